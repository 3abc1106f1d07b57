"""Exporting a trained model out of a checkpoint: plain safetensors with its spec, or a diffusers directory.

The library behind `orch export JOB --format safetensors|diffusers --out DIR`.

    --format safetensors                --format diffusers (pixel space)
    DIR/model.safetensors  weights      DIR/transformer/   DiTTransformer2DModel (config.json, weights)
    DIR/spec.yaml          the spec     DIR/scheduler/     the spec's sampler as a diffusers scheduler
    DIR/README.md          how to load  DIR/spec.yaml, DIR/README.md (with the sampling loop)
    DIR/orch_export.json   provenance   DIR/orch_export.json (provenance, class names)

Why no DiTPipeline (model_index.json) for a pixel-space model: diffusers 0.42's DiTPipeline always
decodes with its VAE (`self.vae.config.scaling_factor`, `self.vae.decode`), so with vae=None it loads
but fails after the last denoising step, and a VAE would be wrong for a model trained on pixels. Its
guidance also hard-codes the null class as 1000 (ImageNet's), which is out of range for any other
class count. So a pixel-space export is the two components diffusers loads offline
(`DiTTransformer2DModel.from_pretrained`, `<Scheduler>.from_pretrained`), with the 15-line sampling
loop written into its README. When the spec gains a latent space (a VAE), the same directory plus
`vae/` and a model_index.json is a DiTPipeline.

Fidelity: diffusers' DiT computes timestep features with `downscale_freq_shift=1`, the official DiT
(ours) with 0 (see model/convert.py). Loaded as is, the exported transformer is close to, not equal
to, the trained model; setting `downscale_freq_shift = 0` on every block's `norm1.emb.time_proj`
(one loop, in the README) makes it compute what the trained model computes, to float rounding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from orchestrator.errors import UserError
from orchestrator.layout import TRAINER_STATE
from orchestrator.specs.job import JobSpec
from orchestrator.trained.sampling import load_model, model_input_of, weights_file

EXPORT_INFO = "orch_export.json"
SAFETENSORS_NAMES = {"model.safetensors", "spec.yaml", "README.md", EXPORT_INFO}
DIFFUSERS_NAMES = {"transformer", "scheduler", "vae", "model_index.json", "spec.yaml", "README.md", EXPORT_INFO}
PIPELINE_NULL_CLASS = (
    1000  # diffusers' DiTPipeline draws its unconditional half with this label (ImageNet's null class)
)
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm_solver++": "DPMSolverMultistepScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
}


class ExportError(UserError):
    """A model that cannot be exported in the asked format, or a folder it cannot be exported into."""


# ---------------------------------------------------------------------------------------------
# safetensors + spec
# ---------------------------------------------------------------------------------------------


def export_safetensors(spec: JobSpec, checkpoint: Path, out_dir: Path, ema: bool = True) -> list[Path]:
    """Write `model.safetensors` (EMA weights unless ema=False), `spec.yaml` and a README on loading them; return the
    paths."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    source = weights_file(checkpoint, ema)
    model = load_model(spec, checkpoint, ema=ema, device="cpu")  # the weights must fit the spec's network
    _prepare(out_dir, SAFETENSORS_NAMES)
    state = load_file(str(source), device="cpu")
    kind = "ema" if ema else "raw"
    weights = out_dir / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "orch.weights": kind, "orch.spec_digest": spec.digest()})
    (out_dir / "spec.yaml").write_text(spec.to_yaml())
    info = _write_info(out_dir, "safetensors", spec, checkpoint, kind, model)
    readme = out_dir / "README.md"
    readme.write_text(_safetensors_readme(spec, kind, model))
    return [weights, out_dir / "spec.yaml", readme, info]


def _safetensors_readme(spec: JobSpec, kind: str, model: torch.nn.Module) -> str:
    c, r = spec.data.num_channels, spec.data.resolution
    unconditional = "" if spec.model.condition == "class" else " (ignored: unconditional)"
    return f"""# {spec.name}: {spec.model.arch} weights exported by orch

- `model.safetensors`: the {"EMA" if kind == "ema" else "raw (not EMA)"} weights, in the official DiT layout
  (`x_embedder.proj`, `t_embedder.mlp`, `y_embedder.embedding_table`, `blocks.N...`, `final_layer...`).
- `spec.yaml`: the resolved job spec they were trained with; it describes the network, the noise
  schedule and the sampler. The model draws {c}-channel {r}x{r} images in [-1, 1] (pixel space),
  class labels 0..{getattr(model, "num_classes", 1) - 1}{unconditional}.

Load and sample with orch's Python API (from an orch checkout, `pip install -e .`):

```python
from pathlib import Path
import yaml
from orchestrator.specs.job import spec_from_dict
from orchestrator.trained.sampling import load_model, sample_images, write_outputs

here = Path(".")  # this folder
spec = spec_from_dict(yaml.safe_load((here / "spec.yaml").read_text()))
model = load_model(spec, here / "model.safetensors")  # eval mode; cuda if visible
images = sample_images(model, spec, labels=[0, 1, 2, 3], seed=0)  # (4, {c}, {r}, {r}) in [-1, 1]
write_outputs(images, [0, 1, 2, 3], Path("samples"), rows=1)
```

Or by hand: `orchestrator.components.model.build_model(spec, orchestrator.trained.sampling.model_input_of(spec, path))`
builds the network and `orchestrator.components.weights.load_weights(model, path)` loads these weights with an exact
key match.
"""


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


def diffusers_problems(spec: JobSpec) -> list[str]:
    """Why the spec's model has no diffusers DiTTransformer2DModel counterpart (empty if it has one)."""
    m = spec.model
    if m.arch != "dit":
        return [f"model.arch is {m.arch!r}: only a DiT converts (export a U-Net with --format safetensors)"]
    wanted = {
        "conditioning": ("adaln_zero", "adaln"),
        "condition": ("class",),
        "ffn": ("mlp",),
        "pos_embed": ("sincos",),
    }
    problems = [
        f"model.{name} is {getattr(m, name)!r} (need {' or '.join(repr(v) for v in ok)})"
        for name, ok in wanted.items()
        if getattr(m, name) not in ok
    ]
    if m.mlp_ratio != 4:
        problems.append(f"model.mlp_ratio is {m.mlp_ratio:g} (diffusers' feed-forward is 4x wide)")
    return problems


def export_diffusers(spec: JobSpec, checkpoint: Path, out_dir: Path, ema: bool = True) -> list[Path]:
    """Write a diffusers directory: a DiTPipeline (transformer/, scheduler/, vae/, model_index.json) for a
    latent model, transformer/ and scheduler/ for a pixel one; with spec.yaml and README.md; return the paths.

    Only a class-conditional adaLN(-Zero) DiT with an MLP feed-forward and sin-cos positions converts;
    anything else is refused with the reasons. See the module docstring for the layout chosen.
    """
    from model.convert import to_diffusers

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    problems = diffusers_problems(spec)
    if problems:
        raise ExportError(
            "only the official DiT layout (class-conditional adaLN-Zero, mlp, sincos, mlp_ratio 4) exports to "
            "diffusers; "
            f"this model has {'; '.join(problems)}. Use --format safetensors"
        )
    weights_file(checkpoint, ema)  # CheckpointNotFound before anything is written
    model = load_model(spec, checkpoint, ema=ema, device="cpu")
    try:
        transformer = to_diffusers(model).eval()
    except ValueError as err:  # the converter's own checks, should the spec check above miss one
        raise ExportError(f"{err}; use --format safetensors") from None

    model_input = model_input_of(spec, checkpoint, ema)
    scheduler = _scheduler(spec, clip=model_input.latent is None)
    kind = "ema" if ema else "raw"
    if model_input.latent is not None and spec.diffusion.objective != "flow":
        return _export_pipeline(spec, checkpoint, out_dir, kind, model, transformer, scheduler, model_input)

    _prepare(out_dir, DIFFUSERS_NAMES)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    written = [out_dir / "transformer", out_dir / "scheduler"]
    if model_input.latent is not None:  # a latent flow model: DiTPipeline cannot step a flow scheduler
        from orchestrator.components.vae import load_vae

        load_vae(model_input.latent.vae).save_pretrained(out_dir / "vae", safe_serialization=True)
        written.append(out_dir / "vae")
    (out_dir / "spec.yaml").write_text(spec.to_yaml())
    info = _write_info(out_dir, "diffusers", spec, checkpoint, kind, model)
    readme = out_dir / "README.md"
    readme.write_text(_diffusers_readme(spec, kind, model, type(scheduler).__name__, model_input))
    return [*written, out_dir / "spec.yaml", readme, info]


def _scheduler(spec: JobSpec, clip: bool):
    """The spec's sampler on the training schedule, configured as orch's own samplers (model/diffusion.py);
    `clip`: pixel space, every x0 estimate clipped to [-1, 1]."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from orchestrator.components.model import make_diffusion

    if spec.diffusion.objective == "flow":  # the flow's ODE scheduler, as model/flow.py samples with it
        from model.flow import flow_scheduler

        return flow_scheduler(make_diffusion(spec), spec.sample.sampler, 1, torch.device("cpu"))
    if spec.diffusion.objective == "continuous":
        return _continuous_scheduler(spec, clip)
    base, sampler = make_diffusion(spec).config, spec.sample.sampler
    if sampler == "ddim":
        return DDIMScheduler.from_config(base, clip_sample=clip, clip_sample_range=1.0)
    if sampler == "ddpm":
        variance = {"variance_type": "learned_range"} if spec.model.learn_sigma else {}
        return DDPMScheduler.from_config(base, clip_sample=clip, clip_sample_range=1.0, **variance)
    return DPMSolverMultistepScheduler.from_config(
        base,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=clip,
        sample_max_value=1.0,
        variance_type=None,
        timestep_spacing=base.timestep_spacing,
        final_sigmas_type="zero",
        lower_order_final=True,
    )


def _continuous_scheduler(spec: JobSpec, clip: bool):
    """A continuous-time VP model as diffusers' DDIM (or DDPM) scheduler: betas chosen so that the table's
    alphas_cumprod[k] is the cosine schedule's alpha(t)^2 at t = k / T exactly, where the network, which sees
    t x T, is asked for timestep k. diffusers then samples the same model on its discrete grid of times."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from model.continuous import ContinuousVP

    d = spec.diffusion
    times = torch.arange(d.num_train_timesteps, dtype=torch.float64) / d.num_train_timesteps
    alpha_bar = ContinuousVP.alpha_sigma(times)[0] ** 2  # alpha_bar[0] = 1
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    kind = DDIMScheduler if spec.sample.sampler == "ddim" else DDPMScheduler
    return kind(
        num_train_timesteps=d.num_train_timesteps,
        trained_betas=betas.tolist(),
        prediction_type=d.prediction,
        clip_sample=clip,
        clip_sample_range=1.0,
    )


def _export_pipeline(
    spec, checkpoint: Path, out_dir: Path, kind: str, model, transformer, scheduler, model_input
) -> list[Path]:
    """A latent DiT as a diffusers DiTPipeline directory (transformer, scheduler, vae, model_index.json).

    DiTPipeline takes label 1000 as the null class of guidance, so the transformer is saved with
    ImageNet's label layout: a 1001-row table whose rows 0..K-1 are the model's classes and whose
    other rows (1000 among them) are its null class; labels K..999 are never drawn.
    """
    from diffusers import DiTPipeline, DiTTransformer2DModel

    from orchestrator.components.vae import load_vae

    k = model.num_classes
    if k > PIPELINE_NULL_CLASS:
        raise ExportError(
            f"the model has {k} classes; diffusers' DiTPipeline takes at most {PIPELINE_NULL_CLASS}. Use --format "
            "safetensors"
        )
    if spec.model.class_dropout == 0:
        raise ExportError(
            "the model has no null class (model.class_dropout: 0), which DiTPipeline's guidance needs; use --format "
            "safetensors"
        )
    padded = DiTTransformer2DModel.from_config({**transformer.config, "num_embeds_ada_norm": PIPELINE_NULL_CLASS})
    state = transformer.state_dict()
    for name, table in list(state.items()):
        if name.endswith("class_embedder.embedding_table.weight"):  # (K + 1, D): classes, then the null row
            rows = table[k].expand(PIPELINE_NULL_CLASS + 1, -1).clone()  # (1001, D), all null
            rows[:k] = table[:k]
            state[name] = rows
    padded.load_state_dict(state, strict=True)
    padded.pos_embed.pos_embed = transformer.pos_embed.pos_embed
    vae = load_vae(model_input.latent.vae)
    names = class_names(spec, k)
    # (class names go to orch_export.json: DiTPipeline does not save its id2label)
    pipeline = DiTPipeline(transformer=padded.eval(), vae=vae, scheduler=scheduler)
    _prepare(out_dir, DIFFUSERS_NAMES)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "spec.yaml").write_text(spec.to_yaml())
    info = _write_info(out_dir, "diffusers", spec, checkpoint, kind, model)
    names_text = f" ({', '.join(names.values())})" if names else ""
    weights_kind = "EMA" if kind == "ema" else "raw"
    readme = out_dir / "README.md"
    readme.write_text(f"""# {spec.name}: a class-conditional latent DiT as a diffusers DiTPipeline, exported by orch

```python
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained(".")
images = pipe(
    class_labels=[0, 1], num_inference_steps={spec.sample.steps}, guidance_scale={spec.sample.guidance_scale}
).images
```

Classes 0..{k - 1}{names_text}; the transformer's label table has ImageNet's 1001 rows
so that DiTPipeline's null class (1000) is this model's null class; labels {k}..999 are the null class too.
The {weights_kind} weights; `scheduler/` is the spec's sampler ({type(scheduler).__name__}); `vae/` decodes the latents.
diffusers computes timestep features with a frequency shift of 1 where the trained model used 0: samples are close to,
not equal to, orch's (see model/convert.py).
""")
    return [
        out_dir / "transformer",
        out_dir / "scheduler",
        out_dir / "vae",
        out_dir / "model_index.json",
        out_dir / "spec.yaml",
        readme,
        info,
    ]


def _scheduler_text(spec: JobSpec, scheduler_class: str) -> str:
    d = spec.diffusion
    if d.objective == "flow":
        return (
            f"a `{scheduler_class}` (rectified flow: the transformer predicts the velocity noise - x0 at timestep "
            f"sigma x {d.num_train_timesteps}, shift {d.shift or 1.0})"
        )
    if d.objective == "continuous":
        return (
            f"a `{scheduler_class}` whose betas put the continuous cosine schedule's alpha(t)^2 at timestep "
            f"t x {d.num_train_timesteps}, the time the transformer was trained at (`{d.prediction}` prediction), "
            "and `clip_sample` to [-1, 1]"
        )
    return (
        f"a `{scheduler_class}` with the training noise schedule ({d.beta_schedule}, {d.num_train_timesteps} steps, "
        f"`{d.prediction}` prediction) and `clip_sample` to [-1, 1]"
    )


def _diffusers_readme(spec: JobSpec, kind: str, model: torch.nn.Module, scheduler_class: str, model_input) -> str:
    """The README of a transformer + scheduler export, with the sampling loop that is its pipeline; latent (flow)
    models also get `vae/` and the decode."""
    c, r, k = model_input.shape[0], model_input.shape[1], model.num_classes
    latent = model_input.latent
    s = spec.sample
    guided = spec.model.class_dropout > 0
    step_args = ", generator=generator" if scheduler_class == "DDPMScheduler" else ""
    guidance_note = (
        f"; label {k} is the null class of classifier-free guidance"
        if guided
        else "; no null class (trained without label dropout): no guidance"
    )
    return f"""# {spec.name}: a class-conditional DiT for diffusers, exported by orch

- `transformer/`: a `DiTTransformer2DModel` with the {"EMA" if kind == "ema" else "raw (not EMA)"} weights;
  {k} classes (labels 0..{k - 1}, class names in `orch_export.json`){guidance_note}.
- `scheduler/`: {_scheduler_text(spec, scheduler_class)}.
- `spec.yaml`: the orch job spec it was trained with.

{_space_text(c, r, latent)}

```python
import torch
from diffusers import {"AutoencoderKL, " if latent else ""}DiTTransformer2DModel, {scheduler_class}

transformer = DiTTransformer2DModel.from_pretrained("transformer").eval()
scheduler = {scheduler_class}.from_pretrained("scheduler")
for block in transformer.transformer_blocks:  # the official DiT timestep frequencies it was trained with
    block.norm1.emb.time_proj.downscale_freq_shift = 0  # (diffusers' default 1 gives close, not equal, outputs)

labels, guidance = torch.tensor([0, 1, 2, 3]), {s.guidance_scale if guided else 1.0}
generator = torch.Generator().manual_seed(0)
x = torch.randn(len(labels), {c}, {r}, {r}, generator=generator)
scheduler.set_timesteps({s.steps})
with torch.no_grad():
    for t in scheduler.timesteps:
        y = torch.cat([labels, torch.full_like(labels, {k})]) if guidance != 1 else labels
        x_in = torch.cat([x, x]) if guidance != 1 else x
        out = transformer(x_in, timestep=t.expand(len(x_in)), class_labels=y).sample[:, :{c}]
        if guidance != 1:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x{step_args}).prev_sample
{_output_text(c, r, latent)}
```
"""


def _space_text(c: int, r: int, latent) -> str:
    if latent is None:
        return f"""The model works in **pixel space**: it denoises {c}-channel {r}x{r} images in [-1, 1] directly, with
no VAE. diffusers' `DiTPipeline` always decodes its output with a VAE and takes the null class to be
1000, so it cannot run this model; the loop below is the whole pipeline:"""
    return f"""The model works in the **latent space** of `vae/` ({latent.vae}): it denoises {c}x{r}x{r} latents scaled
by {latent.scaling_factor}. diffusers' `DiTPipeline` steps DDPM-style schedulers only (it calls
`scale_model_input`, which the flow schedulers lack), so the loop below is the whole pipeline:"""


def _output_text(c: int, r: int, latent) -> str:
    if latent is None:
        return f"images = (x.clamp(-1, 1) + 1) / 2  # (4, {c}, {r}, {r}) in [0, 1]"
    return f"""vae = AutoencoderKL.from_pretrained("vae").eval()
with torch.no_grad():
    images = vae.decode(x / {latent.scaling_factor}).sample
images = (images.clamp(-1, 1) + 1) / 2  # (4, 3, H, W) in [0, 1]"""


# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------


def _prepare(out_dir: Path, names: set[str]) -> None:
    """Create out_dir, refusing one that holds anything but an earlier export of the same format."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} is a file; give a folder to export into")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in names)
        if foreign:
            listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ExportError(f"{out_dir} already holds other files ({listed}); export into a new or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create {out_dir}: {err.strerror}") from None


def class_names(spec: JobSpec, num_classes: int) -> dict[str, str] | None:
    """{label: name} from the data source (the digits' names, an image folder's sub-folders), or None if unknown
    here."""
    if spec.model.condition != "class":
        return None
    if spec.data.source == "digits":
        names = [str(i) for i in range(10)]
    elif spec.data.latent:
        from orchestrator.data.shardformat import DatasetIndex

        try:
            names = DatasetIndex.read(Path(spec.data.path)).class_names or []
        except ValueError:  # the data is not here: the export goes on without names
            return None
    else:
        root = Path(spec.data.path or "")
        if not root.is_dir():
            return None
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {str(i): name for i, name in enumerate(names)} if len(names) == num_classes else None


def _write_info(out_dir: Path, fmt: str, spec: JobSpec, checkpoint: Path, kind: str, model: torch.nn.Module) -> Path:
    """orch_export.json: what was exported, from where, and the class names when they are known."""
    num_classes = getattr(model, "num_classes", None) or 1
    step = None
    state_file = checkpoint / TRAINER_STATE if checkpoint.is_dir() else None
    if state_file is not None and state_file.is_file():
        step = json.loads(state_file.read_text()).get("step")
    info = {
        "format": fmt,
        "weights": kind,
        "source": str(checkpoint.resolve()),
        "step": step,
        "spec_digest": spec.digest(),
        "pixel_space": not spec.data.latent,
        "image_shape": [spec.data.num_channels, spec.data.resolution, spec.data.resolution]
        if not spec.data.latent
        else [3, spec.data.resolution, spec.data.resolution],
        "num_classes": num_classes if spec.model.condition == "class" else None,
        "null_class": num_classes if spec.model.condition == "class" and spec.model.class_dropout > 0 else None,
        "id2label": class_names(spec, num_classes),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out_dir / EXPORT_INFO
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path

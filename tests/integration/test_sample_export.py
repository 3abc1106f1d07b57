"""Sampling from and exporting a job trained through the real `orch` command (orchestrator.trained.sampling,
orchestrator.trained.export)."""

import json
import re
import shutil

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DiTTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

import model.diffusion as diffusion_math
from orchestrator.components.model import build_model, make_diffusion
from orchestrator.components.model_input import pixel_input
from orchestrator.errors import UserError
from orchestrator.jobs.directory import JobDir
from orchestrator.specs.job import replace, spec_from_dict
from orchestrator.trained.export import ExportError, export_diffusers, export_safetensors
from orchestrator.trained.sampling import (
    CheckpointNotFound,
    SamplingError,
    WeightsMismatch,
    load_model,
    load_weights,
    num_classes_of,
    progression_frames,
    progression_strip,
    resolve_checkpoint,
    sample_images,
    write_outputs,
)
from tests.helpers import log_text, only_job, orch, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny class-conditional DiT on the digits (10 classes, class_dropout 0.1), trained 2 steps by `orch submit`."""
    tmp = tmp_path_factory.mktemp("job")
    root = tmp / "runs"
    result = orch("submit", str(tiny_spec(tmp)), "--set", "train.steps=2", root=root)
    job_dir = only_job(root)
    assert result.returncode == 0, result.stderr + log_text(job_dir)
    return root, job_dir


@pytest.fixture(scope="module")
def loaded(job):
    root, job_dir = job
    spec, checkpoint = resolve_checkpoint(job_dir.name[:10], root)
    return spec, checkpoint, load_model(spec, checkpoint)


def noisy_checkpoint(checkpoint, target):
    """A copy of a checkpoint whose EMA weights are randomised: a 2-step model's outputs are ~0, which would compare
    equal to anything."""
    shutil.copytree(checkpoint, target)
    generator = torch.Generator().manual_seed(3)
    weights = load_file(target / "ema.safetensors")
    for name, tensor in weights.items():
        if name != "pos_embed":  # fixed sin-cos, which diffusers recomputes on load
            weights[name] = tensor + 0.2 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, str(target / "ema.safetensors"))
    return target


def python_block(readme_text: str) -> str:
    return re.search(r"```python\n(.*?)```", readme_text, re.S).group(1)


# ---- finding and loading -------------------------------------------------------------------


def test_a_job_id_prefix_a_job_dir_and_a_checkpoint_dir_resolve_to_the_newest_checkpoint(job, tmp_path):
    root, job_dir = job
    newest = job_dir / "checkpoints" / "step-0000002"
    for ref in (job_dir.name, job_dir.name[:6], str(job_dir), str(newest)):
        spec, checkpoint = resolve_checkpoint(ref, root)
        assert checkpoint.resolve() == newest.resolve() and spec.train.steps == 2, ref

    empty = JobDir.create(tmp_path / "runs", "empty-1", "empty", (job_dir / "spec.yaml").read_text(), total_steps=2)
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint yet.*orch resume"):
        resolve_checkpoint(empty.id, tmp_path / "runs")
    with pytest.raises(CheckpointNotFound, match="neither a job directory"):
        resolve_checkpoint(str(tmp_path), root)
    with pytest.raises(UserError, match="no job"):
        resolve_checkpoint("no-such-job", root)


def test_load_model_takes_the_ema_weights_by_default_and_the_raw_ones_on_request(loaded):
    spec, checkpoint, ema_model = loaded
    raw_model = load_model(spec, checkpoint, ema=False)
    assert not ema_model.training and not raw_model.training
    assert num_classes_of(ema_model) == 10  # read from the label table (11 rows, one null), not from the data
    ema_state, raw_state = ema_model.state_dict(), raw_model.state_dict()
    assert all(torch.equal(ema_state[k], v) for k, v in load_file(checkpoint / "ema.safetensors").items())
    assert not all(torch.equal(ema_state[k], raw_state[k]) for k in ema_state), "EMA and raw weights are the same"


def test_load_weights_into_a_mismatched_model_lists_the_keys_instead_of_a_traceback(loaded):
    spec, checkpoint, _ = loaded
    deeper = build_model(replace(spec, "model.depth", 3), pixel_input(spec, 10))
    with pytest.raises(WeightsMismatch, match=r"keys 10 missing \(blocks\.2\.") as caught:
        load_weights(deeper, checkpoint / "ema.safetensors")
    assert isinstance(caught.value, UserError)
    shallower = build_model(replace(spec, "model.depth", 1), pixel_input(spec, 10))
    with pytest.raises(WeightsMismatch, match=r"10 unexpected \(blocks\.1\."):
        load_weights(shallower, checkpoint / "ema.safetensors")


# ---- drawing -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, guidance", [("ddim", 1.0), ("ddpm", 3.0)])
def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(loaded, sampler, guidance):
    spec, _, model = loaded
    labels = [c for c in range(10) for _ in range(2)]  # 20 images
    settings = dict(sampler=sampler, steps=5, guidance=guidance)
    first = sample_images(model, spec, labels, seed=1, **settings)
    assert first.shape == (20, 1, 8, 8) and first.abs().max() <= 1
    assert torch.equal(first, sample_images(model, spec, labels, seed=1, **settings))
    assert torch.equal(first, sample_images(model, spec, labels, seed=1, batch_size=3, **settings))
    # image i depends on (seed, i) only
    assert torch.equal(first[:5], sample_images(model, spec, labels[:5], seed=1, **settings))
    assert not torch.equal(first, sample_images(model, spec, labels, seed=2, **settings))


def test_progress_counts_the_steps_of_every_batch(loaded):
    spec, _, model = loaded
    seen = []
    sample_images(
        model, spec, [0, 1, 2, 3, 4], steps=4, batch_size=2, progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(i, 12) for i in range(1, 13)]  # 3 batches x 4 steps


def test_settings_the_model_cannot_honour_are_user_errors(loaded):
    spec, _, model = loaded
    with pytest.raises(SamplingError, match="out of range.*0..9"):
        sample_images(model, spec, [3, 10])
    with pytest.raises(SamplingError, match="steps must be between 1 and"):
        sample_images(model, spec, [3], steps=1000)
    no_null_class = replace(spec, "model.class_dropout", 0.0)
    with pytest.raises(SamplingError, match="guidance 4.0 needs"):
        sample_images(model, no_null_class, [3], guidance=4.0)


def test_write_outputs_writes_one_png_per_image_and_a_grid(loaded, tmp_path):
    spec, _, model = loaded
    labels = [0, 0, 0, 7, 7, 7]
    images = sample_images(model, spec, labels, seed=0)
    written = write_outputs(images, labels, tmp_path / "out", rows=2)
    names = [p.name for p in written]
    assert names == [
        "0000_class0.png",
        "0001_class0.png",
        "0002_class0.png",
        "0003_class7.png",
        "0004_class7.png",
        "0005_class7.png",
        "grid.png",
    ]
    assert Image.open(written[0]).size == (8, 8) and Image.open(written[-1]).size[0] >= 512


def test_the_progression_ends_with_the_sample_itself(loaded):
    spec, _, model = loaded
    frames = progression_frames(model, spec, [1, 2], sampler="ddim", steps=5, seed=4, frames=4)
    assert frames.shape == (2, 4, 1, 8, 8)
    assert torch.equal(frames[:, -1], sample_images(model, spec, [1, 2], sampler="ddim", steps=5, seed=4))
    assert progression_strip(model, spec, [1, 2], steps=5, frames=4).size[0] >= 512


# ---- export --------------------------------------------------------------------------------


def test_export_safetensors_round_trips_the_ema_weights(loaded, tmp_path, monkeypatch):
    spec, checkpoint, _ = loaded
    out = tmp_path / "export"
    export_safetensors(spec, checkpoint, out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "spec.yaml", "README.md", "orch_export.json"}
    rebuilt = build_model(spec, pixel_input(spec, 10))
    load_weights(rebuilt, out / "model.safetensors")
    ema = load_file(checkpoint / "ema.safetensors")
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in ema.items())
    assert yaml.safe_load((out / "spec.yaml").read_text()) == spec.to_dict()
    monkeypatch.chdir(out)  # the README's own example runs as written
    exec(python_block((out / "README.md").read_text()), {})
    assert len(list((out / "samples").glob("*.png"))) == 5
    shutil.rmtree(out / "samples")

    export_safetensors(spec, checkpoint, out, ema=False)  # an earlier export may be overwritten ...
    raw = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(load_file(out / "model.safetensors")[k], v) for k, v in raw.items())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="other files"):  # ... anything else is not
        export_safetensors(spec, checkpoint, out)


def test_export_refuses_a_checkpoint_without_the_weights_it_needs(loaded, tmp_path):
    spec, checkpoint, _ = loaded
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(checkpoint / "spec.yaml", partial)
    shutil.copy(checkpoint / "model.safetensors", partial)
    for export in (export_safetensors, export_diffusers):
        with pytest.raises(CheckpointNotFound, match="no ema.safetensors.*--no-ema"):
            export(spec, partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_diffusers_refuses_what_diffusers_cannot_express(loaded, tmp_path):
    spec, checkpoint, _ = loaded
    with pytest.raises(ExportError, match="model.ffn is 'conv'.*--format safetensors"):
        export_diffusers(replace(spec, "model.ffn", "conv"), checkpoint, tmp_path / "out")


def test_export_diffusers_loads_in_diffusers_and_samples_as_our_model(loaded, tmp_path, monkeypatch):
    spec, checkpoint, _ = loaded
    noisy = noisy_checkpoint(checkpoint, tmp_path / "noisy")
    ours = load_model(spec, noisy)
    out = tmp_path / "diffusers"
    export_diffusers(spec, noisy, out)
    assert json.loads((out / "orch_export.json").read_text())["id2label"]["7"] == "7"

    transformer = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.clip_sample and transformer.config.num_embeds_ada_norm == 10

    # One step: diffusers' timestep features (downscale_freq_shift=1) differ from the official ones (0),
    # so as loaded it is only close; with the shift the README sets, it computes what our model computes.
    generator = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(4, 1, 8, 8, generator=generator), torch.tensor([0, 10, 50, 99]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        expected = ours(x, t, y)
        as_loaded = transformer(x, timestep=t, class_labels=y).sample
        for block in transformer.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        patched = transformer(x, timestep=t, class_labels=y).sample
    assert expected.abs().mean() > 0.1, "the outputs are too small for the comparison to mean anything"
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(as_loaded, expected, atol=1e-4), (
        "diffusers' timestep features now match: drop the patch from the README"
    )

    # Five DDIM steps with diffusers' scheduler, through the README's loop as written, with and
    # without guidance: the same images as orch's sampler from the same noise.
    monkeypatch.chdir(out)
    code = python_block((out / "README.md").read_text())
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # the README's noise
    for guidance in (1.0, 4.0):
        scope = {}
        exec(re.sub(r"(labels, guidance = .*), [\d.]+\n", rf"\1, {guidance}\n", code), scope)
        assert scope["guidance"] == guidance and len(scope["scheduler"].timesteps) == spec.sample.steps == 5
        reference = diffusion_math.sample(
            ours,
            torch.tensor([0, 1, 2, 3]),
            (1, 8, 8),
            make_diffusion(spec),
            sampler="ddim",
            num_steps=5,
            guidance_scale=guidance,
            null_label=10,
            noise=noise,
            clip_denoised=True,
        )
        torch.testing.assert_close(scope["x"].clamp(-1, 1), reference, atol=1e-4, rtol=1e-4)


def test_a_flow_matching_model_exports_a_flow_scheduler_and_samples_in_diffusers_as_in_orch(
    loaded, tmp_path, monkeypatch
):
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec, checkpoint, _ = loaded
    raw = spec.to_dict()
    raw["diffusion"] |= {"objective": "flow", "beta_schedule": "linear", "shift": 2.0}
    raw["sample"]["sampler"] = "euler"
    flow_spec = spec_from_dict(raw)
    noisy = noisy_checkpoint(checkpoint, tmp_path / "noisy")
    ours = load_model(flow_spec, noisy)
    out = tmp_path / "diffusers"
    export_diffusers(flow_spec, noisy, out)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.shift == 2.0 and scheduler.config.num_train_timesteps == 100
    assert "velocity" in (out / "README.md").read_text()

    monkeypatch.chdir(out)
    code = python_block((out / "README.md").read_text())
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # the README's noise
    for guidance in (1.0, 3.0):
        scope = {}
        exec(re.sub(r"(labels, guidance = .*), [\d.]+\n", rf"\1, {guidance}\n", code), scope)
        reference = diffusion_math.sample(
            ours,
            torch.tensor([0, 1, 2, 3]),
            (1, 8, 8),
            make_diffusion(flow_spec),
            sampler="euler",
            num_steps=5,
            guidance_scale=guidance,
            null_label=10,
            noise=noise,
            clip_denoised=True,  # pixel space, as orch samples it
        )
        assert reference.std() > 0.1
        torch.testing.assert_close(scope["x"].clamp(-1, 1), reference, atol=1e-4, rtol=1e-4)


def test_a_continuous_time_model_exports_a_ddim_scheduler_on_its_own_schedule(loaded, tmp_path):
    from model.continuous import ContinuousVP

    spec, checkpoint, _ = loaded
    raw = spec.to_dict()
    raw["diffusion"] |= {"objective": "continuous", "beta_schedule": "linear", "prediction": "v_prediction"}
    continuous_spec = spec_from_dict(raw)
    noisy = noisy_checkpoint(checkpoint, tmp_path / "noisy")
    ours = load_model(continuous_spec, noisy)
    out = tmp_path / "diffusers"
    export_diffusers(continuous_spec, noisy, out)
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    k = torch.arange(100)
    alpha, _ = ContinuousVP.alpha_sigma(k / 100)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), alpha**2, rtol=1e-5, atol=1e-7)

    # One DDIM step of the exported pair, from timestep 60 to 40, is the step orch's continuous DDIM takes from
    # t = 0.6 to 0.4 with the same network: the scheduler's table and the network's time scale agree.
    transformer = DiTTransformer2DModel.from_pretrained(out / "transformer").eval()
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official DiT frequencies (the README's patch)
    # (without clipping: diffusers' DDIM clips x0 and keeps its eps, orch's recomputes eps from the clipped x0)
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler", clip_sample=False)
    scheduler.set_timesteps(5)  # leading spacing on 100 steps: 80, 60, 40, 20, 0
    assert scheduler.timesteps.tolist() == [80, 60, 40, 20, 0]
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    with torch.no_grad():
        step = scheduler.step(transformer(x, timestep=torch.tensor([60, 60]), class_labels=y).sample, 60, x)
        process = ContinuousVP(prediction="v_prediction")
        (a_t, s_t), (a_s, s_s) = (
            ContinuousVP.alpha_sigma(torch.tensor(0.6)),
            ContinuousVP.alpha_sigma(torch.tensor(0.4)),
        )
        x0, eps = process.predict_x0_eps(ours(x, torch.tensor([60.0, 60.0]), y).double(), x.double(), a_t, s_t)
        expected = a_s * x0 + s_s * eps
    torch.testing.assert_close(step.prev_sample.double(), expected, atol=1e-4, rtol=1e-4)

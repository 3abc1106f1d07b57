"""Throughput of `orch prepare`: images/s from JPEG files on disk to latent shards, on this machine.

    .venv/bin/python bench/prepare_throughput.py [--images 128] [--sd-images 8] [--device auto]

Two VAEs, both randomly initialised (the work does not depend on the weights; nothing is downloaded):
- tiny: 2 levels of 8/16 channels at 256 px, so the figure is the pipeline around the VAE (JPEG decode,
  ADM centre crop, batching, tar writing with fsync) more than the network;
- SD: the architecture of stabilityai/sd-vae-ft-mse (4 levels of 128/256/512/512 channels, 2 ResNet
  blocks each) at 256 px, what a DiT-XL/2 run at 256 px prepares its data with (32x32x4 latents).
The inputs are 512x384 JPEGs of noise (decoding noise costs about what decoding photos costs). Each
figure is one `prepare()` call (one rank) after a warm-up call, without its model load (printed apart).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import cores, cpu_name  # noqa: E402  (bench/machine.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = cores()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

from orchestrator.prepare import load_encoders, prepare, resolve_device  # noqa: E402
from orchestrator.specs.prepare import load_prepare_spec  # noqa: E402

RESOLUTION = 256
VAES = {
    # attention over 128x128 positions would dominate
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
    "SD (sd-vae-ft-mse architecture)": dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32
    ),
}


def make_vae(folder: Path, layout: dict) -> Path:
    levels = len(layout["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        sample_size=RESOLUTION,
        **layout,
    )
    vae.save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / "all").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(
            folder / "all" / f"{i:05d}.jpg", quality=90
        )
    return folder


def write_spec(work: Path, images: Path, vae: Path, out: str, device: str, batch: int) -> Path:
    spec_file = work / f"{out}.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "kind": "prepare",
                "input": {"source": "image_folder", "path": str(images)},
                "image": {"resolution": RESOLUTION},
                "vae": {"name": str(vae)},
                "output": {"path": str(work / out), "shard_size": 64},
                "resources": {"device": device, "batch_size": batch, "workers": max(2, THREADS)},
            }
        )
    )
    return spec_file


def run(tmp: Path, name: str, layout: dict, count: int, device: str, batch: int) -> None:
    work = tmp / name.split()[0]
    vae = make_vae(work / "vae", layout)
    images = make_images(work / "images", count)
    prepare(
        load_prepare_spec(write_spec(work, make_images(work / "warm-up", batch), vae, "warm-up-out", device, batch))
    )  # first-call costs
    spec = load_prepare_spec(write_spec(work, images, vae, "out", device, batch))
    start = time.perf_counter()
    load_encoders(spec, resolve_device(spec.resources.device, 0), captions=False)
    load_seconds = time.perf_counter() - start  # what each prepare() call (each rank) pays once
    result = prepare(spec)
    assert result.samples == count and result.index is not None, result
    params = sum(p.numel() for p in AutoencoderKL.from_pretrained(vae).encoder.parameters()) / 1e6
    print(
        f"{name}: encoder {params:.2f} M params, {count} images (512x384 JPEG) at {RESOLUTION} px, batch {batch}, on "
        f"{result.device}: "
        f"{count / (result.seconds - load_seconds):.2f} images/s "
        f"({result.seconds:.1f} s for the prepare() call, of which {load_seconds:.1f} s loading the VAE)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images for the tiny VAE")
    parser.add_argument("--sd-images", type=int, default=8, help="images for the SD-sized VAE (0 skips it)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(
        f"machine: {platform.node()}, {cpu_name()}, {THREADS} cores ({torch.get_num_threads()} torch threads), "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), "tiny", VAES["tiny"], args.images, args.device, args.batch)
        if args.sd_images:
            run(
                Path(tmp),
                "SD (sd-vae-ft-mse architecture)",
                VAES["SD (sd-vae-ft-mse architecture)"],
                args.sd_images,
                args.device,
                args.batch,
            )


if __name__ == "__main__":
    main()

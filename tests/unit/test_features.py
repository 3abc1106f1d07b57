"""The pretrained feature networks of the metrics (orchestrator/evaluation/features.py) and where their weights are
looked for (weights.py).

Tests cannot download the real weights, so they run the real architectures with weights written here under the
names orch looks for: torch-fidelity's Inception-v3 with random weights, and a tiny DINOv2 saved as Hugging Face's
save_pretrained writes facebook/dinov2-large.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.components.device import use_tf32
from orchestrator.components.images import to_uint8
from orchestrator.errors import UserError
from orchestrator.evaluation.features import (
    load_feature_network,
    quantise_like_png,
    resize_like_pil_bicubic,
)
from orchestrator.evaluation.weights import (
    DINOV2,
    INCEPTION,
    METRIC_NETWORK,
    default_weights_dir,
    missing_weights_message,
    weights_path,
)
from tests.helpers import DINOV2_HIDDEN, write_feature_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return write_feature_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def networks(weights_dir):
    return {name: load_feature_network(name, weights_dir) for name in ("inception", "dinov2")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Six RGB images, 16x16, in [-1, 1]."""
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("name, dim", [("inception", 2048), ("dinov2", DINOV2_HIDDEN)])
def test_features_are_one_float64_row_of_the_networks_width_per_image(networks, images, name, dim):
    network = networks[name]
    assert network.network == name and network.dim == dim
    assert not network.module.training and not any(p.requires_grad for p in network.module.parameters())
    features = network.features(images)
    assert features.shape == (len(images), dim) and features.dtype == np.float64
    assert np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])  # different images, different features
    assert network.features(images[:0]).shape == (0, dim)


@pytest.mark.parametrize("name", ["inception", "dinov2"])
def test_features_do_not_depend_on_the_batch_size(networks, images, name):
    whole = networks[name].features(images, batch_size=len(images))
    one_by_one = networks[name].features(images, batch_size=1)
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["inception", "dinov2"])
def test_grey_images_give_the_features_of_their_rgb_repetition(networks, images, name):
    grey = images[:3, :1]
    assert np.array_equal(networks[name].features(grey), networks[name].features(grey.repeat(1, 3, 1, 1)))


@pytest.mark.parametrize("name", ["inception", "dinov2"])
def test_samples_in_memory_give_the_features_of_the_same_samples_saved_as_png(networks, images, name, tmp_path):
    assert np.array_equal(quantise_like_png(images).permute(0, 2, 3, 1).numpy(), to_uint8(images))
    reloaded = []
    for i, pixels in enumerate(to_uint8(images)):  # as `orch sample` writes them
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        array = np.asarray(Image.open(tmp_path / f"{i}.png"), dtype=np.float32) / 127.5 - 1  # as the loader reads
        reloaded.append(torch.from_numpy(array).permute(2, 0, 1))
    assert np.array_equal(networks[name].features(torch.stack(reloaded)), networks[name].features(images))


@pytest.mark.parametrize("side", [64, 256])
def test_dinov2_resize_reproduces_pils_bicubic_resize_of_dgm_eval(side):
    generator = np.random.default_rng(side)
    line = np.linspace(0, 1, side)
    phase = generator.uniform(0, 6, size=(2, 1, 1, 3))
    smooth = np.sin(5 * line[None, :, None, None] + 3 * line[None, None, :, None] + phase) * 100 + 128
    noise = generator.integers(0, 256, size=(2, side, side, 3))
    pixels = np.concatenate([smooth, noise]).clip(0, 255).astype(np.uint8)  # (4, side, side, 3)
    by_pil = np.stack([np.asarray(Image.fromarray(p).resize((224, 224), Image.BICUBIC)) for p in pixels])
    ours = resize_like_pil_bicubic(torch.from_numpy(pixels).permute(0, 3, 1, 2), 224).permute(0, 2, 3, 1).numpy()
    difference = np.abs(ours - by_pil.astype(np.float32))
    assert difference.max() <= 2  # PIL's fixed-point filter weights round a few values the other way
    assert (difference > 0).mean() < 0.1


@pytest.mark.parametrize("name", ["inception", "dinov2"])
def test_missing_weights_are_a_user_error_naming_the_path_the_source_and_the_fetch_command(tmp_path, name):
    path = weights_path(name, tmp_path)
    expected_command = {
        "inception": f"curl -L --create-dirs -o {path} {INCEPTION.source}",
        "dinov2": f"hf download facebook/dinov2-large --local-dir {path}",
    }[name]
    with pytest.raises(UserError) as raised:
        load_feature_network(name, tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    for part in (name, str(path), {"inception": INCEPTION, "dinov2": DINOV2}[name].source, expected_command):
        assert part in message
    assert "eval.weights_dir" in message and "$ORCH_WEIGHTS" in message


def test_a_dinov2_directory_without_its_weights_file_counts_as_missing(tmp_path):
    folder = weights_path("dinov2", tmp_path)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert "model.safetensors" in missing_weights_message("dinov2", tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert missing_weights_message("dinov2", tmp_path) is None


def test_a_weights_file_that_does_not_load_is_a_user_error_with_the_fetch_command(tmp_path):
    path = weights_path("inception", tmp_path)
    path.write_bytes(b"an interrupted download")
    with pytest.raises(UserError, match="do not load") as raised:
        load_feature_network("inception", tmp_path)
    assert f"curl -L --create-dirs -o {path} {INCEPTION.source}" in str(raised.value)


def test_weights_are_looked_for_under_orch_weights_else_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCH_WEIGHTS", raising=False)
    monkeypatch.setenv("ORCH_CACHE", str(tmp_path / "cache"))
    assert default_weights_dir() == tmp_path / "cache" / "weights"
    assert weights_path("inception", None) == tmp_path / "cache" / "weights" / INCEPTION.local_name
    monkeypatch.setenv("ORCH_WEIGHTS", str(tmp_path / "elsewhere"))
    assert weights_path("dinov2", None) == tmp_path / "elsewhere" / "dinov2-large"
    assert set(METRIC_NETWORK.values()) == {"inception", "dinov2"}
    with pytest.raises(ValueError, match="unknown feature network"):
        weights_path("clip", tmp_path)


def test_the_weights_registry_imports_no_torch():
    check = "import sys, orchestrator.evaluation.weights; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


def test_features_are_computed_in_full_fp32_and_leave_a_jobs_tf32_setting_as_it_was(networks, images, monkeypatch):
    network = networks["dinov2"]
    embed, seen = network.embed, []

    def recording_embed(pixels):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return embed(pixels)

    monkeypatch.setattr(network, "embed", recording_embed)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        use_tf32(True)  # as a training job with resources.tf32 sets it
        network.features(images[:2])
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

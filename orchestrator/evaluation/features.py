"""The pretrained feature networks of the sample-quality metrics: Inception-v3 (FID, KID, precision and recall) and
DINOv2 ViT-L/14 (FD-DINOv2), each turning images in [-1, 1] into float64 feature rows for metrics.py.

Every image is first quantised to 8 bits exactly as saving it as a PNG does (components/images.to_uint8), as the
ADM evaluation suite (Dhariwal & Nichol 2021) reads samples from saved uint8 arrays: features of samples in memory
and of the same samples written to disk are then the same. From the 8-bit pixels:

- Inception: torch-fidelity's port of the TensorFlow FID network and its resize (its input is uint8 at any size), the
  2048 pool features; the network FID, KID and precision/recall are defined on.
- DINOv2: the preprocessing of Stein et al. 2023 (dgm-eval), which resizes the 8-bit image with PIL's bicubic filter
  to 224x224, scales it to [0, 1] and normalises it with the ImageNet mean and deviation; the feature is the class
  token after the final layer norm (Hugging Face's pooler_output, DINOv2's own x_norm_clstoken). PIL's resize is
  reproduced on tensors (bicubic with antialiasing, horizontally then vertically, rounding to 8 bits after each
  pass as PIL does), so that it runs on the accelerator.

Both run in full fp32 (no TF32, whatever a training job set), so an image's features do not depend on the job that
computes them. Weights are never downloaded here: weights.py says where they are looked for and how to fetch them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import UserError
from orchestrator.evaluation.weights import missing_weights_message, network_weights, weights_path

TORCH_FIDELITY_REQUIREMENT = "torch-fidelity==0.4.0"
INCEPTION_DIM = 2048
DINOV2_SIDE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def quantise_like_png(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 of the same shape, the pixels a saved PNG holds (as components/images.py
    writes them), on the images' device."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureNetwork:
    """A pretrained network that maps images to feature rows; `dim` features per image."""

    def __init__(self, network: str, module: nn.Module, dim: int):
        self.network = network
        self.module = module
        self.dim = dim

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Features (N, dim) float64 of images (N, C, H, W) in [-1, 1], C 1 (grey, read as RGB) or 3, computed on the
        network's device `batch_size` images at a time, in full fp32 (no TF32)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float64)
        rows = []
        with strict_fp32():
            for chunk in images.split(batch_size):
                pixels = quantise_like_png(chunk.to(self.device))
                if pixels.shape[1] == 1:
                    pixels = pixels.repeat(1, 3, 1, 1)
                rows.append(self.embed(pixels).double().cpu())
        return torch.cat(rows).numpy()

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features (B, dim) of uint8 RGB pixels (B, 3, H, W) on the network's device."""
        raise NotImplementedError


@contextmanager
def strict_fp32() -> Iterator[None]:
    """Matmuls and cuDNN convolutions in full fp32 inside, whatever a training job set (resources.tf32): the features
    of an image do not depend on the job that computes them."""
    matmul, convolution = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, convolution


class InceptionFeatures(FeatureNetwork):
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        (pool_features,) = self.module(pixels)  # torch-fidelity resizes to 299x299 itself
        return pool_features


class DinoV2Features(FeatureNetwork):
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=dinov2_input(pixels)).pooler_output


def resize_like_pil_bicubic(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, side, side) holding whole numbers in 0..255: PIL's BICUBIC resize, which
    resamples the width first and the height second and stores 8 bits after each pass."""
    x = pixels.float()
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(x.shape[-2], side), mode="bicubic", antialias=True).round().clamp(0, 255)
    if x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True).round().clamp(0, 255)
    return x


def dinov2_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> DINOv2's input: resized to 224x224, in [0, 1], normalised with ImageNet's mean/std."""
    x = resize_like_pil_bicubic(pixels, DINOV2_SIDE) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def inception_extractor_class() -> type[nn.Module]:
    """torch-fidelity's FeatureExtractorInceptionV3, importable without torchvision."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or built for another torch (which raises RuntimeError)
        import_package_without_init("torch_fidelity")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise UserError(
            f"the Inception feature network needs torch-fidelity ({error}): "
            f"pip install --no-deps {TORCH_FIDELITY_REQUIREMENT}"
        ) from None
    return FeatureExtractorInceptionV3


def import_package_without_init(name: str) -> None:
    """Registers package `name` so that its submodules import without its __init__ running."""
    # torch-fidelity's __init__ imports its CLIP and VGG extractors, which need torchvision; its Inception does not
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import that follows says so
    package = importlib.util.module_from_spec(spec)  # a bare module whose __path__ is the package's folder
    sys.modules[name] = package


def load_feature_network(
    network: str, weights_dir: Path | None = None, device: torch.device | str = "cpu"
) -> FeatureNetwork:
    """The network ("inception" or "dinov2") with its weights from `weights_dir` (None: weights.default_weights_dir),
    on `device`, in eval mode without gradients. UserError when the weights are missing or do not load."""
    message = missing_weights_message(network, weights_dir)
    if message is not None:
        raise UserError(message)
    path = weights_path(network, weights_dir)
    try:
        if network == "inception":
            extractor_class = inception_extractor_class()
            module = extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
            feature_network = InceptionFeatures(network, module, INCEPTION_DIM)
        else:
            from transformers import Dinov2Model

            module = Dinov2Model.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
            feature_network = DinoV2Features(network, module, module.config.hidden_size)
    except UserError:
        raise
    except Exception as error:  # a truncated download, another network's file
        fetch = network_weights(network).fetch_command(path)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(
            f"the {network} feature network's weights at {path} do not load ({type(error).__name__}: {first_line}); "
            f"fetch them again on a machine that is online with `{fetch}`"
        ) from None
    feature_network.module.to(device).eval().requires_grad_(False)
    return feature_network

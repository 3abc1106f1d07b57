"""Where the feature networks of the sample-quality metrics keep their weights, and what to say when they are absent.

Two pretrained networks define the metrics orch reports on photographs:

- "inception": Inception-v3 with the TensorFlow weights of 2015-12-05 that FID (Heusel et al. 2017), KID
  (Binkowski et al. 2018) and improved precision and recall (Kynkäänniemi et al. 2019) are defined by, in
  torch-fidelity's PyTorch conversion: one file.
- "dinov2": DINOv2 ViT-L/14 (Oquab et al. 2023), whose features FD-DINOv2 (Stein et al. 2023) compares: the
  Hugging Face repository facebook/dinov2-large as `save_pretrained` writes it, one directory.

orch never downloads them: compute nodes are often offline. A missing network is reported with the path it was
looked for at and the one command that fetches it on a machine that is online. This module imports no torch, so
that `orch validate` can check a spec's weights cheaply.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NetworkWeights:
    """Where one feature network's weights live under the weights directory and where they come from."""

    network: str
    description: str  # what the weights are, for messages
    local_name: str  # the file (inception) or directory (dinov2) under the weights directory
    source: str  # the URL they are fetched from
    is_directory: bool

    def fetch_command(self, path: Path) -> str:
        """The one shell command that puts the weights at `path` on a machine that is online."""
        if self.is_directory:
            return f"hf download {self.repo_id} --local-dir {shlex.quote(str(path))}"
        return f"curl -L --create-dirs -o {shlex.quote(str(path))} {self.source}"

    @property
    def repo_id(self) -> str:
        """The Hugging Face repository of a directory's weights (the end of its URL)."""
        return self.source.removeprefix("https://huggingface.co/")


INCEPTION = NetworkWeights(
    network="inception",
    description="Inception-v3 (the TensorFlow FID weights of 2015-12-05, converted by torch-fidelity)",
    local_name="weights-inception-2015-12-05-6726825d.pth",
    source="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    is_directory=False,
)
DINOV2 = NetworkWeights(
    network="dinov2",
    description="DINOv2 ViT-L/14",
    local_name="dinov2-large",
    source="https://huggingface.co/facebook/dinov2-large",
    is_directory=True,
)
NETWORKS = {weights.network: weights for weights in (INCEPTION, DINOV2)}

# The feature network each metric is computed on.
METRIC_NETWORK = {"fid": "inception", "kid": "inception", "precision_recall": "inception", "fd_dinov2": "dinov2"}

# A directory of DINOv2 weights is complete with its config and one of these.
DINOV2_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_cache_dir() -> Path:
    """$ORCH_CACHE, else ~/.cache/orch: where orch keeps what it computes once (feature networks, statistics)."""
    return Path(os.environ.get("ORCH_CACHE") or Path.home() / ".cache" / "orch")


def default_weights_dir() -> Path:
    """$ORCH_WEIGHTS, else the cache directory's weights/: where the pretrained feature networks are looked for."""
    return Path(os.environ.get("ORCH_WEIGHTS") or default_cache_dir() / "weights")


def network_weights(network: str) -> NetworkWeights:
    if network not in NETWORKS:
        raise ValueError(f"unknown feature network {network!r}; known: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[network]


def weights_path(network: str, weights_dir: Path | None = None) -> Path:
    """The file (inception) or directory (dinov2) that holds the network's weights under `weights_dir` (None: the
    default weights directory)."""
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    return folder.expanduser() / network_weights(network).local_name


def weights_present(network: str, weights_dir: Path | None = None) -> bool:
    path = weights_path(network, weights_dir)
    if not network_weights(network).is_directory:
        return path.is_file()
    return (path / "config.json").is_file() and any((path / name).is_file() for name in DINOV2_WEIGHT_FILES)


def missing_weights_message(network: str, weights_dir: Path | None = None) -> str | None:
    """None when the network's weights are in place; else one line naming what is missing, where it was looked
    for, where it comes from, the command that fetches it, and how to point orch at another directory."""
    if weights_present(network, weights_dir):
        return None
    weights = network_weights(network)
    path = weights_path(network, weights_dir)
    if weights.is_directory:
        expected = f"a directory with config.json and {' or '.join(DINOV2_WEIGHT_FILES)}"
    else:
        expected = "a file"
    return (
        f"the {weights.network} feature network's weights, {weights.description}, are not at {path} ({expected}); "
        f"they come from {weights.source}: on a machine that is online run `{weights.fetch_command(path)}` and "
        f"copy the result there, or point orch at a directory that holds them with the spec's eval.weights_dir "
        f"or $ORCH_WEIGHTS"
    )

"""The layout of prepared latent shards: what `orch prepare` writes and the `webdataset` source reads.

A prepared dataset is a folder:

    OUT/shard-000000.tar   webdataset shards; shard k holds inputs [k*S, (k+1)*S) of the sorted input list
    OUT/shard-000000.json  that shard's record, written after the .tar is complete (samples, skips by reason)
    OUT/index.json         the dataset's record, written last (see DatasetIndex)

One sample per input image (and one more per image with `flip`), key `{input_index:09d}` (`...-flip` for
the flipped copy). Its members:

    latent.npy        float16 (2, C, h, w): mean and std of the VAE's latent distribution, unscaled;
                      training draws mean + std * noise and multiplies by the index's scaling_factor
    cls               ASCII integer class label (when the inputs have classes)
    txt               the caption, UTF-8 (when the inputs have captions)
    text_pooled.npy   float16 (D,): the text encoder's pooled embedding (when captions)
    text_tokens.npy   float16 (L, D): its per-token embeddings, L <= max_text_tokens, unpadded
    json              {"source": relative path or URL, "flipped": bool}

Nothing here imports torch: `orch validate` reads index.json to check a spec against its data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.files import write_atomic

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
LATENT_MEMBER = "latent.npy"
LABEL_MEMBER = "cls"
CAPTION_MEMBER = "txt"
TEXT_POOLED_MEMBER = "text_pooled.npy"
TEXT_TOKENS_MEMBER = "text_tokens.npy"
INFO_MEMBER = "json"


@dataclass(frozen=True)
class ShardRecord:
    name: str  # file name of the .tar, relative to the dataset folder
    num_samples: int
    bytes: int | None = (
        None  # the .tar's size when written: a truncated or replaced shard is caught by a stat, before training
    )


@dataclass(frozen=True)
class DatasetIndex:
    num_samples: int
    shards: list[ShardRecord]
    latent_shape: list[int]  # (C, h, w) of one latent
    latent_dtype: str  # "float16"
    scaling_factor: float  # the VAE config's scaling_factor (0.18215 for SD's VAE)
    vae: str  # name or path of the AutoencoderKL
    resolution: int  # side of the images that were encoded, in pixels
    source: str  # what was prepared (folder, table or webdataset)
    flip: bool  # whether flipped copies were added
    crop: str = "center_crop"  # how images became resolution x resolution: center_crop (ADM's) or resize
    num_classes: int | None = None  # classes 0..n-1 when the inputs had them
    class_names: list[str] | None = None
    text_encoder: str | None = None  # sentence-transformers model, when captions were encoded
    text_dim: int | None = None
    max_text_tokens: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    version: int = FORMAT_VERSION

    def write(self, folder: Path) -> Path:
        path = Path(folder) / INDEX_FILE
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> DatasetIndex:
        """The index of a prepared dataset; ValueError naming the problem if it is missing or not one."""
        path = Path(folder) / INDEX_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{folder} has no {INDEX_FILE}: it is not a prepared dataset (run `orch prepare` first, or it is still "
                "running)"
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the dataset is damaged, run `orch prepare` again"
            ) from None
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a version-{FORMAT_VERSION} dataset index of orch")
        try:
            raw["shards"] = [ShardRecord(**s) for s in raw["shards"]]
            return cls(**raw)
        except (TypeError, KeyError) as err:
            raise ValueError(
                f"{path} lacks or has unknown fields ({err}); the dataset is damaged, run `orch prepare` again"
            ) from None

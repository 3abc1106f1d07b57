"""The prepare spec: what `orch prepare` encodes, how, and where it writes the shards.

A spec of its own kind (`kind: prepare` at the top), parsed once into a frozen tree of typed sections
like the job spec, with the same messages: the YAML line, the dotted path, the near miss. Nothing here
imports torch: the CLI checks a prepare spec before it starts any rank.

    kind: prepare
    version: 1
    input:  {source: image_folder, path: data/cats}
    image:  {resolution: 256, flip: true}
    vae:    {name: stabilityai/sd-vae-ft-mse}
    output: {path: data/cats-latents-256, shard_size: 1000}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.specs.base import (
    CROPS,
    MAX_COUNT,
    MAX_PROCESSES,
    MAX_RESOLUTION,
    HubDatasetFields,
    Section,
    SpecError,
    load_yaml_with_lines,
    parse_override,
    read_spec_text,
    set_path,
    validate_tree,
)

PREPARE_VERSION = 1
TABLE_FORMATS = (".jsonl", ".csv", ".parquet")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_TEXT_ENCODER = "sentence-transformers/clip-ViT-L-14"


class InputSpec(HubDatasetFields):
    source: Literal["image_folder", "table", "webdataset", "hf_dataset"]
    """`image_folder`: images in class sub-folders (or directly in the folder), captions in `captions.jsonl` ({"file":
    ..., "caption": ...}) or a `.txt` beside each image. `table`: a .jsonl, .csv or .parquet of `url, caption[, label]`
    rows whose images are downloaded. `webdataset`: .tar shards of jpg/png samples with optional cls and txt.
    `hf_dataset`: a Hugging Face `datasets` dataset: a Hub name (`huggan/cats`) or a local copy (a save_to_disk folder,
    parquet / arrow files), with images in image_column (or URLs in url_column)."""
    path: str
    """The folder, table file, or webdataset (a .tar or a folder of .tar shards); for hf_dataset a Hub name or a local
    path. Relative paths are relative to the spec file."""
    classes: bool = True
    """image_folder: the sub-folder names are the classes (label = index in their sorted list); false finds images in
    all sub-folders without labels."""
    url_column: str = "url"
    """table: the column holding each image's URL (http, https or file); hf_dataset: set it to read images from URLs
    instead of image_column."""
    caption_column: str = "caption"
    """table, hf_dataset: the column holding captions (used when the data has it; an explicit name must exist)."""
    label_column: str = "label"
    """table, hf_dataset: the column holding labels (used when the data has it; an explicit name must exist): integers
    are kept, names become indices into their sorted list; a datasets ClassLabel gives the class names."""
    streaming: bool = False
    """hf_dataset: read the rows as a stream instead of downloading and converting the whole dataset first (for
    datasets larger than the disk); one process, and a restart continues from the stream position recorded with the
    last finished shard."""
    download_timeout: float = Field(10.0, gt=0, le=86400)
    """table, hf_dataset with url_column: seconds to wait for one image's server before giving up on that attempt."""
    download_retries: int = Field(1, ge=0, le=100)
    """table, hf_dataset with url_column: further attempts after a failed download (not after a 4xx answer, which will
    not change)."""

    @model_validator(mode="after")
    def _source_fields(self) -> InputSpec:
        if self.source == "table" and Path(self.path).suffix.lower() not in TABLE_FORMATS:
            raise ValueError(f"a table is read from {', '.join(TABLE_FORMATS)} files; {self.path} is none of them")
        columns = ("url_column", "caption_column", "label_column", "download_timeout", "download_retries")
        misplaced = [
            f
            for f in self.model_fields_set
            if (f in columns and self.source not in ("table", "hf_dataset"))
            or (f == "classes" and self.source != "image_folder")
            or (f == "streaming" and self.source != "hf_dataset")
        ] + self.hub_fields_misplaced(self.source)
        if misplaced:
            raise ValueError(f"{', '.join(sorted(misplaced))} do(es) not apply to source {self.source}; remove it")
        return self

    @property
    def explicit_columns(self) -> tuple[str, ...]:
        """The column fields the spec sets: those must exist in the data."""
        fields = ("image_column", "url_column", "caption_column", "label_column")
        return tuple(f for f in fields if f in self.model_fields_set)


class ImageSpec(Section):
    resolution: int = Field(256, ge=8, le=MAX_RESOLUTION)
    """Side of the square images the VAE encodes; a multiple of the VAE's downsampling factor (8 for SD's VAE)."""
    crop: Literal[CROPS] = "center_crop"
    """How an image becomes resolution x resolution: `center_crop` (ADM's: scale the short side, cut the middle) or
    `resize` (stretch the whole image to the square, bilinear, as torchvision's Resize((R, R)) does)."""
    flip: bool = False
    """Also encode a horizontally flipped copy of every image (key `...-flip`), doubling the samples."""
    upscale_small: bool = False
    """Upscale images smaller than the resolution on their short side; false skips them (counted as too_small)."""


class VaeSpec(Section):
    name: str = DEFAULT_VAE
    """A diffusers AutoencoderKL: a Hugging Face name (`stabilityai/sd-vae-ft-mse`, `madebyollin/sdxl-vae-fp16-fix` for
    SDXL latents) or a local folder saved with save_pretrained. Offline, it must already be in the Hugging Face cache or
    on disk."""
    subfolder: str | None = None
    """Folder of the VAE inside a pipeline repository (`vae` for e.g. `stabilityai/stable-diffusion-2-1`)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Precision the VAE runs in; float16 needs a GPU (and a VAE that does not overflow in it, e.g. sdxl-vae-fp16-fix).
    Latents are stored as float16 either way."""


class TextSpec(Section):
    enabled: bool = True
    """Encode captions when the inputs have them (the captions themselves are always kept as `txt`); an input without a
    caption gets neither, which the trainer reads as the null caption."""
    encoder: str = DEFAULT_TEXT_ENCODER
    """A sentence-transformers model (Hugging Face name or local folder) giving the pooled and per-token embeddings."""
    max_tokens: int = Field(77, ge=1, le=65536)
    """Per-token embeddings are kept up to this many tokens (longer captions are truncated; shorter ones are not
    padded)."""


class OutputSpec(Section):
    path: str
    """Folder of the prepared dataset (shards, their records, index.json); relative paths are relative to the spec
    file."""
    shard_size: int = Field(1000, ge=1, le=MAX_COUNT)
    """Inputs per shard (a shard holds fewer samples when inputs are skipped, twice as many with flip). Changing it for
    a half-finished output is refused."""


class PrepareResourcesSpec(Section):
    processes: int = Field(1, ge=1, le=MAX_PROCESSES)
    """Ranks `orch prepare` starts on this machine (one per GPU); each takes every processes-th shard."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the VAE and text encoder run: `auto` is the rank's GPU (LOCAL_RANK) when one is visible, else the CPU."""
    batch_size: int = Field(32, ge=1, le=65536)
    """Images per VAE forward pass (flipped copies go in the same pass, so up to twice this)."""
    workers: int = Field(8, ge=1, le=MAX_PROCESSES)
    """Threads per rank that read, download and decode images while the VAE encodes the previous batch."""
    threads: int | None = Field(None, ge=1, le=MAX_PROCESSES)
    """CPU threads of torch per rank; empty means torch's default."""


class PrepareSpec(Section):
    kind: Literal["prepare"]
    """What the YAML describes: `prepare` (a job spec has no `kind`)."""
    version: Literal[1] = PREPARE_VERSION
    """Prepare spec format version."""
    input: InputSpec
    image: ImageSpec = ImageSpec()
    vae: VaeSpec = VaeSpec()
    text: TextSpec = TextSpec()
    output: OutputSpec
    resources: PrepareResourcesSpec = PrepareResourcesSpec()

    @model_validator(mode="after")
    def _cross_section_checks(self) -> PrepareSpec:
        if self.input.streaming and self.resources.processes != 1:
            raise ValueError(
                "input.streaming reads the dataset as one sequence, on one process; set resources.processes: 1, or "
                "drop streaming (the dataset is then converted once and every process takes its shards)"
            )
        if self.vae.dtype == "float16" and self.resources.device == "cpu":
            raise ValueError("vae.dtype float16 needs a GPU; on resources.device cpu use float32 or bfloat16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def data_fields(self) -> dict[str, Any]:
        """The fields that decide what the shards hold (not how fast they are made): a restart must keep them."""
        return {key: value for key, value in self.to_dict().items() if key != "resources"}


# ---------------------------------------------------------------------------------------------
# Loading. A generic version of spec.py's _load_yaml/_validate, whose messages name JobSpec's
# fields; the two could become one pair parameterised by the root class.
# ---------------------------------------------------------------------------------------------


def load_prepare_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PrepareSpec:
    """Read a prepare spec, apply `--set key.path=value` overrides, validate; SpecError naming every problem."""
    path = Path(path)
    text = read_spec_text(path)
    return parse_prepare_spec(text, source=str(path), overrides=overrides, base_dir=path.parent)


def parse_prepare_spec(text: str, source: str = "<spec>", overrides=(), base_dir: Path | None = None) -> PrepareSpec:
    """Validate prepare spec text; see load_prepare_spec. Relative paths are made absolute against base_dir."""
    raw, lines = load_yaml_with_lines(text, source)
    if raw.get("kind") != "prepare":
        raise SpecError(
            f"{source}: not a prepare spec: it needs `kind: prepare` at the top (job specs go to `orch submit`)"
        )
    origins = {key: f"line {line}" for key, line in lines.items()}
    for override in overrides:
        key_path, value = parse_override(override)
        set_path(raw, key_path, value, override)
        origins[key_path] = f"--set {override}"
    spec = validate_tree(PrepareSpec, raw, source, origins)
    if base_dir is None:
        return spec

    def local(path: str, folder_only: bool) -> str:
        """Relative paths are relative to the spec file; a model name stays a hub name unless such a folder exists."""
        if Path(path).is_absolute() or (folder_only and not (base_dir / path).is_dir()):
            return path
        return str((base_dir / path).resolve())

    return spec.model_copy(
        update={
            # a hf_dataset path is a Hub name unless such a file or folder exists beside the spec
            "input": spec.input.model_copy(
                update={
                    "path": spec.input.path
                    if spec.input.source == "hf_dataset" and not (base_dir / spec.input.path).exists()
                    else local(spec.input.path, False)
                }
            ),
            "output": spec.output.model_copy(update={"path": local(spec.output.path, False)}),
            "vae": spec.vae.model_copy(update={"name": local(spec.vae.name, True)}),
            "text": spec.text.model_copy(update={"encoder": local(spec.text.encoder, True)}),
        }
    )

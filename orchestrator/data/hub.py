"""Hugging Face `datasets` as a source of images: a Hub name (`huggan/cats`) or a local copy.

One place opens a dataset for `orch prepare`, for pixel-space training and for `orch validate` / `plan`,
and turns the library's failures into one message naming the cause and the fix:

- a local path is a `save_to_disk` folder (a Dataset or a DatasetDict), or a folder / file of parquet,
  arrow, csv or json that `load_dataset` reads;
- anything else is a Hub name, loaded with `load_dataset(name, config, split, revision)`. Offline
  (HF_HUB_OFFLINE=1, as on cluster nodes) the library uses its cache; a dataset not in it is refused
  with the cache path and the one command that fetches it on a machine that is online.

`datasets` is imported here only, when a spec names such a source (never by `orch --help` / `list`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class HubError(UserError):
    """A `datasets` source that cannot be opened or used as the spec says."""


@dataclass(frozen=True)
class HubSource:
    """Where the rows come from: what a spec's `path`, `config`, `split`, `revision` name."""

    path: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def describe(self) -> str:
        extras = [f"config {self.config}"] if self.config else []
        extras += [f"revision {self.revision}"] if self.revision else []
        return f"{self.path} ({', '.join([f'split {self.split}', *extras])})"

    def fetch_command(self) -> str:
        args = [repr(self.path)]
        args += [f"{self.config!r}"] if self.config else []
        args += [f"split={self.split!r}"]
        args += [f"revision={self.revision!r}"] if self.revision else []
        return f'python -c "import datasets; datasets.load_dataset({", ".join(args)})"'


@dataclass(frozen=True)
class Columns:
    """The columns a source uses; None where the dataset has no such column."""

    image: str | None
    url: str | None
    caption: str | None
    label: str | None
    class_names: list[str] | None  # from a ClassLabel label column


def source_of(fields) -> HubSource:
    """The HubSource of a spec section with hf_dataset fields (the prepare spec's input, the job spec's data)."""
    return HubSource(fields.path, fields.config, fields.split, fields.revision)


def columns_of(fields, features, what: str) -> Columns:
    """The columns a spec section names (image_column, and url_/caption_/label_column where it has them), checked."""
    return resolve_columns(
        features,
        what,
        image_column=fields.image_column,
        url_column=getattr(fields, "url_column", None),
        caption_column=getattr(fields, "caption_column", None),
        label_column=getattr(fields, "label_column", None) or "label",
        required=fields.explicit_columns,
    )


def check(fields, streaming: bool = False) -> Columns:
    """Open the dataset a spec section names and check its columns: what `orch validate` and `plan` do (HubError)."""
    source = source_of(fields)
    data = open_dataset(source, streaming=streaming)
    return columns_of(fields, data.features, f"dataset {source.describe()}")


def is_local(path: str) -> bool:
    return Path(path).exists()


def open_dataset(source: HubSource, streaming: bool = False):
    """The split as a `datasets.Dataset` (memory-mapped, random access) or, streaming, an `IterableDataset`."""
    import datasets

    datasets.logging.set_verbosity_error()  # no progress bars or cache chatter in orch's logs
    datasets.disable_progress_bars()
    what = f"dataset {source.describe()}"
    try:
        if is_local(source.path):
            data = _open_local(Path(source.path), source, streaming)
        else:
            data = datasets.load_dataset(
                source.path, source.config, split=source.split, revision=source.revision, streaming=streaming
            )
    except HubError:
        raise
    except ConnectionError as err:  # offline and not in the cache (or the Hub unreachable)
        raise HubError(_not_cached(source, err)) from None
    except Exception as err:  # the library raises ValueError, FileNotFoundError, DatasetNotFoundError, ...
        raise HubError(_why(what, source, err)) from None
    return data


def _open_local(path: Path, source: HubSource, streaming: bool):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if source.split not in saved:
                raise HubError(
                    f"{path} has no split {source.split!r}; its splits: {', '.join(saved)}; set the split field"
                )
            saved = saved[source.split]
        return saved.to_iterable_dataset() if streaming else saved
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise HubError(
                f"{path} is not a dataset file ({', '.join(LOCAL_FORMATS)}) nor a save_to_disk folder; "
                "point path at one"
            )
        return datasets.load_dataset(
            builder, data_files={source.split: str(path)}, split=source.split, streaming=streaming
        )
    return datasets.load_dataset(str(path), source.config, split=source.split, streaming=streaming)


def _not_cached(source: HubSource, err: Exception) -> str:
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return (
        f"dataset {source.describe()} is not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and the "
        f"Hub {'is switched off here (HF_HUB_OFFLINE=1)' if offline else 'cannot be reached'} ({err}). On a machine "
        f"that is online, with the same HF_HOME, run: {source.fetch_command()} - or save it with save_to_disk and set "
        "path to that folder"
    )


def _why(what: str, source: HubSource, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    name = type(err).__name__
    if "Unknown split" in text:
        return f"{what}: no split {source.split!r}: {text.split('.', 1)[1].strip()} Set the split field to one of them"
    if name in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"):
        return (
            f"{what} not found: {text}. Check the name (https://huggingface.co/datasets/{source.path}) or give a local "
            "path; gated datasets need `hf auth login` on the machine that fetches them"
        )
    return f"{what} cannot be opened: {name}: {text}"


def resolve_columns(
    features: Any,
    what: str,
    image_column: str,
    url_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    required: tuple[str, ...] = (),
) -> Columns:
    """Check the columns against the dataset's features; `required` names the fields the user set (a missing one is an
    error; an unset caption / label column is used when the dataset has it)."""
    import datasets

    if features is None:
        raise HubError(f"{what} does not declare its columns (features); save it with its features, or use a table")
    names = list(features)
    listing = ", ".join(f"{n} ({_kind(features[n])})" for n in names)

    def pick(field: str, column: str | None) -> str | None:
        if column is None:
            return None
        if column in names:
            return column
        if field in required:
            raise HubError(f"{what} has no column {column!r} ({field}); its columns: {listing}")
        return None

    url = pick("url_column", url_column) if "url_column" in required else None
    image = None if url else pick("image_column", image_column)
    if url is None and image is None:
        raise HubError(
            f"{what} has no image column {image_column!r}; its columns: {listing}. Set image_column (or url_column for "
            "a column of image URLs)"
        )
    if image is not None and not _is_image(features[image]):
        raise HubError(
            f"{what}: column {image!r} holds {_kind(features[image])}, not images; set image_column to a column of "
            f"images ({listing})"
        )
    if url is not None and not _is_string(features[url]):
        raise HubError(f"{what}: column {url!r} holds {_kind(features[url])}, not URLs (strings)")
    caption = pick("caption_column", caption_column)
    if caption is not None and not _is_string(features[caption]):
        if "caption_column" in required:
            raise HubError(f"{what}: column {caption!r} holds {_kind(features[caption])}, not captions (strings)")
        caption = None
    label = pick("label_column", label_column)
    class_names = None
    if label is not None:
        feature = features[label]
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
            if "label_column" in required:
                raise HubError(
                    f"{what}: column {label!r} holds {_kind(feature)}, not class labels (a ClassLabel or integers)"
                )
            label = None
    return Columns(image=image, url=url, caption=caption, label=label, class_names=class_names)


def _kind(feature) -> str:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel of {feature.num_classes}"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return type(feature).__name__


def _is_image(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def undecoded(data, image_column: str | None):
    """The dataset with its image column as {"bytes", "path"} records: orch decodes (and counts bad images) itself."""
    import datasets

    if image_column is None:
        return data
    return data.cast_column(image_column, datasets.Image(decode=False))


def image_bytes(cell: dict | None) -> bytes | None:
    """The encoded bytes of one undecoded image cell (read from its path when the dataset stores paths only)."""
    if not cell:
        return None
    if cell.get("bytes") is not None:
        return cell["bytes"]
    if cell.get("path"):
        return Path(cell["path"]).read_bytes()
    return None

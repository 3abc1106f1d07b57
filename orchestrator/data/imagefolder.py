"""Finding the images of an `image_folder` source: one sub-folder per class (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(UserError):
    """The data a spec names is missing or unusable."""


@dataclass(frozen=True)
class ImageFolderIndex:
    classes: tuple[str, ...]
    """Class folder names, sorted; a label is an index into this."""
    items: tuple[tuple[Path, int], ...]
    """(image file, label), sorted by class then file name."""


def scan_image_folder(root: Path) -> ImageFolderIndex:
    """List the images of a class-per-folder tree; DataError naming the problem if it is missing or empty."""
    if not root.exists():
        raise DataError(f"data.path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data.path {root} has no class sub-folders; lay it out as {root}/<class>/<image>.png")
    items = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add "
                "images"
            )
        items.extend((path, label) for path in files)
    return ImageFolderIndex(classes=tuple(p.name for p in class_dirs), items=tuple(items))

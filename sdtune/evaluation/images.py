"""Image sets to evaluate: files from any source the toolkit reads, or images already in memory.

`load_image_set(path)` takes an image folder (captions optional: FID needs none), a synthesis
output folder or its metadata.csv (caption = prompt, labels = its label columns), a
metadata.jsonl/.csv with file_name and text, or a clinical table (CheXpert train.csv, ...).
Every file is decoded by the data layer's one decoder, `sdtune.data.images.load_image`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.data.folder import list_images, read_caption
from sdtune.data.images import IMAGE_SUFFIXES, ImageError, load_image, to_rgb
from sdtune.data.records import DatasetError, Problem, errors_only
from sdtune.errors import UserError

# Columns of a synthesis metadata.csv that are settings, not labels (sdtune.synthesis writes them).
SYNTHESIS_SETTINGS = {"file_name", "prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "text",
                      "count", "group", "patient_id"}


@dataclass(frozen=True)
class ImageItem:
    """One image to evaluate: a file (decoded on use) or an in-memory image, with what is known of it."""

    image: Path | Image.Image | np.ndarray | torch.Tensor
    caption: str | None = None
    labels: Mapping[str, float] = field(default_factory=dict)
    name: str | None = None  # "train.csv line 12" or the file below the folder: messages name it, not the path

    @classmethod
    def from_example(cls, ex) -> ImageItem:
        """A data-layer Example (a table or metadata row), named as training names it."""
        from sdtune.data.splits import held_out_name

        return cls(Path(ex.image), ex.caption, dict(ex.labels), held_out_name(ex))


@dataclass
class ImageSet:
    items: list[ImageItem]
    source: str  # what it was read from, for the report
    kind: str  # folder, synthesis, metadata, table or memory

    def __len__(self) -> int:
        return len(self.items)

    @property
    def files(self) -> list[Path] | None:
        """The files, when every item is one (the feature cache is keyed by them); else None."""
        paths = [item.image for item in self.items]
        return paths if all(isinstance(p, Path) for p in paths) else None

    def subset(self, indices: Sequence[int]) -> ImageSet:
        return ImageSet([self.items[i] for i in indices], self.source, self.kind)


def load_image_set(path: str | Path, uncertainty: str = "ignore") -> ImageSet:
    """The images at `path` (see the module doc), in a fixed order; an empty set is an error. A clinical
    table's uncertain (-1) labels follow `uncertainty` (sdtune.data.captions.apply_uncertainty)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist: pass an image folder, a synthesis folder, a metadata file or a table")
    if path.is_dir():
        table = next((path / name for name in ("metadata.csv", "metadata.jsonl") if (path / name).is_file()), None)
        image_set = _read_file(table, uncertainty) if table else _read_folder(path)
    else:
        image_set = _read_file(path, uncertainty)
    if not image_set.items:
        raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return image_set


def as_image_set(images, what: str = "images", uncertainty: str = "ignore") -> ImageSet:
    """A path, an ImageSet, a list of ImageItems/PIL images/arrays, or a uint8 or [0, 1] float NCHW tensor."""
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, (str, os.PathLike)):
        return load_image_set(images, uncertainty)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise UserError(f"{what}: expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        images = list(images)
    items = [im if isinstance(im, ImageItem) else ImageItem(Path(im) if isinstance(im, (str, os.PathLike)) else im)
             for im in images]
    if not items:
        raise UserError(f"{what}: no images")
    return ImageSet(items, source=f"{len(items)} images in memory", kind="memory")


def pixels(item: ImageItem) -> torch.Tensor:
    """The item as a uint8 RGB tensor (3, H, W)."""
    image = item.image
    if isinstance(image, Path):
        try:
            image = load_image(image)
        except ImageError as err:  # a table's row, not its path: paths name patients
            raise ImageError(item.name or err.path, err.what) from None
    if isinstance(image, Image.Image):
        try:  # 16-bit grey rescaled as from a file, not clipped; a writable copy: torch refuses read-only memory
            image = np.array(to_rgb(image))
        except ValueError:
            raise UserError(f"a {image.mode} image cannot be read as RGB: convert it to RGB or greyscale") from None
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3):
            image = image.permute(2, 0, 1)  # HWC -> CHW
    if image.dtype.is_floating_point:  # [0, 1] floats, as pipelines return them
        if image.numel() and not (-1e-3 <= float(image.min()) and float(image.max()) <= 1 + 1e-3):
            raise UserError(f"a float image must hold values in [0, 1], this one spans {float(image.min()):g} to "
                            f"{float(image.max()):g}: divide 0-255 values by 255, or pass uint8")
        image = (image.float().clamp(0, 1) * 255).round()
    elif image.dtype != torch.uint8:  # a cast would wrap 16-bit values around (1000 -> 232)
        raise UserError(f"a {image.dtype} image cannot be read as 0-255: pass uint8 (0-255) or floats in [0, 1]; "
                        "16-bit files are rescaled when given by path")
    image = image.to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.ndim != 3 or image.shape[0] not in (3, 4):
        raise UserError(f"expected an RGB image, got shape {tuple(image.shape)}")
    if image.shape[0] == 4:  # over black, as a file is read (over_black): round(rgb x alpha / 255), halves up
        weighted = image[:3].int() * image[3:].int()
        return ((2 * weighted + 255) // 510).to(torch.uint8).contiguous()
    return image.contiguous()


# ------------------------------------------------------------------------------- readers


def _read_folder(root: Path) -> ImageSet:
    """Every image under root (or root/images), sorted; a same-stem .txt beside it is its caption."""
    root = root.resolve()
    if (root / "images").is_dir():
        root = root / "images"
    files, unlisted = list_images(root)  # as training lists a folder: linked folders too, hidden files not
    if unlisted:
        raise DatasetError(unlisted, context=str(root), hint="an image set that cannot be read whole is not measured")
    items = []
    for file in files:
        caption, _ = read_caption(file.with_suffix(".txt"))  # optional: FID, KID and diversity need none
        items.append(ImageItem(file, caption, name=str(file.relative_to(root))))  # as the training reader names it
    return ImageSet(items, str(root), "folder")


def _read_file(path: Path, uncertainty: str = "ignore") -> ImageSet:
    from sdtune.data.tables import detect_format, read_csv, read_table

    if path.name.lower().endswith((".csv", ".csv.gz")):  # .csv.gz: as training reads tables
        # the data layer's reader: an empty or unreadable file is a one-line DatasetError, not a traceback
        if {"file_name", "prompt"} <= set(read_csv(path, [], nrows=0).columns):
            return _read_synthesis(path)
    elif path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: not an image folder, a metadata file or a table (.csv, .csv.gz or .jsonl)")

    examples, problems = read_table(path, uncertainty=uncertainty)
    if errors_only(problems):
        raise DatasetError(problems, context=str(path), hint="fix them, or pass a table without those rows")
    items = [ImageItem.from_example(ex) for ex in examples]
    return ImageSet(items, str(path.resolve()), "metadata" if detect_format(path) == "metadata" else "table")


def _read_synthesis(path: Path) -> ImageSet:
    """A synthesis metadata.csv: file_name (relative to its folder), prompt, settings, label columns."""
    from sdtune.data.tables import read_csv

    # Cells as written (only an empty cell is missing); index = file line, all-blank lines dropped.
    df = read_csv(path, ["file_name", "prompt"], dtype=str, keep_default_na=False, na_values=[""]).fillna("")
    root = path.resolve().parent
    labels = [c for c in df.columns if c not in SYNTHESIS_SETTINGS]
    items, problems = [], []
    for line, row in zip(df.index, df.to_dict("records")):
        file = (root / row["file_name"]).resolve()
        if not file.is_file():
            problems.append(Problem(f"{path.name} line {line}", f"image {file} does not exist"))
            continue
        values = {}
        for name in labels:
            value = _label(row[name])
            if value is not None:
                values[name] = value
        items.append(ImageItem(file, " ".join(row["prompt"].split()) or None, values, row["file_name"]))
    if problems:
        raise DatasetError(problems, context=str(path))
    return ImageSet(items, str(path.resolve()), "synthesis")


def _label(text: str) -> float | None:
    """A label cell as a number; blank or not a number: unknown."""
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value

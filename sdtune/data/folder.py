"""The tutorial's layout: `images/NAME.jpg` with its caption in `NAME.txt` beside it."""

from __future__ import annotations

from pathlib import Path

from sdtune.data.images import IMAGE_SUFFIXES
from sdtune.data.records import Example, Problem


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption, None) or (None, what is wrong and what to do)."""
    if not path.is_file():
        return None, f"no caption file {path.name}: write the image's caption into it"
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate a BOM, as Windows editors write one
    except UnicodeDecodeError as err:
        return None, f"caption {path.name} is not UTF-8 (byte {err.start}): re-save it as UTF-8"
    text = " ".join(text.split())  # one line, single spaces: captions are prompts
    if not text:
        return None, f"caption {path.name} is empty: write the image's caption into it"
    return text, None


def read_image_folder(root: str | Path, captions_dir: str | Path | None = None) -> tuple[list[Example], list[Problem]]:
    """Every image under `root` (recursively) with its same-stem .txt caption.

    `root` is the images folder, or a data folder holding `images/`. Captions sit beside the
    images, or in `captions_dir` at the same relative path. Files are taken in sorted order, so
    the dataset is the same on every machine.
    """
    root = Path(root).expanduser().resolve()
    if (root / "images").is_dir():
        root = root / "images"
    captions_root = Path(captions_dir).expanduser().resolve() if captions_dir else root
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    examples, problems, missing = [], [], 0
    for image in images:
        relative = image.relative_to(root)
        caption_file = captions_root / relative.with_suffix(".txt")
        caption, error = read_caption(caption_file)
        missing += not caption_file.exists()
        if error:
            problems.append(Problem(str(relative), error, image=str(image)))
        else:
            examples.append(Example(image=image, caption=caption, source=str(relative)))
    if not images:
        problems.append(Problem(str(root), f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
    elif missing == len(images):  # not a folder of captioned images: one line, not one per image
        tables = sorted(root.rglob("*.csv"))[:1]
        hint = (f"; {tables[0]} is a table: pass it with --train_csv (TRAIN_CSV= in the scripts)" if tables else
                ": write NAME.txt beside each image, or pass --captions_dir, or a table with --train_csv")
        problems = [Problem(str(root), f"none of its {len(images)} images has a caption file{hint}")]
    return examples, problems

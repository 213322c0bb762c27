"""The tutorial's layout: `images/NAME.jpg` with its caption in `NAME.txt` beside it."""

from __future__ import annotations

import os
from pathlib import Path

from sdtune.data.images import IMAGE_SUFFIXES
from sdtune.data.records import Example, Problem


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption, None) or (None, what is wrong and what to do)."""
    if not path.is_file():
        return None, f"no caption file {path.name}: write the image's caption into it"
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")  # tolerate a BOM, as Windows editors write one
    except UnicodeDecodeError as err:
        return None, f"caption {path.name} is not UTF-8 (byte {err.start}): re-save it as UTF-8"
    except OSError as err:
        return None, f"cannot read caption {path.name} ({err.strerror}): check its permissions"
    if "\x00" in text:  # valid UTF-8 all the same: UTF-16 without a BOM reads so, a NUL beside every letter
        return None, f"caption {path.name} holds NUL bytes (first at byte {data.index(0)}): re-save it as UTF-8, not UTF-16"
    text = " ".join(text.split())  # one line, single spaces: captions are prompts
    if not text:
        return None, f"caption {path.name} is empty: write the image's caption into it"
    return text, None


def walk_once(root: str | Path, onerror=None):
    """os.walk that follows linked folders, each real folder once (a link loop ends), in sorted order:
    the same files in the same order on every machine. A caller may prune the yielded subfolders."""
    visited = set()
    for folder, subfolders, files in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link loop, or one folder linked twice
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders.sort()
        yield folder, subfolders, sorted(files)


def list_images(root: Path) -> tuple[list[Path], list[Problem]]:
    """Every image file under root, sorted, and what could not be listed: an unreadable folder, a broken
    link. Linked folders are followed (once: a loop ends); hidden files and folders (macOS's ._NAME and
    __MACOSX, .ipynb_checkpoints) are not data."""
    images, problems = [], []

    def unreadable(err: OSError) -> None:
        where = os.path.relpath(err.filename, root) if err.filename else str(root)
        problems.append(Problem(where, f"cannot read this folder ({err.strerror}): check its permissions; "
                                       "its images are left out"))

    for folder, subfolders, files in walk_once(root, onerror=unreadable):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__MACOSX"]
        for name in files:
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_file():
                images.append(path)
            else:
                problems.append(Problem(str(path.relative_to(root)), "a link to a file that does not exist: "
                                                                      "fix the link or remove it"))
    return sorted(images), problems


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
    if not captions_root.is_dir():
        return [], [Problem(str(captions_root), "--captions_dir does not exist: pass the folder holding the captions")]
    images, unlisted = list_images(root)

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
    if not images and not unlisted:
        problems.append(Problem(str(root), f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
    elif images and missing == len(images):  # not a folder of captioned images: one line, not one per image
        tables = sorted(root.rglob("*.csv"))[:1]
        hint = (f"; {tables[0]} is a table: pass it with --train_csv (TRAIN_CSV= in the scripts)" if tables else
                ": write NAME.txt beside each image, or pass --captions_dir, or a table with --train_csv")
        problems = [Problem(str(root), f"none of its {len(images)} images has a caption file{hint}")]
    return examples, unlisted + problems

"""From a data source to checked (image, caption) examples and a torch Dataset.

One entry for training, synthesis and evaluation: `load_examples(DataConfig)` reads any of the
three input shapes (the tutorial's image folder, a clinical table, generic metadata), checks
every image, and either stops with ALL problems listed or, with `skip_bad_files`, drops them
and writes the list to a report file.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sdtune.config import check_bounds, field
from sdtune.data.folder import read_image_folder
from sdtune.data.images import ImageTransform, check_image, load_image
from sdtune.data.records import DatasetError, Example, Problem, errors_only
from sdtune.data.splits import split_examples
from sdtune.data.tables import TABLE_FORMATS, detect_format, read_table

FORMATS = ("auto", "folder") + tuple(TABLE_FORMATS)


@dataclass
class DataConfig:
    """Where the images and captions come from, how captions are made, and how files are checked."""

    train_data_dir: str | None = field(
        None, "the data: an images folder (tutorial layout, NAME.jpg + NAME.txt), a clinical table "
        "(CheXpert train.csv, MIMIC-CXR chexpert.csv, HAM10000 or ISIC 2019 csv) or a metadata.jsonl/.csv"
    )
    train_csv: str | None = field(None, "a clinical table or metadata file; an alternative spelling of --train_data_dir for tables")
    data_format: str = field("auto", "the data's format; auto detects it from the path and columns", choices=FORMATS)
    image_root: str | None = field(None, "folder that table paths are relative to (default: found beside the table)")
    captions_dir: str | None = field(None, "folder with the .txt captions, mirroring the images folder (default: beside the images)")
    caption_template: str | None = field(None, "caption style for tables: chexpert, study, dermoscopy, or a JSON template "
                                         "file (default: chexpert for chest X-ray tables, dermoscopy for skin)")
    findings: list[str] | None = field(None, "which label columns count as findings in captions (default: all)")
    uncertainty: str = field("ignore", "CheXpert-style -1.0 labels: ignore (U-Ignore), ones (U-Ones) or zeros (U-Zeros)",
                             choices=("ignore", "ones", "zeros"))
    views: str = field("frontal", "chest X-ray views to keep: frontal, AP, PA or all", choices=("frontal", "AP", "PA", "all"))
    demographics: bool = field(False, "start captions with age and sex, e.g. '50 year old female.'")
    resolution: int = field(512, "training resolution; smaller images are upscaled (with a warning)", bounds="8x")
    center_crop: bool = field(True, "crop the centre square after resizing; false: a random square")
    random_flip: bool = field(False, "random horizontal flips; off by default because a flipped chest X-ray mirrors anatomy")
    min_size: int | None = field(None, "images whose short side is below this are errors (default: none)", bounds=">=1")
    skip_bad_files: bool = field(False, "skip unreadable images and bad rows instead of stopping; they are listed in a report file")
    split: str = field("patient", "how validation is held out: patient (no patient on both sides) or image", choices=("patient", "image"))
    validation_fraction: float = field(0.0, "fraction of patients held out for validation", bounds="0..<1")
    split_seed: int = field(0, "seed of the train/validation split", bounds="seed")

    @property
    def source(self) -> str | None:
        return self.train_csv or self.train_data_dir


def read_examples(cfg: DataConfig) -> tuple[list[Example], list[Problem]]:
    """The examples a source describes and the problems of its rows/captions (no image decoded yet)."""
    check_bounds(cfg)
    if cfg.train_csv and cfg.train_data_dir:
        raise DatasetError([Problem("--train_csv", "given together with --train_data_dir: pass one of them")])
    if not cfg.source:
        raise DatasetError([Problem("--train_data_dir", "not given: point it at an images folder or a table")])
    source = Path(cfg.source).expanduser()
    if not source.exists():
        flag = "--train_csv" if cfg.train_csv else "--train_data_dir"
        raise DatasetError([Problem(str(source), f"does not exist: check {flag}")])
    fmt = cfg.data_format
    if fmt == "auto" and source.is_dir():
        metadata = [source / name for name in ("metadata.jsonl", "metadata.csv") if (source / name).is_file()]
        source, fmt = (metadata[0], "metadata") if metadata else (source, "folder")
    if fmt == "folder":
        return read_image_folder(source, cfg.captions_dir)
    return read_table(
        source,
        format=fmt,
        image_root=cfg.image_root,
        template=cfg.caption_template,
        findings=cfg.findings,
        uncertainty=cfg.uncertainty,
        views=cfg.views,
        demographics=cfg.demographics,
    )


def table_format(cfg: DataConfig) -> str | None:
    """The table format given or detected (chexpert, mimic, ham10000, isic, metadata); None for an image folder."""
    fmt, source = cfg.data_format, Path(cfg.source).expanduser() if cfg.source else None
    if fmt == "auto":
        fmt = detect_format(source) if source is not None and source.is_file() else None
    return fmt


def modality_of(cfg: DataConfig) -> str:
    """"dermoscopy" for skin-lesion tables (the format given or detected), else "chest_xray"."""
    return "dermoscopy" if table_format(cfg) in ("ham10000", "isic") else "chest_xray"


def check_images(images: list[tuple[str, str | Path]], resolution: int | None, min_size: int | None,
                 workers: int | None = None) -> list[Problem]:
    """Decode every (where, image) once and collect its problems (threads: decoding releases the GIL)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        found = pool.map(lambda item: check_image(item[1], resolution=resolution, min_size=min_size), images)
        return [Problem(where, p.what, p.severity) for (where, _), problems in zip(images, found) for p in problems]


def long_captions(examples: list[Example], tokenizer) -> list[Problem]:
    """Warnings for captions longer than the text encoder reads (CLIP: 77 tokens, start and end
    included): training and synthesis cut the rest off without a word. Many are one line."""
    distinct = list(dict.fromkeys(ex.caption for ex in examples))
    lengths = dict(zip(distinct, map(len, tokenizer(distinct, verbose=False).input_ids))) if distinct else {}
    limit = tokenizer.model_max_length
    long = [(ex, lengths[ex.caption]) for ex in examples if lengths[ex.caption] > limit]
    cut = f"the text encoder reads {limit} tokens and the rest is cut off: shorten "
    if len(long) > 10:
        ex, n = long[0]
        where = ex.source or str(ex.image)
        return [Problem(f"{len(long)} captions", f"longer than {limit} CLIP tokens (e.g. {where}: {n}); {cut}them "
                        "(report text: keep the impression)", "warning")]
    return [Problem(ex.source or str(ex.image), f"caption of {n} CLIP tokens: {cut}it", "warning") for ex, n in long]


def inspect_dataset(cfg: DataConfig, tokenizer=None) -> tuple[list[Example], list[Problem]]:
    """Read a source and decode every image once: (the usable examples, every problem found).
    With the model's tokenizer, captions it would cut are warned about too."""
    examples, problems = read_examples(cfg)
    if tokenizer is not None:
        problems += long_captions(examples, tokenizer)
    refused = {p.where: p.image for p in problems if p.image}  # rows with a bad caption: their images too
    images = [(ex.source or str(ex.image), ex.image) for ex in examples] + list(refused.items())
    problems += check_images(images, cfg.resolution, cfg.min_size)
    first = {}  # each file's problems together, files in the order first named
    problems.sort(key=lambda p: first.setdefault(p.where, len(first)))
    bad = {p.where for p in errors_only(problems)}
    return [ex for ex in examples if (ex.source or str(ex.image)) not in bad], problems


def load_examples(cfg: DataConfig, report_path: str | Path | None = None, tokenizer=None,
                  log=None) -> list[Example]:
    """Read and check a dataset. Errors stop here, all listed at once, unless skip_bad_files is set;
    then `log` gets one line counting what was skipped and warned about, and where it is listed."""
    examples, problems = inspect_dataset(cfg, tokenizer)
    errors = errors_only(problems)
    if errors and not cfg.skip_bad_files:  # (skipping cannot help when nothing would be left)
        raise DatasetError(problems, context=str(cfg.source),
                           hint="fix them" + (", or pass --skip_bad_files to leave them out" if examples else ""))
    if report_path is not None and not problems and Path(report_path).exists():
        Path(report_path).unlink()  # an earlier run's list (a resume after the data was fixed) is not this one's
    if report_path is not None and problems:
        write_report(problems, report_path)
        if log is not None:
            counts = [f"{len({p.where for p in errors})} skipped (--skip_bad_files)" if errors else "",
                      f"{len(problems) - len(errors)} warning(s)" if len(problems) > len(errors) else ""]
            log(f"data: {len(examples)} images; {', '.join(c for c in counts if c)}, e.g. {problems[0]}; "
                f"all listed in {report_path}")
    return examples


def write_report(problems: list[Problem], path: str | Path) -> Path:
    """One line per problem, so a skipped file is never silently lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\n" for p in problems), encoding="utf-8")
    return path


def summarize(examples: list[Example]) -> dict:
    """Counts for `check`: images, groups, positives per finding, a few caption examples."""
    positives = Counter(name for ex in examples for name, value in ex.labels.items() if value == 1.0)
    captions = Counter(ex.caption for ex in examples)
    return {
        "images": len(examples),
        "groups": len({ex.group for ex in examples if ex.group is not None}),
        "positives": dict(sorted(positives.items())),
        "distinct_captions": len(captions),
        "common_captions": captions.most_common(5),
    }


class ImageCaptionDataset(Dataset):
    """(pixel_values in [-1, 1], caption) pairs for training; images decoded by the one decoder.

    A random crop or flip is drawn from (seed, epoch, index) alone, not from a generator that loader
    workers and processes share or restart: a resumed run draws what an uninterrupted one would have.
    Set the epoch with set_epoch; loader workers must then start afresh each epoch (not persistent).
    """

    def __init__(self, examples: list[Example], resolution: int, center_crop: bool = True, random_flip: bool = False,
                 modality: str | None = "chest_xray", seed: int = 0):
        self.examples, self.seed, self.epoch = examples, seed, 0
        self.transform = ImageTransform(resolution, crop="center" if center_crop else "random",
                                        random_flip=random_flip, modality=modality)
        self.random_augmentation = random_flip or not center_crop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        generator = None
        if self.random_augmentation:
            seed = np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
        return {"pixel_values": self.transform(load_image(ex.image), generator), "caption": ex.caption, "index": i}


__all__ = ["DataConfig", "ImageCaptionDataset", "check_images", "inspect_dataset", "load_examples", "long_captions", "modality_of", "read_examples", "split_examples",
           "summarize", "write_report"]

"""Check a dataset, or export a table-based one to the tutorial's layout or to metadata.jsonl.

    python -m sdtune.data check  --train_data_dir data/CheXpert-v1.0-small/train.csv
    python -m sdtune.data export --train_data_dir data/.../train.csv --output_dir data/export --layout folder
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.config import ArgumentParser, add_arguments, from_args
from sdtune.data.dataset import DataConfig, inspect_dataset, summarize, write_report
from sdtune.data.images import load_image
from sdtune.data.records import DatasetError, Example, Problem, errors_only
from sdtune.data.splits import split_examples
from sdtune.errors import UserError, run_cli, writable_folder


def problem_lines(problems: list[Problem], shown: int = 3) -> list[str]:
    """Every error, then the warnings of each kind (same text but for its numbers): the first `shown`
    and a count of the rest. CheXpert-small's images are all under 512 px: one upscaling warning an
    image would bury the errors."""
    errors = errors_only(problems)
    kinds: dict[str, list[Problem]] = {}
    for p in problems:
        if p.severity != "error":
            kinds.setdefault(re.sub(r"\d+", "N", p.what), []).append(p)
    lines = [str(p) for p in errors]
    for same in kinds.values():
        lines += [str(p) for p in same[:shown]]
        if len(same) > shown:
            lines.append(f"... and {len(same) - shown} more warning(s) like these")
    return lines


def check(cfg: DataConfig, report: Path | None = None) -> int:
    """Print counts, label distribution, caption examples and the problems (every error; repeated warnings
    counted, all listed in `report`); 1 if any error."""
    from sdtune.tiny import build_clip_tokenizer

    examples, problems = inspect_dataset(cfg, tokenizer=build_clip_tokenizer())  # SD1.5's: CLIP's vocabulary
    errors = errors_only(problems)
    stats = summarize(examples)
    print(f"{cfg.source}: {stats['images']} usable images, {len(errors)} error(s), "
          f"{stats['groups']} patients/groups, {stats['distinct_captions']} distinct captions")
    for name, count in stats["positives"].items():
        print(f"  {name}: {count} positive ({count / max(1, stats['images']):.1%})")
    for caption, count in stats["common_captions"]:
        print(f"  {count:6d} x {caption!r}")
    trainable = len(examples)
    if cfg.validation_fraction > 0:
        train, held = split_examples(examples, cfg.validation_fraction, cfg.split_seed, by=cfg.split)
        trainable = len(train)
        print(split_line(train, held, cfg))
    for line in problem_lines(problems):
        print(f"  {line}")
    if report and problems:
        print(f"all {len(problems)} problem(s) listed in {write_report(problems, report)}")
    if not trainable:  # what training would refuse, check refuses too
        print("error: no image is left to train on" + (" after the held-out split" if examples else ""))
    return 1 if errors or not trainable else 0


def split_line(train: list[Example], held: list[Example], cfg: DataConfig) -> str:
    """What training's held-out split will be (split_examples, called as training calls it)."""

    def patients(side: list[Example]) -> str:
        groups = {ex.group for ex in side if ex.group is not None}
        return f" of {len(groups)} patients/groups" if groups else ""

    line = (f"held-out split (--split {cfg.split}, --validation_fraction {cfg.validation_fraction:g}, --split_seed "
            f"{cfg.split_seed}): {len(train)} images{patients(train)} train, {len(held)}{patients(held)} held out")
    if cfg.split == "patient" and all(ex.group is None for ex in train + held):
        line += "; no patient ids here, so it is split by image"
    return line


def export(cfg: DataConfig, output_dir: Path, layout: str) -> int:
    """Write the checked dataset to `output_dir` as images + .txt captions, or images + metadata.jsonl.

    Nothing of the source's names or metadata leaves with the pixels: files are numbered
    (000001.png, ...), every image is decoded and re-encoded as PNG (EXIF, text chunks and DICOM
    headers stay behind), and patient groups become numbered pseudonyms (g000001, ...), enough
    for patient-level splits.
    """
    images_dir = output_dir / "images"
    # Before any image is decoded: a wrong --output_dir is found in a second, not after the whole dataset.
    writable_folder(output_dir, "--output_dir", create=False)
    if (images_dir.is_dir() and any(images_dir.iterdir())) or (output_dir / "metadata.jsonl").exists():
        # Numbered files of an earlier export would be mixed into this one's.
        raise UserError(f"{output_dir} already holds an export: pass an empty or new --output_dir")
    # No resolution: an export keeps each image's own size, so no upscaling warnings.
    examples, problems = inspect_dataset(dataclasses.replace(cfg, resolution=None))
    errors = errors_only(problems)
    if errors and not cfg.skip_bad_files:
        raise DatasetError(problems, context=str(cfg.source), hint="fix them, or pass --skip_bad_files to leave them out")
    if not examples:
        raise UserError(f"nothing to export from {cfg.source}")
    images_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{k:06d}.png" for k in range(1, len(examples) + 1)]
    pseudonyms: dict[str, str] = {}  # in order of first appearance, so they say nothing of the ids
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # decoding and PNG encoding release the GIL
        list(pool.map(lambda ex, name: _pixels_only(ex).save(images_dir / name), examples, names))
    rows = []
    for ex, name in zip(examples, names):
        if layout == "folder":
            (images_dir / name).with_suffix(".txt").write_text(ex.caption + "\n", encoding="utf-8")
        else:
            row = {"file_name": f"images/{name}", "text": ex.caption}
            if ex.group is not None:
                row["group"] = pseudonyms.setdefault(ex.group, f"g{len(pseudonyms) + 1:06d}")
            rows.append(row)
    if layout == "jsonl":
        with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    # Beside the export, never in it: a folder's problems name its files, and file names can name patients.
    report = output_dir.with_name(f"{output_dir.name}.problems.txt")
    if problems:
        write_report(problems, report)
    print(f"exported {len(examples)} images to {output_dir} ({layout} layout)"
          + (f"; {len(errors)} skipped" if errors else "")
          + (f"; problems listed in {report}, beside the export: it names source files" if problems else ""))
    return 0


def _pixels_only(ex: Example) -> Image.Image:
    """The decoded image as a new one that carries nothing else; grey stays one channel (a third the size)."""
    pixels = np.asarray(load_image(ex.image))
    grey = (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0]) if grey else pixels)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m sdtune.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="counts, label distribution, caption examples and every problem")
    add_arguments(check_parser, DataConfig)
    check_parser.add_argument("--report", type=Path, default=None,
                              help="also write every problem here, one a line (the screen counts repeated warnings)")
    export_parser = commands.add_parser("export", help="write images + .txt captions, or images + metadata.jsonl")
    add_arguments(export_parser, DataConfig)
    export_parser.add_argument("--output_dir", "--output-dir", required=True, help="folder to write the export to")
    export_parser.add_argument("--layout", choices=("folder", "jsonl"), default="folder",
                               help="folder: images/NAME.ext + NAME.txt (the tutorial's); jsonl: images/ + metadata.jsonl")
    args = parser.parse_args(argv)
    cfg = from_args(DataConfig, args)
    if args.command == "check":
        return check(cfg, args.report)
    return export(cfg, Path(args.output_dir), args.layout)


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))

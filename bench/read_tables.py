"""How fast a CheXpert-sized table becomes Examples: rows/s of `read_table` on 200,000 rows.

    python bench/read_tables.py [--rows 200000] [--create-images]

Writes a synthetic train.csv in CheXpert's exact columns (labels drawn 1.0/0.0/-1.0/blank,
~17% laterals) to a temporary folder and times three ways of reading it, all with
demographics=True (the slower caption path: nearly every row has its own caption):
  no file check        parsing, views, labels, captions, Examples only (check_files=False)
  file check, missing  every image is stat'ed and missing: one Problem per frontal row
  file check, present  only with --create-images: empty files are written first (slow, ~200k inodes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdtune.data.tables import CHEXPERT_COLUMNS, CHEXPERT_LABELS, read_table  # noqa: E402


def write_table(folder: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lateral = rng.random(rows) < 0.17
    patient = np.arange(rows) // 3 + 1
    paths = [f"CheXpert-v1.0-small/train/patient{p:05d}/study{i % 3 + 1}/view{2 if lat else 1}_{'lateral' if lat else 'frontal'}.jpg"
             for i, (p, lat) in enumerate(zip(patient, lateral))]
    table = pd.DataFrame({
        "Path": paths,
        "Sex": rng.choice(["Male", "Female", "Unknown"], rows, p=[0.55, 0.44, 0.01]),
        "Age": rng.integers(18, 91, rows),
        "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
        "AP/PA": np.where(lateral, "", rng.choice(["AP", "PA"], rows, p=[0.75, 0.25])),
    })
    for name in CHEXPERT_LABELS:
        table[name] = rng.choice([1.0, 0.0, -1.0, np.nan], rows, p=[0.15, 0.1, 0.05, 0.7])
    csv = folder / "CheXpert-v1.0-small" / "train.csv"
    csv.parent.mkdir(parents=True)
    table[CHEXPERT_COLUMNS].to_csv(csv, index=False)
    return csv


def timed(label: str, csv: Path, rows: int, **kwargs) -> None:
    start = time.perf_counter()
    examples, problems = read_table(csv, demographics=True, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label:22s} {seconds:6.2f} s  {rows / seconds:9,.0f} rows/s  "
          f"({len(examples):,} examples, {len(problems):,} problems)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--create-images", action="store_true", help="also time the check with every image present")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_table(Path(tmp), args.rows)
        print(f"{args.rows:,} rows, {csv.stat().st_size / 1e6:.1f} MB, {os.cpu_count()} CPUs")
        timed("no file check", csv, args.rows, check_files=False)
        timed("file check, missing", csv, args.rows)
        if args.create_images:
            start = time.perf_counter()
            for rel in pd.read_csv(csv, usecols=["Path"])["Path"]:
                image = Path(tmp, rel)
                image.parent.mkdir(parents=True, exist_ok=True)
                image.touch()
            print(f"(wrote {args.rows:,} empty images in {time.perf_counter() - start:.1f} s)")
            timed("file check, present", csv, args.rows)


if __name__ == "__main__":
    main()

"""Phantom findings measured in image sets: does a set show the finding its labels (or prompts) name?

    python -m sdtune.evaluation.phantom_findings synthetic/lora synthetic/unet \
        --real data/phantom/CheXpert-v1.0-small/valid.csv

For each finding that sdtune.phantom draws and a set has as a label column, the mean of its
score (`sdtune.phantom.measure_findings`, e.g. the cardiothoracic ratio for Cardiomegaly) over
the images labelled 1 and over those labelled 0. On the real phantom set the gap shows what a
model that learned the finding would reproduce. A score is NaN when no pair of lung fields is
found (noise-like images): the counts say how many images could be measured.

A check for models fine-tuned on phantom data (make demo, the tests); the scores mean nothing
on real radiographs. It reports, and claims nothing.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

MISSING = "—"


def measure_set(source) -> dict[str, dict]:
    """Per drawn finding among the set's label columns: mean score with it = 1 and = 0, and counts."""
    from PIL import Image

    from sdtune.evaluation.images import load_image_set
    from sdtune.phantom import DRAWN, SCORES, measure_findings

    image_set = load_image_set(source)
    findings = [f for f in DRAWN if any(f in item.labels for item in image_set.items)]
    scores = []
    for item in image_set.items:
        with Image.open(item.image) as image:
            scores.append(measure_findings(image.convert("L")))
    out = {}
    for finding in findings:
        groups = {}
        for value, key in ((1, "with"), (0, "without")):
            values = [s[SCORES[finding]] for item, s in zip(image_set.items, scores) if item.labels.get(finding) == value]
            finite = [v for v in values if math.isfinite(v)]
            groups[key] = {"mean": float(np.mean(finite)) if finite else None, "n": len(values),
                           "measured": len(finite)}
        out[finding] = {"score": SCORES[finding], **groups}
    return out


def _cell(group: dict) -> str:
    mean = MISSING if group["mean"] is None else f"{group['mean']:.3f}"
    return f"{mean} ({group['measured']}/{group['n']})"


def findings_table(sets: dict[str, dict]) -> str:
    """Markdown: one row per finding, per set 'mean with (measured/n)' and 'mean without'."""
    findings = list(dict.fromkeys(f for table in sets.values() for f in table))
    headers = ["finding", "score"] + [f"{name}: {side}" for name in sets for side in ("with", "without")]
    rows = []
    for finding in findings:
        score = next(t[finding]["score"] for t in sets.values() if finding in t)
        cells = [finding, score]
        for table in sets.values():
            cells += [_cell(table[finding][side]) if finding in table else MISSING for side in ("with", "without")]
        rows.append(cells)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sdtune.evaluation.phantom_findings",
                                     description="Phantom finding scores of image sets, by label (phantom data only).")
    parser.add_argument("sets", nargs="+", help="synthesis folders (or anything evaluate.py --fake reads)")
    parser.add_argument("--real", help="the real phantom set for reference, e.g. .../CheXpert-v1.0-small/valid.csv")
    args = parser.parse_args(argv)
    sources = ([("real", args.real)] if args.real else []) + [(s.rstrip("/").split("/")[-1] or s, s) for s in args.sets]
    sets = {name: measure_set(path) for name, path in sources}
    print("Phantom finding scores, mean over images labelled with / without the finding "
          "(measured images / images; — when none could be measured):\n")
    print(findings_table(sets))
    return sets


if __name__ == "__main__":
    from sdtune.errors import run_cli

    run_cli(lambda: main(sys.argv[1:]))

"""Train/validation splits at the patient level, so no patient is on both sides."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from sdtune.data.records import Example


def split_examples(
    examples: list[Example], val_fraction: float, seed: int = 0, by: str = "patient"
) -> tuple[list[Example], list[Example]]:
    """Split into (train, validation), deterministically for a seed.

    by="patient" keeps every image of a group (CheXpert patient, MIMIC subject, HAM10000 lesion)
    on one side; images without a group key count as groups of one. by="image" ignores groups:
    use it only when you know images are independent. The validation side gets
    ceil(val_fraction x number of groups) groups.
    """
    if by not in ("patient", "image"):
        raise ValueError(f"unsupported split {by!r}: use 'patient' or 'image'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    def key(i: int, ex: Example) -> str:
        return f"group:{ex.group}" if by == "patient" and ex.group is not None else f"image:{i}"

    keys = [key(i, ex) for i, ex in enumerate(examples)]
    groups = sorted(set(keys))  # sorted first, so the shuffle depends on the seed alone
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = math.ceil(val_fraction * len(groups)) if val_fraction > 0 else 0
    val_groups = {groups[i] for i in order[:n_val]}
    train = [ex for k, ex in zip(keys, examples) if k not in val_groups]
    val = [ex for k, ex in zip(keys, examples) if k in val_groups]
    return train, val


def held_out_name(ex: Example) -> str:
    """How held_out.txt names an example, never by a patient id: a table's row ("train.csv line 12"); a
    folder's file by a digest of its path (folders are often named by patient). Training writes it;
    evaluate.py and downstream.py match --real against it."""
    if re.fullmatch(r".+ line \d+", ex.source):
        return ex.source
    return "file " + hashlib.sha256((ex.source or str(ex.image)).encode()).hexdigest()[:16]

"""The data layer's shared vocabulary: an Example, a Problem, and the error that lists them all."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import UserError


@dataclass(frozen=True)
class Example:
    """One (image, caption) pair, with what splits, synthesis and evaluation need to know."""

    image: Path  # absolute path of the image file
    caption: str
    group: str | None = None  # split key: CheXpert patient, MIMIC subject_id, HAM10000 lesion_id
    labels: Mapping[str, float] = field(default_factory=dict)  # finding -> value after the uncertainty policy
    source: str = ""  # where it came from, for messages: "train.csv row 12", "images/a.png"


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file or row. `where` names it; `what` says what is wrong and what to do."""

    where: str
    what: str
    severity: str = "error"  # "error" stops training unless skipped; "warning" is reported only
    # The image of a row refused before decoding (a bad caption or label): still decoded, so its
    # own problems come in the same report, not in a second round after the first fix.
    image: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" if self.severity == "error" else f"{self.where}: warning: {self.what}"


class DatasetError(UserError):
    """Every problem found in a dataset, reported at once (one line each)."""

    def __init__(self, problems: Iterable[Problem], context: str = "the dataset", hint: str = ""):
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        lines = [f"{len(errors)} problem(s) in {context}{' (' + hint + ')' if hint else ''}:"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def errors_only(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def file_stamp(path: str | Path) -> str:
    """A file as caches know it: path, size, modification and change times, inode. The change time and
    inode catch a file replaced with its size and modification time kept (cp -p, rsync -a, tar x)."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"

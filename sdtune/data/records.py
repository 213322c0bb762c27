"""The data layer's shared vocabulary: an Example, a Problem, and the error that lists them all."""

from __future__ import annotations

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

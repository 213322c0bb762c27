"""Captions from labels: one function builds both training captions and synthesis prompts.

A model fine-tuned on "Chest x-ray of a patient with Cardiomegaly and Edema" must be prompted
with exactly that wording, so training (tables.py) and synthesis call the same
`build_caption`. Wording lives in a `CaptionTemplate`; three presets cover the tutorial, the
study's own captions (Pixels Under Pressure) and dermoscopy. Templates only ever see finding
names, age and sex: no identifier (patient, subject, study, image id) can reach a caption.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtune.errors import UserError

# "No Finding" only says that nothing else is positive; it is never listed as a finding.
NO_FINDING = "No Finding"

# The labels the study's captions name, in its order (its eight minus No Finding).
STUDY_FINDINGS = ("Cardiomegaly", "Lung Opacity", "Edema", "Pneumonia", "Pneumothorax",
                  "Pleural Effusion", "Support Devices")

UNCERTAINTY_POLICIES = ("ignore", "ones", "zeros")


@dataclass(frozen=True)
class CaptionTemplate:
    """How labels become words. Format fields: {findings}; {age}, {sex}, {caption}."""

    positive: str = "Chest x-ray of a patient with {findings}"  # the tutorial's wording
    negative: str = "Chest x-ray of a patient with no significant findings"  # nothing positive
    joiner: str = "natural"  # "natural": "A, B and C"; anything else is the separator, e.g. ", "
    demographics: str = "{age} year old {sex}. {caption}"  # used only when age/sex are asked for
    lowercase_findings: bool = False  # the tutorial and the study write "Pleural Effusion"
    findings: tuple[str, ...] | None = None  # labels that count, in caption order (None: all given)


PRESETS = {
    "chexpert": CaptionTemplate(),
    "study": CaptionTemplate(
        positive="Chest X-ray showing {findings}",
        negative="Normal chest X-ray with no significant findings",
        joiner=", ",
        findings=STUDY_FINDINGS,
    ),
    "dermoscopy": CaptionTemplate(
        positive="a dermoscopic image of {findings}",
        negative="a dermoscopic image of a skin lesion",
        demographics="{caption}, {age} year old {sex}",
        lowercase_findings=True,
    ),
}


def join_findings(names: Sequence[str], joiner: str = "natural") -> str:
    """"A", "A and B", "A, B and C" (natural), or names joined by the separator `joiner`."""
    if joiner != "natural":
        return joiner.join(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _age_sex(demographics: Mapping) -> tuple[str | None, str]:
    """("50", "female"); age None when unknown; sex "patient" when not male/female."""
    age = demographics.get("age")
    try:
        age = float(age)
    except (TypeError, ValueError):
        age = math.nan
    sex = str(demographics.get("sex") or "").strip().lower()
    sex = {"m": "male", "f": "female"}.get(sex, sex)
    return (str(round(age)) if math.isfinite(age) else None), (sex if sex in ("male", "female") else "patient")


def build_caption(labels: Mapping[str, float | None], template: CaptionTemplate | None = None,
                  findings: Sequence[str] | None = None, demographics: Mapping | None = None) -> str:
    """The caption (or prompt) for one image: its positive findings (value 1.0) in words.

    `findings` picks which labels count and their order (default: the template's, else all of
    `labels` in their order); a finding missing from `labels` is not positive. No positive
    finding gives the template's negative text. `demographics` ({"age": 50, "sex": "Female"})
    wraps the caption in the template's demographics format; without a known age it is left out.
    """
    template = template or PRESETS["chexpert"]
    names = findings if findings is not None else template.findings
    names = [n for n in (names if names is not None else labels) if n != NO_FINDING]
    positive = [n.lower() if template.lowercase_findings else n for n in names if labels.get(n) == 1.0]
    if positive:
        caption = template.positive.format(findings=join_findings(positive, template.joiner))
    else:
        caption = template.negative
    return caption if demographics is None else add_demographics(caption, template, demographics)


def add_demographics(caption: str, template: CaptionTemplate, demographics: Mapping) -> str:
    """`caption` in the template's demographics format ("50 year old female. {caption}").

    Sex other than male/female reads "patient"; without a known age the caption is returned
    unchanged rather than half-written.
    """
    age, sex = _age_sex(demographics)
    if age is None or not template.demographics:
        return caption
    return template.demographics.format(age=age, sex=sex, caption=caption)


def apply_uncertainty(value, policy: str = "ignore"):
    """A CheXpert label value after an uncertainty policy (Irvin et al. 2019): works on arrays too.

    1.0 positive, 0.0 negative, blank/NaN (not mentioned) -> 0.0, -1.0 (uncertain) ->
    "ones": 1.0 (U-Ones), "zeros": 0.0 (U-Zeros), "ignore": NaN (U-Ignore: unknown, so left out
    of Example.labels and not positive in captions; the row itself is kept).
    """
    if policy not in UNCERTAINTY_POLICIES:
        raise UserError(f"unknown uncertainty policy {policy!r}: use one of {', '.join(UNCERTAINTY_POLICIES)}")
    uncertain = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[policy]
    values = np.asarray(value, dtype=float)
    out = np.where(np.isnan(values), 0.0, values)
    out = np.where(out == -1.0, uncertain, out)
    return float(out) if out.ndim == 0 else out


def load_template(name_or_path: str | Path | CaptionTemplate | None) -> CaptionTemplate:
    """A preset by name ("chexpert", "study", "dermoscopy") or a JSON template file.

    The file holds CaptionTemplate fields, optionally starting from a preset:
    {"preset": "study", "lowercase_findings": true}. Unknown keys are errors.
    """
    if name_or_path is None or isinstance(name_or_path, CaptionTemplate):
        return name_or_path or PRESETS["chexpert"]
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"caption template {str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read caption template {path}: {err}") from None
    if not isinstance(fields, dict):
        raise UserError(f"caption template {path}: expected a JSON object of template fields")
    known = [f.name for f in dataclasses.fields(CaptionTemplate)]
    for key, value in fields.items():
        if key != "preset" and key not in known:
            raise UserError(f"caption template {path}: unknown key {key!r} (known: preset, {', '.join(known)})")
        wanted = bool if key == "lowercase_findings" else (list, type(None)) if key == "findings" else str
        if not isinstance(value, wanted):
            raise UserError(f"caption template {path}: {key!r} has the wrong type ({type(value).__name__})")
    preset = fields.pop("preset", "chexpert")
    if preset not in PRESETS:
        raise UserError(f"caption template {path}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if fields.get("findings") is not None:
        fields["findings"] = tuple(fields["findings"])
    template = dataclasses.replace(PRESETS[preset], **fields)
    _check_formats(template, path)
    return template


def _check_formats(template: CaptionTemplate, path: Path) -> None:
    """Fail at load, not mid-dataset, on a format field other than those a template may use."""
    for key in ("positive", "negative", "joiner", "demographics"):
        if "\x00" in getattr(template, key):  # JSON's \u0000: it would reach every caption
            raise UserError(f"caption template {path}: {key!r} holds a NUL character (\\u0000): remove it")
    try:
        template.positive.format(findings="x")
        template.demographics.format(age="50", sex="female", caption="x")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"caption template {path}: bad format field {err} (positive may use {{findings}}; "
                        "demographics {age}, {sex}, {caption})") from None
    if template.demographics and "{caption}" not in template.demographics:
        raise UserError(f"caption template {path}: demographics must contain {{caption}}, e.g. "
                        "\"{age} year old {sex}. {caption}\"")

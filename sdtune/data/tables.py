"""Clinical tables and generic metadata to Examples, with every row problem reported at once.

Formats, as each dataset publishes them: CheXpert train.csv/valid.csv, MIMIC-CXR-JPG (chexpert.csv
joined with metadata.csv), HAM10000_metadata.csv, the ISIC 2019 ground truth, and the diffusers
imagefolder convention (metadata.jsonl/.csv with file_name and text).

Every reader returns (examples, problems). A bad row becomes a Problem and is left out; only a
whole-file problem (unreadable, missing columns) raises DatasetError. Problems and
Example.source name rows as "train.csv line 13": the line of the file, header = line 1, which
is also the row number a spreadsheet shows. Table paths are checked lexically against the image
root, so "../../etc/passwd" or an absolute path elsewhere is an error and never opened; symlinks
inside the root are trusted (datasets often live on another disk). Images are only checked to
exist here; decoding is images.py's job.
"""

from __future__ import annotations

import csv
import gc
import gzip
import json
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from sdtune.data.captions import (NO_FINDING, CaptionTemplate, add_demographics, apply_uncertainty, build_caption,
                                  load_template)
from sdtune.data.folder import walk_once
from sdtune.data.records import DatasetError, Example, Problem
from sdtune.errors import UserError

TABLE_FORMATS = ("chexpert", "mimic", "ham10000", "isic", "metadata")

CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_LABELS
MIMIC_LABELS = sorted(CHEXPERT_LABELS)  # the same 14 labels, alphabetical in mimic-cxr-2.0.0-chexpert.csv
MIMIC_FRONTAL, MIMIC_LATERAL = ("PA", "AP"), ("LATERAL", "LL")

# Diagnosis codes -> the names captions use; the same name for the same disease in both datasets.
HAM10000_DX = {
    "akiec": "actinic keratosis", "bcc": "basal cell carcinoma", "bkl": "benign keratosis",
    "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic nevus", "vasc": "vascular lesion",
}
ISIC2019_DX = {
    "MEL": "melanoma", "NV": "melanocytic nevus", "BCC": "basal cell carcinoma", "AK": "actinic keratosis",
    "BKL": "benign keratosis", "DF": "dermatofibroma", "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma", "UNK": "unknown",  # UNK: none of the others (caption: negative text)
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what the HAM10000/ISIC image search indexes
FEW = 3  # past this many rows, one problem shared by all of them is one line for the file, not one per row

DEFAULT_TEMPLATE = {"chexpert": "chexpert", "mimic": "chexpert", "ham10000": "dermoscopy", "isic": "dermoscopy"}

Read = tuple[list[Example], list[Problem]]  # what every reader returns
Found = list[tuple[str, int, Problem]]  # internal: (file, line, Problem), to list problems in file order


def read_table(path: str | Path, format: str = "auto", image_root: str | Path | None = None,  # noqa: A002
               template: str | Path | CaptionTemplate | None = None, findings: Sequence[str] | None = None,
               uncertainty: str = "ignore", views: str | Sequence[str] = "frontal", demographics: bool = False,
               check_files: bool = True) -> Read:
    """Read any supported table: (examples, every row problem), in file order.

    template: preset name, JSON file or CaptionTemplate (default: "chexpert" for chest X-ray
    tables, "dermoscopy" for skin; metadata files bring their own text). findings: the labels
    captions use (default: the template's, else all). uncertainty: "ignore", "ones" or "zeros"
    for -1.0 labels. U-Ignore keeps a row whose findings are all uncertain: its caption names
    only certain positives, so it reads as the negative text ("ignore" and "zeros" give the same
    captions and differ in Example.labels, where an ignored label is absent). views: "frontal",
    "lateral", "all" or positions such as ("AP", "PA"); tables without views ignore it.
    demographics: wrap captions with age and sex where the table has them. check_files=False
    skips the existence check of CheXpert/MIMIC/metadata images (HAM10000 and ISIC images are
    found by searching, so they are always checked).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder: pass the table file itself (e.g. train.csv)")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in TABLE_FORMATS:
        raise UserError(f"unsupported table format {fmt!r}: use auto or one of {', '.join(TABLE_FORMATS)}")
    apply_uncertainty(0.0, uncertainty)  # an unknown policy fails here, before any reading
    if fmt == "metadata":
        if demographics:
            raise UserError("demographics=True needs a clinical table: metadata files carry their captions in 'text'")
        return read_metadata(path, image_root, check_files)
    reader = {"chexpert": read_chexpert, "mimic": read_mimic, "ham10000": read_ham10000, "isic": read_isic2019}[fmt]
    kwargs = dict(image_root=image_root, template=template, findings=findings, demographics=demographics)
    if fmt in ("chexpert", "mimic"):
        kwargs.update(uncertainty=uncertainty, views=views, check_files=check_files)
    return reader(path, **kwargs)


def detect_format(path: str | Path) -> str:
    """The table format, told from the file's columns (CSV header or the first JSONL record)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "metadata"
    columns = set(read_csv(path, [], nrows=0).columns)
    if sep := _separator(columns):
        raise UserError(f"cannot tell the format of {path}: its columns look separated by {sep}, not commas: "
                        "save it comma-separated")
    signatures = (("chexpert", {"Path", "Frontal/Lateral"}), ("mimic", {"dicom_id", "ViewPosition"}),
                  ("mimic", {"subject_id", "study_id", NO_FINDING}), ("ham10000", {"image_id", "dx"}),
                  ("isic", {"image", "MEL"}), ("metadata", {"file_name"}))
    for fmt, needs in signatures:
        if needs <= columns:
            return fmt
    # Half a signature is most likely that format with a column renamed or dropped: say which.
    near = [f"a {fmt} table without {', '.join(sorted(needs - columns))}" for fmt, needs in signatures
            if needs & columns]
    if columns & {"caption", "text", "prompt", "captions"}:  # an image-and-caption table under other names
        near = ["a metadata table (image, caption) whose columns must be named file_name and text"]
    raise UserError(f"cannot tell the format of {path} from its columns ({', '.join(sorted(columns)) or 'none'})"
                    + (f"; it looks like {' or '.join(near)}" if near else "")
                    + f": fix its header, or pass the format (--data_format), one of {', '.join(TABLE_FORMATS)}")


# ------------------------------------------------------------------------------- readers


def read_chexpert(path: str | Path, image_root: str | Path | None = None, template: str | CaptionTemplate | None = None,
                  findings: Sequence[str] | None = None, uncertainty: str = "ignore",
                  views: str | Sequence[str] = "frontal", demographics: bool = False,
                  check_files: bool = True) -> Read:
    """CheXpert train.csv/valid.csv. Paths are relative to the folder holding CheXpert-v1.0-small/.

    Default image root: the table's parent's parent (CheXpert's layout), else its parent,
    whichever holds the first images. group = the patient ("patient00001") from the path.
    """
    path, template = Path(path), load_template(template or DEFAULT_TEMPLATE["chexpert"])
    # Columns a setting reads are needed only with it: a table cut without Sex and Age still trains.
    positions = not (isinstance(views, str) and views.strip().lower() in ("all", "frontal", "lateral"))
    needed = [c for c in CHEXPERT_COLUMNS if (c not in ("Sex", "Age") or demographics) and (c != "AP/PA" or positions)]
    df = read_csv(path, needed, dtype={"Path": str})
    df, left_out = _keep_views(df, path, views, "Frontal/Lateral", "AP/PA")
    rels = df["Path"]
    root = _chexpert_root(path, rels, image_root)
    images, found = _resolve(path.name, df.index, rels, root, check_files, start="CheXpert-v1.0-small/")
    found += left_out
    groups = rels.str.extract(r"(patient\d+)", expand=False)
    for line, group, image in zip(df.index, groups, images):
        if image is not None and not isinstance(group, str):  # a bad path is reported once, above
            found.append(_row(path.name, line, "no patientNNNNN in Path, so the patient-level split cannot use it"))
    values, bad = _label_values(path.name, df, CHEXPERT_LABELS, blank_ok=True)
    found += bad
    values = apply_uncertainty(values, uncertainty)
    people = (df["Age"], df["Sex"]) if demographics else None
    captions = _captions(values, CHEXPERT_LABELS, template, findings, people)
    return _finish(path.name, df.index, images, captions, groups.tolist(), CHEXPERT_LABELS, values, found)


def read_mimic(path: str | Path, image_root: str | Path | None = None, template: str | CaptionTemplate | None = None,
               findings: Sequence[str] | None = None, uncertainty: str = "ignore",
               views: str | Sequence[str] = "frontal", demographics: bool = False,
               check_files: bool = True) -> Read:
    """MIMIC-CXR-JPG from mimic-cxr-2.0.0-chexpert.csv or -metadata.csv; the other is found beside it.

    One example per image (metadata row), labelled by its study. Images are
    files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg under the image root
    (default: the tables' folder, as PhysioNet ships it). group = subject_id. The tables hold no
    age or sex (those are in MIMIC-IV), so demographics are not available.
    """
    if demographics:
        raise UserError("MIMIC-CXR-JPG tables carry no age or sex: run without demographics")
    path, template = Path(path), load_template(template or DEFAULT_TEMPLATE["mimic"])
    ids = {"subject_id": str, "study_id": str, "dicom_id": str}
    given = "metadata" if "dicom_id" in read_csv(path, [], nrows=0).columns else "chexpert"
    other = _beside(path, given, "chexpert" if given == "metadata" else "metadata")
    labels_csv, meta_csv = (other, path) if given == "metadata" else (path, other)
    labels = read_csv(labels_csv, ["subject_id", "study_id"] + MIMIC_LABELS, dtype=ids)
    meta = read_csv(meta_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"], dtype=ids)
    meta, left_out = _keep_views(meta, meta_csv, views, None, "ViewPosition")

    # Label problems are reported once per study, at its chexpert.csv line; its images are left out.
    values, found = _label_values(labels_csv.name, labels, MIMIC_LABELS, blank_ok=True)
    bad_lines = {line for _, line, _ in found}
    found += left_out
    labels = labels.assign(_row=np.arange(len(labels)), _ok=~labels.index.isin(bad_lines))
    labels = labels.drop_duplicates(["subject_id", "study_id"])  # a repeated study would duplicate its images
    joined = meta.reset_index(names="_line").merge(labels[["subject_id", "study_id", "_row", "_ok"]], how="left",
                                                   on=["subject_id", "study_id"], validate="many_to_one")
    joined = joined.set_index("_line").rename_axis(None)
    unlabelled = joined["_ok"].isna()
    if unlabelled.any():
        n_images, n_studies = int(unlabelled.sum()), joined[unlabelled].study_id.nunique()
        found.append(_file(meta_csv.name, f"{n_images} image(s) of {n_studies} study(ies) have no labels in "
                                          f"{labels_csv.name} (first: line {joined.index[unlabelled][0]}); left out",
                           "warning"))
    joined = joined[joined["_ok"].eq(True)]

    root = _root(image_root, meta_csv.parent)
    sid, study = joined["subject_id"].astype(str), joined["study_id"].astype(str)
    rels = "files/p" + sid.str[:2] + "/p" + sid + "/s" + study + "/" + joined["dicom_id"].astype(str) + ".jpg"
    images, more = _resolve(meta_csv.name, joined.index, rels, root, check_files, start="files/")
    values = apply_uncertainty(values[joined["_row"].to_numpy(dtype=int)], uncertainty)
    captions = _captions(values, MIMIC_LABELS, template, findings, None)
    return _finish(meta_csv.name, joined.index, images, captions, sid.tolist(), MIMIC_LABELS, values, found + more)


def read_ham10000(path: str | Path, image_root: str | Path | None = None, template: str | CaptionTemplate | None = None,
                  findings: Sequence[str] | None = None, demographics: bool = False) -> Read:
    """HAM10000_metadata.csv. Images {image_id}.jpg are searched for once, recursively, under
    the image root (default: the table's folder), so HAM10000_images_part_1/2 both count.
    group = lesion_id (several images show one lesion). Labels: one-hot over HAM10000_DX names.
    """
    path, template = Path(path), load_template(template or DEFAULT_TEMPLATE["ham10000"])
    df = read_csv(path, ["lesion_id", "image_id", "dx"] + (["age", "sex"] if demographics else []),
                   dtype={"lesion_id": str, "image_id": str, "dx": str})
    names = list(HAM10000_DX.values())
    dx = df["dx"].str.strip().str.lower().map(HAM10000_DX)
    found = [_row(path.name, line, f"{'unknown dx ' + _cell(code) if isinstance(code, str) else 'dx is blank'}: "
                                   f"use one of {', '.join(HAM10000_DX)}")
             for line, code in df["dx"][dx.isna()].items()]
    values = (dx.to_numpy()[:, None] == np.array(names)[None, :]).astype(float)
    images, more = _search(path.name, df.index, _image_ids(df["image_id"]), _root(image_root, path.parent))
    people = (df["age"], df["sex"]) if demographics else None
    captions = _captions(values, names, template, findings, people)
    return _finish(path.name, df.index, images, captions, df["lesion_id"].tolist(), names, values, found + more)


def read_isic2019(path: str | Path, image_root: str | Path | None = None, template: str | CaptionTemplate | None = None,
                  findings: Sequence[str] | None = None, demographics: bool = False) -> Read:
    """ISIC_2019_Training_GroundTruth.csv (image + one-hot MEL ... UNK).

    The ground truth has no lesion key: group comes from ISIC_2019_Training_Metadata.csv's
    lesion_id when that file sits beside it (its age_approx/sex give demographics); otherwise
    group is None and splits are image-level. UNK is kept in labels but never named in captions.
    """
    path, template = Path(path), load_template(template or DEFAULT_TEMPLATE["isic"])
    codes = list(ISIC2019_DX)
    df = read_csv(path, ["image"] + codes, dtype={"image": str})
    values, found = _label_values(path.name, df, codes, blank_ok=False, allowed=(0.0, 1.0))
    bad_lines = {line for _, line, _ in found}
    for line, row in zip(df.index, values):
        on = [c for c, v in zip(codes, row) if v == 1.0]
        if len(on) != 1 and line not in bad_lines:
            found.append(_row(path.name, line, f"{len(on)} diagnoses ({', '.join(on) or 'none'}): "
                                               "exactly one column must be 1.0"))
    metadata = path.with_name(path.name.replace("GroundTruth", "Metadata"))
    groups, people = [None] * len(df), None
    if metadata != path and metadata.is_file():
        meta = read_csv(metadata, ["image", "lesion_id"] + (["age_approx", "sex"] if demographics else []),
                         dtype={"image": str, "lesion_id": str})
        meta = meta.assign(image=_image_ids(meta["image"])).drop_duplicates("image").set_index("image")
        meta = meta.reindex(_image_ids(df["image"]))
        groups = [g if isinstance(g, str) else None for g in meta["lesion_id"]]
        people = (meta["age_approx"], meta["sex"]) if demographics else None
    elif demographics:
        raise UserError(f"demographics need {metadata.name} beside {path} (age_approx, sex): add it or run without")
    names = [ISIC2019_DX[c] for c in codes]
    images, more = _search(path.name, df.index, _image_ids(df["image"]), _root(image_root, path.parent))
    findings = findings if findings is not None else (template.findings or names[:-1])  # not "unknown"
    captions = _captions(values, names, template, findings, people)
    return _finish(path.name, df.index, images, captions, groups, names, values, found + more)


def read_metadata(path: str | Path, image_root: str | Path | None = None,
                  check_files: bool = True) -> Read:
    """metadata.jsonl/.csv (diffusers imagefolder): file_name relative to the file's folder, text.

    An optional `group` (or `patient_id`) column is the split key; other numeric columns are
    kept as labels. Empty text is an error; a file listed twice is a warning (first kept).
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        df, found = _read_jsonl(path)
    else:
        strings = dict.fromkeys(["file_name", "text", "group", "patient_id"], str)
        df, found = read_csv(path, ["file_name", "text"], dtype=strings), []
    images, more = _resolve(path.name, df.index, df["file_name"], _root(image_root, path.parent), check_files)
    text = [" ".join(t.split()) if isinstance(t, str) else "" for t in df["text"]]  # one line: captions are prompts
    found += more
    for line, raw, t in zip(df.index, df["text"], text):
        if not t:  # a number is no caption (a label column named text?): refused, not turned into one
            kind = "blank" if isinstance(raw, str) else _not_text(raw)
            found.append(_row(path.name, line, "empty or missing text: write the image's caption" if kind == "blank"
                              else f"text is {kind}, not a caption: write the image's caption as a string"))
        elif "\x00" in t:  # a raw NUL in a CSV cell, \u0000 in JSON: garbage a prompt cannot carry
            found.append(_row(path.name, line, "text holds NUL characters (\\x00): remove them from the caption"))
    key = next((c for c in ("group", "patient_id") if c in df.columns), None)
    groups = [None if pd.isna(g) else str(g) for g in df[key]] if key else [None] * len(df)
    names = [c for c in df.columns if c not in ("file_name", "text", key) and is_label_column(df[c])]
    cells = df[names].apply(lambda column: column.map(_blank_if_spaces))
    numbers = cells.apply(pd.to_numeric, errors="coerce")
    for line, row in (cells.notna() & numbers.isna()).iterrows():  # "yes" in a label column: refused, not 0
        if row.any():
            cells_text = ", ".join(f"{c}={_cell(df.at[line, c])}" for c in names if row[c])
            found.append(_row(path.name, line, f"label(s) {cells_text} not a number: write 1, 0, -1 or leave blank"))
    values = numbers.to_numpy(dtype=float) if names else np.zeros((len(df), 0))
    return _finish(path.name, df.index, images, text, groups, names, values, found)


def _blank_if_spaces(value):
    return (value.strip() or np.nan) if isinstance(value, str) else value


def is_label_column(column: pd.Series) -> bool:
    """A metadata column of labels: numbers, or mostly numbers with some cells written wrong (a text
    column such as a view or a note has next to none)."""
    if pd.api.types.is_numeric_dtype(column):
        return True
    filled = column.map(_blank_if_spaces).dropna()
    return len(filled) > 0 and pd.to_numeric(filled, errors="coerce").notna().mean() > 0.5


# ------------------------------------------------------------------------------- helpers


def read_csv(path: Path, required: Sequence[str], **kwargs) -> pd.DataFrame:
    """The table with index = file line number (header = 1); all-blank lines dropped."""
    if "nrows" not in kwargs:  # a whole table: rows with too few or too many fields, all of them, first
        uneven = _uneven_rows(Path(path))
        if uneven:
            raise DatasetError(uneven, context=str(path), hint="fix or remove these rows (a cell with a comma "
                               "must be quoted)")
    try:
        df = pd.read_csv(path, skip_blank_lines=False, low_memory=False, **kwargs)
    except UnicodeDecodeError:  # its position counts from the start of pandas' chunk, not the file
        raise DatasetError([_not_utf8(path)], context=str(path)) from None
    except (OSError, ValueError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
        # ';'-separated rows with decimal commas ("0,5") fail to parse before any column is checked
        sep = isinstance(err, pd.errors.ParserError) and _separator(_header(path))
        what = f"its columns look separated by {sep}, not commas: save it comma-separated" if sep else \
            f"cannot read the table: {err}"
        raise DatasetError([Problem(str(path), what)], context=str(path)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        sep = _separator(df.columns)
        what = f"its columns look separated by {sep}, not commas: save it comma-separated" if sep else \
            f"missing column(s) {', '.join(missing)}; the table needs {', '.join(required)}"
        raise DatasetError([Problem(str(path), what)], context=str(path))
    df.index = df.index + 2
    return df.dropna(how="all")


def _uneven_rows(path: Path) -> list[Problem]:
    """Rows whose field count is not the header's. pandas pads a short row with blanks (a row cut short
    would train with its missing findings read as negative) and stops at the first long one."""
    try:
        with (gzip.open(path, "rt", encoding="utf-8-sig", newline="") if path.suffix == ".gz"
              else open(path, encoding="utf-8-sig", newline="")) as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if _separator(header):
                return []  # read_csv says how to save it
            problems, line = [], reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    problems.append(Problem(f"{path.name} line {line}", f"{len(row)} fields where the header has "
                                                                        f"{len(header)}"))
                line = reader.line_num + 1
            return problems
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # pandas' read reports these


def _header(path: Path) -> list:
    """The header's columns, or none where even the header cannot be read."""
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError, pd.errors.ParserError):
        return []


def _separator(columns) -> str | None:
    """The separator ("';'" or "tabs") of a header that reading with commas left as one column, else None."""
    columns = list(columns)
    if len(columns) == 1 and isinstance(columns[0], str):
        return "';'" if ";" in columns[0] else "tabs" if "\t" in columns[0] else None
    return None


def _not_utf8(path: Path, data: bytes | None = None) -> Problem:
    """The problem of a file that is not UTF-8, naming its first bad line (found only after a read failed)."""
    line = None
    try:
        if data is None and path.suffix.lower() not in (".bz2", ".xz", ".zip", ".zst", ".tar"):
            with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as f:  # as pandas infers it
                data = f.read()
        if data is not None:
            data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
    except OSError:
        pass
    return Problem(str(path), "not UTF-8 text" + (f" (line {line})" if line else "") + ": re-save it as UTF-8")


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, Found]:
    """One record per line; a line that is not a JSON object is a row problem, not a crash."""
    records, lines, found = [], [], []
    try:
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM, as Windows editors write it
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # newlines as read_text reads them
    except OSError as err:
        raise DatasetError([Problem(str(path), f"cannot read the metadata: {err}")], context=str(path)) from None
    except UnicodeDecodeError:
        raise DatasetError([_not_utf8(path, data)], context=str(path)) from None
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 or \x85 may sit in a caption
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            found.append(_row(path.name, number, f"not JSON ({err.msg}): fix or remove the line"))
            continue
        if not isinstance(record, dict):
            found.append(_row(path.name, number, "not a JSON object with file_name and text"))
            continue
        records.append(record)
        lines.append(number)
    df = pd.DataFrame.from_records(records, index=lines)
    missing = [c for c in ("file_name", "text") if c not in df.columns]
    if missing:
        raise DatasetError([Problem(str(path), f"no record has {' or '.join(missing)}; each line needs "
                                               "{\"file_name\": ..., \"text\": ...}")], context=str(path))
    return df, found


def _row(name: str, line: int, what: str, severity: str = "error") -> tuple[str, int, Problem]:
    return name, int(line), Problem(f"{name} line {line}", what, severity)


def _file(name: str, what: str, severity: str = "error") -> tuple[str, int, Problem]:
    return name, 0, Problem(name, what, severity)


def _root(image_root: str | Path | None, default: Path) -> str:
    return os.path.abspath(os.path.expanduser(image_root if image_root is not None else default))


def _chexpert_root(table: Path, rels: pd.Series, image_root: str | Path | None) -> str:
    """image_root, else the first of parent.parent / parent holding any of the first 20 images."""
    if image_root is not None:
        return _root(image_root, table.parent)
    candidates = [_root(None, table.parent.parent), _root(None, table.parent)]
    sample = [r for r in rels.head(20) if isinstance(r, str) and ".." not in r and not os.path.isabs(r)]
    for root in candidates:
        if any(os.path.isfile(os.path.join(root, r)) for r in sample):
            return root
    return candidates[0]  # nothing found: the problems will name the paths under CheXpert's layout


def _beside(path: Path, given: str, wanted: str) -> Path:
    """MIMIC's other table: same name with `given` replaced by `wanted`, .csv or .csv.gz."""
    stem = path.name.replace(given, wanted).removesuffix(".gz").removesuffix(".csv")
    for name in (stem + ".csv", stem + ".csv.gz"):
        if (path.parent / name).is_file() and name != path.name:
            return path.parent / name
    raise UserError(f"{path} needs its {wanted} table beside it ({stem}.csv or .csv.gz): put them in one folder")


def _keep_views(df: pd.DataFrame, path: Path, views: str | Sequence[str], frontal_lateral: str | None,
                position: str) -> tuple[pd.DataFrame, Found]:
    """Rows of the wanted views: "frontal", "lateral", "all", or positions such as ("AP", "PA"), and a
    warning for the rows left out because their view cannot be told (blank, or neither Frontal nor Lateral)."""
    if isinstance(views, str) and views.strip().lower() in ("all", "frontal", "lateral"):
        views = views.strip().lower()
    if views == "all":
        return df, []
    if views in ("frontal", "lateral") and frontal_lateral:  # CheXpert says it in its own column
        column = frontal_lateral
        cells = _cells(df[column])  # "Frontal " is frontal too
        keep, unknown = cells.str.lower() == views, ~cells.str.lower().isin(["frontal", "lateral"])
    else:
        if views in ("frontal", "lateral"):
            wanted = MIMIC_FRONTAL if views == "frontal" else MIMIC_LATERAL
        else:
            wanted = [v.strip().upper() for v in ([views] if isinstance(views, str) else views)]
        column = position
        cells = _cells(df[column])
        keep, unknown = cells.str.upper().isin(wanted), cells == ""  # other positions (MIMIC's LAO, SWIMMERS) are views
        if frontal_lateral:  # CheXpert leaves AP/PA blank on lateral images
            unknown &= _cells(df[frontal_lateral]).str.lower() != "lateral"
    if len(df) and not keep.any():
        values = set(cells.str.upper()) - {""}
        seen = sorted(v for v in values if _a_word(v))
        others = f"{', ' if seen else ''}{len(values) - len(seen)} other(s) not shown" if len(seen) < len(values) else ""
        raise UserError(f"{path}: no rows with views {views!r} (its {column} values: "
                        f"{', '.join(seen) or ('' if others else 'none')}{others})")
    found = []
    for value, lines in df.index[unknown.to_numpy()].groupby(cells[unknown].to_numpy()).items():
        shown = repr(value) if _a_word(value) else "holds a value that"
        what = f"{column} is blank" if value == "" else f"{column} {shown} is neither Frontal nor Lateral"
        found += _each_or_once(path.name, list(lines), f"{what}: left out", "warning")
    return df[keep], found


def _a_word(value: str) -> bool:
    """A short word is a view written wrong; anything else may be a shifted cell holding a path, which
    names a patient: not shown."""
    return re.fullmatch(r"[A-Za-z ]{1,20}", value) is not None


def _cells(column: pd.Series) -> pd.Series:
    """Cells as stripped text, blank as "" (pandas keeps missing cells missing through astype(str))."""
    return column.fillna("").astype(str).str.strip()


def _resolve(name: str, lines, rels, root: str, check_files: bool, start: str = "") -> tuple[list[str | None], Found]:
    """Absolute image paths (None for a bad row) and the problems: empty, outside the root, missing.

    Paths written on Windows ('\\') are read with '/' unless a file is named that way. When no
    image is found at all, the cause is the image root or the paths' style, not each row: more
    than FEW rows missing or absolute are one problem for the file, not 200k identical lines.
    start: the folder the paths start from, for the hint ("CheXpert-v1.0-small/").
    """
    images, found, missing, absolute = [], [], [], []
    inside = root.rstrip(os.sep) + os.sep
    look = check_files and os.path.isdir(root)  # no root: one problem below, not a failed lookup per row
    for line, rel in zip(lines, rels):
        image = None
        if not isinstance(rel, str) or not rel.strip():
            kind = "blank" if isinstance(rel, str) else _not_text(rel)
            found.append(_row(name, line, "empty image path" if kind == "blank" else
                              f"its image path is {kind}, not text: write the file's path as a string"))
            images.append(None)
            continue
        full = os.path.normpath(os.path.join(root, rel))
        if "\\" in rel and not (full.startswith(inside) and os.path.isfile(full)):  # a table written on Windows
            rel = rel.replace("\\", "/")
            full = os.path.normpath(os.path.join(root, rel))
        if (os.path.isabs(rel) and not full.startswith(inside)) or re.match(r"[A-Za-z]:/", rel):  # C:/ too
            absolute.append(line)
        elif not full.startswith(inside):
            # Messages name the row, never its path: paths name patients (patient00001/, p10000032/).
            found.append(_row(name, line, f"its image path leads outside the image root {root}: not read"))
        elif check_files and not (look and os.path.isfile(full)):
            missing.append(line)
        else:
            image = full
        images.append(image)
    none_found = all(image is None for image in images)
    if missing and check_files and not look:
        found.append(_file(name, f"the image root {root} does not exist: fix --image_root"))
    elif none_found and len(missing) > FEW:
        found.append(_file(name, f"none of the {len(missing)} image paths is found under the image root {root}: "
                                 "set --image_root to the folder the paths start from"
                                 + (f" (e.g. the one holding {start})" if start else "")))
    else:
        found += [_row(name, line, f"its image file is not found under the image root {root}: fix the path or set "
                                   "--image_root") for line in missing]
    what = (f"its image path is absolute and leads outside the image root {root}: not read; absolute paths from "
            "another machine: make them relative to the image root")
    found += _each_or_once(name, absolute, what) if none_found else [_row(name, line, what) for line in absolute]
    return images, found


def _search(name: str, lines, ids: pd.Series, root: str) -> tuple[list[str | None], Found]:
    """Images named {id}.jpg/.jpeg/.png anywhere under root: one walk, then a lookup per row."""
    index, repeated = {}, 0
    for folder, _, files in walk_once(root):  # sorted: the same file wins on every machine
        for file in files:
            stem, suffix = os.path.splitext(file)
            if suffix.lower() in IMAGE_SUFFIXES:
                repeated += stem in index
                index.setdefault(stem, os.path.join(folder, file))
    images, found, missing = [], [], []
    for line, image_id in zip(lines, ids):
        image = index.get(image_id) if isinstance(image_id, str) else None
        if not isinstance(image_id, str) or not image_id.strip():
            found.append(_row(name, line, "empty image id"))
        elif "/" in image_id or "\\" in image_id:
            found.append(_row(name, line, "image id is a path, not a name: not read"))  # (a path names a patient)
        elif image is None:
            missing.append((line, image_id))
        images.append(image)
    if missing and not os.path.isdir(root):
        found.append(_file(name, f"the image root {root} does not exist: fix --image_root"))
    elif len(missing) > FEW and all(image is None for image in images):  # one line, not one per row
        found.append(_file(name, f"none of the {len(missing)} images ({missing[0][1]}.jpg ...) is found under the "
                                 f"image root {root}: set --image_root to a folder holding them (subfolders count)"))
    else:
        found += [_row(name, line, f"no image {image_id}.jpg under {root}: set --image_root to their folder")
                  for line, image_id in missing]
    if repeated:  # Kaggle's HAM10000 copy ships every image twice (HAM10000_ and ham10000_images_part_*)
        found.append(_file(name, f"{repeated} image name(s) occur more than once under {root}; "
                                 "the first in sorted order is used", "warning"))
    return images, found


def _each_or_once(name: str, lines: Sequence[int], what: str, severity: str = "error") -> Found:
    """A problem per row, or past FEW rows one for the file that says how many and the first."""
    if len(lines) <= FEW:
        return [_row(name, line, what, severity) for line in lines]
    return [_file(name, f"{len(lines)} rows (first: line {lines[0]}): {what}", severity)]


def _image_ids(ids: pd.Series) -> pd.Series:
    """HAM10000/ISIC image ids as the image search knows them: spaces and a known image suffix dropped."""
    suffix = "(" + "|".join(map(re.escape, IMAGE_SUFFIXES)) + ")$"
    return ids.str.strip().str.replace(suffix, "", case=False, regex=True)


def _cell(value) -> str:
    """A table cell as a message shows it: 'yes', 2.0 or blank (not np.float64(nan)). Text that is not a
    short word or a number is not shown: a shifted cell may hold a path or an id that names a patient."""
    if isinstance(value, str):
        return repr(value) if _a_word(value) or re.fullmatch(r"[-+0-9.,eE ]{1,12}", value) else "<a value not shown>"
    return "blank" if value is None or (isinstance(value, float) and value != value) else str(value)


def _not_text(value) -> str:
    """What a cell that should hold text holds instead, in JSON's words."""
    if value is None or (isinstance(value, float) and value != value):
        return "blank"
    if isinstance(value, (bool, np.bool_)):
        return "true/false"
    if isinstance(value, numbers.Number):
        return "a number"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _label_values(name: str, df: pd.DataFrame, labels: Sequence[str], blank_ok: bool,
                  allowed: Sequence[float] = (1.0, 0.0, -1.0)) -> tuple[np.ndarray, Found]:
    """The label cells as floats (blank = NaN) and one problem per row holding any other value."""
    raw = df[list(labels)]
    values = raw.apply(pd.to_numeric, errors="coerce")
    bad = (values.notna() & ~values.isin(list(allowed))) | (values.isna() & raw.notna())
    if not blank_ok:
        bad |= raw.isna()
    found = []
    for line in df.index[bad.any(axis=1).to_numpy()]:
        cells = ", ".join(f"{c}={_cell(raw.at[line, c])}" for c in labels if bad.at[line, c])
        accepted = ", ".join(map(str, allowed)) + (" or blank" if blank_ok else "")
        found.append(_row(name, line, f"unknown label value(s) {cells}: use {accepted}"))
    return values.to_numpy(dtype=float), found


def _captions(values: np.ndarray, names: Sequence[str], template: CaptionTemplate,
              findings: Sequence[str] | None, people: tuple[pd.Series, pd.Series] | None) -> list[str]:
    """build_caption for every row, called once per distinct (positives, age, sex)."""
    chosen = list(findings if findings is not None else template.findings or names)
    unknown = [f for f in chosen if f not in names]
    if unknown:
        raise UserError(f"finding(s) {', '.join(unknown)} are not labels of this table ({', '.join(names)})")
    positive = values[:, [names.index(f) for f in chosen]] == 1.0
    # Few distinct combinations of positives: caption each once. A bit code per row is much
    # faster than np.unique(axis=0); tables have at most 14 findings, far below 63 bits.
    codes = positive @ (2 ** np.arange(len(chosen), dtype=np.int64))
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    patterns = positive[first]
    bodies = [build_caption(dict(zip(chosen, map(float, p))), template, chosen) for p in patterns]
    if people is None:
        return [bodies[i] for i in inverse]
    # build_caption's own wrapping, once per distinct (caption, age, sex).
    ages = pd.to_numeric(people[0], errors="coerce").round().tolist()
    cache, captions = {}, []
    for i, age, sex in zip(inverse.tolist(), ages, people[1].tolist()):
        key = (i, age if age == age else None, sex if isinstance(sex, str) else None)
        if key not in cache:
            cache[key] = add_demographics(bodies[i], template, {"age": key[1], "sex": key[2]})
        captions.append(cache[key])
    return captions


def _finish(name: str, lines, images: list[str | None], captions: list[str], groups: list, names: Sequence[str],
            values: np.ndarray, found: Found) -> Read:
    """Examples for the rows without an error (first of any duplicate image); problems in file order."""
    bad = {problem.where for _, _, problem in found if problem.severity == "error"}
    examples, first = [], {}
    # The cyclic GC would rescan every Example, Path and label dict made so far, again and
    # again; none of them form cycles, so pausing it halves the time for 200k rows.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for line, image, caption, group, row in zip(lines, images, captions, groups, values.tolist()):
            source = f"{name} line {line}"
            if source in bad or image is None:
                continue
            if image in first:
                found.append(_row(name, line, f"its image is already listed at {first[image]}; this row is left out",
                                  "warning"))
                continue
            first[image] = source
            labels = {k: v for k, v in zip(names, row) if v == v}  # NaN (U-Ignore) = unknown: left out
            examples.append(Example(Path(image), caption, group if isinstance(group, str) else None, labels, source))
    finally:
        if collecting:
            gc.enable()
    if bad:  # the refused rows' images are still decoded, for a one-round report
        refused = {f"{name} line {line}": image for line, image in zip(lines, images) if image is not None}
        found = [(n, line, replace(p, image=refused.get(p.where)) if p.where in bad else p) for n, line, p in found]
    found.sort(key=lambda f: (f[0], f[1]))
    return examples, [problem for _, _, problem in found]

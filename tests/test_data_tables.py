"""Clinical tables to Examples: paths, captions, groups, labels per format; every problem at once."""

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sdtune.data import tables
from sdtune.data.dataset import DataConfig, modality_of
from sdtune.data.records import DatasetError
from sdtune.data.tables import CHEXPERT_COLUMNS, CHEXPERT_LABELS, MIMIC_LABELS, detect_format, read_table
from sdtune.errors import UserError

NEGATIVE = "Chest x-ray of a patient with no significant findings"


def write_csv(path: Path, columns, rows) -> Path:
    """rows: dicts; missing cells are blank, as in CheXpert."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def chexpert_row(patient: int, view: str = "frontal", ap: str = "AP", sex: str = "Female", age: int = 50, **labels):
    rel = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view{1 if view == 'frontal' else 2}_{view}.jpg"
    return {"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": view.title(), "AP/PA": ap,
            **{k.replace("_", " "): v for k, v in labels.items()}}


@pytest.fixture
def chexpert(tmp_path):
    """tmp/CheXpert-v1.0-small/train.csv: frontal AP (Cardiomegaly, Edema uncertain), its lateral, frontal PA normal."""
    rows = [
        chexpert_row(1, Cardiomegaly=1.0, Edema=-1.0, Fracture=0.0),
        chexpert_row(1, view="lateral", ap="LL", Cardiomegaly=1.0, Edema=-1.0),
        chexpert_row(2, ap="PA", sex="Male", age=61, No_Finding=1.0),
    ]
    touch(*(tmp_path / r["Path"] for r in rows))
    return write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)


def test_chexpert_examples(chexpert):
    examples, problems = read_table(chexpert)
    assert problems == []
    root = chexpert.parent.parent
    assert [ex.image for ex in examples] == [root / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                             root / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"]
    assert all(ex.image.is_absolute() for ex in examples)
    assert [ex.caption for ex in examples] == ["Chest x-ray of a patient with Cardiomegaly", NEGATIVE]
    assert [ex.group for ex in examples] == ["patient00001", "patient00002"]
    assert [ex.source for ex in examples] == ["train.csv line 2", "train.csv line 4"]  # file lines, header = 1
    # U-Ignore: the uncertain Edema is unknown (absent); blanks are negative.
    assert examples[0].labels == {name: 1.0 if name == "Cardiomegaly" else 0.0 for name in CHEXPERT_LABELS if name != "Edema"}
    assert examples[1].labels["No Finding"] == 1.0 and sum(examples[1].labels.values()) == 1.0


def test_chexpert_uncertainty_template_and_demographics(chexpert):
    examples, _ = read_table(chexpert, uncertainty="ones", demographics=True)
    assert examples[0].labels["Edema"] == 1.0
    assert [ex.caption for ex in examples] == ["50 year old female. Chest x-ray of a patient with Cardiomegaly and Edema",
                                               f"61 year old male. {NEGATIVE}"]
    assert not any("patient0" in ex.caption or "study1" in ex.caption for ex in examples)
    examples, _ = read_table(chexpert, uncertainty="zeros", template="study")
    assert examples[0].labels["Edema"] == 0.0
    assert [ex.caption for ex in examples] == ["Chest X-ray showing Cardiomegaly",
                                               "Normal chest X-ray with no significant findings"]
    examples, _ = read_table(chexpert, uncertainty="ones", findings=["Edema"])
    assert examples[0].caption == "Chest x-ray of a patient with Edema"
    with pytest.raises(UserError, match="Melanoma"):
        read_table(chexpert, findings=["Melanoma"])


def test_u_ignore_keeps_a_row_whose_only_finding_is_uncertain(tmp_path):
    rows = [chexpert_row(1, Edema=-1.0)]
    table = write_csv(tmp_path / "CheXpert-v1.0-small" / "valid.csv", CHEXPERT_COLUMNS, rows)
    examples, problems = read_table(table, check_files=False)  # no image files: existence not checked
    assert problems == [] and [ex.caption for ex in examples] == [NEGATIVE] and "Edema" not in examples[0].labels
    examples, problems = read_table(table)
    assert examples == [] and "its image file is not found under the image root" in problems[0].what


@pytest.mark.parametrize("views, lines", [
    ("frontal", [2, 4]), ("all", [2, 3, 4]), ("lateral", [3]), ("AP", [2]), (("PA",), [4]), (["AP", "PA"], [2, 4]),
])
def test_chexpert_views(chexpert, views, lines):
    examples, _ = read_table(chexpert, views=views)
    assert [ex.source for ex in examples] == [f"train.csv line {n}" for n in lines]


def test_chexpert_view_that_matches_nothing_is_an_error(chexpert):
    with pytest.raises(UserError, match="no rows with views 'RL'.*AP, LL, PA"):
        read_table(chexpert, views="RL")


def test_chexpert_views_column_with_no_frontal_rows_and_blank_cells_is_one_error(tmp_path):
    # Found by tests/test_fuzz.py: blank view cells stay missing through pandas' astype(str)
    rows = [chexpert_row(1, view="lateral", ap=""), {**chexpert_row(2, ap="LL"), "Frontal/Lateral": ""}]
    table = write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)
    with pytest.raises(UserError, match=r"no rows with views 'frontal' \(its Frontal/Lateral values: LATERAL\)"):
        read_table(table)



def test_rows_whose_view_cannot_be_told_are_a_warning_not_dropped_silently(tmp_path):
    rows = [{**chexpert_row(1), "Frontal/Lateral": "Frontal "}, {**chexpert_row(2), "Frontal/Lateral": ""},
            {**chexpert_row(3), "Frontal/Lateral": "Frontl"}, chexpert_row(4, view="lateral", ap=""),
            {**chexpert_row(5), "AP/PA": " pa"}, {**chexpert_row(6), "AP/PA": ""}]
    table = write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)
    examples, problems = read_table(table, check_files=False)
    assert [ex.source for ex in examples] == ["train.csv line 2", "train.csv line 6", "train.csv line 7"]
    assert [(p.where, p.what, p.severity) for p in problems] == [
        ("train.csv line 3", "Frontal/Lateral is blank: left out", "warning"),
        ("train.csv line 4", "Frontal/Lateral 'Frontl' is neither Frontal nor Lateral: left out", "warning")]
    # Positions: a blank AP/PA is a warning on a frontal image only (CheXpert leaves it blank on laterals)
    examples, problems = read_table(table, views=["AP", "PA"], check_files=False)
    assert [ex.source for ex in examples] == ["train.csv line 2", "train.csv line 3", "train.csv line 4",
                                              "train.csv line 6"]
    assert [(p.where, p.what) for p in problems] == [("train.csv line 7", "AP/PA is blank: left out")]
    # Many such rows: one warning with their count and the first
    rows = rows[:1] + [{**chexpert_row(n), "Frontal/Lateral": ""} for n in range(2, 7)]
    table = write_csv(table, CHEXPERT_COLUMNS, rows)
    _, problems = read_table(table, check_files=False)
    assert [(p.where, p.what) for p in problems] == [
        ("train.csv", "5 rows (first: line 3): Frontal/Lateral is blank: left out")]


def test_view_cells_holding_paths_are_never_printed(tmp_path):
    """Shifted columns put paths, which name patients, in the view column: no message shows them."""
    shifted = "CheXpert-v1.0-small/train/patient00042/study1/view1_frontal.jpg"
    rows = [{**chexpert_row(1), "Frontal/Lateral": shifted}, {**chexpert_row(2), "Frontal/Lateral": "Lateral"}]
    table = write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)
    _, problems = read_table(table, views="lateral", check_files=False)
    assert [(p.where, p.what) for p in problems] == [
        ("train.csv line 2", "Frontal/Lateral holds a value that is neither Frontal nor Lateral: left out")]
    with pytest.raises(UserError) as error:
        read_table(table, check_files=False)  # no frontal row at all
    assert "patient00042" not in str(error.value).lower()
    assert "(its Frontal/Lateral values: LATERAL, 1 other(s) not shown)" in str(error.value)


def test_mimic_blank_view_position_is_a_warning(mimic):
    table = mimic / "mimic-cxr-2.0.0-metadata.csv"
    df = pd.read_csv(table, dtype=str)
    df.loc[0, "ViewPosition"] = ""
    df.to_csv(table, index=False)
    examples, problems = read_table(table)
    assert [ex.source for ex in examples] == ["mimic-cxr-2.0.0-metadata.csv line 4"]
    assert ("mimic-cxr-2.0.0-metadata.csv line 2", "ViewPosition is blank: left out", "warning") in \
        [(p.where, p.what, p.severity) for p in problems]

def test_chexpert_image_root(chexpert, tmp_path):
    # The table moved away from the images: image_root says where Paths start.
    moved = tmp_path / "tables" / "train.csv"
    moved.parent.mkdir()
    moved.write_bytes(chexpert.read_bytes())
    examples, problems = read_table(moved, image_root=tmp_path)
    assert problems == [] and examples[0].image == tmp_path / pd.read_csv(chexpert).Path[0]
    # Table beside CheXpert-v1.0-small/ (not inside it): found via the table's own folder.
    beside = tmp_path / "train.csv"
    beside.write_bytes(chexpert.read_bytes())
    examples, problems = read_table(beside)
    assert problems == [] and len(examples) == 2


def test_every_bad_row_is_reported_at_once_and_nothing_outside_the_root_is_touched(tmp_path, monkeypatch):
    rows = [
        chexpert_row(1, Edema=1.0),                                   # line 2: fine
        chexpert_row(2),                                              # line 3: image missing
        {**chexpert_row(3), "Path": "../../etc/passwd"},              # line 4: escapes the root
        chexpert_row(4, Edema="yes"),                                 # line 5: unknown label value
        {**chexpert_row(5), "Path": "/etc/hosts"},                    # line 6: absolute path elsewhere
        chexpert_row(6, Cardiomegaly=2.0, Fracture=-2),               # line 7: two unknown values
        chexpert_row(1, Edema=1.0),                                   # line 8: same image again
        {**chexpert_row(7), "Path": "CheXpert-v1.0-small/train/anon/study1/view1_frontal.jpg"},  # line 9: no patient
    ]
    table = write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)
    touch(*(tmp_path / rows[i]["Path"] for i in (0, 3, 5, 7)))
    checked = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(tables.os.path, "isfile", lambda p: checked.append(str(p)) or real_isfile(p))

    examples, problems = read_table(table)

    assert [ex.source for ex in examples] == ["train.csv line 2"]
    assert [(p.where, p.severity) for p in problems] == [
        ("train.csv line 3", "error"), ("train.csv line 4", "error"), ("train.csv line 5", "error"),
        ("train.csv line 6", "error"), ("train.csv line 7", "error"), ("train.csv line 8", "warning"),
        ("train.csv line 9", "error")]
    what = [p.what for p in problems]
    assert f"its image file is not found under the image root {tmp_path}" in what[0]
    assert "its image path leads outside the image root" in what[1]
    assert what[2] == "unknown label value(s) Edema='yes': use 1.0, 0.0, -1.0 or blank"
    assert "leads outside" in what[3]
    assert not any("patient0" in w or "passwd" in w for w in what)  # the row is named, never its path
    assert "Cardiomegaly=" in what[4] and "Fracture=" in what[4]
    assert "already listed at train.csv line 2" in what[5]
    assert "no patientNNNNN in Path" in what[6]
    assert all(p.startswith(str(tmp_path)) for p in checked), checked



def five_frontal_rows(tmp_path, **path):
    """train.csv with 5 frontal rows (more than tables.FEW) and their images; path: line -> another Path."""
    rows = [chexpert_row(n) for n in range(1, 6)]
    touch(*(tmp_path / r["Path"] for r in rows))
    rows = [{**r, "Path": path.get(f"line{n}", r["Path"])} for n, r in enumerate(rows, start=2)]
    return write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", CHEXPERT_COLUMNS, rows)


def test_a_wrong_image_root_is_one_problem_not_one_per_row(tmp_path):
    table = five_frontal_rows(tmp_path)
    examples, problems = read_table(table, image_root=tmp_path / "nowhere")
    assert examples == [] and [(p.where, p.what) for p in problems] == [
        ("train.csv", f"the image root {tmp_path / 'nowhere'} does not exist: fix --image_root")]
    examples, problems = read_table(table, image_root=tmp_path / "CheXpert-v1.0-small")  # one level too deep
    assert examples == [] and [(p.where, p.what) for p in problems] == [
        ("train.csv", f"none of the 5 image paths is found under the image root {tmp_path / 'CheXpert-v1.0-small'}: "
                      "set --image_root to the folder the paths start from "
                      "(e.g. the one holding CheXpert-v1.0-small/)")]
    # Some images found: each missing one is its row's problem
    (tmp_path / pd.read_csv(table).Path[0]).unlink()
    examples, problems = read_table(table)
    assert len(examples) == 4 and [p.where for p in problems] == ["train.csv line 2"]
    assert "its image file is not found under the image root" in problems[0].what and "--image_root" in problems[0].what


def test_windows_and_absolute_image_paths(tmp_path):
    rel = chexpert_row(1)["Path"]
    table = five_frontal_rows(tmp_path, line2=rel.replace("/", "\\"), line3="..\\..\\etc\\passwd",
                              line4="C:\\Users\\alice\\" + chexpert_row(3)["Path"].replace("/", "\\"))
    examples, problems = read_table(table)
    assert [ex.source for ex in examples] == ["train.csv line 2", "train.csv line 5", "train.csv line 6"]
    assert examples[0].image == tmp_path / rel  # a table written on Windows: its '\\' read as '/'
    assert [p.where for p in problems] == ["train.csv line 3", "train.csv line 4"]
    assert "leads outside the image root" in problems[0].what
    assert problems[1].what.endswith("absolute paths from another machine: make them relative to the image root")
    # Every row absolute, from another machine: one problem, not one per row
    elsewhere = {f"line{n}": f"/home/alice/{chexpert_row(n - 1)['Path']}" for n in range(2, 7)}
    table = five_frontal_rows(tmp_path, **elsewhere)
    examples, problems = read_table(table)
    assert examples == [] and [p.where for p in problems] == ["train.csv"]
    assert problems[0].what.startswith("5 rows (first: line 2): its image path is absolute and leads outside")
    assert not any("patient0" in p.what or "alice" in p.what for p in problems)


def test_ham10000_wrong_image_root_is_one_problem(ham, tmp_path):
    _, problems = read_table(ham, image_root=tmp_path / "nowhere")
    assert [p.where for p in problems] == ["HAM10000_metadata.csv", "HAM10000_metadata.csv line 5"]  # + the unknown dx
    assert problems[0].what == f"the image root {tmp_path / 'nowhere'} does not exist: fix --image_root"
    (tmp_path / "empty").mkdir()
    _, problems = read_table(ham, image_root=tmp_path / "empty")
    assert [p.where for p in problems] == ["HAM10000_metadata.csv", "HAM10000_metadata.csv line 5"]
    assert problems[0].what.startswith("none of the 5 images (ISIC_0027419.jpg ...) is found under the image root")

def test_missing_columns_name_the_columns_and_the_file(tmp_path):
    columns = [c for c in CHEXPERT_COLUMNS if c not in ("AP/PA", "Edema")]
    table = write_csv(tmp_path / "train.csv", columns, [])
    with pytest.raises(DatasetError, match=r"train.csv: missing column\(s\) Edema;"):
        read_table(table, format="chexpert")  # frontal views are told by Frontal/Lateral: AP/PA is not read
    with pytest.raises(DatasetError, match=r"train.csv: missing column\(s\) AP/PA, Edema"):
        read_table(table, format="chexpert", views="AP")
    # Sex and Age are read only for demographic captions
    table = write_csv(tmp_path / "cut.csv", [c for c in CHEXPERT_COLUMNS if c not in ("Sex", "Age")], [])
    assert read_table(table, format="chexpert") == ([], [])
    with pytest.raises(DatasetError, match=r"cut.csv: missing column\(s\) Sex, Age"):
        read_table(table, format="chexpert", demographics=True)


def test_unreadable_table_and_unknown_format(tmp_path):
    table = tmp_path / "train.csv"
    table.write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot read the table"):
        read_table(table, format="chexpert")
    write_csv(table, ["a", "b"], [{"a": 1, "b": 2}])
    with pytest.raises(UserError, match=r"cannot tell the format .*\(a, b\): fix its header, or pass the format "
                                        r"\(--data_format\)"):
        read_table(table)
    write_csv(table, ["path", "Frontal/Lateral", "Edema"], [{"path": "x.jpg", "Frontal/Lateral": "Frontal", "Edema": 1}])
    with pytest.raises(UserError, match=r"it looks like a chexpert table without Path: fix its header"):
        read_table(table)  # a renamed Path column
    with pytest.raises(UserError, match="unsupported table format 'dicom'"):
        read_table(table, format="dicom")
    table.write_text("image,caption\na.png,Chest x-ray\n")  # not "a isic table without MEL"
    with pytest.raises(UserError, match=r"it looks like a metadata table \(image, caption\) whose columns must be "
                                        r"named file_name and text"):
        read_table(table)



def test_a_table_not_in_utf8_names_its_first_bad_line(tmp_path, monkeypatch):
    # pandas' UnicodeDecodeError counts from the start of its read chunk: no line, no fix
    table = write_csv(tmp_path / "train.csv", CHEXPERT_COLUMNS, [chexpert_row(n) for n in range(1, 5)])
    with open(table, "a", encoding="latin-1") as f:
        f.write("CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg,Female,50,Frontal,AP,Gérard\n")
    for fmt in ("auto", "chexpert"):
        with pytest.raises(DatasetError) as err:
            read_table(table, format=fmt)
        assert err.value.problems[0].what == "not UTF-8 text (line 6): re-save it as UTF-8"
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "G\xe9rard"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl: not UTF-8 text \(line 2\): re-save it as UTF-8"):
        read_table(path)


def test_rows_cut_short_or_too_long_are_all_reported_not_padded(tmp_path):
    """pandas pads a short row with blanks: a row cut off after its first labels would train as negative."""
    import gzip

    table = write_csv(tmp_path / "train.csv", CHEXPERT_COLUMNS, [chexpert_row(n, Edema=1) for n in range(1, 4)])
    lines = table.read_text().splitlines()
    short = lines[2].split(",")[:6]  # Path..AP/PA and No Finding: the findings are gone
    long = lines[3] + ",1,0"
    quoted = '"' + lines[1].split(",")[0] + '",' + ",".join(lines[1].split(",")[1:])  # quoted: one field still
    table.write_text("\n".join([lines[0], quoted, ",".join(short), "", long]) + "\n")
    for path in (table, tmp_path / "train.csv.gz"):
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(table.read_bytes()))
        with pytest.raises(DatasetError) as err:
            read_table(path, format="chexpert")
        n = len(CHEXPERT_COLUMNS)
        assert [str(p) for p in err.value.problems] == [f"{path.name} line 3: 6 fields where the header has {n}",
                                                        f"{path.name} line 5: {n + 2} fields where the header has {n}"]
        assert "a cell with a comma must be quoted" in str(err.value)
    table.write_text("\n".join([lines[0], quoted, lines[2]]) + "\n")
    examples, problems = read_table(table, format="chexpert", check_files=False)
    assert len(examples) == 2 and not problems


@pytest.mark.parametrize("sep, name", [(";", "';'"), ("\t", "tabs")])
def test_a_table_separated_by_semicolons_or_tabs_says_so(tmp_path, sep, name):
    table = tmp_path / "train.csv"
    rows = [[r[c] if c in r else "" for c in CHEXPERT_COLUMNS] for r in (chexpert_row(1, Edema="1,0"), chexpert_row(2))]
    table.write_text("\n".join(sep.join(map(str, row)) for row in [CHEXPERT_COLUMNS] + rows) + "\n")
    said = f"look separated by {name}, not commas: save it comma-separated"
    with pytest.raises(UserError, match=said):
        read_table(table)
    with pytest.raises(DatasetError, match=said):  # the decimal comma in line 2 splits it: not parsed at all
        read_table(table, format="chexpert")
    table.write_text(sep.join(CHEXPERT_COLUMNS) + "\n")
    with pytest.raises(DatasetError, match=said):  # parsed, as one column
        read_table(table, format="chexpert")

# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

SUBJECT, STUDY_1, STUDY_2, STUDY_3 = "10000032", "50414267", "53189527", "56699142"


@pytest.fixture
def mimic(tmp_path):
    labels = [
        {"subject_id": SUBJECT, "study_id": STUDY_1, "Pleural Effusion": 1.0, "Edema": -1.0},
        {"subject_id": SUBJECT, "study_id": STUDY_2, "No Finding": 1.0},
    ]
    meta = [  # dicom_id, study, view; study 3 has no labels
        ("02aa804e-bde0afdd", STUDY_1, "PA"), ("174413ec-4ec4c1f7", STUDY_1, "LATERAL"),
        ("2a2277a9-b0ded155", STUDY_2, "AP"), ("68b5c4b1-227d0485", STUDY_3, "PA"),
    ]
    write_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + MIMIC_LABELS, labels)
    write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"],
              [{"dicom_id": d, "subject_id": SUBJECT, "study_id": s, "ViewPosition": v, "Rows": 3056, "Columns": 2544}
               for d, s, v in meta])
    touch(*(tmp_path / f"files/p10/p{SUBJECT}/s{s}/{d}.jpg" for d, s, _ in meta))
    return tmp_path


@pytest.mark.parametrize("given", ["mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv"])
def test_mimic_examples_from_either_table(mimic, given):
    examples, problems = read_table(mimic / given)
    assert [ex.image for ex in examples] == [mimic / f"files/p10/p{SUBJECT}/s{STUDY_1}/02aa804e-bde0afdd.jpg",
                                             mimic / f"files/p10/p{SUBJECT}/s{STUDY_2}/2a2277a9-b0ded155.jpg"]
    assert [ex.caption for ex in examples] == ["Chest x-ray of a patient with Pleural Effusion", NEGATIVE]
    assert [ex.group for ex in examples] == [SUBJECT, SUBJECT]
    assert [ex.source for ex in examples] == ["mimic-cxr-2.0.0-metadata.csv line 2", "mimic-cxr-2.0.0-metadata.csv line 4"]
    assert examples[0].labels["Pleural Effusion"] == 1.0 and "Edema" not in examples[0].labels
    assert [(p.where, p.severity) for p in problems] == [("mimic-cxr-2.0.0-metadata.csv", "warning")]
    assert "1 image(s) of 1 study(ies) have no labels" in problems[0].what


def test_mimic_views_uncertainty_and_no_identifier_in_captions(mimic):
    examples, _ = read_table(mimic / "mimic-cxr-2.0.0-chexpert.csv", views="all", uncertainty="ones", template="study")
    assert [ex.caption for ex in examples] == ["Chest X-ray showing Edema, Pleural Effusion"] * 2 + \
        ["Normal chest X-ray with no significant findings"]
    examples, _ = read_table(mimic / "mimic-cxr-2.0.0-chexpert.csv", views=["LATERAL"])
    assert [ex.image.name for ex in examples] == ["174413ec-4ec4c1f7.jpg"]
    for ex in read_table(mimic / "mimic-cxr-2.0.0-chexpert.csv", views="all")[0]:
        assert not any(key in ex.caption for key in (SUBJECT, STUDY_1, STUDY_2, "02aa804e", "p10"))
    with pytest.raises(UserError, match="no age or sex"):
        read_table(mimic / "mimic-cxr-2.0.0-chexpert.csv", demographics=True)


def test_mimic_bad_label_is_reported_once_at_its_study_line(mimic):
    table = mimic / "mimic-cxr-2.0.0-chexpert.csv"
    df = pd.read_csv(table, dtype=str)
    df.loc[0, "Cardiomegaly"] = "maybe"
    df.to_csv(table, index=False)
    examples, problems = read_table(table, views="all")
    assert [ex.image.name for ex in examples] == ["2a2277a9-b0ded155.jpg"]
    assert [p.where for p in problems] == ["mimic-cxr-2.0.0-chexpert.csv line 2", "mimic-cxr-2.0.0-metadata.csv"]
    assert "Cardiomegaly='maybe'" in problems[0].what


def test_mimic_needs_its_other_table(mimic):
    (mimic / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(UserError, match="needs its metadata table beside it"):
        read_table(mimic / "mimic-cxr-2.0.0-chexpert.csv")


# ----------------------------------------------------------------------------- dermoscopy

@pytest.fixture
def ham(tmp_path):
    rows = [
        {"lesion_id": "HAM_0000118", "image_id": "ISIC_0027419", "dx": "bkl", "age": 80.0, "sex": "male"},
        {"lesion_id": "HAM_0000118", "image_id": "ISIC_0025030", "dx": "bkl", "age": 80.0, "sex": "male"},
        {"lesion_id": "HAM_0002730", "image_id": "ISIC_0026769", "dx": "mel", "age": 50.0, "sex": "female"},
        {"lesion_id": "HAM_0001466", "image_id": "ISIC_0031633", "dx": "xyz", "age": 75.0, "sex": "male"},
        {"lesion_id": "HAM_0001467", "image_id": "ISIC_0099999", "dx": "nv", "age": "", "sex": "unknown"},
    ]
    touch(tmp_path / "HAM10000_images_part_1/ISIC_0027419.jpg", tmp_path / "HAM10000_images_part_1/ISIC_0031633.jpg",
          tmp_path / "HAM10000_images_part_2/ISIC_0025030.jpg", tmp_path / "HAM10000_images_part_2/ISIC_0026769.jpg")
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    return write_csv(tmp_path / "HAM10000_metadata.csv", columns, rows)


def test_modality_follows_the_format_given_or_detected(ham, chexpert):
    """Skin tables are dermoscopy (a random flip is harmless); the rest warn about mirrored chest X-rays."""
    assert modality_of(DataConfig(train_csv=str(ham))) == "dermoscopy"  # detected from its columns
    assert modality_of(DataConfig(train_csv=str(chexpert))) == "chest_xray"
    assert modality_of(DataConfig(train_csv=str(chexpert), data_format="ham10000")) == "dermoscopy"
    assert modality_of(DataConfig(train_data_dir=str(ham.parent))) == "chest_xray"  # a folder: not known


def test_ham10000_examples_and_problems(ham):
    examples, problems = read_table(ham)
    root = ham.parent
    assert [ex.image for ex in examples] == [root / "HAM10000_images_part_1/ISIC_0027419.jpg",
                                             root / "HAM10000_images_part_2/ISIC_0025030.jpg",
                                             root / "HAM10000_images_part_2/ISIC_0026769.jpg"]
    assert [ex.caption for ex in examples] == ["a dermoscopic image of benign keratosis"] * 2 + \
        ["a dermoscopic image of melanoma"]
    assert [ex.group for ex in examples] == ["HAM_0000118", "HAM_0000118", "HAM_0002730"]
    assert not any("HAM_" in ex.caption or "ISIC_" in ex.caption for ex in examples)
    assert examples[2].labels == {name: float(name == "melanoma") for name in tables.HAM10000_DX.values()}
    assert [p.where for p in problems] == ["HAM10000_metadata.csv line 5", "HAM10000_metadata.csv line 6"]
    assert "unknown dx 'xyz'" in problems[0].what and "no image ISIC_0099999.jpg" in problems[1].what


def test_ham10000_demographics_and_a_copy_in_another_folder(ham):
    touch(ham.parent / "ham10000_images_part_1/ISIC_0027419.jpg")  # Kaggle's second copy
    examples, problems = read_table(ham, demographics=True)
    assert [ex.caption for ex in examples][1:] == ["a dermoscopic image of benign keratosis, 80 year old male",
                                                   "a dermoscopic image of melanoma, 50 year old female"]
    assert examples[0].image.parent.name == "HAM10000_images_part_1"  # first in sorted order
    assert (problems[0].where, problems[0].severity) == ("HAM10000_metadata.csv", "warning")


ISIC_CODES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


@pytest.fixture
def isic(tmp_path):
    def row(image, *on):
        return {"image": image, **{c: float(c in on) for c in ISIC_CODES}}
    rows = [row("ISIC_0000000", "NV"), row("ISIC_0000001", "MEL"), row("ISIC_0000002", "MEL", "NV"),
            row("ISIC_0000003"), row("ISIC_0000004", "SCC")]
    touch(*(tmp_path / "ISIC_2019_Training_Input" / f"{r['image']}.jpg" for r in rows))
    return write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", ["image"] + ISIC_CODES, rows)


def test_isic2019_examples_and_one_hot_check(isic):
    examples, problems = read_table(isic)
    assert [ex.image for ex in examples] == [isic.parent / f"ISIC_2019_Training_Input/ISIC_000000{i}.jpg" for i in (0, 1, 4)]
    assert [ex.caption for ex in examples] == ["a dermoscopic image of melanocytic nevus", "a dermoscopic image of melanoma",
                                               "a dermoscopic image of squamous cell carcinoma"]
    assert [ex.group for ex in examples] == [None, None, None]  # no lesion key in the ground truth
    assert examples[1].labels["melanoma"] == 1.0 and sum(examples[1].labels.values()) == 1.0
    assert [(p.where, p.what) for p in problems] == [
        ("ISIC_2019_Training_GroundTruth.csv line 4", "2 diagnoses (MEL, NV): exactly one column must be 1.0"),
        ("ISIC_2019_Training_GroundTruth.csv line 5", "0 diagnoses (none): exactly one column must be 1.0")]


def test_isic2019_groups_and_demographics_from_its_metadata(isic):
    write_csv(isic.parent / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
              [{"image": "ISIC_0000000", "age_approx": 55.0, "lesion_id": "BCN_0000001", "sex": "female"},
               {"image": "ISIC_0000001", "age_approx": 30.0, "sex": "male"}])
    examples, _ = read_table(isic, demographics=True)
    assert [ex.group for ex in examples] == ["BCN_0000001", None, None]
    assert [ex.caption for ex in examples] == ["a dermoscopic image of melanocytic nevus, 55 year old female",
                                               "a dermoscopic image of melanoma, 30 year old male",
                                               "a dermoscopic image of squamous cell carcinoma"]



def test_image_ids_with_an_image_suffix_or_spaces_and_blank_cells_are_read_as_written(ham, isic):
    df = pd.read_csv(ham, dtype=str)
    df.loc[0, "image_id"], df.loc[1, "image_id"], df.loc[2, "dx"] = "ISIC_0027419.JPG", " ISIC_0025030 ", None
    df.to_csv(ham, index=False)
    examples, problems = read_table(ham)
    assert [ex.image.name for ex in examples] == ["ISIC_0027419.jpg", "ISIC_0025030.jpg"]
    assert problems[0].what.startswith("dx is blank: use one of akiec")
    df = pd.read_csv(isic, dtype=str)
    df.loc[0, "image"], df.loc[1, "UNK"] = "ISIC_0000000.jpg", None
    df.to_csv(isic, index=False)
    write_csv(isic.parent / "ISIC_2019_Training_Metadata.csv", ["image", "lesion_id"],
              [{"image": "ISIC_0000000", "lesion_id": "BCN_0000001"}])
    examples, problems = read_table(isic)
    assert [(ex.image.name, ex.group) for ex in examples] == [("ISIC_0000000.jpg", "BCN_0000001"),
                                                              ("ISIC_0000004.jpg", None)]
    assert problems[0].what == "unknown label value(s) UNK=blank: use 0.0, 1.0"  # not UNK=np.float64(nan)

# ----------------------------------------------------------------------------- generic metadata

def test_metadata_jsonl_lines_are_newline_separated_only(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028 and \x85 raw; str.splitlines() would cut there.
    touch(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png")
    records = [{"file_name": "a.png", "text": "Large effusion.\u2028Cardiomegaly."},
               {"file_name": "b.png", "text": "x\x85y"}, {"file_name": "c.png", "text": "plain"}]
    path = tmp_path / "metadata.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n{broken\n", encoding="utf-8")
    examples, problems = read_table(path)
    assert [ex.image.name for ex in examples] == ["a.png", "b.png", "c.png"]
    assert [p.where for p in problems] == ["metadata.jsonl line 4"]


def test_metadata_jsonl(tmp_path):
    touch(tmp_path / "a.png", tmp_path / "sub/b.png", tmp_path / "c.png")
    lines = [
        {"file_name": "a.png", "text": "  Chest x-ray\n of A "},
        {"file_name": "sub/b.png", "text": "B", "group": "p1", "Edema": 1},
        {"file_name": "../outside.png", "text": "C"},
        {"file_name": "c.png", "text": ""},
        "{not json",
        {"file_name": "a.png", "text": "again"},
        {"file_name": "missing.png", "text": "D"},
    ]
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    assert detect_format(path) == "metadata"
    examples, problems = read_table(path)
    assert [(ex.image, ex.caption, ex.group, ex.source) for ex in examples] == [
        (tmp_path / "a.png", "Chest x-ray of A", None, "metadata.jsonl line 1"),
        (tmp_path / "sub/b.png", "B", "p1", "metadata.jsonl line 2")]
    assert examples[1].labels == {"Edema": 1.0} and examples[0].labels == {}
    assert [(p.where, p.severity) for p in problems] == [(f"metadata.jsonl line {n}", s) for n, s in
                                                         [(3, "error"), (4, "error"), (5, "error"), (6, "warning"), (7, "error")]]
    assert "leads outside" in problems[0].what and "empty or missing text" in problems[1].what and "not JSON" in problems[2].what


def test_metadata_values_that_are_not_text_say_what_they_are(tmp_path):
    touch(tmp_path / "a.png")
    lines = [{"file_name": "a.png", "text": 123}, {"file_name": 7, "text": "x"},
             {"file_name": ["a.png"], "text": "y"}, {"file_name": None, "text": None}]
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    examples, problems = read_table(path)
    assert examples == [] and [(p.where, p.what) for p in problems] == [
        ("metadata.jsonl line 1", "text is a number, not a caption: write the image's caption as a string"),
        ("metadata.jsonl line 2", "its image path is a number, not text: write the file's path as a string"),
        ("metadata.jsonl line 3", "its image path is a list, not text: write the file's path as a string"),
        ("metadata.jsonl line 4", "empty image path"),
        ("metadata.jsonl line 4", "empty or missing text: write the image's caption")]


def test_metadata_text_with_nul_characters_is_refused(tmp_path):
    # JSON's \u0000 and a raw NUL in a CSV cell both decode to a caption holding NUL: a row problem, not a prompt
    touch(tmp_path / "a.png", tmp_path / "b.png")
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(map(json.dumps, [{"file_name": "a.png", "text": "Chest x-ray\x00"},
                                              {"file_name": "b.png", "text": "fine"}])) + "\n")
    table = tmp_path / "metadata.csv"
    table.write_bytes(b"file_name,text\na.png,fine\nb.png,Che\x00st x-ray\n")
    nul = "text holds NUL characters (\\x00): remove them from the caption"
    for file, good, bad in ((path, "b.png", "metadata.jsonl line 1"), (table, "a.png", "metadata.csv line 3")):
        examples, problems = read_table(file)
        assert [ex.image.name for ex in examples] == [good]
        assert [(p.where, p.what) for p in problems] == [(bad, nul)]


def test_a_metadata_label_column_with_a_cell_written_wrong_stays_a_label_column(tmp_path):
    # One "yes" used to turn the whole column to text, so it was dropped as a label: every image lost it.
    touch(*(tmp_path / f"{i}.png" for i in range(4)))
    path = write_csv(tmp_path / "metadata.csv", ["file_name", "text", "Cardiomegaly", "view"],
                     [{"file_name": f"{i}.png", "text": "x", "Cardiomegaly": cell, "view": "PA"}
                      for i, cell in enumerate(["1.0", "0", "yes", ""])])
    examples, problems = read_table(path)
    assert [(ex.image.name, ex.labels) for ex in examples] == [("0.png", {"Cardiomegaly": 1.0}),
                                                              ("1.png", {"Cardiomegaly": 0.0}), ("3.png", {})]
    assert [(p.where, p.what) for p in problems] == [
        ("metadata.csv line 4", "label(s) Cardiomegaly='yes' not a number: write 1, 0, -1 or leave blank")]


def test_a_label_cell_that_may_name_a_patient_is_not_shown(tmp_path):
    # a shifted or hand-edited cell holding a path or an id: the row is named by its line, the cell is not
    rows = [chexpert_row(1, Edema="CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"),
            chexpert_row(2, Cardiomegaly="patient00002"), chexpert_row(3, Edema="yes")]
    path = write_csv(tmp_path / "train.csv", CHEXPERT_COLUMNS, rows)
    _, problems = read_table(path, check_files=False)
    text = " ".join(p.what for p in problems)
    assert "patient0000" not in text and "<a value not shown>" in text and "Edema='yes'" in text


def test_metadata_csv_and_missing_text_column(tmp_path):
    touch(tmp_path / "img/a.png")
    path = write_csv(tmp_path / "metadata.csv", ["file_name", "text", "patient_id"],
                     [{"file_name": "img/a.png", "text": "an x-ray", "patient_id": "p7"}])
    examples, problems = read_table(path)
    assert problems == [] and [(ex.image, ex.caption, ex.group) for ex in examples] == [(tmp_path / "img/a.png", "an x-ray", "p7")]
    write_csv(path, ["file_name"], [{"file_name": "img/a.png"}])
    with pytest.raises(DatasetError, match=r"missing column\(s\) text"):
        read_table(path)


# ----------------------------------------------------------------------------- detection, phantom

@pytest.mark.parametrize("name, columns, expected", [
    ("train.csv", CHEXPERT_COLUMNS, "chexpert"),
    ("mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + MIMIC_LABELS, "mimic"),
    ("mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"], "mimic"),
    ("HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], "ham10000"),
    ("ISIC_2019_Training_GroundTruth.csv", ["image"] + ISIC_CODES, "isic"),
    ("metadata.csv", ["file_name", "text"], "metadata"),
])
def test_detect_format(tmp_path, name, columns, expected):
    assert detect_format(write_csv(tmp_path / name, columns, [])) == expected


def test_phantom_chexpert_reads_frontal_images_that_exist(request, tmp_path):
    try:
        out = Path(request.getfixturevalue("phantom_chexpert"))
    except pytest.FixtureLookupError:
        phantom = pytest.importorskip("sdtune.phantom")
        out = phantom.write_phantom_chexpert(tmp_path, n=30, size=64, seed=0)
    table = out / "CheXpert-v1.0-small" / "train.csv"
    examples, problems = read_table(table)
    rows = pd.read_csv(table)
    assert problems == []
    assert len(examples) == (rows["Frontal/Lateral"] == "Frontal").sum() > 0
    assert all(ex.image.is_file() and ex.image.name.endswith("_frontal.jpg") for ex in examples)
    assert all(ex.group == ex.image.parts[-3] for ex in examples)
    assert all("patient0" not in ex.caption for ex in examples)


def test_isic2019_unk_is_a_label_but_never_named_in_a_caption(tmp_path):
    codes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    path = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image"] + codes)
        writer.writeheader()
        writer.writerow({"image": "ISIC_0000000", **{c: float(c == "UNK") for c in codes}})
        writer.writerow({"image": "ISIC_0000001", **{c: float(c == "MEL") for c in codes}})
    (tmp_path / "ISIC_2019_Training_Input").mkdir()
    for name in ("ISIC_0000000", "ISIC_0000001"):
        (tmp_path / "ISIC_2019_Training_Input" / f"{name}.jpg").touch()
    examples, problems = read_table(path)
    assert problems == []
    assert [ex.caption for ex in examples] == ["a dermoscopic image of a skin lesion", "a dermoscopic image of melanoma"]
    assert examples[0].labels["unknown"] == 1.0 and sum(examples[0].labels.values()) == 1.0

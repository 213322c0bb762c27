"""Phantom CheXpert: CheXpert's exact format, patient structure, determinism, the CLI, and
that every drawn finding can be measured back from the pixels alone."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from sdtune.phantom import DRAWN, SCORES, measure_findings, render_chest_xray, write_phantom_chexpert

REPO = Path(__file__).resolve().parents[1]
SIZE = 128  # the phantom_chexpert fixture's
# CheXpert's columns, in its order (REFERENCE.md section 5), written out rather than imported.
CHEXPERT = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
            "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
            "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
LABELS = CHEXPERT[5:]
PATHOLOGIES = LABELS[1:-1]  # CheXpert's No Finding ignores Support Devices


def auroc(pos, neg) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney U / n1 n2)."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_auroc_helper():
    assert auroc([2, 3], [1, 2]) == 3.5 / 4
    assert auroc([1], [2]) == 0.0 and auroc([5, 6], [1, 2]) == 1.0


def _table(out: Path, split: str) -> pd.DataFrame:
    """The CSV as text, exactly as written (blank stays "")."""
    return pd.read_csv(out / "CheXpert-v1.0-small" / f"{split}.csv", dtype=str, keep_default_na=False)


def _both(out: Path) -> pd.DataFrame:
    return pd.concat([_table(out, "train").assign(split="train"), _table(out, "valid").assign(split="valid")])


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("split", ["train", "valid"])
def test_csv_has_chexpert_columns_and_values(phantom_chexpert, split):
    df = _table(phantom_chexpert, split)
    assert list(df.columns) == CHEXPERT
    for label in LABELS:
        assert set(df[label]) <= {"1.0", "0.0", "-1.0", ""}, label
    assert set(df["Sex"]) <= {"Male", "Female", "Unknown"}
    assert all(a.isdigit() and 0 <= int(a) <= 90 for a in df["Age"])
    frontal = df["Frontal/Lateral"] == "Frontal"
    assert set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
    assert set(df.loc[frontal, "AP/PA"]) <= {"AP", "PA"}
    assert set(df.loc[~frontal, "AP/PA"]) <= {"LL", "RL", ""}
    pattern = rf"CheXpert-v1\.0-small/{split}/patient\d{{5}}/study\d+/view\d+_(frontal|lateral)\.jpg"
    for path, view in zip(df["Path"], df["Frontal/Lateral"]):
        assert re.fullmatch(pattern, path) and path.endswith(f"_{view.lower()}.jpg"), path


def test_every_path_is_an_8bit_grayscale_jpeg_of_the_requested_size(phantom_chexpert):
    for path in _both(phantom_chexpert)["Path"]:
        with Image.open(phantom_chexpert / path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "L", (SIZE, SIZE)), path


def test_no_finding_follows_chexpert(phantom_chexpert):
    df = _both(phantom_chexpert)
    pathology = df[PATHOLOGIES].isin(["1.0", "-1.0"]).any(axis=1)
    assert set(df["No Finding"]) <= {"1.0", ""}
    assert ((df["No Finding"] == "1.0") == ~pathology).all()
    assert 0 < (df["No Finding"] == "1.0").sum() < len(df)


def test_split_sizes_views_and_label_frequencies(phantom_chexpert):
    train, valid = _table(phantom_chexpert, "train"), _table(phantom_chexpert, "valid")
    assert (len(train), len(valid)) == (90, 10)  # n=100: a tenth to valid
    lateral = (train["Frontal/Lateral"] == "Lateral").mean()
    assert 0.05 < lateral < 0.3  # CheXpert: ~14% lateral
    for label in DRAWN:  # positive often enough for an AUROC to mean something
        assert 0.15 <= (train[label] == "1.0").mean() <= 0.45, label
    assert (train[LABELS] == "-1.0").to_numpy().sum() > 0  # uncertain labels occur
    assert (train[LABELS] == "").to_numpy().mean() > 0.5  # most cells are blank, as in CheXpert


def test_patients_have_several_studies_and_splits_share_none(phantom_chexpert):
    df = _both(phantom_chexpert)
    parts = df["Path"].str.split("/", expand=True)
    df = df.assign(patient=parts[2], study=parts[3])
    train, valid = df[df.split == "train"], df[df.split == "valid"]
    studies = train.groupby("patient")["study"].nunique()
    assert (studies >= 2).sum() >= 0.4 * len(studies) and studies.max() <= 4
    assert set(train.patient).isdisjoint(valid.patient)
    assert (valid.groupby("patient")["study"].nunique() == 1).all()  # as in CheXpert's valid set
    # Sex is the patient's; labels are the study's (all its views share them).
    assert (df.groupby("patient")["Sex"].nunique() == 1).all()
    assert (df.groupby(["patient", "study"])[LABELS].nunique() == 1).all().all()


# ----------------------------------------------------------------------------- measurements


@pytest.fixture(scope="module")
def frontals():
    """160 frontal phantoms, each finding present with probability 0.35 independently,
    passed through JPEG like the dataset's, with their measured scores."""
    rng = np.random.default_rng(2024)
    findings, scores = [], []
    for i in range(160):
        f = {k: bool(rng.random() < 0.35) for k in DRAWN}
        img = render_chest_xray(f, SIZE, np.random.default_rng([2024, i]))
        findings.append(f)
        scores.append(measure_findings(_jpeg_roundtrip(img)))
    return pd.DataFrame(findings), pd.DataFrame(scores)


def _jpeg_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("finding", DRAWN)
def test_each_finding_is_measurable(frontals, finding):
    findings, scores = frontals
    present, score = findings[finding].to_numpy(), scores[SCORES[finding]].to_numpy()
    assert 30 <= present.sum() <= 130
    assert auroc(score[present], score[~present]) >= 0.95


def test_cardiothoracic_ratio_means(frontals):
    findings, scores = frontals
    ctr = scores["cardiothoracic_ratio"]
    normal, enlarged = ctr[~findings["Cardiomegaly"]], ctr[findings["Cardiomegaly"]]
    assert abs(normal.mean() - 0.42) < 0.03 and normal.max() < 0.5
    assert enlarged.mean() > 0.55 and enlarged.min() > 0.5


@pytest.fixture(scope="module")
def dataset_frontals(phantom_chexpert):
    """The fixture dataset's frontal rows, with the scores measured from their JPEGs."""
    df = _both(phantom_chexpert)
    df = df[df["Frontal/Lateral"] == "Frontal"]
    return df, pd.DataFrame([measure_findings(Image.open(phantom_chexpert / p)) for p in df["Path"]])


@pytest.mark.parametrize("finding", DRAWN)
def test_dataset_labels_agree_with_pixels(dataset_frontals, finding):
    """Through the whole writer: CSV label (1.0 vs 0.0 or blank; -1.0 left out) against the
    score measured from the JPEG it points to."""
    df, scores = dataset_frontals
    known = (df[finding] != "-1.0").to_numpy()
    present, score = (df[finding] == "1.0").to_numpy()[known], scores[SCORES[finding]].to_numpy()[known]
    assert present.sum() >= 10
    assert auroc(score[present], score[~present]) >= 0.95


def test_measurements_take_any_size_type_and_range():
    img = render_chest_xray({"Cardiomegaly": True, "Pleural Effusion": True}, 256, np.random.default_rng(5))
    ref, a = measure_findings(img), np.asarray(img)
    for same in (a, a.astype(np.uint16) * 256, a / 127.5 - 1, np.stack([a] * 3, -1)):  # 16-bit, [-1, 1], RGB
        got = measure_findings(same)
        assert all(abs(got[k] - ref[k]) < 1e-4 for k in ref)
    for other in (img.resize((96, 96), Image.BILINEAR), img.resize((512, 512), Image.BICUBIC),
                  img.filter(ImageFilter.GaussianBlur(2))):  # smaller, larger, blurrier
        got = measure_findings(other)
        assert abs(got["cardiothoracic_ratio"] - ref["cardiothoracic_ratio"]) < 0.03
        assert got["cardiothoracic_ratio"] > 0.5 and got["effusion"] > 0


def test_no_lungs_gives_nan_not_an_error():
    scores = measure_findings(np.full((64, 64), 128, np.uint8))
    assert set(scores) == set(SCORES.values()) and all(np.isnan(v) for v in scores.values())


def test_render_rejects_misspelt_findings():
    with pytest.raises(ValueError, match="Cardiomegally"):
        render_chest_xray({"Cardiomegally": True}, 64, np.random.default_rng(0))


# ----------------------------------------------------------------------------- determinism, CLI


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_other_images(tmp_path):
    a = _files(write_phantom_chexpert(tmp_path / "a", n=24, size=64, seed=3))
    b = _files(write_phantom_chexpert(tmp_path / "b", n=24, size=64, seed=3))
    c = _files(write_phantom_chexpert(tmp_path / "c", n=24, size=64, seed=4))
    assert len(a) == 24 + 3 and a == b  # images, two CSVs, phantom.json
    first = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert first in c and c[first] != a[first]


def test_an_image_does_not_depend_on_how_many_are_written(tmp_path):
    small = _files(write_phantom_chexpert(tmp_path / "s", n=12, size=64, seed=0))
    large = _files(write_phantom_chexpert(tmp_path / "l", n=40, size=64, seed=0))
    shared = [k for k in small if "/train/patient00001/" in k]
    assert shared and all(small[k] == large[k] for k in shared)


def test_cli_writes_a_loadable_dataset(tmp_path):
    out = tmp_path / "phantom"
    result = subprocess.run([sys.executable, "-m", "sdtune.phantom", str(out), "--n", "20", "--size", "64"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "18 train + 2 valid images" in result.stdout
    train, valid = _table(out, "train"), _table(out, "valid")
    assert (len(train), len(valid)) == (18, 2)
    assert all(Image.open(out / p).size == (64, 64) for p in pd.concat([train, valid])["Path"])


def test_cli_rejects_nonsense(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdtune.phantom", str(tmp_path), "--n", "0"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "--n >= 1" in result.stderr


@pytest.mark.parametrize("module", ["sdtune.phantom", "sdtune.tiny"])
def test_an_output_folder_that_is_a_file_is_one_line(module, tmp_path, capsys):
    import importlib

    from sdtune.errors import run_cli

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: importlib.import_module(module).main([str(tmp_path / "afile")]))
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: OUT_DIR {tmp_path / 'afile'} is a file: pass a new or empty folder\n"

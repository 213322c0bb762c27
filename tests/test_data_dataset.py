"""One entry for all sources: read, check every image, stop with all problems or skip them."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.dicom import write_identified_dicom
from PIL import Image

from sdtune.data.dataset import DataConfig, ImageCaptionDataset, inspect_dataset, load_examples
from sdtune.data.folder import read_image_folder
from sdtune.data.images import load_image
from sdtune.data.records import DatasetError, Example
from sdtune.data.splits import split_examples
from sdtune.data.tables import read_table

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "MRN12345"


def _radiograph(size=(80, 64), seed=0):
    """A grey gradient with noise: passes every image check."""
    rng = np.random.default_rng(seed)
    x = np.linspace(40, 200, size[0])[None, :] + rng.normal(0, 10, (size[1], size[0]))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L")


def _dicom(path: Path) -> None:
    """A small MONOCHROME2 DICOM carrying patient identifiers in its header."""
    write_identified_dicom(path, {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "InstitutionName": "General Hospital"},
                           np.arange(64 * 64).reshape(64, 64) % 4096)


@pytest.fixture
def messy_folder(tmp_path):
    """The tutorial's layout with one good image, one DICOM, and four kinds of bad input."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    _radiograph().save(images / "good.png")
    (images / "good.txt").write_text("Chest x-ray of a patient with Edema")
    _dicom(images / "scan.dcm")
    (images / "scan.txt").write_text("Chest x-ray of a patient with no significant findings")
    _radiograph(seed=1).save(images / "nocaption.png")
    Image.new("L", (64, 64), 255).save(images / "white.png")
    (images / "white.txt").write_text("Chest x-ray of a patient with Cardiomegaly")
    full = images / "truncated.jpg"
    _radiograph(seed=2).save(full, quality=95)
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (images / "truncated.txt").write_text("Chest x-ray of a patient with Pneumothorax")
    return tmp_path / "data"


def test_all_problems_are_reported_at_once(messy_folder):
    cfg = DataConfig(train_data_dir=str(messy_folder), resolution=64)
    with pytest.raises(DatasetError) as caught:
        load_examples(cfg)
    message = str(caught.value)
    assert message.startswith("3 problem(s) in ") and "--skip_bad_files" in message
    assert {p.where for p in caught.value.problems} == {"nocaption.png", "white.png", "truncated.jpg"}
    assert all(len(line.strip()) and "Traceback" not in line for line in message.splitlines())


@pytest.mark.parametrize("layout", ["folder", "metadata"])
def test_a_file_with_a_bad_caption_and_a_bad_image_is_reported_in_one_round(tmp_path, layout):
    images = tmp_path / "data"
    images.mkdir()
    _radiograph().save(images / "good.png")
    (images / "both.png").write_bytes(b"not an image")  # and an empty caption
    Image.new("L", (64, 64), 0).save(images / "black.png")  # a good caption, a black page
    captions = {"good.png": "Chest x-ray", "both.png": " ", "black.png": "Chest x-ray of a patient with Edema"}
    if layout == "folder":
        for name, text in captions.items():
            (images / name).with_suffix(".txt").write_text(text)
    else:
        (images / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n"
                                                       for n, t in captions.items()))
    with pytest.raises(DatasetError) as caught:
        load_examples(DataConfig(train_data_dir=str(images), resolution=64))
    both = "both.png" if layout == "folder" else "metadata.jsonl line 2"
    wheres = [p.where for p in caught.value.problems]
    assert wheres.count(both) == 2 and wheres[wheres.index(both) + 1] == both  # its caption, then its image
    whats = " ".join(p.what for p in caught.value.problems if p.where == both)
    assert "empty" in whats and "not an image" in whats
    assert len(wheres) == 3 and str(caught.value).startswith("3 problem(s)")


def test_skip_bad_files_keeps_the_good_and_lists_the_rest(messy_folder, tmp_path):
    cfg = DataConfig(train_data_dir=str(messy_folder), resolution=64, skip_bad_files=True)
    report = tmp_path / "report" / "skipped.txt"
    logged = []
    examples = load_examples(cfg, report_path=report, log=logged.append)
    assert sorted(e.source for e in examples) == ["good.png", "scan.dcm"]
    assert logged[0].startswith("data: 2 images; 3 skipped (--skip_bad_files), e.g. ") and str(report) in logged[0]
    lines = report.read_text().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["nocaption.png", "truncated.jpg", "white.png"]
    # the data fixed (only its good files left): the old list goes, it would name problems this run has not
    for name in ("nocaption.png", "truncated.jpg", "truncated.txt", "white.png", "white.txt"):
        (messy_folder / "images" / name).unlink()
    assert len(load_examples(cfg, report_path=report)) == 2 and not report.exists()


def test_dataset_items_are_vae_ready(messy_folder):
    examples = load_examples(DataConfig(train_data_dir=str(messy_folder), resolution=32, skip_bad_files=True))
    item = ImageCaptionDataset(examples, resolution=32)[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1.0
    assert item["caption"] in {e.caption for e in examples}


def test_random_crops_and_flips_depend_on_seed_epoch_and_index_alone(tmp_path):
    from sdtune.data.records import Example

    rng = np.random.default_rng(0)
    examples = []
    for i in range(4):  # not square, so a random crop has room to move
        Image.fromarray(rng.integers(0, 256, (56, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        examples.append(Example(image=tmp_path / f"{i}.png", caption="c"))

    def pixels(seed, epoch, order, **augment):
        dataset = ImageCaptionDataset(examples, 48, modality=None, seed=seed,
                                      **(augment or {"center_crop": False, "random_flip": True}))
        dataset.set_epoch(epoch)
        return {i: dataset[i]["pixel_values"] for i in order}

    first = pixels(0, 0, [0, 1, 2, 3])
    torch.manual_seed(123)  # the global stream plays no part
    again = pixels(0, 0, [3, 2, 1, 0])  # another instance, another order of reads: the same draws
    assert all(torch.equal(first[i], again[i]) for i in first)
    for other in (pixels(0, 1, [0, 1, 2, 3]), pixels(1, 0, [0, 1, 2, 3])):  # another epoch or seed draws anew
        assert any(not torch.equal(first[i], other[i]) for i in first)
    # the index is drawn from too: one image at eight indices is not cut eight times alike
    same = ImageCaptionDataset([examples[0]] * 8, 48, center_crop=False, random_flip=True, modality=None)
    assert len({same[i]["pixel_values"].sum().item() for i in range(8)}) > 1
    # a random crop alone (no flip) follows the same rule
    crops = []
    for global_seed in (1, 2):  # a crop drawn from the global stream would differ
        torch.manual_seed(global_seed)
        crops.append(pixels(0, 0, [0, 1, 2, 3], center_crop=False, random_flip=False))
    assert all(torch.equal(crops[0][i], crops[1][i]) for i in range(4))


def test_phantom_chexpert_through_the_table_reader(phantom_chexpert):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    examples = load_examples(DataConfig(train_data_dir=str(table), resolution=64))
    assert examples and all(e.image.is_file() and "frontal" in e.image.name for e in examples)
    assert all(e.group and e.group.startswith("patient") for e in examples)
    assert all(e.caption.startswith("Chest x-ray of a patient with") for e in examples)
    batch = ImageCaptionDataset(examples[:2], resolution=64)
    assert batch[1]["pixel_values"].shape == (3, 64, 64)


def test_folder_with_metadata_jsonl_is_read_as_metadata(tmp_path):
    _radiograph().save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "Chest x-ray"}) + "\n")
    examples, problems = inspect_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=32))
    assert problems == [] and [e.caption for e in examples] == ["Chest x-ray"]


def test_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist: check --train_data_dir"):
        load_examples(DataConfig(train_data_dir=str(tmp_path / "nowhere")))


def test_skip_bad_files_is_suggested_only_when_it_would_leave_images(messy_folder, tmp_path):
    with pytest.raises(DatasetError, match=r"\(fix them, or pass --skip_bad_files to leave them out\)"):
        load_examples(DataConfig(train_data_dir=str(messy_folder), resolution=64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no images found") as err:
        load_examples(DataConfig(train_data_dir=str(tmp_path / "empty")))
    assert "--skip_bad_files" not in str(err.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtune.data", *map(str, args)], capture_output=True, text=True)


def test_check_prints_counts_and_every_problem_without_traceback(messy_folder):
    result = _cli("check", "--train_data_dir", messy_folder, "--resolution", 64)
    assert result.returncode == 1
    assert "2 usable images, 3 error(s)" in result.stdout
    for name in ("nocaption.png", "white.png", "truncated.jpg"):
        assert name in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert PATIENT_NAME not in result.stdout and PATIENT_ID not in result.stdout


def test_check_lists_every_error_first_and_counts_repeated_warnings(phantom_chexpert, tmp_path):
    """CheXpert-small's images are under 512 px: one upscaling warning an image would bury the errors."""
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    lines = table.read_text().splitlines()
    table_with_errors = tmp_path / "train.csv"
    for line in [n for n, text in enumerate(lines) if ",Frontal," in text][:2]:  # their images missing: errors
        fields = lines[line].split(",")
        fields[0] = fields[0].replace(".jpg", "-missing.jpg")
        lines[line] = ",".join(fields)
    table_with_errors.write_text("\n".join(lines) + "\n")
    result = _cli("check", "--train_csv", table_with_errors, "--image_root", phantom_chexpert, "--resolution", 512,
                  "--report", tmp_path / "report.txt")
    shown = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ") and ":" in line
             and ("warning" in line or "line" in line) and " x " not in line]
    report = (tmp_path / "report.txt").read_text().splitlines()
    upscaled = [r for r in report if "will be upscaled" in r]
    errors = [r for r in report if ": warning: " not in r]
    assert len(errors) == 2 and len(upscaled) > 10  # every phantom is under 512 px
    assert shown[:2] == errors  # every error, first
    assert shown[2:5] == upscaled[:3] and f"... and {len(upscaled) - 3} more warning(s) like these" in result.stdout
    assert f"all {len(report)} problem(s) listed in {tmp_path / 'report.txt'}" in result.stdout


def test_check_on_phantom_reports_label_distribution(phantom_chexpert):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    result = _cli("check", "--train-data-dir", table, "--resolution", 64)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Cardiomegaly:" in result.stdout and "positive" in result.stdout
    assert "patients/groups" in result.stdout
    assert "held-out split" not in result.stdout  # training holds nothing out unless asked

    # With --validation_fraction, the split training will make, counted independently from the table.
    result = _cli("check", "--train-data-dir", table, "--resolution", 64, "--validation_fraction", 0.25,
                  "--split_seed", 3)
    df = pd.read_csv(table)
    patients = df[df["Frontal/Lateral"] == "Frontal"].Path.str.extract(r"(patient\d+)")[0]
    n_patients = patients.nunique()
    line = next(x for x in result.stdout.splitlines() if x.startswith("held-out split"))
    counts = re.search(r"(\d+) images of (\d+) patients/groups train, (\d+) of (\d+) patients/groups held out", line)
    n_train_images, n_train, n_held_images, n_held_found = map(int, counts.groups())
    assert (n_train + n_held_found, n_held_found) == (n_patients, math.ceil(0.25 * n_patients))
    assert n_train_images + n_held_images == len(patients)
    train, val = split_examples(load_examples(DataConfig(train_csv=str(table), resolution=64)), 0.25, seed=3)
    assert (len(train), len(val)) == (n_train_images, n_held_images)  # training's own call gives the same split


def test_export_without_skip_stops_with_all_problems(messy_folder, tmp_path):
    result = _cli("export", "--train_data_dir", messy_folder, "--output_dir", tmp_path / "out", "--resolution", 64)
    assert result.returncode == 2 and result.stderr.startswith("error: 3 problem(s)")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["folder", "jsonl"])
def test_export_round_trips_and_leaves_identifiers_behind(messy_folder, tmp_path, layout):
    out = tmp_path / "out"
    result = _cli("export", "--train_data_dir", messy_folder, "--output_dir", out, "--layout", layout,
                  "--resolution", 64, "--skip_bad_files")
    assert result.returncode == 0, result.stderr
    assert "exported 2 images" in result.stdout and "3 skipped" in result.stdout
    if layout == "folder":
        examples, problems = read_image_folder(out)
    else:
        examples, problems = read_table(out / "metadata.jsonl")
    assert problems == []
    assert sorted(e.caption for e in examples) == [
        "Chest x-ray of a patient with Edema", "Chest x-ray of a patient with no significant findings"]
    assert sorted(e.image.name for e in examples) == ["000001.png", "000002.png"]  # numbered, not named
    # The same pixels as the sources decoded: good.png, then the DICOM (file order).
    for exported, source in zip(sorted(e.image for e in examples), ["good.png", "scan.dcm"]):
        assert np.array_equal(np.asarray(load_image(exported)), np.asarray(load_image(messy_folder / "images" / source)))
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert PATIENT_NAME.encode() not in data and PATIENT_ID.encode() not in data, f
            # no source file name either, of an exported or a skipped file
            assert not re.search(rb"scan|good|nocaption|white|truncated", data), f
    # the skipped files are listed for the user beside the export, not in it
    report = tmp_path / "out.problems.txt"
    assert {line.split(":")[0] for line in report.read_text().splitlines()} == {"nocaption.png", "white.png",
                                                                               "truncated.jpg"}
    assert f"problems listed in {report}, beside the export" in result.stdout


def test_export_leaves_exif_and_text_chunks_behind(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x010E] = f"PatientName={PATIENT_NAME} PatientID={PATIENT_ID}"  # ImageDescription
    _radiograph().convert("RGB").save(images / "a.jpg", exif=exif, quality=95)
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Comment", f"patient {PATIENT_ID}")
    _radiograph(seed=1).save(images / "b.png", pnginfo=text)
    for name in ("a", "b"):
        (images / f"{name}.txt").write_text("Chest x-ray")
    assert PATIENT_ID.encode() in (images / "a.jpg").read_bytes() and PATIENT_ID.encode() in (images / "b.png").read_bytes()
    out = tmp_path / "out"
    assert _cli("export", "--train_data_dir", tmp_path / "data", "--output_dir", out, "--resolution", 64).returncode == 0
    exported = sorted((out / "images").glob("*.png"))
    assert len(exported) == 2
    for f in exported:
        assert PATIENT_ID.encode() not in f.read_bytes() and PATIENT_NAME.encode() not in f.read_bytes()
        with Image.open(f) as image:
            assert image.mode == "L" and not image.getexif() and not image.info  # grey stays one channel


def test_export_keeps_patient_groups_in_jsonl(phantom_chexpert, tmp_path):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    out = tmp_path / "out"
    assert _cli("export", "--train_data_dir", table, "--output_dir", out, "--layout", "jsonl", "--resolution", 64).returncode == 0
    original = load_examples(DataConfig(train_data_dir=str(table), resolution=64))
    exported, problems = read_table(out / "metadata.jsonl")
    assert problems == [] and len(exported) == len(original)
    again = _cli("export", "--train_data_dir", table, "--output_dir", out, "--layout", "jsonl", "--resolution", 64)
    assert again.returncode == 2 and "already holds an export" in again.stderr  # no stale files mixed in
    # The same patients together, under pseudonyms: the groups partition the images alike.
    def partition(examples):
        groups = {}
        for i, ex in enumerate(examples):
            groups.setdefault(ex.group, set()).add(i)
        return sorted(map(sorted, groups.values()))

    assert partition(exported) == partition(original) and len({e.group for e in original}) > 1
    text = (out / "metadata.jsonl").read_text()
    assert not re.search(r"patient\d", text) and not any(e.group in text for e in original)


def test_check_fails_where_training_would_and_export_checks_its_folder_first(tmp_path, monkeypatch):
    from sdtune.data import __main__ as data_cli
    from sdtune.errors import UserError

    table = tmp_path / "metadata.csv"
    table.write_text("file_name,text\n")  # a header and no rows: nothing to train on
    assert data_cli.main(["check", "--train_csv", str(table)]) == 1
    _radiograph().save(tmp_path / "a.png")
    table.write_text("file_name,text,group\na.png,Chest x-ray,p1\n")
    assert data_cli.main(["check", "--train_csv", str(table), "--resolution", "64"]) == 0
    # one patient, held out: training would have no image left
    assert data_cli.main(["check", "--train_csv", str(table), "--resolution", "64", "--validation_fraction", "0.5"]) == 1

    decoded = []
    monkeypatch.setattr(data_cli, "inspect_dataset", lambda cfg: decoded.append(cfg) or ([], []))
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="^--output_dir .*afile is a file: pass a new or empty folder$"):
        data_cli.main(["export", "--train_csv", str(table), "--output_dir", str(tmp_path / "afile")])
    assert decoded == []  # refused before a single image was read


def test_captions_the_text_encoder_would_cut_are_warned_about(tmp_path):
    from sdtune.data.dataset import long_captions
    from sdtune.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    report = " ".join(["Small left pleural effusion with adjacent atelectasis."] * 10)  # about 90 tokens
    examples = [Example(Path("a.png"), "Chest x-ray of a patient with Edema", source="a.png"),
                Example(Path("b.png"), report, source="b.png")]
    tokens = len(tokenizer(report).input_ids)
    assert tokens > 77
    assert [str(p) for p in long_captions(examples, tokenizer)] == [
        f"b.png: warning: caption of {tokens} CLIP tokens: the text encoder reads 77 tokens and the rest is cut off: "
        "shorten it"]
    fits = " ".join(["a"] * 75)  # 75 tokens and the start and end ones: what the text encoder reads, exactly
    assert len(tokenizer(fits).input_ids) == 77
    assert long_captions([Example(Path("c.png"), fits, source="c.png")], tokenizer) == []
    assert len(long_captions([Example(Path("c.png"), fits + " a", source="c.png")], tokenizer)) == 1
    many = [Example(Path(f"{i}.png"), report, source=f"{i}.png") for i in range(11)]
    (warning,) = long_captions(examples + many, tokenizer)  # many are one line, not one each
    assert warning.where == "12 captions" and f"(e.g. b.png: {tokens})" in warning.what

    # `check` counts with SD1.5's tokenizer; training with its model's, and says where the list is
    _radiograph().save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text(report)
    result = _cli("check", "--train_data_dir", tmp_path, "--resolution", 64)
    assert result.returncode == 0 and f"b.png: warning: caption of {tokens} CLIP tokens" in result.stdout
    logged = []
    load_examples(DataConfig(train_data_dir=str(tmp_path), resolution=64), report_path=tmp_path / "run" / "report.txt",
                  tokenizer=tokenizer, log=logged.append)
    assert logged == [f"data: 1 images; 1 warning(s), e.g. b.png: warning: caption of {tokens} CLIP tokens: the text "
                      f"encoder reads 77 tokens and the rest is cut off: shorten it; all listed in "
                      f"{tmp_path / 'run' / 'report.txt'}"]

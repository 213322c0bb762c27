"""The tutorial's images + .txt layout, and patient-level splits."""

from pathlib import Path

import pytest
from PIL import Image

from sdtune.data.folder import read_image_folder
from sdtune.data.records import Example
from sdtune.data.splits import split_examples


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 100).save(path)


def test_reads_images_with_same_stem_captions(tmp_path):
    _image(tmp_path / "images" / "b.png")
    (tmp_path / "images" / "b.txt").write_text("Chest x-ray of a patient with Pleural Effusion\n")
    _image(tmp_path / "images" / "sub" / "a.jpg")
    (tmp_path / "images" / "sub" / "a.txt").write_text("  Chest x-ray\n of a patient  ")
    (tmp_path / "tabular_info").mkdir()

    examples, problems = read_image_folder(tmp_path)  # the data/ folder; images/ is found
    assert problems == []
    assert [e.source for e in examples] == ["b.png", "sub/a.jpg"]
    assert [e.caption for e in examples] == ["Chest x-ray of a patient with Pleural Effusion", "Chest x-ray of a patient"]
    assert all(e.image.is_absolute() and e.image.is_file() for e in examples)


def test_captions_from_a_parallel_folder(tmp_path):
    _image(tmp_path / "images" / "x" / "a.png")
    (tmp_path / "captions" / "x").mkdir(parents=True)
    (tmp_path / "captions" / "x" / "a.txt").write_text("Chest x-ray of a patient with Edema")
    examples, problems = read_image_folder(tmp_path / "images", captions_dir=tmp_path / "captions")
    assert problems == [] and examples[0].caption == "Chest x-ray of a patient with Edema"


def test_every_caption_problem_is_reported_at_once(tmp_path):
    images = tmp_path / "images"
    for name in ("ok", "missing", "empty", "latin1", "nul", "utf16"):
        _image(images / f"{name}.png")
    (images / "ok.txt").write_text("fine")
    (images / "empty.txt").write_text(" \n\t")
    (images / "latin1.txt").write_bytes("Épanchement pleural".encode("latin-1"))
    (images / "nul.txt").write_bytes(b"Chest x-ray\x00 of a patient")
    # UTF-16 without a BOM (a BOM is not UTF-8) decodes as UTF-8 all the same, a NUL beside every letter
    (images / "utf16.txt").write_bytes("Chest x-ray".encode("utf-16-le"))

    examples, problems = read_image_folder(images)
    assert [e.source for e in examples] == ["ok.png"]
    by_file = {p.where: p.what for p in problems}
    assert set(by_file) == {"missing.png", "empty.png", "latin1.png", "nul.png", "utf16.png"}
    assert "no caption file missing.txt" in by_file["missing.png"]
    assert "empty" in by_file["empty.png"]
    assert "not UTF-8" in by_file["latin1.png"] and "re-save it as UTF-8" in by_file["latin1.png"]
    assert by_file["nul.png"] == "caption nul.txt holds NUL bytes (first at byte 11): re-save it as UTF-8, not UTF-16"
    assert by_file["utf16.png"] == "caption utf16.txt holds NUL bytes (first at byte 1): re-save it as UTF-8, not UTF-16"
    assert all(p.image == str(images / p.where) for p in problems)  # still decoded, for a one-round report


def test_a_folder_without_any_caption_is_one_line_that_names_its_table(tmp_path):
    for patient in range(3):
        _image(tmp_path / "CheXpert-v1.0-small" / "train" / f"patient{patient:05d}" / "study1" / "view1_frontal.jpg")
    (tmp_path / "CheXpert-v1.0-small" / "train.csv").write_text("Path\n")
    examples, problems = read_image_folder(tmp_path)
    assert examples == [] and [(p.where, p.what) for p in problems] == [(
        str(tmp_path), f"none of its 3 images has a caption file; {tmp_path / 'CheXpert-v1.0-small' / 'train.csv'} is "
        "a table: pass it with --train_csv (TRAIN_CSV= in the scripts)")]
    (tmp_path / "CheXpert-v1.0-small" / "train.csv").unlink()
    (problem,) = read_image_folder(tmp_path)[1]
    assert problem.what.endswith("write NAME.txt beside each image, or pass --captions_dir, or a table with --train_csv")


def test_an_empty_folder_is_a_problem(tmp_path):
    examples, problems = read_image_folder(tmp_path)
    assert examples == [] and "no images found" in problems[0].what


def _examples(groups):
    return [Example(image=Path(f"/x/{i}.png"), caption="c", group=g) for i, g in enumerate(groups)]


def test_patient_split_keeps_each_patient_on_one_side():
    groups = [f"patient{i // 3:05d}" for i in range(60)] + [None] * 6  # 20 patients x 3 images, 6 ungrouped
    train, val = split_examples(_examples(groups), val_fraction=0.25, seed=1)
    assert len(train) + len(val) == 66
    train_groups = {e.group for e in train if e.group}
    val_groups = {e.group for e in val if e.group}
    assert train_groups.isdisjoint(val_groups) and val_groups
    assert {e.image for e in train}.isdisjoint({e.image for e in val})
    # 26 groups (20 patients + 6 single images) -> ceil(0.25 * 26) = 7 validation groups
    assert len(val_groups) + sum(e.group is None for e in val) == 7


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    ex = _examples([f"p{i // 2}" for i in range(100)])
    a = split_examples(ex, 0.2, seed=3)
    assert a == split_examples(ex, 0.2, seed=3)
    assert a != split_examples(ex, 0.2, seed=4)
    # and does not depend on the input order
    assert sorted(e.image for e in split_examples(ex[::-1], 0.2, seed=3)[1]) == sorted(e.image for e in a[1])


def test_image_split_ignores_groups():
    ex = _examples(["same"] * 10)
    train, val = split_examples(ex, 0.3, seed=0, by="image")
    assert len(val) == 3 and len(train) == 7
    assert split_examples(ex, 0.3, seed=0, by="patient")[1] in ([], ex)  # one group: all or nothing


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": 0.1, "by": "study"}])
def test_bad_split_settings(kwargs):
    with pytest.raises(ValueError):
        split_examples(_examples(["a"]), **kwargs)


def _captioned(path: Path, caption: str = "Chest x-ray") -> None:
    _image(path)
    path.with_suffix(".txt").write_text(caption)


def test_linked_folders_are_read_and_what_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    """A second disk linked in, a broken link, an unreadable folder: nothing is left out silently."""
    import os

    images = tmp_path / "images"
    _captioned(images / "a.png")
    _captioned(tmp_path / "disk2" / "b.png")
    (images / "batch2").symlink_to(tmp_path / "disk2")
    (images / "loop").symlink_to(images)  # a link loop ends
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _captioned(images / "locked" / "c.png")
    _captioned(images / "__MACOSX" / "._a.png")  # macOS archive debris: not data
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    _captioned(images / ".ipynb_checkpoints" / "a.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    examples, problems = read_image_folder(images)
    assert [e.source for e in examples] == ["a.png", "batch2/b.png"]
    assert {p.where: p.what.split(":")[0] for p in problems} == {
        "gone.png": "a link to a file that does not exist", "locked": "cannot read this folder (Permission denied)"}
    assert all(p.severity == "error" for p in problems)


def test_an_unreadable_caption_or_missing_captions_dir_is_one_problem(tmp_path, monkeypatch):
    _captioned(tmp_path / "a.png")
    _captioned(tmp_path / "b.png")
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "b.txt" else real_read(self))
    examples, problems = read_image_folder(tmp_path)
    assert [e.source for e in examples] == ["a.png"]
    assert [str(p) for p in problems] == ["b.png: cannot read caption b.txt (Permission denied): check its permissions"]
    examples, problems = read_image_folder(tmp_path, captions_dir=tmp_path / "captions")
    assert examples == [] and len(problems) == 1 and "--captions_dir does not exist" in problems[0].what

"""Property-based fuzzing of the data layer: hostile bytes and tables give clear errors, never crashes."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdtune.data.images import IMAGE_SUFFIXES, ImageError, check_image, load_image
from sdtune.data.records import Problem
from sdtune.data.tables import CHEXPERT_COLUMNS, read_table
from sdtune.errors import UserError

# Bounded so CI stays fast: a few seconds per property.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encoded(fmt: str) -> bytes:
    pixels = (np.arange(48 * 40).reshape(40, 48) % 251).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


VALID = {".png": _encoded("PNG"), ".jpg": _encoded("JPEG"), ".bmp": _encoded("BMP"), ".tif": _encoded("TIFF")}


def _only_clear_errors(path):
    try:
        image = load_image(path)
        assert image.mode == "RGB"
    except ImageError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    problems = check_image(path, resolution=32)
    assert all(isinstance(p, Problem) and p.where == str(path) for p in problems)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(IMAGE_SUFFIXES))
def test_random_bytes_never_crash_the_decoder(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _only_clear_errors(path)


@FUZZ
@given(suffix=st.sampled_from(sorted(VALID)), cut=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_truncated_and_corrupted_images_never_crash_the_decoder(tmp_path, suffix, cut, flips):
    data = bytearray(VALID[suffix][: max(1, int(len(VALID[suffix]) * cut))])
    for position in flips:  # flip a few bytes too
        if data:
            data[position % len(data)] ^= 0xFF
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(bytes(data))
    _only_clear_errors(path)


CELL = st.one_of(st.sampled_from(["1.0", "0.0", "-1.0", "", "nan", "2", "yes", "Frontal", "AP", "../../etc/passwd",
                                  "/abs/path.jpg", "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]),
                 st.text(max_size=12))


@FUZZ
@given(rows=st.lists(st.lists(CELL, min_size=len(CHEXPERT_COLUMNS), max_size=len(CHEXPERT_COLUMNS)), max_size=8),
       drop=st.integers(0, len(CHEXPERT_COLUMNS)))
def test_random_chexpert_tables_give_problems_not_crashes(tmp_path, rows, drop):
    import csv

    columns = CHEXPERT_COLUMNS[:drop] + CHEXPERT_COLUMNS[drop + 1:] if drop < len(CHEXPERT_COLUMNS) else CHEXPERT_COLUMNS
    table = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(row[: len(columns)] for row in rows)
    try:
        examples, problems = read_table(table, format="chexpert")
    except UserError as err:  # whole-file problems: missing columns, nothing left after the view filter
        assert str(err) and "Traceback" not in str(err) and "patient00001" not in str(err)
        return
    assert all(isinstance(p, Problem) for p in problems)
    assert not any("patient00001" in p.what for p in problems)  # a cell holding a path is never echoed
    assert all(e.image.is_relative_to(tmp_path) for e in examples)  # never outside the image root


@pytest.mark.parametrize("suffix", sorted(VALID))
def test_the_valid_seeds_decode(tmp_path, suffix):
    path = tmp_path / f"ok{suffix}"
    path.write_bytes(VALID[suffix])
    assert load_image(path).size == (48, 40)

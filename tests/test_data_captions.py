"""Captions: exact wording of every preset, joins, demographics, uncertainty policies, template files."""

import json
import math

import numpy as np
import pytest

from sdtune.data.captions import PRESETS, CaptionTemplate, apply_uncertainty, build_caption, join_findings, load_template
from sdtune.errors import UserError


@pytest.mark.parametrize("names, expected", [
    ([], ""),
    (["A"], "A"),
    (["A", "B"], "A and B"),
    (["A", "B", "C"], "A, B and C"),
])
def test_natural_join(names, expected):
    assert join_findings(names) == expected


def test_separator_join():
    assert join_findings(["A", "B", "C"], ", ") == "A, B, C"


def test_tutorial_caption_keeps_the_label_names_and_their_order():
    labels = {"No Finding": 0.0, "Cardiomegaly": 1.0, "Edema": 0.0, "Pleural Effusion": 1.0, "Fracture": 1.0}
    assert build_caption({"Pleural Effusion": 1.0}) == "Chest x-ray of a patient with Pleural Effusion"
    assert build_caption(labels) == "Chest x-ray of a patient with Cardiomegaly, Pleural Effusion and Fracture"
    # `findings` picks the labels that count and their order; absent ones are not positive.
    assert build_caption(labels, findings=["Fracture", "Cardiomegaly", "Pneumonia"]) == \
        "Chest x-ray of a patient with Fracture and Cardiomegaly"


def test_no_positive_gives_the_negative_text_and_no_finding_is_never_listed():
    negative = "Chest x-ray of a patient with no significant findings"
    assert build_caption({}) == negative
    assert build_caption({"No Finding": 1.0, "Edema": 0.0, "Cardiomegaly": math.nan}) == negative
    assert build_caption({"Edema": -1.0}) == negative  # uncertain is not positive until a policy says so
    assert build_caption({"No Finding": 1.0, "Edema": 1.0}) == "Chest x-ray of a patient with Edema"


def test_study_authors_preset():
    study = PRESETS["study"]
    labels = {"No Finding": 0.0, "Edema": 1.0, "Cardiomegaly": 1.0, "Fracture": 1.0}  # Fracture: not a study label
    assert build_caption(labels, study) == "Chest X-ray showing Cardiomegaly, Edema"
    assert build_caption({"No Finding": 1.0, "Fracture": 1.0}, study) == "Normal chest X-ray with no significant findings"
    every = {name: 1.0 for name in study.findings}
    assert build_caption(every, study) == ("Chest X-ray showing Cardiomegaly, Lung Opacity, Edema, Pneumonia, "
                                           "Pneumothorax, Pleural Effusion, Support Devices")


def test_dermoscopy_preset():
    derm = PRESETS["dermoscopy"]
    assert build_caption({"melanoma": 1.0, "melanocytic nevus": 0.0}, derm) == "a dermoscopic image of melanoma"
    assert build_caption({"Melanoma": 1.0}, derm) == "a dermoscopic image of melanoma"  # lowercased
    assert build_caption({"melanoma": 0.0}, derm) == "a dermoscopic image of a skin lesion"
    assert build_caption({"melanoma": 1.0}, derm, demographics={"age": 45.0, "sex": "male"}) == \
        "a dermoscopic image of melanoma, 45 year old male"


def test_demographics_prefix():
    labels = {"Edema": 1.0}
    assert build_caption(labels, demographics={"age": 50, "sex": "Female"}) == \
        "50 year old female. Chest x-ray of a patient with Edema"
    assert build_caption({}, demographics={"age": 49.6, "sex": "M"}) == \
        "50 year old male. Chest x-ray of a patient with no significant findings"
    assert build_caption(labels, demographics={"age": 71, "sex": "Unknown"}) == \
        "71 year old patient. Chest x-ray of a patient with Edema"
    # Without a known age the prefix is left out rather than written half.
    assert build_caption(labels, demographics={"age": math.nan, "sex": "Female"}) == "Chest x-ray of a patient with Edema"
    assert build_caption(labels, demographics={"age": 50, "sex": "Female"}) == \
        build_caption(labels, demographics={"age": 50, "sex": "Female"})  # deterministic


def test_uncertainty_policies_on_a_row_with_an_uncertain_label():
    raw = {"Cardiomegaly": 1.0, "Edema": -1.0, "Fracture": math.nan, "Pneumonia": 0.0}
    expected = {
        "ignore": ({"Cardiomegaly": 1.0, "Fracture": 0.0, "Pneumonia": 0.0}, "Chest x-ray of a patient with Cardiomegaly"),
        "ones": ({"Cardiomegaly": 1.0, "Edema": 1.0, "Fracture": 0.0, "Pneumonia": 0.0},
                 "Chest x-ray of a patient with Cardiomegaly and Edema"),
        "zeros": ({"Cardiomegaly": 1.0, "Edema": 0.0, "Fracture": 0.0, "Pneumonia": 0.0},
                  "Chest x-ray of a patient with Cardiomegaly"),
    }
    for policy, (labels, caption) in expected.items():
        applied = {k: apply_uncertainty(v, policy) for k, v in raw.items()}
        kept = {k: v for k, v in applied.items() if not math.isnan(v)}  # U-Ignore: uncertain = unknown
        assert kept == labels, policy
        assert build_caption(applied) == caption, policy


def test_uncertainty_on_arrays_and_unknown_policy():
    values = np.array([[1.0, 0.0, -1.0, np.nan]])
    np.testing.assert_array_equal(apply_uncertainty(values, "ones"), [[1.0, 0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(apply_uncertainty(values, "zeros"), [[1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(apply_uncertainty(values, "ignore"), [[1.0, 0.0, np.nan, 0.0]])
    with pytest.raises(UserError, match="U-Maybe|ones"):
        apply_uncertainty(values, "U-Maybe")


def test_load_template_presets_and_file(tmp_path):
    assert load_template("study") is PRESETS["study"]
    assert load_template(None) == CaptionTemplate()
    path = tmp_path / "lower.json"
    path.write_text(json.dumps({"preset": "study", "lowercase_findings": True, "findings": ["Edema", "Cardiomegaly"]}))
    template = load_template(str(path))
    assert template.findings == ("Edema", "Cardiomegaly")
    assert build_caption({"Cardiomegaly": 1.0, "Edema": 1.0}, template) == "Chest X-ray showing edema, cardiomegaly"


@pytest.mark.parametrize("content, message", [
    ({"positive": "X of {findings}", "suffix": "."}, "unknown key 'suffix'"),
    ({"positive": "X of {findings} in {subject_id}"}, "bad format field 'subject_id'"),
    ({"demographics": "{age} year old {sex}."}, "must contain {caption}"),
    ({"lowercase_findings": "yes"}, "'lowercase_findings' has the wrong type"),
    ({"preset": "mri"}, "unknown preset 'mri'"),
    ({"negative": "no\u0000findings"}, r"'negative' holds a NUL character \(\\u0000\): remove it"),
])
def test_bad_template_file_names_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message) as err:
        load_template(path)
    assert "mine.json" in str(err.value)


def test_unknown_template_name():
    with pytest.raises(UserError, match="neither a preset .*chexpert, study, dermoscopy"):
        load_template("no-such-style")

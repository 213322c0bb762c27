"""No patient identifier leaves the input: train, synthesize and evaluate on DICOMs that carry them,
then search every file the toolkit wrote (captions, logs, tensorboard, checkpoints, metadata)."""

from pathlib import Path

import numpy as np
import pytest
from helpers.dicom import write_identified_dicom

from sdtune.evaluation.cli import main as evaluate
from sdtune.synthesis import main as synthesize
from sdtune.train import main as train

IDENTIFIERS = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN12345",
    "PatientBirthDate": "19500314",
    "InstitutionName": "St Example Hospital",
    "AccessionNumber": "ACC998877",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20240229",
}


def _dicom(path: Path, seed: int, photometric: str = "MONOCHROME2") -> None:
    y, x = np.mgrid[:72, :72]
    noise = np.random.default_rng(seed).integers(0, 400, (72, 72))
    write_identified_dicom(path, IDENTIFIERS, (x * 40 + y * 10 + noise) % 4096, photometric)


@pytest.mark.slow
def test_identifiers_never_reach_any_output(tiny_model, tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(6):
        _dicom(images / f"scan{i}.dcm", i, "MONOCHROME1" if i % 2 else "MONOCHROME2")
        (images / f"scan{i}.txt").write_text("Chest x-ray of a patient with Pleural Effusion")
    assert all(v.encode() in (images / "scan0.dcm").read_bytes() for v in IDENTIFIERS.values())  # planted

    run, synthetic = tmp_path / "run", tmp_path / "synthetic"
    train(["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(tmp_path / "data"),
           "--strategy", "lora", "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
           "--checkpointing_steps", "1", "--output_dir", str(run), "--report_to", "tensorboard",
           "--validation_prompts", "Chest x-ray of a patient with Pleural Effusion", "--validation_steps", "1",
           "--validation_inference_steps", "2", "--validation_fraction", "0.3",
           "--latent_cache_dir", str(run / "latent_cache")])  # cached latents are searched too
    assert len(list((run / "latent_cache").glob("*.safetensors"))) >= 3
    synthesize(["--model-path", str(run), "--prompts", "Chest x-ray of a patient with Pleural Effusion",
                "--num-images", "2", "--steps", "2", "--height", "64", "--width", "64", "--output-dir", str(synthetic)])
    evaluate(["--real", str(tmp_path / "data"), "--fake", str(synthetic), "--metrics", "kid,vendi",
              "--output", str(tmp_path / "results.json"), "--cache-dir", str(tmp_path / "cache")])

    written = [p for folder in (run, synthetic, tmp_path / "cache") for p in folder.rglob("*") if p.is_file()]
    written.append(tmp_path / "results.json")
    kinds = {p.suffix for p in written}
    assert {".safetensors", ".json", ".png", ".csv", ".txt"} <= kinds  # weights, summaries, images, metadata
    assert any("tfevents" in p.name for p in written)  # tensorboard logs were searched too
    for path in written:
        data = path.read_bytes()
        for tag, value in IDENTIFIERS.items():
            assert value.encode() not in data, f"{tag} found in {path.relative_to(tmp_path)}"


def test_table_paths_name_patients_and_no_output_repeats_them(tiny_model, tmp_path, capsys):
    """CheXpert's paths carry the patient id (train/patient00001/...). A table with a missing image
    and a repeated row goes through check, export, training (held-out split, problem report,
    tensorboard), a held-out evaluation and the downstream classifier (its predictions file too): no
    file written and no line printed names a patient."""
    import re

    import pandas as pd

    from sdtune.data.__main__ import main as data_tool
    from sdtune.phantom import write_phantom_chexpert

    root = write_phantom_chexpert(tmp_path / "data", n=24, size=64)
    table = root / "CheXpert-v1.0-small" / "train.csv"
    df = pd.read_csv(table)
    frontal = df[df["Frontal/Lateral"] == "Frontal"]
    missing = root / frontal.Path.iloc[0]
    kept = missing.read_bytes()
    missing.unlink()  # a missing image
    pd.concat([df, frontal.iloc[[1]]]).to_csv(table, index=False)  # a repeated row
    assert df.Path.str.contains(r"patient\d{5}").all()

    data_flags = ["--train_csv", str(table), "--resolution", "64", "--skip_bad_files"]
    assert data_tool(["check", *data_flags, "--validation_fraction", "0.25"]) == 1  # the missing image is an error
    data_tool(["export", *data_flags, "--output_dir", str(tmp_path / "export"), "--layout", "jsonl"])
    run = tmp_path / "run"
    train(["--pretrained_model_name_or_path", str(tiny_model), *data_flags, "--strategy", "bitfit",
           "--train_batch_size", "2", "--max_train_steps", "1", "--output_dir", str(run), "--report_to", "tensorboard",
           "--validation_fraction", "0.25", "--latent_cache_dir", str(run / "latent_cache")])
    missing.write_bytes(kept)  # evaluate.py has no --skip_bad_files: its real set must be whole
    synthetic = tmp_path / "synthetic"
    synthesize(["--model-path", str(run), "--prompts", "Chest x-ray", "--num-images", "2", "--steps", "2",
                "--height", "64", "--width", "64", "--output-dir", str(synthetic)])
    evaluate(["--real", str(table), "--real-patients", "held_out", "--fake", str(synthetic), "--metrics", "kid",
              "--kid-subset-size", "2", "--output", str(tmp_path / "results.json"), "--cache-dir", str(tmp_path / "cache")])
    from sdtune.downstream import main as downstream
    from sdtune.phantom import DRAWN

    downstream(["--real", str(table), "--synthetic", str(synthetic), "--arms", "a,b", "--arch", "small_cnn",
                "--resolution", "16", "--steps", "2", "--seeds", "0", "--n_per_class", "1", "--bootstrap", "5",
                "--labels", ",".join(DRAWN), "--workers", "1", "--output_dir", str(tmp_path / "downstream")])
    printed = capsys.readouterr()

    patient = re.compile(rb"patient\d{5}")
    written = [p for folder in (tmp_path / "export", run, synthetic, tmp_path / "cache", tmp_path / "downstream")
               for p in folder.rglob("*") if p.is_file()] + [tmp_path / "results.json", tmp_path / "export.problems.txt"]
    assert {"held_out.txt", "data_problems.txt", "export.problems.txt", "metadata.jsonl",
            "downstream_predictions.csv"} <= {p.name for p in written}
    assert any("tfevents" in p.name for p in written)
    assert "line" in (run / "data_problems.txt").read_text()  # the problems are there, by row
    for path in written:
        assert not patient.search(path.read_bytes()), f"a patient id in {path.relative_to(tmp_path)}"
        assert not patient.search(str(path.relative_to(tmp_path)).encode()), path
    assert not patient.search((printed.out + printed.err).encode()), "a patient id was printed"

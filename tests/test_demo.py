"""`make demo` and run_study.sh end to end, at minimal size, through the toolkit's own entry points."""

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sdtune.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # this interpreter's environment (not resolved: a venv's python is a link)


def environment(**overrides) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", **overrides}


def table_rows(markdown: str) -> dict[str, dict]:
    lines = [line for line in markdown.split("\n\n")[0].splitlines() if line.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(headers, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]
    return {row["run"]: row for row in rows}


def test_run_study_lists_all_eleven_strategies_by_default():
    header = re.search(r'^: "\$\{STRATEGIES:=([^}]*)\}"', (ROOT / "run_study.sh").read_text(), re.M)
    assert header and header.group(1).split() == list(STRATEGIES)
    for name in STRATEGIES:  # each has its training and synthesis script
        assert (ROOT / f"{name}.sh").is_file() or (ROOT / f"finetune_{name}.sh").is_file()
        assert (ROOT / f"synthesis_{name}.sh").is_file()


def test_run_study_refuses_missing_settings_up_front(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "run_study.sh")], env=environment(OUTPUT_ROOT=str(tmp_path)),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "set LABELS_CSV" in result.stderr
    result = subprocess.run(["bash", str(ROOT / "run_study.sh")], capture_output=True, text=True, cwd=tmp_path,
                            env=environment(OUTPUT_ROOT=str(tmp_path), LABELS_CSV="x.csv", STRATEGIES="lora nope"))
    assert result.returncode == 2 and "set REAL_CSV or REAL_DIR" in result.stderr
    result = subprocess.run(["bash", str(ROOT / "run_study.sh")], capture_output=True, text=True, cwd=tmp_path,
                            env=environment(OUTPUT_ROOT=str(tmp_path), LABELS_CSV="x.csv", REAL_DIR="r",
                                            STRATEGIES="lora nope"))
    assert result.returncode == 2 and "unknown strategy 'nope'" in result.stderr
    for extra, expected in (({"STAGES": "train downstrem"}, "unknown stage 'downstrem'"),
                            ({"STAGES": "train downstream"}, "downstream stage trains classifiers on the labelled table"),
                            ({"STAGES": "train downstream", "TRAIN_CSV": "t.csv"}, "set VALIDATION_FRACTION"),
                            ({"STAGES": "train downstream", "TRAIN_CSV": "t.csv", "VALIDATION_FRACTION": "0.0"},
                             "set VALIDATION_FRACTION")):
        result = subprocess.run(["bash", str(ROOT / "run_study.sh")], capture_output=True, text=True, cwd=tmp_path,
                                env=environment(OUTPUT_ROOT=str(tmp_path), **extra))
        assert result.returncode == 2 and expected in result.stderr, (extra, result.stderr)
        assert not (tmp_path / "runs").exists()
    # a feature network that cannot load (xrv's weights, offline and not cached) fails before any training
    result = subprocess.run(["bash", str(ROOT / "run_study.sh")], capture_output=True, text=True, cwd=tmp_path,
                            env=environment(OUTPUT_ROOT=str(tmp_path), LABELS_CSV="x.csv", REAL_DIR="r",
                                            FID_FEATURES="xrv", PYTHON=sys.executable, HOME=str(tmp_path)))
    assert result.returncode == 2 and not (tmp_path / "runs").exists(), result.stderr
    assert "torchxrayvision weights densenet121-res224-all are not cached" in result.stderr
    assert "FID_FEATURES names xrv, which cannot be loaded" in result.stderr


@pytest.mark.slow
def test_make_demo_at_minimal_size(tmp_path):
    demo = tmp_path / "demo"
    # -o: never reinstall here (CI's `make test` has just run `make setup`); VENV: this interpreter's.
    result = subprocess.run(
        ["make", "-s", "-o", str(VENV / ".sdtune-installed"), "demo", f"VENV={VENV}"], cwd=ROOT,
        capture_output=True, text=True, timeout=900,
        env=environment(DEMO_DIR=str(demo), DEMO_STEPS="2", DEMO_IMAGES="2", DEMO_PHANTOMS="40",
                        DEMO_SAMPLING_STEPS="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout.split("(log: ")[-1].split("\n", 1)[1].strip())
    assert set(rows) == {"lora", "unet"}
    for name in ("lora", "unet"):
        summary = json.loads((demo / "runs" / name / "training_summary.json").read_text())
        assert summary["steps"] == 2 and rows[name]["strategy"] == name
        assert rows[name]["trainable params"] == f"{summary['trainable_parameters']['total']:,}"
        results = json.loads((demo / "runs" / name / "evaluation" / "inception.json").read_text())
        assert rows[name]["FID (Inception)"] == f"{results['metrics']['fid']['value']:.2f}"
        assert results["samples"]["fake"] == 8 and results["samples"]["real"] >= 2  # 4 conditions x 2; valid set
        assert results["real"]["source"].endswith("valid.csv")
        assert rows[name]["CLIP score"] == "—"  # no CLIP weights offline
    for name in ("comparison.md", "comparison.csv", "fid_vs_parameters.png", "fid_vs_gpu_hours.png", "sample_grid.png"):
        assert (demo / "comparison" / name).is_file()
    assert (demo / "runs" / "lora" / "samples" / "cardiomegaly" / "grid.png").is_file()
    assert "| Cardiomegaly | cardiothoracic_ratio |" in result.stdout  # the phantom finding scores
    assert f"everything is in {demo}" in result.stdout
    # demo.sh sets TQDM_DISABLE=1: no progress bar in the logs of training, synthesis or features
    for log in ("train-lora", "synthesize-lora", "evaluate-lora"):
        assert "%|" not in (demo / "logs" / f"{log}.log").read_text(), log


class _Pool(torch.nn.Module):
    """A 48-d stand-in feature network (4x4 average pooling): spares the smoke run Inception's start-up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1)


@pytest.mark.slow
def test_run_study_smoke_on_the_tiny_model(tiny_model, phantom_chexpert, tmp_path):
    """Two strategies at minimal size (the demo test covers Inception features and LoRA)."""
    pool = tmp_path / "pool.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_Pool()).save(str(pool))
    labels = tmp_path / "labels.csv"
    labels.write_text("Cardiomegaly,Pleural Effusion,count\n1,0,2\n0,1,2\n")
    out = tmp_path / "study"
    data = phantom_chexpert / "CheXpert-v1.0-small"
    env = environment(
        MODEL_NAME=str(tiny_model), TRAIN_CSV=str(data / "train.csv"), REAL_CSV=str(data / "valid.csv"),
        LABELS_CSV=str(labels), STRATEGIES="bitfit unet", OUTPUT_ROOT=str(out), MAX_TRAIN_STEPS="1",
        STAGES="train synthesize evaluate downstream compare", VALIDATION_FRACTION="0.25",
        DOWNSTREAM_LABELS="Cardiomegaly,Pleural Effusion", DOWNSTREAM_ARGS="--arch small_cnn --resolution 16 --steps 2 "
                                                                          "--seeds 0 --n_per_class 2 --workers 1",
        RESOLUTION="64", TRAIN_BATCH_SIZE="2", GRADIENT_ACCUMULATION_STEPS="1", MIXED_PRECISION="no",
        USE_8BIT_ADAM="false", GRADIENT_CHECKPOINTING="false", NUM_INFERENCE_STEPS="2", BATCH_SIZE="4",
        FID_FEATURES=str(pool), FID_BOOTSTRAP="0", METRICS="fid,kid,vendi,clip",
        EVAL_ARGS=f"--cache-dir {tmp_path / 'cache'} --device cpu", PYTHON=sys.executable,
        ACCELERATE_ARGS="--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no")
    result = subprocess.run(["bash", str(ROOT / "run_study.sh")], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows((out / "comparison" / "comparison.md").read_text())
    assert list(rows) == ["bitfit", "unet"]
    with open(out / "comparison" / "comparison.csv", newline="") as f:
        records = {r["run"]: r for r in csv.DictReader(f)}
    for name in rows:
        summary = json.loads((out / "runs" / name / "training_summary.json").read_text())
        assert summary["strategy"]["name"] == name and summary["steps"] == 1
        assert int(records[name]["trainable_parameters"]) == summary["trainable_parameters"]["total"]
        assert len(list((out / "synthetic" / name / "images").glob("*.png"))) == 4
        assert (out / "runs" / name / "evaluation" / "pool.pt.json").is_file()
        assert float(records[name]["fid_torchscript_pool_pt"]) > 0 and records[name]["clip"] == ""  # CLIP: a warning offline
    # The downstream stage: arms c, d per strategy and the real-only a, b once, all on the patients training held out
    baseline = json.loads((out / "downstream_real" / "downstream.json").read_text())
    assert list(baseline["arms"]) == ["a", "b"]
    assert baseline["settings"]["synthetic"] == [str(out / "synthetic" / n) for n in rows]
    for name in rows:
        own = json.loads((out / "runs" / name / "downstream" / "downstream.json").read_text())
        assert list(own["arms"]) == ["c", "d"] and own["counts"]["test"] == {
            **baseline["counts"]["test"], "generators_holding_it_out": [str(out / "runs" / name)]}
        assert own["counts"]["test"]["rule"] == "held out by the generator"
        assert float(records[name]["downstream_b"]) == baseline["arms"]["b"]["mean_auroc"]["mean"]
        c = own["arms"]["c"]["mean_auroc"]  # one seed: no std; the test patients' bootstrap interval
        assert rows[name]["AUROC (c: scarce real + synthetic)"] == f"{c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
    comparison = (out / "comparison" / "comparison.md").read_text()
    assert "NOT COMPARABLE" not in comparison
    for name in rows:  # the study's questions, paired across the baseline's and the strategy's downstream runs
        assert re.search(rf"^- {re.escape(name)}: downstream differences, .*\(c\) − \(b\) [+-]\d", comparison, re.M)
    # Both strategies freeze the VAE: they share one latent cache, each image encoded once for both.
    encoded = [json.loads((out / "runs" / n / "training_summary.json").read_text())["encoded_once"]["latents"] for n in rows]
    assert all("on disk" in e for e in encoded)
    assert len(list((out / "latent_cache").glob("*.safetensors"))) == int(encoded[0].split()[0])
    # A second run continues: nothing is retrained, the table is made again.
    first_table = (out / "comparison" / "comparison.md").read_text()
    again = subprocess.run(["bash", str(ROOT / "run_study.sh")], env={**env, "STAGES": "train compare"},
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": complete in") == 2 and not re.findall(r"^== train-\S+ \(", again.stdout, re.M)
    assert (out / "comparison" / "comparison.md").read_text() == first_table
    # Retrained (RESUME=false): the old model's images and scores go with it, so none is shown as the new one's.
    retrained = subprocess.run(["bash", str(ROOT / "run_study.sh")],
                               env={**env, "STAGES": "train", "STRATEGIES": "bitfit", "RESUME": "false"},
                               capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    assert not any((out / sub).exists() for sub in ("synthetic/bitfit", "runs/bitfit/evaluation", "runs/bitfit/downstream"))
    assert (out / "runs" / "unet" / "evaluation" / "pool.pt.json").is_file()  # the other strategy keeps its own

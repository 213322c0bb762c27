"""downstream.py: four arms on phantom chest X-rays, AUROC checked against Mann-Whitney, the patient split."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.downstream import (ARCHS, DownstreamConfig, auroc_per_label, build_classifier, label_matrix, load_bank,
                               masked_bce, mean_auroc, read_weights, run, sample_per_class)
from sdtune.data.records import DatasetError, Example
from sdtune.errors import UserError, run_cli
from sdtune.phantom import DRAWN, render_chest_xray, write_phantom_chexpert
from sdtune.synthesis import METADATA_COLUMNS, write_metadata

ROOT = Path(__file__).resolve().parents[1]
N_SYNTHETIC_EACH = 10  # per drawn finding, plus as many with no finding


@pytest.fixture(scope="module")
def phantom_train_csv(tmp_path_factory):
    """400 phantom images at 64 px (about 2 s to write): 318 frontal training-table images, 135 patients."""
    out = write_phantom_chexpert(tmp_path_factory.mktemp("phantom400"), n=400, size=64, seed=0)
    return out / "CheXpert-v1.0-small" / "train.csv"


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """A folder in synthesize_images.py's output format: images/*.png (RGB) and metadata.csv with the
    drawn findings as label columns; each finding alone N_SYNTHETIC_EACH times, then no finding."""
    out = tmp_path_factory.mktemp("synthetic")
    (out / "images").mkdir()
    rng = np.random.default_rng(7)
    plan = [name for name in DRAWN for _ in range(N_SYNTHETIC_EACH)] + [None] * N_SYNTHETIC_EACH
    rows = []
    for k, finding in enumerate(plan):
        labels = {name: float(name == finding) for name in DRAWN}
        render_chest_xray({n: v == 1.0 for n, v in labels.items()}, 64, rng).convert("RGB").save(out / "images" / f"{k:06d}.png")
        prompt = f"Chest x-ray of a patient with {finding}" if finding else "Chest x-ray of a patient with no significant findings"
        rows.append({"file_name": f"images/{k:06d}.png", "prompt": prompt, "negative_prompt": "", "seed": k, "steps": 50,
                     "guidance": 7.5, "scheduler": "pndm", **labels, "text": prompt})
    assert list(rows[0])[:len(METADATA_COLUMNS)] == METADATA_COLUMNS  # the synthesis format, column for column
    write_metadata(out / "metadata.csv", rows)
    return out


def config(real, tmp_path, **overrides) -> DownstreamConfig:
    settings = dict(real=str(real), labels=list(DRAWN), arch="small_cnn", resolution=32, epochs=1, batch_size=16,
                    arms="a", seeds="0", n_per_class=15, workers=2, output_dir=str(tmp_path / "downstream"))
    return DownstreamConfig(**{**settings, **overrides})


def mann_whitney_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half: every pair compared."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


# ------------------------------------------------------------------------------- acceptance


@pytest.mark.slow
def test_arm_a_small_classifier_reaches_auroc_0_9(phantom_train_csv, tmp_path):
    cfg = config(phantom_train_csv, tmp_path, resolution=48, epochs=5)
    summary, scores = run(cfg)
    a = summary["arms"]["a"]["seeds"]["0"]
    assert a["mean_auroc"] >= 0.9, a["auroc"]
    assert all(a["auroc"][name] is not None for name in DRAWN)  # every drawn finding has both classes in the test set
    assert a["mean_auroc"] == pytest.approx(np.mean([a["auroc"][n] for n in DRAWN]), abs=1e-12)
    assert a["train_images"] == summary["counts"]["real_train"]["images"] == 254
    assert a["steps"] == 5 * 16  # ceil(254 / 16) per epoch
    # The reported AUROC, recomputed from the test scores by comparing every positive with every negative.
    targets, test_scores = scores["targets"].numpy(), scores[("a", 0)].numpy()
    for j, name in enumerate(DRAWN):
        known = ~np.isnan(targets[:, j])
        assert a["auroc"][name] == pytest.approx(mann_whitney_auroc(test_scores[known, j], targets[known, j]), abs=1e-6)
    assert len(test_scores) == summary["counts"]["test"]["images"] == 64
    assert json.loads((tmp_path / "downstream" / "downstream.json").read_text()) == json.loads(json.dumps(summary))


@pytest.mark.slow
def test_four_arms_end_to_end(phantom_train_csv, synthetic_set, tmp_path):
    cfg = config(phantom_train_csv, tmp_path, arms="a,b,c,d", seeds="0,1", synthetic=[str(synthetic_set)], steps=6)
    summary, _ = run(cfg)
    arms, counts, n = summary["arms"], summary["counts"], cfg.n_per_class
    n_synthetic = len(DRAWN) * N_SYNTHETIC_EACH + N_SYNTHETIC_EACH
    assert counts["synthetic"]["images"] == n_synthetic
    assert counts["synthetic"]["positives"] == {name: N_SYNTHETIC_EACH for name in DRAWN}
    for seed in ("0", "1"):
        a, b, c, d = (arms[arm]["seeds"][seed] for arm in "abcd")
        assert a["train_images"] == counts["real_train"]["images"]
        assert a["train_positives"] == counts["real_train"]["positives"]
        for name in DRAWN:  # >= N positives per label (the phantom has more than N of each)
            assert n <= b["train_positives"][name] <= counts["real_train"]["positives"][name]
            assert c["train_positives"][name] == b["train_positives"][name] + N_SYNTHETIC_EACH
        assert b["train_images"] < a["train_images"]
        assert c["train_images"] == b["train_images"] + n_synthetic
        assert d["train_images"] == n_synthetic and d["train_positives"] == counts["synthetic"]["positives"]
        assert a["steps"] == b["steps"] == c["steps"] == d["steps"] == 6  # --steps: compute-matched arms
    assert arms["b"]["seeds"]["0"]["train_positives"] != arms["b"]["seeds"]["1"]["train_positives"]  # drawn per seed
    for arm in "abcd":  # mean and std over seeds
        values = [arms[arm]["seeds"][s]["mean_auroc"] for s in ("0", "1")]
        assert arms[arm]["mean_auroc"]["mean"] == pytest.approx(np.mean(values))
        assert arms[arm]["mean_auroc"]["std"] == pytest.approx(np.std(values, ddof=1))
        assert arms[arm]["mean_auroc"]["n"] == 2
    # The files: JSON as returned, the Markdown table (one row per arm), the CSV (one row per arm and seed).
    out = Path(cfg.output_dir)
    assert json.loads((out / "downstream.json").read_text())["arms"]["c"]["seeds"]["1"]["train_images"] == \
        arms["c"]["seeds"]["1"]["train_images"]
    table = (out / "downstream.md").read_text().splitlines()
    assert table[0] == "| arm | training images | mean AUROC | " + " | ".join(DRAWN) + " |"
    assert [line.split(" | ")[0] for line in table[2:6]] == ["| (a) all real", "| (b) N real per class",
                                                            "| (c) N real per class + synthetic", "| (d) synthetic only"]
    assert f"| {n_synthetic} | " in table[5]
    rows = list(csv.DictReader((out / "downstream.csv").open()))
    assert [(r["arm"], r["seed"]) for r in rows] == [(arm, s) for arm in "abcd" for s in ("0", "1")]
    assert float(rows[0]["mean_auroc"]) == pytest.approx(arms["a"]["seeds"]["0"]["mean_auroc"], abs=1e-6)
    assert summary["settings"]["seeds"] == [0, 1] and summary["settings"]["lr"] == 1e-3
    assert {"torch", "torchvision", "torchmetrics"} <= set(summary["versions"])


def test_same_seed_same_initial_weights_in_every_arm():
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        weights.append(build_classifier("small_cnn", 5).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ------------------------------------------------------------------------------- the patient split


def test_patient_level_split(phantom_train_csv, tmp_path):
    def split(seed):
        bank, counts = load_bank(config(phantom_train_csv, tmp_path, split_seed=seed, resolution=16), list(DRAWN),
                                 print, with_synthetic=False)
        return ([bank.groups[i] for i in bank.train], [bank.groups[i] for i in bank.test]), counts

    (train, test), counts = split(0)
    assert all(g is not None for g in train + test)
    assert not set(train) & set(test)  # no patient on both sides
    assert len(train) > len(set(train))  # patients do have several images, so this is a real check
    n_patients = len(set(train) | set(test))
    assert len(set(test)) == int(np.ceil(0.2 * n_patients)) == counts["test"]["patients"]
    assert split(0)[0] == (train, test)  # deterministic for a split seed
    (_, other), other_counts = split(1)
    assert set(other) != set(test)
    # the digest of the tested rows tells the two test sets apart, and is the same for the same rows
    assert split(0)[1]["test"]["rows_sha256"] == counts["test"]["rows_sha256"] != other_counts["test"]["rows_sha256"]


@pytest.fixture(scope="module")
def generator_run(phantom_train_csv, tiny_model, tmp_path_factory):
    """A tiny LoRA run on the phantom table that held out a quarter of its patients (one step)."""
    from sdtune.train import main as train_main

    out = tmp_path_factory.mktemp("generator") / "run"
    train_main(["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(phantom_train_csv),
                "--strategy", "lora", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "1",
                "--validation_fraction", "0.25", "--output_dir", str(out), "--report_to", "none"])
    return out


def _made_by(synthetic_set: Path, model: Path, folder: Path) -> Path:
    """A copy of the synthetic set whose synthesis_config.json names `model` as its generator."""
    import shutil

    shutil.copytree(synthetic_set, folder)
    (folder / "synthesis_config.json").write_text(json.dumps({"settings": {"model_path": str(model)}}))
    return folder


def test_the_generators_held_out_patients_are_the_test_set(phantom_train_csv, synthetic_set, generator_run, tmp_path):
    import pandas as pd

    # The held-out patients, worked out by hand from held_out.txt ("train.csv line N", header = line 1).
    table = pd.read_csv(phantom_train_csv)
    lines = (generator_run / "held_out.txt").read_text().splitlines()
    held = {re.search(r"(patient\d+)", table.Path[int(line.split()[-1]) - 2]).group(1) for line in lines}
    assert 0 < len(held) < table.Path.str.extract(r"(patient\d+)")[0].nunique()

    made = _made_by(synthetic_set, generator_run / "final_model", tmp_path / "synthetic")
    bank, counts = load_bank(config(phantom_train_csv, tmp_path, resolution=16, test_fraction=0.5, synthetic=[str(made)]),
                             list(DRAWN), print, with_synthetic=True)
    test, train = {bank.groups[i] for i in bank.test}, {bank.groups[i] for i in bank.train}
    assert test == held and not test & train  # not --test_fraction's split: exactly what the generator never saw
    assert counts["test"]["generators_holding_it_out"] == [str(generator_run)]
    # Arms a, b alone with the same sets: their images are not read, their generator still sets the test set.
    real_only, counts = load_bank(config(phantom_train_csv, tmp_path, resolution=16, test_fraction=0.5,
                                         synthetic=[str(made)]), list(DRAWN), print, with_synthetic=False)
    assert len(real_only.synthetic) == 0 < len(bank.synthetic)
    assert torch.equal(real_only.pixels[real_only.test], bank.pixels[bank.test])  # the same test images, in order
    # Without synthetic sets nothing trained on --real: the usual patient split.
    bank, counts = load_bank(config(phantom_train_csv, tmp_path, resolution=16), list(DRAWN), print, with_synthetic=False)
    assert {bank.groups[i] for i in bank.test} != held and counts["test"]["rule"].startswith("patient split")


def test_every_view_of_a_held_out_patient_is_tested(phantom_train_csv, synthetic_set, generator_run, tmp_path):
    import pandas as pd

    # The generator trained on frontal views; the classifier reads every view. A held-out patient's
    # lateral view is a test image too, never a training one.
    table = pd.read_csv(phantom_train_csv)
    lines = (generator_run / "held_out.txt").read_text().splitlines()
    held = {re.search(r"(patient\d+)", table.Path[int(line.split()[-1]) - 2]).group(1) for line in lines}
    laterals = set(table[table["Frontal/Lateral"] == "Lateral"].Path.str.extract(r"(patient\d+)")[0])
    assert laterals & held  # there are such views to place
    made = _made_by(synthetic_set, generator_run / "final_model", tmp_path / "synthetic")
    bank, counts = load_bank(config(phantom_train_csv, tmp_path, resolution=16, views="all", synthetic=[str(made)]),
                             list(DRAWN), print, with_synthetic=True)
    test, train = {bank.groups[i] for i in bank.test}, {bank.groups[i] for i in bank.train}
    assert test == held and not test & train
    n_held_images = table.Path.str.extract(r"(patient\d+)")[0].isin(held).sum()
    assert len(bank.test) == n_held_images > len(lines)  # the laterals are in


def test_a_generator_that_trained_on_every_test_patient_is_refused(phantom_train_csv, synthetic_set, generator_run,
                                                                   tmp_path):
    run_dir = tmp_path / "saw-all"
    run_dir.mkdir()
    summary = json.loads((generator_run / "training_summary.json").read_text())
    summary["arguments"]["data"]["validation_fraction"] = 0.0  # as a run without a held-out split records it
    (run_dir / "training_summary.json").write_text(json.dumps(summary))
    made = _made_by(synthetic_set, run_dir / "final_model", tmp_path / "synthetic")
    cfg = config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(made)])
    with pytest.raises(UserError, match="held out no patients: its images may reproduce the test patients.*"
                                        "--validation_fraction 0.2"):
        load_bank(cfg, list(DRAWN), print, with_synthetic=True)
    warned = []
    cfg = config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(made)], allow_seen_test_patients=True)
    _, counts = load_bank(cfg, list(DRAWN), warned.append, with_synthetic=True)
    assert counts["test"]["generators_that_saw_it"] == [str(run_dir)] and "may reproduce" in warned[0]
    summary, _ = run(config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(made)], arms="d", steps=1,
                            allow_seen_test_patients=True))
    assert f"The generator(s) {run_dir} trained on these test patients." in (tmp_path / "downstream" / "downstream.md").read_text()


def test_generators_the_check_cannot_read_are_named_and_held_out_sets_must_meet(phantom_train_csv, synthetic_set,
                                                                                 generator_run, tmp_path, capsys):
    import shutil

    def bank(real, *sets):
        warned = []
        load_bank(config(real, tmp_path, resolution=16, synthetic=[str(x) for x in sets]), list(DRAWN), warned.append,
                  with_synthetic=True)
        return warned

    moved = _made_by(synthetic_set, tmp_path / "moved" / "final_model", tmp_path / "s-moved")
    assert "has no training_summary.json beside it (moved?)" in bank(phantom_train_csv, moved)[0]
    copy = phantom_train_csv.with_name("train_copy.csv")
    shutil.copy(phantom_train_csv, copy)
    made = _made_by(synthetic_set, generator_run / "final_model", tmp_path / "s-made")
    assert "which trained on" in bank(copy, made)[0] and "not on --real" in bank(copy, made)[0]
    # A second generator that held out other rows: the test set is what both held out, and it is said.
    lines = (generator_run / "held_out.txt").read_text().splitlines()
    other = tmp_path / "other-run"
    other.mkdir()
    shutil.copy(generator_run / "training_summary.json", other)
    (other / "held_out.txt").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    second = _made_by(synthetic_set, other / "final_model", tmp_path / "s-other")
    bank(phantom_train_csv, made, second)
    assert f"{len(lines) // 2} of them also held out" in capsys.readouterr().out
    (other / "held_out.txt").write_text("train.csv line 100000\n")  # nothing in common
    with pytest.raises(UserError, match="held out no image in common: train them with the same"):
        bank(phantom_train_csv, made, second)


# ------------------------------------------------------------------------------- pieces


def test_sample_per_class_rule():
    rng = np.random.default_rng(0)
    targets = (rng.random((300, 3)) < [0.3, 0.1, 0.02]).astype(float)
    targets[rng.random((300, 3)) < 0.1] = np.nan  # unknown values never count as positives
    n = 20
    picked, short = sample_per_class(targets, n, seed=0)
    positives = np.nansum(targets[picked] == 1, axis=0)
    available = np.nansum(targets == 1, axis=0)
    assert available[2] < n and short == [2]  # the rare label gives all it has
    assert positives[2] == available[2]
    assert (positives[:2] >= n).all()
    assert np.array_equal(picked, sample_per_class(targets, n, seed=0)[0])  # deterministic per seed
    assert not np.array_equal(picked, sample_per_class(targets, n, seed=1)[0])
    assert len(np.unique(picked)) == len(picked)


def test_auroc_masks_unknown_and_skips_single_class_labels():
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.random((50, 3))).float()
    targets = torch.from_numpy((rng.random((50, 3)) < 0.4).astype(np.float32))
    targets[::3, 0] = float("nan")
    targets[:, 2] = 0.0  # no positive in the test set
    with torch.no_grad():
        result = auroc_per_label(scores, targets, ["x", "y", "z"])
    known = ~np.isnan(targets[:, 0].numpy())
    assert result["x"] == pytest.approx(mann_whitney_auroc(scores[known, 0].numpy(), targets[known, 0].numpy()), abs=1e-6)
    assert result["y"] == pytest.approx(mann_whitney_auroc(scores[:, 1].numpy(), targets[:, 1].numpy()), abs=1e-6)
    assert result["z"] is None and mean_auroc(result) == pytest.approx((result["x"] + result["y"]) / 2)
    # ties at mid-rank, as torchmetrics computes it
    from torchmetrics.functional.classification import binary_auroc as torchmetrics_auroc

    tied = torch.tensor([0.1, 0.4, 0.4, 0.4, 0.8, 0.8, 0.2, 0.9])
    truth = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    ours = auroc_per_label(tied[:, None], truth[:, None].float(), ["t"])["t"]
    assert ours == pytest.approx(mann_whitney_auroc(tied.numpy(), truth.numpy()), abs=1e-12)
    assert ours == pytest.approx(float(torchmetrics_auroc(tied, truth)), abs=1e-6)


def test_predictions_are_logits_so_confident_scores_keep_their_order():
    from sdtune.downstream import Bank, predict

    class Confident(torch.nn.Module):  # logits 20 + pixel value: a float32 sigmoid makes them all 1.0
        def forward(self, x):
            return 20.0 + x.mean(dim=(1, 2, 3))[:, None]

    pixels = torch.arange(6, dtype=torch.uint8).mul(40).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
    targets = torch.tensor([0.0, 0, 0, 1, 1, 1])[:, None]
    bank = Bank(pixels, targets, [None] * 6, np.arange(0), np.arange(6), np.arange(0))
    scores = predict(Confident(), bank, bank.test, 4, torch.device("cpu"))
    assert torch.sigmoid(scores).unique().numel() == 1  # a probability would tie them all: AUROC 0.5
    assert auroc_per_label(scores, targets, ["x"])["x"] == 1.0


def test_loss_leaves_out_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = [(0, 0, 1.0), (1, 0, 0.0), (1, 1, 1.0)]
    expected = np.mean([np.log1p(np.exp(-l)) if y else np.log1p(np.exp(l)) for l, y in
                        ((logits[i, j].item(), y) for i, j, y in known)])
    assert masked_bce(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_label_policy():
    examples = [Example(Path("a.png"), "c", labels={"A": 1.0, "B": -1.0}), Example(Path("b.png"), "c", labels={"A": 0.0})]
    # metadata (synthetic sets): blank = 0, -1 by the uncertainty policy
    assert np.array_equal(label_matrix(examples, ["A", "B"], True, "ignore"), [[1, np.nan], [0, 0]], equal_nan=True)
    assert np.array_equal(label_matrix(examples, ["A", "B"], True, "ones"), [[1, 1], [0, 0]])
    assert np.array_equal(label_matrix(examples, ["A", "B"], True, "zeros"), [[1, 0], [0, 0]])
    # clinical tables are read under U-Ignore (blank = 0): a missing value is an uncertain -1
    clinical = [Example(Path("a.png"), "c", labels={"A": 1.0}), Example(Path("b.png"), "c", labels={"A": 0.0, "B": 1.0})]
    assert np.array_equal(label_matrix(clinical, ["A", "B"], False, "ignore"), [[1, np.nan], [0, 1]], equal_nan=True)
    assert np.array_equal(label_matrix(clinical, ["A", "B"], False, "ones"), [[1, 1], [0, 1]])
    assert np.array_equal(label_matrix(clinical, ["A", "B"], False, "zeros"), [[1, 0], [0, 1]])


def test_the_uncertainty_policy_changes_training_labels_never_the_test_set(phantom_train_csv, tmp_path):
    import pandas as pd

    banks = {policy: load_bank(config(phantom_train_csv, tmp_path, uncertainty=policy, resolution=16), list(DRAWN),
                               print, with_synthetic=False)[0] for policy in ("ignore", "ones", "zeros")}
    test = {policy: bank.targets[bank.test].numpy() for policy, bank in banks.items()}
    assert np.array_equal(test["ones"], test["ignore"], equal_nan=True)
    assert np.array_equal(test["zeros"], test["ignore"], equal_nan=True)
    # and the test set's unknowns are exactly its table's -1.0 cells
    table = pd.read_csv(phantom_train_csv)
    frontal = table[table["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    uncertain = (frontal[list(DRAWN)] == -1.0).to_numpy()
    ignored = banks["ignore"]
    all_targets = ignored.targets.numpy()
    assert np.isnan(test["ignore"]).any()  # the phantom has uncertain test labels: a real check
    assert np.isnan(all_targets).sum() == uncertain.sum()
    train = {policy: bank.targets[bank.train].numpy() for policy, bank in banks.items()}
    unknown = np.isnan(train["ignore"])
    assert unknown.any() and (train["ones"][unknown] == 1).all() and (train["zeros"][unknown] == 0).all()
    assert np.array_equal(train["ones"][~unknown], train["ignore"][~unknown])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_gives_one_logit_per_label(arch):
    model = build_classifier(arch, 6).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 6)


def test_pretrained_weights_fill_all_but_the_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    imagenet = build_classifier("small_cnn", 1000).state_dict()  # an "ImageNet" file: 1000-class head
    torch.save(imagenet, tmp_path / "w.pth")
    save_file(imagenet, str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        torch.manual_seed(1)
        model = build_classifier("small_cnn", 5, read_weights(tmp_path / file)).state_dict()
        assert all(torch.equal(model[k], v) for k, v in imagenet.items() if not k.startswith("classifier."))
        assert model["classifier.weight"].shape == (5, 128)
    # torchvision's released DenseNet files use the old layer names ('norm.1'): renamed on reading
    densenet = build_classifier("densenet121", 1000).state_dict()
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in densenet.items()}
    assert old.keys() != densenet.keys()
    torch.save(old, tmp_path / "densenet.pth")
    loaded = build_classifier("densenet121", 6, read_weights(tmp_path / "densenet.pth")).state_dict()
    assert torch.equal(loaded["features.denseblock1.denselayer1.norm1.weight"],
                       densenet["features.denseblock1.denselayer1.norm1.weight"])
    with pytest.raises(UserError, match="not resnet50 weights|do not fit --arch resnet50"):
        build_classifier("resnet50", 6, read_weights(tmp_path / "w.pth"))


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, expected", [
    ("missing synthetic", "--synthetic .*nowhere does not exist"),
    ("unknown arch", "unknown --arch 'vgg16': use one of densenet121, efficientnet_b0, resnet50, small_cnn"),
    ("label not in data", "label\\(s\\) Nodule not in .*train.csv \\(its labels: .*Cardiomegaly"),
    ("synthetic lacks label", "--synthetic .* has no column\\(s\\) Edema"),
    ("arm c without synthetic", "arm\\(s\\) c need --synthetic"),
    ("bad arm", "--arms 'a,e'"),
    ("missing real", "--real .*nowhere.csv does not exist: pass the real data"),
    ("bad device", "--device 'cuda:x' is not a device: use auto, cpu, cuda or cuda:N"),
    ("negative seed", "--seeds '0,-1': give distinct integers from 0"),
    ("negative split seed", "--split_seed -2 must be from 0 to 4294967295"),
    ("numbers out of range", "--epochs 0 must be at least 1; --lr -0.1 must be above 0; --test_fraction 20 must be "
                             "above 0 and below 1 \\(a fraction: 0.2 means 20%\\)"),
    ("images folder", "--real .* is a folder without metadata.jsonl or metadata.csv, so it has no labels"),
    ("unknown table", "cannot tell the format of .*odd.csv .* pass the format \\(--real-format\\)"),
    ("diverged", "the classifier diverged \\(loss (nan|inf) after \\d+ steps at --lr 1e\\+30\\): lower --lr"),
])
def test_bad_input_is_one_line_error(case, expected, phantom_train_csv, synthetic_set, tmp_path, capsys):
    argv = ["--real", str(phantom_train_csv), "--arch", "small_cnn", "--resolution", "16", "--epochs", "1",
            "--labels", ",".join(DRAWN), "--arms", "a", "--seeds", "0", "--output-dir", str(tmp_path / "out")]
    extra = {"missing synthetic": ["--arms", "a,d", "--synthetic", str(tmp_path / "nowhere")],
             "unknown arch": ["--arch", "vgg16"],
             "label not in data": ["--labels", "Cardiomegaly", "Nodule"],
             "synthetic lacks label": ["--labels", "Cardiomegaly,Edema", "--arms", "d", "--synthetic", str(synthetic_set)],
             "arm c without synthetic": ["--arms", "a,c"],
             "bad arm": ["--arms", "a,e"],
             "missing real": ["--real", str(tmp_path / "nowhere.csv")],
             "bad device": ["--device", "cuda:x"],
             "negative seed": ["--seeds", "0,-1"],
             "negative split seed": ["--split-seed", "-2"],
             "numbers out of range": ["--epochs", "0", "--lr", "-0.1", "--test_fraction", "20"],
             "images folder": ["--real", str(phantom_train_csv.parent / "train")],
             "unknown table": ["--real", str(tmp_path / "odd.csv")],
             "diverged": ["--lr", "1e30"]}[case]
    from sdtune.downstream import main

    (tmp_path / "odd.csv").write_text("foo,bar\n1,2\n")
    old_results = tmp_path / "out" / "downstream.json"  # an earlier run's
    old_results.parent.mkdir()
    old_results.write_text("{}")

    if "--labels" in extra:  # replaced, not repeated: a repeated list flag adds a note line
        at = argv.index("--labels")
        del argv[at:at + 2]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv + extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(expected, err), err
    # Bad input loses nothing; a run that fails later leaves no earlier results to be read as its own.
    assert old_results.exists() == (case != "diverged")


def _stops(argv: list[str], capsys) -> str:
    """stderr of a downstream.py run that stops on bad input: exit status 2 and no traceback."""
    from sdtune.downstream import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def _args(real, tmp_path, *extra: str) -> list[str]:
    return ["--real", str(real), "--arch", "small_cnn", "--resolution", "16", "--epochs", "1", "--labels",
            ",".join(DRAWN), "--seeds", "0", "--bootstrap", "0", "--workers", "2", "--output-dir",
            str(tmp_path / "out"), *extra]


def _edited_copy(synthetic_set: Path, folder: Path, cells: dict[tuple[int, str], str]) -> Path:
    """A copy of the synthetic set with some label cells rewritten: {(file line, column): text}."""
    import shutil

    import pandas as pd

    shutil.copytree(synthetic_set, folder)
    table = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    for (line, column), text in cells.items():
        table.loc[line - 2, column] = text  # header = line 1
    table.to_csv(folder / "metadata.csv", index=False)
    return folder / "metadata.csv"


def test_a_synthetic_label_cell_that_is_no_number_is_named_not_read_as_0(phantom_train_csv, synthetic_set, tmp_path):
    # The metadata reader keeps only all-numeric columns as labels: one "yes" made every image a negative.
    file = _edited_copy(synthetic_set, tmp_path / "s", {(3, "Cardiomegaly"): "yes",
                                                       (7, "Pneumothorax"): "patient00001"})
    cfg = config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(file.parent)])
    with pytest.raises(DatasetError) as caught:
        load_bank(cfg, list(DRAWN), print, with_synthetic=True)
    fix = "not a number: write 1, 0, -1 or leave blank"  # the data layer's metadata reader names them
    assert [str(p) for p in caught.value.problems] == [f"{file} line 3: label(s) Cardiomegaly='yes' {fix}",
                                                       f"{file} line 7: label(s) Pneumothorax=<a value not shown> {fix}"]
    assert "patient00001" not in str(caught.value)  # such a cell is not repeated: it may hold an identifier
    # a label column the data layer does not take for one (mostly words): named here, cell by cell
    file = _edited_copy(synthetic_set, tmp_path / "s3", {(line, "Cardiomegaly"): "no" for line in range(2, 60)})
    with pytest.raises(DatasetError) as caught:
        load_bank(config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(file.parent)]),
                  list(DRAWN), print, with_synthetic=True)
    assert str(caught.value.problems[0]) == f"{file} line 2: Cardiomegaly is not a number: write 1, 0, -1 or leave it blank"
    # A cell of spaces is blank (0), and the column's other cells are still read as labels.
    last = 2 + len(DRAWN) * N_SYNTHETIC_EACH + N_SYNTHETIC_EACH - 1  # a no-finding row
    file = _edited_copy(synthetic_set, tmp_path / "s2", {(last, "Cardiomegaly"): " "})
    _, counts = load_bank(config(phantom_train_csv, tmp_path, resolution=16, synthetic=[str(file.parent)]),
                          list(DRAWN), print, with_synthetic=True)
    assert counts["synthetic"]["positives"] == {name: N_SYNTHETIC_EACH for name in DRAWN}


def test_synthetic_files_that_cannot_be_read_are_one_line(phantom_train_csv, synthetic_set, tmp_path, capsys):
    import shutil

    latin1 = "file_name,text,Cardiomegaly\nimages/\u00e9.png,x,1\n".encode("latin-1")
    for name, data in (("empty", b""), ("latin1", latin1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.csv").write_bytes(data)
        err = _stops(_args(phantom_train_csv, tmp_path, "--arms", "d", "--synthetic", str(tmp_path / name)), capsys)
        assert f"{tmp_path / name / 'metadata.csv'}: " + ("cannot read" if name == "empty" else "not UTF-8") in err, err
    # its synthesis_config.json holds no settings object: one line naming it
    shutil.copytree(synthetic_set, tmp_path / "made")
    (tmp_path / "made" / "synthesis_config.json").write_text('{"settings": []}')
    err = _stops(_args(phantom_train_csv, tmp_path, "--arms", "d", "--synthetic", str(tmp_path / "made")), capsys)
    assert err == (f"error: cannot read the model path from {tmp_path / 'made' / 'synthesis_config.json'}: it holds no "
                   "settings.model_path string\n")


@pytest.fixture
def small_chexpert(tmp_path):
    """A 30-image phantom CheXpert table of its own, for tests that break its files."""
    return write_phantom_chexpert(tmp_path / "small", n=30, size=32, seed=1) / "CheXpert-v1.0-small" / "train.csv"


def test_no_readable_image_or_no_row_left_is_said_with_its_cause(small_chexpert, tmp_path, capsys):
    import pandas as pd

    table = pd.read_csv(small_chexpert)
    # --image_root wrong: every row is left out, and the message names --image_root, not --labels
    err = _stops(_args(small_chexpert, tmp_path, "--arms", "a", "--image_root", str(tmp_path), "--skip_bad_files"),
                 capsys)
    assert "no row of" in err and "left out every row" in err and "--image_root" in err and "fix --labels" not in err
    # every image truncated: no torch.stack of nothing, but the first problem
    for path in table.Path:
        image = small_chexpert.parents[1] / path
        image.write_bytes(image.read_bytes()[:200])
    err = _stops(_args(small_chexpert, tmp_path, "--arms", "a", "--skip_bad_files"), capsys)
    assert err.count("\n") == 1 and "no image of" in err and "could be read" in err, err
    assert re.search(r"e\.g\. train\.csv line \d+: truncated or corrupt image data", err), err
    assert "patient" not in err


def test_every_problem_of_the_data_comes_in_one_report(small_chexpert, synthetic_set, tmp_path, capsys):
    import pandas as pd

    table = pd.read_csv(small_chexpert)
    frontal = [i for i in table.index if table.at[i, "Frontal/Lateral"] == "Frontal"]
    refused, truncated = frontal[0], frontal[2]
    table.loc[refused, "Cardiomegaly"] = 2.0  # a row the data layer refuses; its image is broken too
    table.to_csv(small_chexpert, index=False)
    for i in (refused, truncated):
        image = small_chexpert.parents[1] / table.Path[i]
        image.write_bytes(image.read_bytes()[:200])
    # two synthetic sets, each with bad label values on two lines
    sets = [_edited_copy(synthetic_set, tmp_path / name, {(3, "Cardiomegaly"): "2", (5, "Pneumothorax"): "5"})
            for name in ("s1", "s2")]
    err = _stops(_args(small_chexpert, tmp_path, "--arms", "a,d", "--synthetic", *(str(f.parent) for f in sets)),
                 capsys)
    lines = err.splitlines()
    assert lines[0].startswith("error: 7 problem(s) in "), err
    assert [line.split(": ")[0] for line in lines[1:]] == [
        f"  train.csv line {refused + 2}", f"  train.csv line {refused + 2}", f"  train.csv line {truncated + 2}",
        f"  {sets[0]} line 3", f"  {sets[0]} line 5", f"  {sets[1]} line 3", f"  {sets[1]} line 5"], err
    assert "unknown label value(s) Cardiomegaly=2.0" in lines[1] and "truncated or corrupt" in lines[2] + lines[3]
    assert lines[4:6] == [f"  {sets[0]} line 3: label Cardiomegaly = 2: labels must be 1, 0, -1 or blank",
                          f"  {sets[0]} line 5: label Pneumothorax = 5: labels must be 1, 0, -1 or blank"]


# ------------------------------------------------------------------------------- the wrapper


@pytest.mark.slow
def test_wrapper_runs_with_environment_overrides(phantom_train_csv, tmp_path):
    out = tmp_path / "wrapped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "REAL": str(phantom_train_csv),
           "LABELS": "Cardiomegaly,Pleural Effusion", "ARCH": "small_cnn", "RESOLUTION": "16", "EPOCHS": "1",
           "ARMS": "a,b", "SEEDS": "4", "N_PER_CLASS": "5", "OUTPUT_DIR": str(out)}
    result = subprocess.run(["bash", str(ROOT / "downstream.sh"), "--split-seed", "2", "--workers", "1"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "downstream.json").read_text())
    settings = summary["settings"]
    assert summary["labels"] == ["Cardiomegaly", "Pleural Effusion"] and settings["arch"] == "small_cnn"
    assert settings["seeds"] == [4] and settings["arms"] == ["a", "b"] and settings["n_per_class"] == 5
    assert settings["split_seed"] == 2 and settings["batch_size"] == 32  # an extra argument; a header default
    assert list(summary["arms"]) == ["a", "b"] and summary["counts"]["synthetic"]["images"] == 0
    assert "(b) N real per class" in result.stdout


def test_sample_per_class_counts_positives_drawn_for_rarer_labels():
    """B (8 positives) is visited before A (50) and every B image is also A: its 5 images already give A
    its 5 positives, so the subset is exactly 5 of B's images, whatever the seed."""
    targets = np.zeros((100, 2))
    targets[:50, 0] = 1.0  # label A
    targets[:8, 1] = 1.0  # label B, rarer, always with A
    for seed in range(5):
        picked, short = sample_per_class(targets, 5, seed)
        assert short == [] and len(picked) == 5 and set(picked) <= set(range(8))


def test_downstream_wrapper_passes_every_header_override(tmp_path):
    stub = tmp_path / "python"  # stands in for $PYTHON: records its arguments
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$RECORDED_ARGV"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "RECORDED_ARGV": str(tmp_path / "argv"),
           "SYNTHETIC": "synthetic/a synthetic/b", "TEST_FRACTION": "0.3", "UNCERTAINTY": "ones", "N_PER_CLASS": "7",
           "EPOCHS": "2", "DEVICE": "cpu", "BOOTSTRAP": "0"}
    result = subprocess.run(["bash", str(ROOT / "downstream.sh")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv[0].endswith("downstream.py")
    synthetic = argv.index("--synthetic")
    assert argv[synthetic + 1:synthetic + 3] == ["synthetic/a", "synthetic/b"]  # space-separated sets, in order
    rest = argv[1:synthetic]
    flags = dict(zip(rest[::2], rest[1::2]))
    assert (flags["--test_fraction"], flags["--uncertainty"], flags["--n_per_class"], flags["--epochs"],
            flags["--device"], flags["--bootstrap"]) == ("0.3", "ones", "7", "2", "cpu", "0")
    # Real-only arms: the default set is not passed; a set you name is (its generator gives the test set).
    for synthetic, passed in ((None, False), ("synthetic/x", True)):
        env = {k: v for k, v in env.items() if k != "SYNTHETIC"} | {"ARMS": "a,b"}
        if synthetic:
            env["SYNTHETIC"] = synthetic
        subprocess.run(["bash", str(ROOT / "downstream.sh")], env=env, check=True, cwd=tmp_path)
        argv = (tmp_path / "argv").read_text().split("\0")[:-1]
        assert ("--synthetic" in argv) == passed and (not passed or argv[argv.index("--synthetic") + 1] == synthetic)


def test_versions_record_the_running_code_and_leave_out_what_is_missing():
    import sdtune
    from sdtune.provenance import package_versions

    found = package_versions("sdtune", "numpy", "no-such-package-here")
    assert found["sdtune"] == sdtune.__version__ and found["numpy"] == np.__version__
    assert "no-such-package-here" not in found and found["python"].count(".") == 2


# ------------------------------------------------------------------------------- intervals and predictions


def _test_set(patients=30, per_patient=2, seed=0):
    rng = np.random.default_rng(seed)
    groups = [f"p{p:03d}" for p in range(patients) for _ in range(per_patient)]
    targets = torch.from_numpy(rng.integers(0, 2, (len(groups), 2)).astype(np.float32))
    return groups, targets, rng


def test_bootstrap_resamples_patients_and_pairs_the_arms():
    from sdtune.downstream import bootstrap_intervals

    groups, targets, rng = _test_set()
    noisy = torch.from_numpy(rng.normal(size=targets.shape).astype(np.float32)) + targets
    scores = {("a", 0): noisy, ("b", 0): noisy * 3 - 5,  # b ranks every image as a does: the same AUROCs
              ("c", 0): targets * 10.0}  # c separates the classes perfectly
    out = bootstrap_intervals(scores, targets, groups, ["x", "y"], ["a", "b", "c"], [0], resamples=200, seed=1)
    lo, hi = out["arms"]["a"]
    assert lo < hi and out["arms"]["b"] == [lo, hi]  # the test set's luck is real, and shared
    assert out["differences"]["b-a"] == {"delta": 0.0, "ci95": [0.0, 0.0]}  # paired: no luck left in a difference
    assert out["differences"]["c-a"]["ci95"][0] > 0 and out["arms"]["c"] == [1.0, 1.0]
    assert out["unit"] == "patient" and out["resamples"] == 200

    # Three resamples of two seeds, drawn again here: every image of each drawn patient (patients in sorted
    # order), the AUROC of those images per label, averaged over labels, then seeds; then the percentiles
    other_seed = torch.from_numpy(rng.normal(size=targets.shape).astype(np.float32)) + 0.5 * targets
    two = {("a", 0): noisy, ("a", 1): other_seed}
    three = bootstrap_intervals(two, targets, groups, ["x", "y"], ["a"], [0, 1], resamples=3, seed=7)
    patients, draw = sorted(set(groups)), np.random.default_rng(7)
    values = []
    for _ in range(3):
        drawn = draw.integers(0, len(patients), len(patients))
        idx = [i for u in drawn for i, g in enumerate(groups) if g == patients[u]]
        t = targets[idx].numpy()
        values.append(np.mean([np.mean([mann_whitney_auroc(s[idx].numpy()[:, j], t[:, j]) for j in range(2)])
                               for s in (noisy, other_seed)]))
    assert three["arms"]["a"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])), abs=1e-9)


def test_predictions_file_holds_every_logit_and_rebuilds_the_reported_auroc(phantom_train_csv, tmp_path):
    cfg = config(phantom_train_csv, tmp_path, resolution=16, steps=3, seeds="0,1", bootstrap=50)
    summary, scores = run(cfg)
    with open(tmp_path / "downstream" / "downstream_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_test = summary["counts"]["test"]["images"]
    assert len(rows) == n_test * len(DRAWN) * 2  # every image, label and seed of arm a
    assert all(re.fullmatch(r"train\.csv line \d+", r["row"]) for r in rows)  # rows, never patient paths
    for seed in ("0", "1"):
        for name in DRAWN:
            mine = [r for r in rows if r["seed"] == seed and r["label"] == name and r["target"] != ""]
            auroc = mann_whitney_auroc(np.array([float(r["logit"]) for r in mine]),
                                       np.array([int(r["target"]) for r in mine]))
            assert summary["arms"]["a"]["seeds"][seed]["auroc"][name] == pytest.approx(auroc, abs=1e-4)
    ci = summary["arms"]["a"]["mean_auroc"]["ci95"]
    assert ci[0] <= ci[1] and "[95% interval over 50 resamples of the test patients, the trained models fixed]" in (
        tmp_path / "downstream" / "downstream.md").read_text()


def test_runs_of_the_real_and_the_synthetic_arms_pair_through_their_predictions(phantom_train_csv, synthetic_set,
                                                                                 tmp_path):
    """run_study.sh trains a, b once and c, d per strategy: their predictions files pair them afterwards,
    with the same numbers as one run of all four arms."""
    from sdtune.downstream import bootstrap_intervals, paired_differences, read_predictions

    settings = dict(resolution=16, steps=3, seeds="0,1", bootstrap=40, synthetic=[str(synthetic_set)])
    together, kept = run(config(phantom_train_csv, tmp_path, arms="a,b,c,d", **settings))
    real = run(config(phantom_train_csv, tmp_path, arms="a,b", output_dir=str(tmp_path / "real"), **settings))[0]
    run(config(phantom_train_csv, tmp_path, arms="c,d", output_dir=str(tmp_path / "synthetic"), **settings))
    assert real["counts"]["test"]["rows_sha256"] == together["counts"]["test"]["rows_sha256"]

    rows, patients, labels, scores, targets = read_predictions(tmp_path / "downstream" / "downstream_predictions.csv")
    assert labels == list(DRAWN) and torch.equal(torch.nan_to_num(targets, -9), torch.nan_to_num(kept["targets"], -9))
    assert torch.allclose(scores[("c", 1)], kept[("c", 1)], atol=1e-6)  # the logits, as written
    assert len(set(patients)) == together["counts"]["test"]["patients"] and all(p.startswith("p") for p in patients)
    paired = paired_differences(tmp_path / "synthetic", tmp_path / "real", 40, 0)
    assert set(paired) == {"c-b", "d-a", "b-a", "c-a"}
    # one run of all four arms, resampled the same way (the same pseudonymous patients), gives the same
    alone = bootstrap_intervals(scores, targets, patients, labels, list("abcd"), [0, 1], 40, 0)["differences"]
    for pair in paired:
        assert paired[pair]["delta"] == pytest.approx(alone[pair]["delta"], abs=1e-9)
        assert paired[pair]["ci95"] == pytest.approx(alone[pair]["ci95"], abs=1e-9)
    assert paired["c-b"]["delta"] == pytest.approx(together["bootstrap"]["differences"]["c-b"]["delta"], abs=1e-6)
    # other test rows do not pair
    other = run(config(phantom_train_csv, tmp_path, arms="c,d", split_seed=5, output_dir=str(tmp_path / "other"),
                       **settings))[0]
    assert other["counts"]["test"]["rows_sha256"] != real["counts"]["test"]["rows_sha256"]
    assert paired_differences(tmp_path / "other", tmp_path / "real", 40, 0) is None
    # the baseline's lines in another order pair the same; a file that lost lines does not pair
    file = tmp_path / "real" / "downstream_predictions.csv"
    header, *lines = file.read_text().splitlines()
    file.write_text("\n".join([header] + lines[::-1]) + "\n")
    assert paired_differences(tmp_path / "synthetic", tmp_path / "real", 40, 0) == paired
    file.write_text("\n".join([header] + lines[:-3]) + "\n")
    assert paired_differences(tmp_path / "synthetic", tmp_path / "real", 40, 0) is None


def test_a_label_rarely_in_the_test_set_is_counted_when_draws_lose_it():
    from sdtune.downstream import bootstrap_intervals

    groups, targets, rng = _test_set(patients=40)
    targets[:, 1] = 0.0
    targets[:2, 1] = 1.0  # one patient is the only positive of label y
    scores = {("a", 0): targets + torch.from_numpy(rng.normal(size=targets.shape).astype(np.float32))}
    out = bootstrap_intervals(scores, targets, groups, ["x", "y"], ["a"], [0], resamples=400, seed=0)
    # a patient is left out of a draw of 40 with probability (39/40)^40, about 36%
    assert set(out["single_class"]) == {"y"} and 0.28 < out["single_class"]["y"] < 0.45


def test_predictions_files_that_cannot_be_paired_give_no_differences(tmp_path):
    from sdtune.downstream import paired_differences

    for name in ("run", "base"):
        (tmp_path / name).mkdir()
    assert paired_differences(tmp_path / "run", tmp_path / "base", 10, 0) is None  # no files
    for name in ("run", "base"):  # a file of another version, without patients
        (tmp_path / name / "downstream_predictions.csv").write_text("row,label,target,arm,seed,logit\nr,x,1,a,0,0.5\n")
    assert paired_differences(tmp_path / "run", tmp_path / "base", 10, 0) is None


def test_weighted_auroc_equals_the_auroc_of_the_repeated_images():
    from sdtune.downstream import weighted_auroc

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=60), 1)  # rounded: many ties
    targets = rng.integers(0, 2, 60).astype(float)
    targets[::7] = np.nan  # unknown: counted for neither class
    weights = rng.integers(0, 4, 60).astype(float)
    order = np.argsort(scores, kind="stable")
    ties = np.concatenate([[0], np.cumsum(scores[order][1:] != scores[order][:-1])])
    repeated = np.repeat(np.arange(60), weights.astype(int))
    known = repeated[~np.isnan(targets[repeated])]
    expected = mann_whitney_auroc(scores[known], targets[known])
    assert weighted_auroc(weights[order], ties, targets[order]) == pytest.approx(expected, abs=1e-12)
    assert weighted_auroc(weights[order], ties, np.where(np.isnan(targets), np.nan, 1.0)[order]) is None

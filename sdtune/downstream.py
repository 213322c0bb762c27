"""Downstream utility: does synthetic data help a chest X-ray classifier when real data is scarce?

One multi-label classifier per (arm, seed), all evaluated on the same held-out real test set
(patients never seen in training):

    a  all real         every real training image
    b  N real per class  a seeded subset with >= N positives per label (see sample_per_class)
    c  b + synthetic     the same subset plus every synthetic image
    d  synthetic only    every synthetic image

A seed gives the same initial weights in every arm (and seeds arm b's subset and the batch
order), so arms differ by their data only; --steps also matches their compute. Per label: AUROC on the test images whose label is known; the mean
AUROC averages the labels with both classes in the test set. Over seeds: mean and std (ddof=1).

Every image is decoded once, resized and cropped to --resolution, and kept in memory as uint8
(1 channel when every real image is grey, 3 otherwise) for all arms, seeds and epochs.

    python downstream.py --real data/CheXpert-v1.0-small/train.csv --synthetic synthetic/lora \
        --n-per-class 100 --seeds 0,1,2 --output-dir outputs/lora/downstream
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from sdtune.config import ArgumentParser, add_arguments, check_bounds, field, from_args
from sdtune.data.captions import apply_uncertainty
from sdtune.data.dataset import FORMATS, DataConfig, read_examples
from sdtune.data.images import ImageError, ImageTransform, load_image
from sdtune.data.records import DatasetError, Example, Problem, errors_only
from sdtune.data.splits import held_out_name, split_examples
from sdtune.data.tables import detect_format, is_label_column, read_csv
from sdtune.errors import UserError
from sdtune.provenance import (generator_runs, held_out_rows, package_versions, synthetic_file, trained_on,
                               trained_on_real)

STUDY_LABELS = ["Cardiomegaly", "Lung Opacity", "Edema", "No Finding", "Pneumothorax", "Pleural Effusion"]
ARMS = {"a": "all real", "b": "N real per class", "c": "N real per class + synthetic", "d": "synthetic only"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESULTS_FILE, TABLE_FILE, CSV_FILE = "downstream.json", "downstream.md", "downstream.csv"
PREDICTIONS_FILE = "downstream_predictions.csv"
# The questions the arms answer, as differences of mean AUROC: does synthetic data help scarce real data,
# can it replace real data, what does scarcity cost, does scarce + synthetic reach all of the real data.
DIFFERENCES = (("c", "b"), ("d", "a"), ("b", "a"), ("c", "a"))


@dataclass
class DownstreamConfig:
    """Real and synthetic data, the classifier, the arms and seeds of the downstream experiment."""

    real: str | None = field(None, "the real data: a clinical table (CheXpert train.csv, MIMIC-CXR, ...), a "
                                   "metadata.jsonl/.csv with label columns, or a folder holding one")
    real_format: str = field("auto", f"format of --real: {', '.join(f for f in FORMATS if f != 'folder')}")
    image_root: str | None = field(None, "folder that --real's image paths are relative to (default: found beside it)")
    uncertainty: str = field("ignore", "CheXpert -1.0 labels in training: ignore (unknown: left out of the loss), "
                                       "ones or zeros; blank is 0. The test set always leaves -1.0 out of the AUROC",
                             choices=("ignore", "ones", "zeros"))
    views: str = field("frontal", "chest X-ray views kept: frontal, AP, PA or all", choices=("frontal", "AP", "PA", "all"))
    synthetic: list[str] | None = field(None, "synthetic sets: synthesize_images.py output folders or their "
                                              "metadata.csv (labels from their label columns): images trained on by arms c, d; "
                                              "for every arm, their generators' held-out patients are the test set")
    labels: list[str] = field(STUDY_LABELS, "labels to classify, as arguments or comma-separated (default: the "
                                            f"study's six, {', '.join(STUDY_LABELS)})")
    arch: str = field("densenet121", "classifier: densenet121, efficientnet_b0, resnet50 (torchvision), or small_cnn "
                                     "(a ~100k-parameter CNN for tests and CPU demos only)")
    pretrained_weights: str | None = field(None, "ImageNet weights for --arch from a local .pth/.safetensors file, "
                                                 "never downloaded (default: none, random initialisation)")
    resolution: int = field(224, "images are resized (short side) and centre-cropped to this square", bounds=">=1")
    epochs: int = field(5, "passes over each arm's training images (a small arm gets fewer steps; see --steps)",
                        bounds=">=1")
    steps: int | None = field(None, "optimizer steps for every arm instead of --epochs: compute-matched arms, "
                                    "cycling through a small arm's images more often", bounds=">=1")
    batch_size: int = field(32, "images per step", bounds=">=1")
    lr: float | None = field(None, "Adam learning rate (default: 1e-4 for the torchvision networks, 1e-3 for small_cnn)",
                             bounds=">0")
    n_per_class: int = field(100, "arms b, c: real images per label (>= this many positives where the data has them)")
    arms: str = field("a,b,c,d", "comma-separated arms: a all real, b N real per class, c b + synthetic, d synthetic only")
    seeds: str = field("0,1,2", "comma-separated seeds; a seed gives the same initial weights in every arm")
    test_fraction: float = field(0.2, "fraction of real patients held out as the test set (unless the synthetic "
                                      "sets' generator held out patients of --real: then those are the test set)",
                                bounds="0<..<1")
    allow_seen_test_patients: bool = field(False, "measure even when a synthetic set's generator trained on every "
                                                  "patient of --real (the results then say so)")
    split_seed: int = field(0, "seed of the patient-level train/test split (the same test set for every arm and seed)",
                            bounds="seed")
    bootstrap: int = field(1000, "resamples of the test patients for 95% intervals of each arm's mean AUROC and of "
                                 "the differences between arms (paired: the same patients for every arm); 0: none",
                           bounds=">=0")
    skip_bad_files: bool = field(False, "leave out unreadable images and bad rows instead of stopping")
    workers: int = field(8, "threads decoding images", bounds=">=1")
    device: str = field("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    output_dir: str = field("outputs/downstream", f"folder for {RESULTS_FILE}, {TABLE_FILE} and {CSV_FILE}")


# ------------------------------------------------------------------------------- classifiers


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks and a linear head: a stand-in for tests and CPU demos, not for real data."""

    def __init__(self, num_classes: int = 1000, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Arch:
    build: str  # torchvision.models function name, or "small_cnn"
    head: str  # dotted path of the final nn.Linear, replaced by one with an output per label
    lr: float  # default learning rate


# A new architecture is one row.
ARCHS = {
    "densenet121": Arch("densenet121", "classifier", 1e-4),
    "efficientnet_b0": Arch("efficientnet_b0", "classifier.1", 1e-4),
    "resnet50": Arch("resnet50", "fc", 1e-4),
    "small_cnn": Arch("small_cnn", "classifier", 1e-3),
}
# torchvision's released DenseNet files still use the old names 'norm.1', 'conv.2', ...
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def build_classifier(arch: str, num_labels: int, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The network with one logit per label; `weights` (e.g. ImageNet's) fill every layer but the head."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}: use one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    if spec.build == "small_cnn":
        model = SmallCNN()
    else:
        import torchvision

        model = getattr(torchvision.models, spec.build)(weights=None)  # never a download
    parent_name, _, leaf = spec.head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, nn.Linear(old.in_features, num_labels))
    if weights is not None:
        load_backbone(model, weights, spec.head, arch)
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or a pickle read with weights_only=True (no foreign code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--pretrained_weights {path} does not exist: give a local .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any reader failure is the file's problem)
        raise UserError(f"cannot read --pretrained_weights {path}: {' '.join(str(err).split())[:200]}") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained_weights {path} does not hold a state dict (name -> tensor)")
    return {_OLD_DENSENET_KEY.sub(r"\1\2", k.removeprefix("module.")): v for k, v in state.items()}


def load_backbone(model: nn.Module, weights: dict[str, torch.Tensor], head: str, arch: str) -> None:
    """Load every weight but the head's; anything missing or left over is an error, never ignored."""
    body = {k: v for k, v in weights.items() if not k.startswith(head + ".")}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserError(f"--pretrained_weights do not fit --arch {arch}: {' '.join(str(err).split())[:300]}") from None
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise UserError(f"--pretrained_weights are not {arch} weights: {len(missing)} missing (e.g. "
                        f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


# ------------------------------------------------------------------------------- data


@dataclass
class Bank:
    """Every image of the run, decoded once: uint8 pixels (N, 1 or 3, R, R) and targets (N, labels), NaN = unknown."""

    pixels: torch.Tensor
    targets: torch.Tensor
    groups: list[str | None]
    train: np.ndarray  # indices of the real training images
    test: np.ndarray  # indices of the real test images
    synthetic: np.ndarray  # indices of the synthetic images
    names: list[str] | None = None  # each image's row or file ("train.csv line 12"), never a patient id


def read_real(cfg: DownstreamConfig) -> tuple[list[Example], bool, list[Problem]]:
    """(examples of --real, whether it is a metadata file, its row problems): load_bank stops on them
    with every other problem of the run, unless skipped."""
    if not cfg.real:
        raise UserError("--real is not given: pass the real data (e.g. CheXpert's train.csv)")
    source = Path(cfg.real).expanduser()
    # Checked before the data layer, whose messages name training's flags.
    if not source.exists():
        raise UserError(f"--real {cfg.real} does not exist: pass the real data (e.g. CheXpert's train.csv)")
    if source.is_dir() and not any((source / n).is_file() for n in ("metadata.jsonl", "metadata.csv")):
        raise UserError(f"--real {cfg.real} is a folder without metadata.jsonl or metadata.csv, so it has no labels: "
                        "pass a clinical table (e.g. CheXpert's train.csv) or a metadata file with label columns")
    try:
        examples, problems = read_examples(DataConfig(  # U-Ignore: label_matrix applies the policy, to training rows
            train_data_dir=cfg.real, data_format=cfg.real_format, image_root=cfg.image_root,
            uncertainty="ignore", views=cfg.views))
    except DatasetError:
        raise
    except UserError as err:
        raise UserError(str(err).replace("--data_format", "--real-format")) from None
    if source.is_dir():
        metadata = any((source / n).is_file() for n in ("metadata.jsonl", "metadata.csv"))
    else:
        metadata = (cfg.real_format if cfg.real_format != "auto" else detect_format(source)) == "metadata"
    return examples, metadata, problems


def read_synthetic(path: str, labels: list[str]) -> tuple[list[Example], list[Problem]]:
    """A synthetic set through the data layer's metadata reader, and its problems; every label must be
    one of its columns. Rows and problems are named by the set's file ("synthetic/lora/metadata.csv
    line 3"): several sets share the name metadata.csv."""
    file = synthetic_file(path)
    # The data layer's reader: an empty or non-UTF-8 file is one line, not a pandas traceback.
    cells = read_csv(file, [], dtype=str)
    missing = [name for name in labels if name not in cells.columns]
    if missing:
        raise UserError(f"--synthetic {path} has no column(s) {', '.join(missing)}: make it with a --labels-csv "
                        "holding them, or fix --labels")
    examples, problems = read_examples(DataConfig(train_csv=str(file), data_format="metadata"))

    def named(where: str) -> str:
        return str(file.parent / where) if where.startswith(file.name) else where

    problems = [replace(p, where=named(p.where)) for p in problems]
    # The metadata reader keeps mostly-numeric columns as labels (and names their other cells); a label asked
    # for that it did not keep would be NaN, so 0, for every image. So the label columns are read here too.
    values = cells[labels].apply(pd.to_numeric, errors="coerce")
    bad = cells[labels].apply(lambda column: column.str.strip().fillna("") != "") & values.isna()
    for line in cells.index[bad.any(axis=1).to_numpy()]:
        # the cell itself is not repeated: a column mix-up can put a patient's path in it
        problems += [Problem(f"{file} line {line}", f"{name} is not a number: write 1, 0, -1 or leave it blank")
                     for name in labels if bad.at[line, name] and not is_label_column(cells[name])]
    rows = values.to_dict("index")  # file line -> {label: value}
    examples = [replace(ex, source=named(ex.source), labels={**ex.labels, **{
        k: v for k, v in rows.get(int(ex.source.rpartition(" line ")[2]), {}).items() if v == v}}) for ex in examples]
    return examples, problems


def generator_held_out(cfg: DownstreamConfig, generators: list[tuple[str, Path, dict]], warn) -> tuple[set[str] | None, dict]:
    """The rows (or files) of --real that every generator trained on --real held out, or None when no
    generator trained on it; and a record of the rule for the results.

    A generator that trained on the test patients can reproduce them, which would flatter arms c
    and d. So when the generators trained on --real, the test set is what they held out
    (--validation_fraction), and a generator that held out nothing is an error unless allowed.
    """
    held, used, seen = None, [], []
    for set_path, run_dir, summary in generators:
        source = trained_on(summary)
        if not trained_on_real(summary, cfg.real):
            warn(f"--synthetic {set_path} comes from {run_dir}, which trained on {source}, not on --real: "
                 "if the two share patients, the test set may hold some its generator saw")
            continue
        names, why = held_out_rows(run_dir, summary)
        if names is None:
            problem = (f"--synthetic {set_path} comes from {run_dir}, which trained on {cfg.real} and {why}: "
                       "its images may reproduce the test patients")
            if not cfg.allow_seen_test_patients:
                raise UserError(f"{problem}. Train the generator with --validation_fraction 0.2 (its held-out "
                                "patients become this test set), or pass --allow_seen_test_patients to measure anyway")
            warn(f"{problem} (--allow_seen_test_patients)")
            seen.append(str(run_dir))
            continue
        if held is not None and names != held:
            print(f"test set: {run_dir} held out {len(names)} rows, {len(held & names)} of them also held out "
                  f"by {', '.join(used)}: only those are tested")
        held = names if held is None else held & names
        used.append(str(run_dir))
    rule = "held out by the generator" if used else "patient split (--test_fraction, --split_seed)"
    return held, {"rule": rule, "generators_holding_it_out": used, "generators_that_saw_it": seen}


def label_matrix(examples: list[Example], labels: list[str], metadata: bool, uncertainty: str,
                 problems: list[Problem] | None = None) -> np.ndarray:
    """(N, labels) floats: 1 positive, 0 negative, NaN unknown (left out of the loss and the AUROC).

    Clinical tables are read under U-Ignore with blank = 0, so a missing value is an uncertain
    -1. Metadata files (synthetic sets included) keep raw cells: blank is 0. Either way -1 then
    follows `uncertainty` through the data layer's `apply_uncertainty`. Any other value is a
    problem of its row: every one is added to `problems`, or raised at once without it.
    """
    values = np.array([[ex.labels.get(name, np.nan) for name in labels] for ex in examples], dtype=float)
    values = values.reshape(len(examples), len(labels))
    if not metadata:
        values = np.where(np.isnan(values), -1.0, values)
    values = apply_uncertainty(values, uncertainty)
    bad = ~np.isnan(values) & ~np.isin(values, (0.0, 1.0))
    found = [Problem(examples[i].source or str(examples[i].image),
                     f"label {labels[j]} = {values[i, j]:g}: labels must be 1, 0, -1 or blank")
             for i, j in np.argwhere(bad)]
    if problems is None and found:
        raise DatasetError(found, context="the labels")
    if problems is not None:
        problems += found
    return values


def decode(examples: list[Example], resolution: int, grey: bool, workers: int) -> tuple[list[torch.Tensor | None], list[Problem]]:
    """Each image decoded by the data layer's decoder, resized and centre-cropped, as uint8 (C, R, R)."""
    transform = ImageTransform(resolution, crop="center")

    def one(ex: Example) -> torch.Tensor | Problem:
        try:
            image = load_image(ex.image)
        except ImageError as err:
            return Problem(ex.source or str(ex.image), err.what)
        if grey:
            image = image.convert("L").convert("RGB")
        pixels = ((transform(image) + 1.0) * 127.5).round().to(torch.uint8)  # exact: the transform is p / 127.5 - 1
        if torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2]):
            pixels = pixels[:1]  # a radiograph: one channel is a third of the memory
        return pixels

    with ThreadPoolExecutor(max(1, workers)) as pool:
        out = list(pool.map(one, examples))
    problems = [p for p in out if isinstance(p, Problem)]
    return [None if isinstance(p, Problem) else p for p in out], problems


def load_bank(cfg: DownstreamConfig, labels: list[str], warn, with_synthetic: bool) -> tuple[Bank, dict]:
    """Read, split and decode the real data, and the synthetic images if `with_synthetic`, once; checks every
    label against the data. The test set comes from --synthetic's generators whether or not their images are
    read, so real-only arms run alone are tested on the same patients as arms c and d. Every problem of the
    data (rows, label values, images) is found before any stops the run, so one run reports them all."""
    real, metadata, problems = read_real(cfg)
    skip = cfg.skip_bad_files
    if not real:  # before the labels are checked: with no row left, every label would be "not in" --real
        if not skip:
            _stop_on_errors(problems + _refused_images(problems, cfg), cfg.real, skip)
        errors = errors_only(problems)
        raise UserError(f"no row of {cfg.real} is left to use" + (
            f": --skip_bad_files left out every row ({len(errors)} problem(s), e.g. {errors[0]})" if errors
            else f" (--views {cfg.views})"))
    absent = [name for name in labels if not any(name in ex.labels for ex in real)]
    if absent:
        found = sorted({k for ex in real for k in ex.labels})
        raise UserError(f"label(s) {', '.join(absent)} not in {cfg.real} (its labels: {', '.join(found) or 'none'}): "
                        "fix --labels")
    # A synthetic set's problems and bad label values stop the run even with --skip_bad_files: leaving
    # them out would change what is measured.
    synthetic, synth_targets, unskippable = [], [], []
    for path in (cfg.synthetic or []) if with_synthetic else []:
        try:
            examples, found = read_synthetic(path, labels)
        except DatasetError as err:  # a set that cannot be read at all (empty, not UTF-8): reported with the rest
            unskippable += err.problems
            continue
        synthetic += examples
        unskippable += found
        synth_targets.append(label_matrix(examples, labels, True, cfg.uncertainty, unskippable))

    held, test_rule = generator_held_out(cfg, generator_runs(cfg.synthetic or [], warn), warn)
    if held is not None:
        listed = [held_out_name(ex) in held for ex in real]
        # Every image of a held-out patient is tested, also one the generator did not load (e.g. another view).
        patients = {ex.group for ex, was in zip(real, listed) if was and ex.group is not None}
        tested = [was or ex.group in patients for ex, was in zip(real, listed)]
        test = [ex for ex, t in zip(real, tested) if t]
        train = [ex for ex, t in zip(real, tested) if not t]
        if not test:
            why = ("held out no image in common" if len(test_rule["generators_holding_it_out"]) > 1 and not held
                   else f"held out nothing that is in {cfg.real}")
            raise UserError(f"the generators {', '.join(test_rule['generators_holding_it_out'])} {why}: train them "
                            "with the same --validation_fraction and --split_seed on this table")
        print(f"test set: the {len(test)} images the generator(s) held out from training "
              f"({', '.join(test_rule['generators_holding_it_out'])}); --test_fraction is not used")
    else:
        if real and all(ex.group is None for ex in real):
            warn(f"{cfg.real} has no patient ids: the test set is split by image, so a patient may be on both sides")
        train, test = split_examples(real, cfg.test_fraction, seed=cfg.split_seed, by="patient")
    examples = train + test + synthetic
    # The policy is a training choice; the test set's uncertain labels are always left out of the AUROC.
    targets = np.concatenate([label_matrix(train, labels, metadata, cfg.uncertainty, unskippable),
                              label_matrix(test, labels, metadata, "ignore", unskippable)] + synth_targets)
    print(f"decoding {len(examples)} images at {cfg.resolution} px ({len(train) + len(test)} real, "
          f"{len(synthetic)} synthetic)")
    real_pixels, image_problems = decode(train + test, cfg.resolution, grey=False, workers=cfg.workers)
    # SD's RGB output has faint colour casts no radiograph has: grey real data makes synthetic grey too.
    grey = all(p is None or p.shape[0] == 1 for p in real_pixels)
    synth_pixels, synth_problems = decode(synthetic, cfg.resolution, grey=grey, workers=cfg.workers)
    # One report of everything: --skip_bad_files leaves out real rows and unreadable images, so only the rest stops it.
    stopping = list(unskippable) if skip else problems + image_problems + unskippable + synth_problems
    stopping += _refused_images(stopping, cfg)
    first = {}  # each row's problems together, rows in the order first named
    stopping.sort(key=lambda p: first.setdefault(p.where, len(first)))
    context = f"{cfg.real} and the synthetic set(s)" if with_synthetic and cfg.synthetic else cfg.real
    if errors_only(unskippable):
        raise DatasetError(stopping, context, "fix them: --skip_bad_files leaves out real rows and unreadable "
                                              "images only")
    _stop_on_errors(stopping, context, skip)
    if problems:
        warn(f"{len(problems)} row problem(s) in {cfg.real}, e.g. {problems[0]}")
    if all(p is None for p in real_pixels):  # --skip_bad_files left out every one: nothing to train or test on
        raise UserError(f"no image of {cfg.real} could be read: --skip_bad_files left out all {len(real_pixels)}, "
                        f"e.g. {image_problems[0]}")
    pixels = real_pixels + synth_pixels
    keep = np.array([p is not None for p in pixels], dtype=bool)
    if not keep.all():
        warn(f"{int((~keep).sum())} unreadable image(s) left out (--skip_bad_files)")
    channels = 1 if all(p.shape[0] == 1 for p in pixels if p is not None) else 3
    stacked = torch.stack([p.expand(channels, -1, -1) for p in pixels if p is not None])
    kind = np.array([0] * len(train) + [1] * len(test) + [2] * len(synthetic))[keep]
    bank = Bank(stacked, torch.from_numpy(targets[keep]).float(),
                [ex.group for ex, k in zip(examples, keep) if k],
                np.flatnonzero(kind == 0), np.flatnonzero(kind == 1), np.flatnonzero(kind == 2),
                [held_out_name(ex) for ex, k in zip(examples, keep) if k])
    tested = sorted(held_out_name(ex) for ex, k in zip(test, keep[len(train):len(train) + len(test)]) if k)
    # Which images were tested, not only how many: two results are comparable only on the same ones.
    digest = hashlib.sha256("\n".join(tested).encode()).hexdigest()[:16]
    counts = {"real_train": _describe(bank, bank.train, labels),
              "test": {**_describe(bank, bank.test, labels), "rows_sha256": digest, **test_rule},
              "synthetic": _describe(bank, bank.synthetic, labels)}
    return bank, counts


def _refused_images(problems: list[Problem], cfg: DownstreamConfig) -> list[Problem]:
    """The problems of the images of rows refused before decoding (a bad label or caption): decoded
    anyway, as `python -m sdtune.data check` does, so they come in this report, not the next run's."""
    refused = [Example(Path(p.image), "", source=p.where) for p in problems if p.image]
    return decode(refused, cfg.resolution, grey=False, workers=cfg.workers)[1]


def _stop_on_errors(problems: list[Problem], context: str, skip: bool) -> None:
    if errors_only(problems) and not skip:
        raise DatasetError(problems, context=context, hint="fix them, or pass --skip_bad_files to leave them out")


def _describe(bank: Bank, idx: np.ndarray, labels: list[str]) -> dict:
    t = bank.targets[torch.as_tensor(idx, dtype=torch.long)]
    groups = {bank.groups[i] for i in idx if bank.groups[i] is not None}
    return {"images": int(len(idx)), "patients": len(groups),
            "positives": {n: int((t[:, j] == 1).sum()) for j, n in enumerate(labels)},
            "negatives": {n: int((t[:, j] == 0).sum()) for j, n in enumerate(labels)}}


def sample_per_class(targets: torch.Tensor | np.ndarray, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Arm b's subset: (sorted indices, labels short of n positives).

    Labels are visited rarest first (fewest positives; ties in --labels order). For each, images
    positive for it and not yet chosen are drawn at random until the subset holds >= n positives
    of it, counting positives of images drawn for earlier labels; a label with fewer than n
    positives contributes all of them. Unknown values never count. Deterministic for a seed.
    """
    positive = np.nan_to_num(np.asarray(targets, dtype=float), nan=0.0) == 1.0
    rng = np.random.default_rng([seed, 2])
    chosen = np.zeros(len(positive), dtype=bool)
    short = []
    for j in np.argsort(positive.sum(axis=0), kind="stable"):
        need = n - int((positive[:, j] & chosen).sum())
        if need > 0:
            pool = np.flatnonzero(positive[:, j] & ~chosen)
            chosen[rng.permutation(pool)[:need]] = True
            if len(pool) < need:
                short.append(int(j))
    return np.flatnonzero(chosen), sorted(short)


# ------------------------------------------------------------------------------- training and evaluation


def _batch(bank: Bank, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels -> ImageNet-normalised float RGB on the device."""
    x = bank.pixels[idx].to(device, non_blocking=True).float().div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the known targets only (NaN = unknown contributes nothing)."""
    known = ~torch.isnan(targets)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def train_classifier(model: nn.Module, bank: Bank, idx: np.ndarray, cfg: DownstreamConfig, lr: float, seed: int,
                     device: torch.device) -> list[float]:
    """Adam on the masked BCE for --steps, else --epochs; batch order from the seed. Returns the mean loss per epoch."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    idx = torch.as_tensor(idx, dtype=torch.long)
    steps, step, losses = total_steps(cfg, len(idx)), 0, []
    while step < steps:
        total, seen = 0.0, 0
        for batch in idx[torch.randperm(len(idx), generator=order)].split(cfg.batch_size):
            loss = masked_bce(model(_batch(bank, batch, device)), bank.targets[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # summed on the device, read once an epoch: a read each step would wait for the GPU
            total, seen, step = total + loss.detach() * len(batch), seen + len(batch), step + 1
            if step == steps:
                break
        losses.append(float(total) / seen)
        if not math.isfinite(losses[-1]):  # every score would then tie: an AUROC of 0.5 that means nothing
            raise UserError(f"the classifier diverged (loss {losses[-1]} after {step} steps at --lr {lr:g}): "
                            "lower --lr")
    return losses


def total_steps(cfg: DownstreamConfig, n_images: int) -> int:
    return cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(n_images / cfg.batch_size)


@torch.no_grad()
def predict(model: nn.Module, bank: Bank, idx: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """The logits: an AUROC needs their order alone, which a float32 sigmoid loses above about 16.6 (all 1.0)."""
    model.to(device).eval()
    idx = torch.as_tensor(idx, dtype=torch.long)
    return torch.cat([model(_batch(bank, b, device)).float().cpu() for b in idx.split(batch_size)])


def binary_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic: (rank sum of positives - n1(n1+1)/2) / (n1 n0), ties at mid-rank."""
    _, where, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where.ravel()]  # 1-based, tied scores share their mean rank
    positive = targets == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_per_label(scores: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, float | None]:
    """AUROC of each label over its known targets; None when the test set has a single class of it."""
    scores, targets = scores.double().numpy(), targets.double().numpy()
    out = {}
    for j, name in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        out[name] = binary_auroc(scores[known, j], y) if 0 < y.sum() < len(y) else None
    return out


def mean_auroc(per_label: dict[str, float | None]) -> float | None:
    values = [v for v in per_label.values() if v is not None]
    return float(np.mean(values)) if values else None


def weighted_auroc(weights: np.ndarray, ties: np.ndarray, targets: np.ndarray) -> float | None:
    """AUROC of images sorted by score, each counted `weights` times (the Mann-Whitney statistic: a
    positive above a negative counts 1, a tie 1/2); `ties` numbers the runs of equal scores. Unknown
    targets (NaN) count for neither class. None with a single class."""
    positive = np.bincount(ties, np.where(targets == 1, weights, 0.0))
    negative = np.bincount(ties, np.where(targets == 0, weights, 0.0))
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(negative) - negative  # negatives scored below each run of ties
    return float((positive * (below + 0.5 * negative)).sum() / (n_pos * n_neg))


def bootstrap_intervals(scores: dict, targets: torch.Tensor, groups: list[str | None], labels: list[str],
                        arms: list[str], seeds: list[int], resamples: int, seed: int) -> dict:
    """95% percentile intervals of each arm's mean AUROC (averaged over seeds) and of the differences
    between arms, from `resamples` draws of the test patients with replacement (every image of a drawn
    patient; images alone where there are no patient ids). Paired: every arm is scored on the same
    draw, so a difference's interval leaves out the test set's luck that all arms share. The trained
    models stay fixed: the intervals cover the test set's sampling, the std over seeds the training's.
    A label with one class in a draw is left out of that draw's mean, for every arm alike; how often,
    per label, is returned as `single_class`."""
    units = [g if g is not None else f"image {i}" for i, g in enumerate(groups)]
    names, unit_of = np.unique(units, return_inverse=True)
    # A draw repeats a patient's images as often as it draws the patient: each image is weighted by that
    # count, and every (arm, seed, label) is sorted once, so a resample costs O(images), not a sort.
    sorted_scores = {}
    for key in ((arm, s) for arm in arms for s in seeds):
        for j in range(len(labels)):
            x = scores[key][:, j].double().numpy()
            order = np.argsort(x, kind="stable")
            ties = np.concatenate([[0], np.cumsum(x[order][1:] != x[order][:-1])])  # equal scores share a group
            sorted_scores[key, j] = order, ties, targets[:, j].double().numpy()[order]
    rng = np.random.default_rng(seed)
    draws = {arm: [] for arm in arms}
    positive, negative = (targets == 1).double().numpy(), (targets == 0).double().numpy()
    single_class = np.zeros(len(labels))
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))[unit_of].astype(float)
        single_class += (weights @ positive == 0) | (weights @ negative == 0)
        for arm in arms:
            means = [mean_auroc({j: weighted_auroc(weights[order], ties, y)
                                 for j, (order, ties, y) in ((j, sorted_scores[(arm, s), j]) for j in range(len(labels)))})
                     for s in seeds]
            draws[arm].append(np.mean(means) if None not in means else np.nan)

    def interval(values) -> list[float] | None:
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]  # a draw with one class of every label has no AUROC
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None

    measured = {(arm, s): mean_auroc(auroc_per_label(scores[(arm, s)], targets, labels)) for arm in arms for s in seeds}
    differences = {}
    for x, y in DIFFERENCES:
        if x in draws and y in draws:
            deltas = [None if None in (measured[(x, s)], measured[(y, s)]) else measured[(x, s)] - measured[(y, s)]
                      for s in seeds]
            differences[f"{x}-{y}"] = {"delta": None if None in deltas else float(np.mean(deltas)),
                                       "ci95": interval(np.subtract(draws[x], draws[y]))}
    return {"arms": {arm: interval(draws[arm]) for arm in arms}, "differences": differences,
            "resamples": resamples, "unit": "patient" if any(g is not None for g in groups) else "image",
            "single_class": {name: float(n / resamples) for name, n in zip(labels, single_class) if n}}


def _spread(values: list[float | None]) -> dict:
    """Mean and sample std (ddof=1) over seeds; std is None with one seed."""
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v)}


# ------------------------------------------------------------------------------- the experiment


def resolve(cfg: DownstreamConfig) -> tuple[list[str], list[str], list[int], torch.device, float]:
    """Check every setting before any image is read: (labels, arms, seeds, device, learning rate)."""
    labels = [name.strip() for item in cfg.labels for name in item.split(",") if name.strip()]
    if not labels or len(set(labels)) < len(labels):
        raise UserError(f"--labels {cfg.labels}: give distinct label names")
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) < len(arms):
        raise UserError(f"--arms {cfg.arms!r}: give distinct arms among {', '.join(ARMS)}, comma-separated")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {cfg.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {cfg.seeds!r}: give distinct integers from 0, e.g. 0,1,2")
    check_bounds(cfg)
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown --arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    needs = [a for a in arms if a in "cd"]
    if needs and not cfg.synthetic:
        raise UserError(f"arm(s) {', '.join(needs)} need --synthetic: pass a synthetic set, or --arms a,b")
    for path in cfg.synthetic or []:  # every arm reads their provenance (the test set); c and d their images
        synthetic_file(path)
    if any(a in "bc" for a in arms) and cfg.n_per_class < 1:
        raise UserError(f"--n_per_class must be at least 1, got {cfg.n_per_class}")
    lr = cfg.lr if cfg.lr is not None else ARCHS[cfg.arch].lr
    try:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        raise UserError(f"--device {cfg.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device here; use --device cpu")
    return labels, arms, seeds, device, lr


def arm_indices(arm: str, bank: Bank, n_per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The bank indices an arm trains on for a seed, and the labels short of N positives (arms b, c)."""
    if arm == "a":
        return bank.train, []
    if arm == "d":
        return bank.synthetic, []
    picked, short = sample_per_class(bank.targets[torch.as_tensor(bank.train)], n_per_class, seed)
    subset = bank.train[picked]
    return (subset if arm == "b" else np.concatenate([subset, bank.synthetic])), short


def run(cfg: DownstreamConfig) -> tuple[dict, dict]:
    """Train and evaluate every (arm, seed); write the JSON, Markdown and CSV results.

    Returns (summary, scores): the results as written to the JSON, and in memory the test
    targets (key "targets", NaN = unknown) and each run's test logits (key (arm, seed)).
    """
    labels, arms, seeds, device, lr = resolve(cfg)
    out_dir = Path(cfg.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings = []

    def warn(message: str) -> None:
        warnings.append(message)
        print(f"warning: {message}")

    weights = read_weights(cfg.pretrained_weights) if cfg.pretrained_weights else None
    build_classifier(cfg.arch, len(labels), weights)  # a bad file or arch fails before any image is read
    bank, counts = load_bank(cfg, labels, warn, with_synthetic=any(a in "cd" for a in arms))
    if len(bank.test) == 0 or len(bank.train) == 0:
        raise UserError(f"the split left {len(bank.train)} training and {len(bank.test)} test images: use more "
                        "patients or another --test_fraction")
    for name in labels:
        pos, neg = counts["test"]["positives"][name], counts["test"]["negatives"][name]
        if pos == 0 or neg == 0:
            warn(f"the test set has {pos} positive and {neg} negative {name}: its AUROC is null and left out of the mean")
    if any(a in "cd" for a in arms) and len(bank.synthetic) == 0:
        raise UserError("the synthetic sets hold no images: arms c and d have nothing to train on")
    # The input is good: an earlier run's results go now, so that a failure below leaves none to be mistaken
    # for this run's (compare and run_study.sh read them).
    for name in (RESULTS_FILE, TABLE_FILE, CSV_FILE, PREDICTIONS_FILE):
        (out_dir / name).unlink(missing_ok=True)

    params = sum(p.numel() for p in build_classifier(cfg.arch, len(labels)).parameters())
    print(f"{cfg.arch} ({params:,} parameters, {'ImageNet' if weights else 'random'} init) on {device}, lr {lr:g}, "
          f"{f'{cfg.steps} steps' if cfg.steps else f'{cfg.epochs} epochs'} of batch {cfg.batch_size} per arm; "
          f"{len(labels)} labels; seeds {seeds}")
    print(f"real: {counts['real_train']['images']} training images ({counts['real_train']['patients']} patients), "
          f"{counts['test']['images']} test images ({counts['test']['patients']} patients); "
          f"synthetic: {counts['synthetic']['images']}")

    results = {arm: {"name": ARMS[arm], "seeds": {}} for arm in arms}
    test_targets = bank.targets[torch.as_tensor(bank.test)]
    kept = {"targets": test_targets}
    for seed in seeds:
        for arm in arms:
            idx, short = arm_indices(arm, bank, cfg.n_per_class, seed)
            if short and seed == seeds[0]:
                warn(f"arm {arm}: the real training set has fewer than {cfg.n_per_class} positive "
                     f"{', '.join(labels[j] for j in short)}: all of them are used")
            if len(idx) == 0:
                raise UserError(f"arm {arm} has no training images: the real training set has no positive of any label")
            described = _describe(bank, idx, labels)
            for name in labels:
                if described["positives"][name] == 0 and seed == seeds[0]:
                    warn(f"arm {arm} has no positive {name} to learn from")
            start = time.perf_counter()
            torch.manual_seed(seed)  # the same initial weights for this seed in every arm
            model = build_classifier(cfg.arch, len(labels), weights)
            losses = train_classifier(model, bank, idx, cfg, lr, seed, device)
            scores = predict(model, bank, bank.test, 2 * cfg.batch_size, device)
            per_label = auroc_per_label(scores, test_targets, labels)
            kept[(arm, seed)] = scores
            seconds = time.perf_counter() - start
            results[arm]["seeds"][str(seed)] = {
                "mean_auroc": mean_auroc(per_label), "auroc": per_label, "train_images": described["images"],
                "train_positives": described["positives"], "steps": total_steps(cfg, len(idx)),
                "final_loss": losses[-1], "seconds": round(seconds, 2)}
            print(f"arm {arm} ({ARMS[arm]}) seed {seed}: mean AUROC {_fmt(mean_auroc(per_label))} "
                  f"({described['images']} images, loss {losses[-1]:.4f}, {seconds:.1f} s)")
    for arm, r in results.items():
        runs = list(r["seeds"].values())
        r["mean_auroc"] = _spread([x["mean_auroc"] for x in runs])
        r["auroc"] = {name: _spread([x["auroc"][name] for x in runs]) for name in labels}
    intervals = None
    if cfg.bootstrap:
        print(f"bootstrap: {cfg.bootstrap} resamples of the test patients")
        intervals = bootstrap_intervals(kept, test_targets, [bank.groups[i] for i in bank.test], labels, arms, seeds,
                                        cfg.bootstrap, cfg.split_seed)
        for name, share in intervals["single_class"].items():
            if share > 0.01:  # those draws average the other labels: the interval mixes two means
                warn(f"{name} has a single class in {share:.0%} of the bootstrap's draws (few test patients with "
                     "it): those draws leave it out of the mean AUROC; more test patients make the intervals sound")
        if cfg.bootstrap < 200:
            warn(f"--bootstrap {cfg.bootstrap}: the 2.5% and 97.5% percentiles of so few draws are noisy; use 1000")
        for arm, r in results.items():
            r["mean_auroc"]["ci95"] = intervals["arms"][arm]

    summary = {"kind": "sdtune.downstream", "format": 1, "labels": labels, "arms": results, "counts": counts,
               "bootstrap": intervals and {k: intervals[k] for k in ("differences", "resamples", "unit", "single_class")},
               "settings": {**asdict(cfg), "labels": labels, "lr": lr, "arms": arms, "seeds": seeds,
                            "device": str(device)},
               "versions": versions(), "warnings": warnings}
    table = markdown_table(summary)
    print(table)
    _write(out_dir / RESULTS_FILE, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    _write(out_dir / TABLE_FILE, table + "\n")
    _write(out_dir / CSV_FILE, csv_rows(summary))
    _write(out_dir / PREDICTIONS_FILE, prediction_rows(kept, [bank.names[i] for i in bank.test],
                                                       [bank.groups[i] for i in bank.test], labels))
    print(f"results: {out_dir / RESULTS_FILE}, {out_dir / TABLE_FILE}, {out_dir / CSV_FILE}; each test image's "
          f"logits: {out_dir / PREDICTIONS_FILE}")
    return summary, kept


# ------------------------------------------------------------------------------- outputs


def _fmt(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def markdown_table(summary: dict) -> str:
    """One row per arm: training images, mean AUROC and each label's AUROC, mean ± std over seeds."""
    labels = summary["labels"]
    lines = ["| arm | training images | mean AUROC | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for arm, r in summary["arms"].items():
        images = sorted({x["train_images"] for x in r["seeds"].values()})
        shown = str(images[0]) if len(images) == 1 else f"{images[0]}–{images[-1]}"
        cells = [_fmt(r["auroc"][n]["mean"], r["auroc"][n]["std"]) for n in labels]
        ci = r["mean_auroc"].get("ci95")
        mean = _fmt(r["mean_auroc"]["mean"], r["mean_auroc"]["std"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(f"| ({arm}) {r['name']} | {shown} | {mean} | " + " | ".join(cells) + " |")
    settings, test = summary["settings"], summary["counts"]["test"]
    per_class = f", N = {settings['n_per_class']} per class" if set(summary["arms"]) & {"b", "c"} else ""
    held_by = (f", held out from training by {', '.join(test['generators_holding_it_out'])}"
               if test.get("generators_holding_it_out") else "")
    seen = (f" **The generator(s) {', '.join(test['generators_that_saw_it'])} trained on these test patients.**"
            if test.get("generators_that_saw_it") else "")
    boot = summary.get("bootstrap")
    interval = (f" [95% interval over {boot['resamples']} resamples of the test {boot['unit']}s, the trained "
                "models fixed]" if boot else "")
    lines.append(f"\nAUROC on {test['images']} held-out real test images ({test['patients']} patients{held_by}); "
                 f"mean ± std over {len(settings['seeds'])} seed(s){interval}; {settings['arch']}{per_class}.{seen}")
    for pair, d in (boot or {}).get("differences", {}).items():
        if d["delta"] is not None and d["ci95"]:
            lines.append(f"- ({pair[0]}) − ({pair[2]}): {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                         + (" (the interval excludes 0)" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else ""))
    return "\n".join(lines)


def csv_rows(summary: dict) -> str:
    """One row per (arm, seed): arm, seed, train_images, mean_auroc, then one column per label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["arm", "seed", "train_images", "mean_auroc"] + summary["labels"])
    for arm, r in summary["arms"].items():
        for seed, x in r["seeds"].items():
            writer.writerow([arm, seed, x["train_images"], _cell(x["mean_auroc"])]
                            + [_cell(x["auroc"][n]) for n in summary["labels"]])
    return buffer.getvalue()


def prediction_rows(kept: dict, rows: list[str], groups: list[str | None], labels: list[str]) -> str:
    """Every test image's target and logit per (arm, seed, label), one line each: for other tests
    (DeLong, calibration, compare's paired intervals across runs) without training again. Rows are
    named as held_out.txt names them; patients by pseudonyms numbered in test order (p00001, ...)."""
    pseudonyms: dict[str, str] = {}
    patients = ["" if g is None else pseudonyms.setdefault(g, f"p{len(pseudonyms) + 1:05d}") for g in groups]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "patient", "label", "target", "arm", "seed", "logit"])
    targets = kept["targets"].numpy()
    for (arm, seed), logits in ((k, v.numpy()) for k, v in kept.items() if k != "targets"):
        for i, (row, patient) in enumerate(zip(rows, patients)):
            for j, label in enumerate(labels):
                target = "" if np.isnan(targets[i, j]) else int(targets[i, j])
                writer.writerow([row, patient, label, target, arm, seed, f"{logits[i, j]:.9g}"])
    return buffer.getvalue()


def read_predictions(path: Path) -> tuple[list[str], list[str | None], list[str], dict, torch.Tensor]:
    """A predictions file back: (rows, patients, labels, {(arm, seed): logits (N, labels)}, targets (N, labels))."""
    df = pd.read_csv(path, dtype={"row": str, "patient": str, "label": str, "arm": str}, keep_default_na=False)
    missing = [c for c in ("row", "patient", "label", "target", "arm", "seed", "logit") if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column(s) {', '.join(missing)}: write it again with this downstream.py")
    rows, labels = list(dict.fromkeys(df["row"])), list(dict.fromkeys(df["label"]))
    at, col = {r: i for i, r in enumerate(rows)}, {n: j for j, n in enumerate(labels)}
    i, j = df["row"].map(at).to_numpy(), df["label"].map(col).to_numpy()
    patients = [None] * len(rows)
    for r, p in zip(i, df["patient"]):
        patients[r] = p or None
    targets = np.full((len(rows), len(labels)), np.nan)
    known = df["target"].astype(str) != ""
    targets[i[known], j[known]] = df["target"][known].astype(float)
    scores = {}
    for (arm, seed), part in df.groupby(["arm", "seed"], sort=False):
        logits = np.full((len(rows), len(labels)), np.nan, dtype=np.float32)
        logits[part["row"].map(at).to_numpy(), part["label"].map(col).to_numpy()] = part["logit"].astype(float)
        if len(part) != logits.size or np.isnan(logits).any():  # lines lost or repeated: nothing to pair
            raise UserError(f"{path}: arm {arm} seed {seed} lacks a logit for some image and label: run it again")
        scores[(arm, int(seed))] = torch.from_numpy(logits)
    return rows, patients, labels, scores, torch.from_numpy(targets).float()


def paired_differences(run: Path, baseline: Path, resamples: int, seed: int) -> dict | None:
    """The study's differences (c − b, d − a, ...) with paired intervals between two downstream.py runs on
    one test set: the real-only arms of `baseline`, the synthetic arms of `run` (their predictions files).
    None when they cannot be paired (no predictions, other test rows, labels or seeds)."""
    files = [Path(folder) / PREDICTIONS_FILE for folder in (run, baseline)]
    try:
        (rows, patients, labels, scores, targets), (rows_b, _, labels_b, scores_b, targets_b) = map(read_predictions,
                                                                                                    files)
    except (OSError, UserError, ValueError, pd.errors.ParserError):  # none, or not one this version wrote
        return None
    seeds = sorted({s for _, s in scores})
    if (sorted(rows) != sorted(rows_b) or sorted(labels) != sorted(labels_b)
            or seeds != sorted({s for _, s in scores_b}) or set(scores) & set(scores_b)):
        return None
    # the baseline's rows and labels in the run's order, matched by name
    at, col = {r: i for i, r in enumerate(rows_b)}, {n: j for j, n in enumerate(labels_b)}
    order, columns = [at[r] for r in rows], [col[n] for n in labels]
    if not torch.equal(torch.nan_to_num(targets_b[order][:, columns], -9), torch.nan_to_num(targets, -9)):
        return None
    scores.update({key: logits[order][:, columns] for key, logits in scores_b.items()})
    arms = [a for a in ARMS if any(k[0] == a for k in scores)]
    return bootstrap_intervals(scores, targets, patients, labels, arms, seeds, resamples, seed)["differences"]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _write(path: Path, text: str) -> None:
    """Written aside and renamed: a killed run never leaves half a results file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def versions() -> dict:
    return package_versions("sdtune", "torch", "torchvision", "torchmetrics", "numpy")


def parse_args(argv: list[str] | None = None) -> DownstreamConfig:
    parser = ArgumentParser(prog="downstream.py", description="Does synthetic data help a classifier? "
                                     "Four arms (all real, N real per class, plus synthetic, synthetic only), "
                                     "AUROC on a held-out real test set split by patient.")
    add_arguments(parser, DownstreamConfig)
    return from_args(DownstreamConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))[0]

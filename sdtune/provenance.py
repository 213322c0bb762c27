"""Where a result came from: the versions that made it; for a synthetic set, the training run that
made it, what that run read, and which rows it held out (downstream.py, evaluate.py
--real_patients held_out and `compare` ask)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from sdtune.errors import UserError


def package_versions(*packages: str) -> dict[str, str]:
    """Python's version and each installed package's, for a result's record (one not installed is left out)."""
    from sdtune import __version__

    out = {"python": platform.python_version()}
    for package in packages:
        try:  # sdtune's own from the code that runs: a checkout on PYTHONPATH has no installed metadata
            out[package] = __version__ if package == "sdtune" else importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def code_digest(*modules: str) -> str:
    """A hash of these modules' source files: a cache keyed by it is never read by code that would now
    compute its entries differently (any edit re-computes; stale numbers are worse than a slow run)."""
    import hashlib
    import importlib

    digest = hashlib.sha256()
    for name in modules:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:12]


def synthetic_file(path: str) -> Path:
    """The metadata.csv of a synthetic set given as its folder or the file itself."""
    source = Path(path).expanduser()
    file = source / "metadata.csv" if source.is_dir() else source
    if not file.is_file():
        what = "has no metadata.csv" if source.is_dir() else "does not exist"
        raise UserError(f"--synthetic {source} {what}: pass a synthesize_images.py output folder or its metadata.csv")
    return file


def generator_runs(synthetic_sets: list[str], warn=None) -> list[tuple[str, Path, dict]]:
    """(set, run folder, training summary) of each synthetic set made by a model this toolkit trained:
    synthesis_config.json names the model, whose run folder holds training_summary.json. A set whose
    generator cannot be found is named to `warn` (a hub id, e.g. the untrained base model, is not)."""
    from sdtune.synthesis import read_summary

    found = []
    for path in synthetic_sets:
        config = synthetic_file(path).parent / "synthesis_config.json"
        if not config.is_file():
            if warn:
                warn(f"--synthetic {path} has no synthesis_config.json: cannot tell which patients its generator saw")
            continue
        try:
            model_path = json.loads(config.read_text())["settings"]["model_path"]
            if not isinstance(model_path, str):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: e.g. {"settings": []}
            what = "it holds no settings.model_path string" if isinstance(err, (KeyError, TypeError)) else err
            raise UserError(f"cannot read the model path from {config}: {what}") from None
        model = Path(model_path).expanduser()
        for folder in (model, model.parent):  # a run folder; its final_model/, checkpoint-N/ or adapter file
            summary = read_summary(folder)
            if summary is not None:
                found.append((path, folder, summary))
                break
        else:
            if warn and (model.is_absolute() or model.exists()):  # not a hub id
                warn(f"--synthetic {path}: its generator {model} has no training_summary.json beside it (moved?): "
                     "cannot tell which patients it saw")
    return found


def trained_on(summary: dict) -> str | None:
    """The table or folder a training run read, as its training_summary.json records it."""
    data = summary.get("arguments", {}).get("data", {})
    return summary.get("data_source") or data.get("train_csv") or data.get("train_data_dir")


def trained_on_real(summary: dict, real: str | Path) -> bool:
    source = trained_on(summary)
    return bool(source) and Path(source).expanduser().resolve() == Path(real).expanduser().resolve()


def held_out_rows(run_dir: Path, summary: dict) -> tuple[set[str] | None, str]:
    """The rows (or files) a training run held out, as its held_out.txt names them; or None and why
    there are none a test may use (nothing held out, or held out by image, so a patient's other
    images were trained on)."""
    data = summary.get("arguments", {}).get("data", {})
    listed = run_dir / "held_out.txt"
    if not data.get("validation_fraction") or not listed.is_file():
        return None, "held out no patients"
    if data.get("split") == "image":
        return None, "split it by image (--split image)"
    return set(listed.read_text().splitlines()), ""

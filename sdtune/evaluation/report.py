"""evaluate.py compare: the study's table from any set of runs, as Markdown, CSV and PNG plots.

    python evaluate.py compare outputs/unet outputs/lora outputs/dora --output-dir outputs/comparison

A run is a training output folder: its training_summary.json gives the strategy, trainable
parameters, peak memory, throughput and wall time; its evaluation results are evaluate.py's
results JSON files found by --results patterns (default RUN/results.json and
RUN/evaluation/*.json). Each results file is filed under the features it was computed with
(Inception, XRV, a TorchScript module), so FID, KID and Vendi of different feature networks
never share a column. A value a run does not have is "—" (an empty cell in the CSV), never
an error; a folder without training_summary.json is a one-line error naming it.

GPU-hours = wall time x processes / 3600, processes = global batch / (per-device batch x
gradient accumulation), all from the summary.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from dataclasses import dataclass, field as dc_field
from pathlib import Path

from sdtune.config import ArgumentParser, add_arguments, field, from_args
from sdtune.errors import UserError

MISSING = "—"
DEFAULT_RESULTS = ["results.json", "evaluation/*.json"]
FEATURE_NAMES = {"inception": "Inception", "xrv": "XRV"}  # display names; others show their own name


@dataclass
class CompareConfig:
    """Where the runs' evaluation results are, and where the table and plots go."""

    output_dir: str = field("comparison", "folder for comparison.md, comparison.csv and the PNG plots")
    results: list[str] = field(DEFAULT_RESULTS, "evaluate.py results files of each run: glob patterns, relative to "
                                                "the run folder unless absolute; {run} is the run folder and {name} "
                                                "its name, e.g. '/data/evals/{name}/*.json' (put the RUN_DIRs first)")
    grid_images: int = field(8, "images of each run's synthetic set in the side-by-side sample grid, spread evenly "
                                "over the set so every prompt group shows (0: no grid)")
    plots: bool = field(True, "write fid_vs_parameters.png, fid_vs_gpu_hours.png and sample_grid.png")
    downstream_real: str | None = field(None, "downstream.py results of the real-only arms a and b run once for every "
                                              "run (a folder or its downstream.json; run_study.sh: "
                                              "OUTPUT_ROOT/downstream_real): shown in each row without its own a, b")


# ------------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One run's numbers: its summary, and per feature network the first results file that used it."""

    name: str
    path: Path
    summary: dict
    by_features: dict[str, dict] = dc_field(default_factory=dict)  # extractor -> results JSON
    other: list[dict] = dc_field(default_factory=list)  # results without features (e.g. CLIP only)
    feature_files: dict[str, Path] = dc_field(default_factory=dict)  # extractor -> the file used
    files: list[Path] = dc_field(default_factory=list)  # every results file used
    notes: list[str] = dc_field(default_factory=list)
    downstream: dict = dc_field(default_factory=dict)  # RUN/downstream/downstream.json (downstream.py), if any

    @property
    def results(self) -> list[dict]:
        return list(self.by_features.values()) + self.other


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def find_results(run: Path, name: str, patterns: list[str]) -> list[Path]:
    """Results files of a run, in pattern order, each once."""
    found: list[Path] = []
    for pattern in patterns:
        relative = "{run}" not in pattern and not Path(pattern).is_absolute()
        pattern = pattern.replace("{run}", glob.escape(str(run))).replace("{name}", glob.escape(name))
        if relative:
            pattern = str(Path(glob.escape(str(run))) / pattern)
        for file in sorted(glob.glob(pattern)):
            path = Path(file)
            if path.is_file() and path.resolve() not in {p.resolve() for p in found}:
                found.append(path)
    return found


def load_run(path: Path, name: str, patterns: list[str]) -> Run:
    if not path.is_dir():
        raise UserError(f"run {path} does not exist or is not a folder: pass training output folders (OUTPUT_DIR)")
    summary_path = path / "training_summary.json"
    if not summary_path.is_file():
        raise UserError(f"run {path} has no training_summary.json: pass a training output folder "
                        "(train_text_to_image.py writes the summary there)")
    run = Run(name, path, _read_json(summary_path, "training summary"))
    status = run.summary.get("status")
    if status not in (None, "complete"):
        run.notes.append(f"{name}: training status '{status}' (the numbers are of an unfinished run)")
    for file in find_results(path, name, patterns):
        results = _read_json(file, "results file")
        if not isinstance(results.get("metrics"), dict):
            run.notes.append(f"{name}: {file} is not an evaluate.py results file (no 'metrics'): ignored")
            continue
        extractor = (results.get("features") or {}).get("extractor")
        if extractor is None:
            run.other.append(results)
        elif extractor in run.by_features:
            run.notes.append(f"{name}: {file} has {feature_label(extractor)} features again: the first file "
                             f"({run.feature_files[extractor]}) is used")
            continue
        else:
            run.by_features[extractor], run.feature_files[extractor] = results, file
        run.files.append(file)
    if not run.files:
        run.notes.append(f"{name}: no evaluation results (looked for {', '.join(patterns)})")
    downstream = path / "downstream" / "downstream.json"
    if downstream.is_file():
        data = _read_json(downstream, "downstream results")
        if data.get("kind") == "sdtune.downstream":
            run.downstream = data
            run.notes += downstream_provenance(name, path, data)
            seen = _get(data, "counts", "test", "generators_that_saw_it")
            if seen:  # --allow_seen_test_patients
                run.notes.append(f"{name}: NOT COMPARABLE downstream AUROC: its test patients were in the training "
                                 f"data of {', '.join(seen)}, whose images arms (c, d) learn from (flattered)")
        else:
            run.notes.append(f"{name}: {downstream} is not a downstream.py results file: ignored")
    return run


def load_runs(paths: list[str], patterns: list[str]) -> list[Run]:
    names = [Path(p).resolve().name for p in paths]
    # Folders with the same name (a/lora, b/lora) are told apart by the path as given.
    names = [p if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [load_run(Path(p), n, patterns) for p, n in zip(paths, names)]


def read_downstream_baseline(path: str) -> tuple[dict, Path]:
    """--downstream_real: downstream.py results holding arm a or b, and the file they came from."""
    file = Path(path).expanduser()
    file = file / "downstream.json" if file.is_dir() else file
    if not file.is_file():
        raise UserError(f"--downstream_real {path}: no downstream.json there: pass the --output_dir of a "
                        "downstream.py --arms a,b run")
    data = _read_json(file, "downstream results")
    if data.get("kind") != "sdtune.downstream" or not any(a in (data.get("arms") or {}) for a in "ab"):
        raise UserError(f"--downstream_real {file} holds no real-only arm of downstream.py: pass the results of "
                        "downstream.py --arms a,b")
    return data, file


# What must agree for a row's arms to differ by their data only: the classifier, its training, the labels.
DOWNSTREAM_SETTINGS = ("arch", "pretrained_weights", "resolution", "epochs", "steps", "batch_size", "lr",
                       "n_per_class", "seeds", "uncertainty", "views", "labels")


def downstream_test_set(data: dict) -> list:
    """The tested images (their digest, where recorded) and their counts."""
    return [_get(data, "counts", "test", key) for key in ("rows_sha256", "images", "patients", "positives")]


def downstream_baseline_notes(runs: list[Run], baseline: dict, file: Path) -> list[str]:
    """Where the rows' arms a, b come from, and NOT COMPARABLE for a run whose arms c, d were tested on other
    images or trained otherwise."""
    out = [f"AUROC (a), (b) of runs without their own: the real-only baseline {file}"]

    for run in runs:
        arms = (run.downstream or {}).get("arms") or {}
        if not any(a in arms for a in "cd") or all(a in arms for a in "ab"):
            continue  # nothing of its own to set beside the baseline, or a row entirely its own
        settings, theirs = run.downstream.get("settings") or {}, baseline.get("settings") or {}
        differ = ["test set"] if downstream_test_set(run.downstream) != downstream_test_set(baseline) else []
        differ += [key for key in DOWNSTREAM_SETTINGS if settings.get(key) != theirs.get(key)]
        if differ:
            out.append(f"NOT COMPARABLE: {run.name}'s downstream arms (c, d) and the real-only baseline differ in "
                       f"{', '.join(differ)}: run both with the same settings and synthetic sets whose generators "
                       "held out the same patients")
        elif theirs.get("bootstrap"):  # one test set, one recipe: the study's questions, paired across the runs
            from sdtune.downstream import paired_differences

            print(f"downstream: pairing {run.name} with the real-only baseline ({theirs['bootstrap']} resamples)")
            differences = paired_differences(run.path / "downstream", file.parent, theirs["bootstrap"],
                                             theirs.get("split_seed", 0))
            shown = [f"({pair[0]}) − ({pair[2]}) {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                     for pair, d in (differences or {}).items() if d["delta"] is not None and d["ci95"]]
            if differences is None:
                out.append(f"{run.name}: no downstream differences: its downstream_predictions.csv and the "
                           "baseline's do not pair (one is missing or incomplete, or they differ in rows, labels, "
                           "seeds or arms); run downstream.py again for both")
            elif shown:
                out.append(f"{run.name}: downstream differences, 95% paired bootstrap over the test patients: "
                           + "; ".join(shown))
    return out


# ------------------------------------------------------------------------------- the table


def downstream_provenance(name: str, run_path: Path, data: dict) -> list[str]:
    """A note when a run's downstream AUROC used synthetic images that another model (or an unknown
    one) made: the row would credit this run with them."""
    from sdtune.provenance import generator_runs

    sets = (data.get("settings") or {}).get("synthetic") or []
    if not any(a in (data.get("arms") or {}) for a in "cd"):
        return []
    try:
        found = {path: folder for path, folder, _ in generator_runs(sets)}
    except UserError as err:
        return [f"{name}: cannot tell which model made its downstream synthetic sets ({err})"]
    others = [f"{path} ({found[path] if path in found else 'generator unknown'})" for path in sets
              if path not in found or found[path].resolve() != run_path.resolve()]
    return [f"{name}: its downstream AUROC (c, d) used synthetic sets this run did not make: {', '.join(others)}"] if others else []


def feature_label(extractor: str) -> str:
    return FEATURE_NAMES.get(extractor, extractor.split(":", 1)[-1])


def feature_key(extractor: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in extractor.lower()).strip("_")


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def processes(summary: dict) -> int | None:
    """Processes (GPUs) of a run: global batch / (per-device batch x accumulation)."""
    train = _get(summary, "arguments", "train") or {}
    global_batch, batch, accumulation = (summary.get("global_batch_size"), train.get("train_batch_size"),
                                         train.get("gradient_accumulation_steps"))
    if not all(isinstance(v, int) and v > 0 for v in (global_batch, batch, accumulation)):
        return None
    return max(1, round(global_batch / (batch * accumulation)))


def run_record(run: Run, extractors: list[str], baseline: dict | None = None) -> dict:
    """The run's row: every CSV column, None where the run has no value."""
    s = run.summary
    n_proc = processes(s)
    wall = _number(s.get("wall_time_seconds"))
    row = {
        "run": run.name, "run_dir": str(run.path), "strategy": _get(s, "strategy", "name"), "status": s.get("status"),
        "steps": s.get("steps"), "trainable_parameters": _get(s, "trainable_parameters", "total"),
        "trainable_percent_of_sd15": _number(s.get("trainable_percent_of_sd15")),
        "peak_gpu_memory_gib": _number(s.get("peak_gpu_memory_gib")),
        "samples_per_second": _number(s.get("samples_per_second")), "num_processes": n_proc,
        "wall_time_seconds": wall, "gpu_hours": wall * n_proc / 3600 if wall is not None and n_proc else None,
    }
    for extractor in extractors:
        k, r = feature_key(extractor), run.by_features.get(extractor, {})
        m = r.get("metrics", {})
        row.update({
            f"fid_{k}": _number(_get(m, "fid", "value")), f"fid_{k}_std": _number(_get(m, "fid", "std")),
            f"kid_{k}": _number(_get(m, "kid", "mean")), f"kid_{k}_std": _number(_get(m, "kid", "std")),
            f"vendi_{k}": _number(_get(m, "vendi", "fake")), f"vendi_real_{k}": _number(_get(m, "vendi", "real")),
            f"n_real_{k}": _get(r, "samples", "real"), f"n_fake_{k}": _get(r, "samples", "fake"),
        })
    clip, ms_ssim = first_metric(run, "clip", "value"), first_metric(run, "ms_ssim", "mean")
    row.update(clip=_number(clip.get("value")), clip_model=clip.get("model"),
               ms_ssim=_number(ms_ssim.get("mean")), ms_ssim_std=_number(ms_ssim.get("std")))
    # downstream.py's mean AUROC per arm: c and d use this run's synthetic images; a and b, real only, come
    # from the run's own results or else the shared baseline (--downstream_real)
    for arm in DOWNSTREAM_ARMS:
        own = _get(run.downstream, "arms", arm, "mean_auroc")
        auroc = (own if own is not None or arm in "cd" else _get(baseline, "arms", arm, "mean_auroc")) or {}
        row[f"downstream_{arm}"], row[f"downstream_{arm}_std"] = _number(auroc.get("mean")), _number(auroc.get("std"))
        low, high = auroc.get("ci95") or (None, None)  # the test patients' bootstrap, where it was run
        row[f"downstream_{arm}_ci_low"], row[f"downstream_{arm}_ci_high"] = _number(low), _number(high)
    return row


def first_metric(run: Run, name: str, key: str) -> dict:
    """The run's `name` metric from the first results file that has its `key` value ({} if none has)."""
    return next((r["metrics"][name] for r in run.results if _get(r, "metrics", name, key) is not None), {})


def _fmt(value, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _pm(value, spread, spec: str) -> str:
    if value is None:
        return MISSING
    return format(value, spec) + (f" ± {format(spread, spec)}" if spread is not None else "")


def _interval(low, high) -> str:
    return f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""


DOWNSTREAM_ARMS = {"a": "all real", "b": "scarce real", "c": "scarce real + synthetic", "d": "synthetic only"}


def display_columns(extractors: list[str], arms: list[str] = ()) -> list[tuple[str, callable]]:
    """(header, row -> cell text) of the Markdown table, in order."""
    columns = [
        ("run", lambda r: r["run"]),
        ("strategy", lambda r: r["strategy"] or MISSING),
        ("steps", lambda r: _fmt(r["steps"], "d") if isinstance(r["steps"], int) else MISSING),
        ("trainable params", lambda r: _fmt(r["trainable_parameters"], ",")),
        ("% of SD1.5", lambda r: MISSING if r["trainable_percent_of_sd15"] is None
         else f"{r['trainable_percent_of_sd15']:.3g}%"),
        ("peak mem (GiB)", lambda r: _fmt(r["peak_gpu_memory_gib"], ".2f")),
        ("samples/s", lambda r: _fmt(r["samples_per_second"], ".3g")),
        ("GPU-hours", lambda r: _fmt(r["gpu_hours"], ".3g")),
    ]
    for extractor in extractors:
        k, label = feature_key(extractor), feature_label(extractor)
        columns += [
            (f"FID ({label})", lambda r, k=k: _pm(r[f"fid_{k}"], r[f"fid_{k}_std"], ".2f")),
            (f"KID ({label})", lambda r, k=k: _pm(r[f"kid_{k}"], r[f"kid_{k}_std"], ".4f")),
            (f"Vendi ({label})", lambda r, k=k: _fmt(r[f"vendi_{k}"], ".2f")),
        ]
    columns += [("CLIP score", lambda r: _fmt(r["clip"], ".2f")),
                ("MS-SSIM", lambda r: _fmt(r["ms_ssim"], ".4f"))]
    columns += [(f"AUROC ({a}: {DOWNSTREAM_ARMS[a]})", lambda r, a=a: _pm(r[f"downstream_{a}"], r[f"downstream_{a}_std"], ".3f")
                 + _interval(r[f"downstream_{a}_ci_low"], r[f"downstream_{a}_ci_high"]))
                for a in arms]
    return columns


def extractors_of(runs: list[Run]) -> list[str]:
    """Feature networks the runs' results used, Inception first; Inception alone when there are none (so
    the table always has its FID columns)."""
    found = {e for run in runs for e in run.by_features}
    return [e for e in FEATURE_NAMES if e in found] + sorted(found - set(FEATURE_NAMES)) or ["inception"]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"] + [line(r) for r in rows])


def per_condition(runs: list[Run], extractors: list[str]) -> list[dict]:
    """Long-format rows of every run's per-condition FID (run, features, condition, fid, std, n_real, n_fake)."""
    rows = []
    for run in runs:
        for extractor in extractors:
            table = _get(run.by_features.get(extractor, {}), "metrics", "fid_per_condition") or {}
            for condition, c in table.items():
                rows.append({"run": run.name, "features": extractor, "condition": condition,
                             "fid": _number(c.get("value")), "fid_std": _number(c.get("std")),
                             "n_real": c.get("n_real"), "n_fake": c.get("n_fake")})
    return rows


def notes(runs: list[Run], records: list[dict], extractors: list[str]) -> list[str]:
    out = ["GPU-hours = wall time x processes / 3600, processes = global batch / (per-device batch x gradient "
           "accumulation); a run with peak memory — had no CUDA device, so its hours are CPU process-hours."]
    if extractors:
        out.append("FID ± bootstrap std, KID mean ± std over subsets, Vendi of the synthetic set; compare FID only "
                   "between runs with the same features, resize and image counts (FID is biased upward when there "
                   "are fewer images than feature dimensions).")
    for extractor in extractors:
        k = feature_key(extractor)
        counts = sorted({(r[f"n_real_{k}"], r[f"n_fake_{k}"]) for r in records if r[f"fid_{k}"] is not None})
        if counts:
            text = "; ".join(f"{real} real / {fake} synthetic" for real, fake in counts)
            out.append(f"{feature_label(extractor)} features, images: {text}"
                       + (" (differs between runs)" if len(counts) > 1 else ""))
        # One column must hold numbers made alike: the same network, preprocessing and real set.
        for what, read in (("feature version and resize", lambda r: (r.get("features") or {}).get("version")),
                           ("real set", lambda r: (r.get("real") or {}).get("source"))):
            differ = _differing({run.name: read(run.by_features[extractor]) for run in runs
                                 if extractor in run.by_features})
            if differ:
                out.append(f"NOT COMPARABLE: the {feature_label(extractor)} numbers differ in {what} between runs "
                           f"({differ}): evaluate them all alike")
    # A CLIP score is a number of its model, and MS-SSIM one of the image size (fewer scales below 176 px).
    clip_models = {run.name: first_metric(run, "clip", "value").get("model") for run in runs}
    clip_models = {name: model for name, model in clip_models.items() if model}
    differ = _differing(clip_models)
    if differ:
        out.append(f"NOT COMPARABLE: the CLIP scores come from different models between runs ({differ}): score every "
                   "run with one --clip-model")
    elif clip_models:
        out.append(f"CLIP score model: {next(iter(clip_models.values()))}")
    sizes = {run.name: first_metric(run, "ms_ssim", "mean") for run in runs}
    differ = _differing({name: f"{'x'.join(map(str, m.get('image_size') or ['?']))} px, {m.get('scales')} scales"
                         for name, m in sizes.items() if m})
    if differ:
        out.append(f"NOT COMPARABLE: MS-SSIM was measured on other image sizes or scales between runs ({differ}): "
                   "synthesize every run at one size")
    # The study trained every arm with AdamW; the full fine-tuning scripts default to 8-bit AdamW to fit 12 GB.
    optimizers = {run.name: run.summary["optimizer"].replace(" (fused)", "").replace("Paged", "")
                  for run in runs if run.summary.get("optimizer")}
    differ = _differing(optimizers)
    if differ:
        out.append(f"The runs trained with different optimizers ({differ}); the study used AdamW for every arm: "
                   "set USE_8BIT_ADAM alike in every script (or MEMORY_PROFILE) for a like-for-like table")
    # the mean AUROC of different labels is a different number
    label_sets = {}
    for run in runs:
        if run.downstream:
            label_sets.setdefault(tuple(run.downstream.get("labels") or ()), []).append(run.name)
    if len(label_sets) > 1:
        out.append("NOT COMPARABLE: the downstream mean AUROC averages other labels between runs ("
                   + "; ".join(f"{', '.join(names)}: {', '.join(labels) or 'not recorded'}"
                               for labels, names in label_sets.items()) + ")")
    # and AUROCs of other test images or another classifier recipe are other numbers
    measured = [run for run in runs if run.downstream]
    differ = [key for key in DOWNSTREAM_SETTINGS if key != "labels"
              and len({json.dumps(_get(r.downstream, "settings", key)) for r in measured}) > 1]
    differ += ["test set"] if len({json.dumps(downstream_test_set(r.downstream)) for r in measured}) > 1 else []
    if differ:
        out.append(f"NOT COMPARABLE: the downstream AUROCs differ in {', '.join(differ)} between runs: run downstream.py "
                   "alike for every strategy, on synthetic sets whose generators held out the same patients")
    for run in runs:
        out += run.notes
    return out


def _differing(values: dict[str, object]) -> str | None:
    """"a, b: x; c: y" for runs -> value when the runs hold more than one value, else None."""
    groups: dict[object, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    if len(groups) < 2:
        return None
    return "; ".join(f"{', '.join(names)}: {value or 'not recorded'}" for value, names in groups.items())


def to_markdown(records: list[dict], extractors: list[str], cond_rows: list[dict], note_lines: list[str]) -> str:
    arms = [a for a in DOWNSTREAM_ARMS if any(r[f"downstream_{a}"] is not None for r in records)]
    columns = display_columns(extractors, arms)
    parts = [markdown_table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in records])]
    for extractor in extractors:
        rows = [c for c in cond_rows if c["features"] == extractor]
        if not rows:
            continue
        conditions = list(dict.fromkeys(c["condition"] for c in rows))
        cells = {(c["run"], c["condition"]): _pm(c["fid"], c["fid_std"], ".2f") for c in rows}
        parts.append(f"FID per condition ({feature_label(extractor)}):\n\n" + markdown_table(
            ["run"] + conditions, [[r["run"]] + [cells.get((r["run"], c), MISSING) for c in conditions]
                                   for r in records]))
    parts.append("\n".join(f"- {line}" for line in note_lines))
    return "\n\n".join(parts) + "\n"


def to_csv(rows: list[dict]) -> str:
    """CSV text; a missing value is an empty cell, numbers at full precision."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return buffer.getvalue()


# ------------------------------------------------------------------------------- plots


# x axes of the FID plots: (record key, axis label, file): what a strategy costs, in parameters and in compute
FID_PLOTS = {"parameters": ("trainable_parameters", "trainable parameters", "fid_vs_parameters.png"),
             "gpu_hours": ("gpu_hours", "GPU-hours of training", "fid_vs_gpu_hours.png")}


def plot_fid_against(records: list[dict], extractors: list[str], x: str, path: Path) -> dict[str, list[tuple]]:
    """FID against a cost (FID_PLOTS: log x), one panel per feature network; returns the points drawn per
    extractor, (x, fid, std, run), and writes nothing when no run has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, _ = FID_PLOTS[x]
    panels = {}
    for extractor in extractors:
        k = feature_key(extractor)
        points = [(r[key], r[f"fid_{k}"], r[f"fid_{k}_std"], r["run"]) for r in records
                  if r[f"fid_{k}"] is not None and isinstance(r[key], (int, float)) and r[key] > 0]
        if points:
            panels[extractor] = points
    if not panels:
        return panels
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (extractor, points) in zip(axes[0], panels.items()):
        for cost, fid, std, name in points:
            ax.errorbar(cost, fid, yerr=std if std is not None else None, fmt="o", capsize=3)
            ax.annotate(name, (cost, fid), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"FID ({feature_label(extractor)}), lower is better")
        ax.set_title(f"FID against {label} ({feature_label(extractor)})")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels


def synthetic_source(run: Run) -> str | None:
    """The run's synthetic set: the fake source its evaluation read."""
    return next((_get(r, "fake", "source") for r in run.results if _get(r, "fake", "source")), None)


def spread(total: int, n: int) -> list[int]:
    """n indices spread evenly over 0..total-1, first and last included (all of them when total <= n)."""
    if total <= n:
        return list(range(total))
    return [round(k * (total - 1) / (n - 1)) for k in range(n)] if n > 1 else [0]


def column_titles(prompts: list[str | None], width: int = 18) -> list[str]:
    """The prompts without the words they all start with, wrapped: what differs between the columns."""
    import os
    import textwrap

    texts = [p or "" for p in prompts]
    common = os.path.commonprefix(texts) if len(set(texts)) > 1 else ""
    common = common[:common.rfind(" ") + 1]  # back to a word boundary
    return ["\n".join(textwrap.wrap(t[len(common):], width)[:3]) for t in texts]


def plot_sample_grid(runs: list[Run], n: int, path: Path) -> list[str]:
    """n images of every run's synthetic set, spread over the set (its prompts in order), one row per run;
    returns notes on runs left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from sdtune.evaluation.images import load_image_set
    from sdtune.evaluation.samples import GRID_GAP, image_grid

    rows, left_out = [], []
    for run in runs:
        source = synthetic_source(run)
        if source is None:
            left_out.append(f"{run.name}: not in the sample grid (its results name no synthetic set)")
            continue
        try:
            items = load_image_set(source).items
            items = [items[i] for i in spread(len(items), n)]
            images = []
            for item in items:
                with Image.open(item.image) as image:
                    images.append(image.convert("RGB"))
        except (UserError, OSError) as err:
            left_out.append(f"{run.name}: not in the sample grid ({source}: {str(err).splitlines()[0]})")
            continue
        rows.append((run.name, images, [item.caption for item in items]))
    if not rows:
        return left_out
    side = min(256, rows[0][1][0].width)  # one cell size for all rows, whatever each run's resolution
    columns = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, 1.3 * columns + 1.5), 1.4 * len(rows) + 0.9),
                             squeeze=False)
    for r, (ax, (name, images, prompts)) in enumerate(zip(axes[:, 0], rows)):
        ax.imshow(image_grid([im.resize((side, side), Image.BICUBIC) for im in images], columns=columns))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if r == 0:  # the prompts above the first row
            for c, title in enumerate(column_titles(prompts)):
                ax.text(c * (side + GRID_GAP) + side / 2, -side * 0.05, title, ha="center", va="bottom", fontsize=6)
    fig.suptitle(f"{columns} synthetic images of each run, spread over its set", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return left_out


# ------------------------------------------------------------------------------- the command


def compare(run_dirs: list[str], cfg: CompareConfig) -> dict:
    if cfg.grid_images < 0:
        raise UserError(f"--grid_images must be at least 0, got {cfg.grid_images}")
    runs = load_runs(run_dirs, cfg.results)
    baseline, baseline_file = read_downstream_baseline(cfg.downstream_real) if cfg.downstream_real else ({}, None)
    extractors = extractors_of(runs)
    records = [run_record(run, extractors, baseline) for run in runs]
    cond_rows = per_condition(runs, extractors)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # What an earlier comparison wrote and this one may not (a per-condition table, a plot): never left
    # beside the new table as if it were of these runs.
    for name in ("comparison.csv", "comparison_per_condition.csv", "comparison.md", "sample_grid.png",
                 *(name for _, _, name in FID_PLOTS.values())):
        (out / name).unlink(missing_ok=True)
    written = {"csv": out / "comparison.csv"}
    written["csv"].write_text(to_csv(records))
    if cond_rows:
        written["per_condition_csv"] = out / "comparison_per_condition.csv"
        written["per_condition_csv"].write_text(to_csv(cond_rows))
    note_lines = notes(runs, records, extractors)
    if baseline_file:
        note_lines += downstream_baseline_notes(runs, baseline, baseline_file)
    if cfg.plots:
        for x, (_, label, name) in FID_PLOTS.items():
            if plot_fid_against(records, extractors, x, out / name):
                written[f"fid_vs_{x}"] = out / name
            else:
                note_lines.append(f"{name} not written: no run has both an FID and its {label}")
        if cfg.grid_images:
            note_lines += plot_sample_grid(runs, cfg.grid_images, out / "sample_grid.png")
            if (out / "sample_grid.png").is_file():
                written["sample_grid"] = out / "sample_grid.png"
    markdown = to_markdown(records, extractors, cond_rows, note_lines)
    written["markdown"] = out / "comparison.md"
    written["markdown"].write_text(markdown)
    print(markdown)
    print("written: " + ", ".join(str(p) for p in written.values()))
    return {"records": records, "per_condition": cond_rows, "markdown": markdown, "files": written}


def main(argv: list[str]) -> dict:
    parser = ArgumentParser(
        prog="evaluate.py compare",
        description="The study's comparison table (Markdown, CSV) and plots from training runs and their "
                    "evaluate.py results.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (training_summary.json)")
    add_arguments(parser, CompareConfig)
    args = parser.parse_args(argv)
    return compare(args.runs, from_args(CompareConfig, args))

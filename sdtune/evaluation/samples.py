"""evaluate.py --generate-samples: the tutorial's visual check, N samples of a prompt and one grid image.

    python evaluate.py --generate-samples --num-samples 10 --prompt "Chest x-ray of a patient with Edema"

There is one sampling path in the toolkit: the samples are a small synthetic dataset made by
sdtune.synthesis (same model resolution, seeds, PNGs and metadata.csv as synthesize_images.py),
and grid.png is drawn from its images. Without --model-path the tutorial's layout is assumed:
outputs/final_model, else the only outputs/*/final_model there is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from sdtune.config import ArgumentParser, add_arguments, field, from_args
from sdtune.errors import UserError
from sdtune.synthesis import SynthesisConfig, synthesize

GRID_GAP = 2  # pixels of white between grid cells
DEFAULT_OUTPUTS = Path("outputs")  # where the training scripts write (the tutorial's layout)


# What a set of samples has of its own; every sampling setting (steps, guidance, size, seed,
# sampler, precision, speed options, ...) is synthesize_images.py's, declared once in SynthesisConfig.
OWN_FIELDS = [
    ("generate_samples", bool, field(True, "this mode (evaluate.py --generate-samples)")),
    ("prompt", list[str] | None, field(None, "prompt(s); each gets --num_samples images (one grid row per prompt "
                                             "when there are several)")),
    ("num_samples", int, field(10, "images per prompt")),
    ("model_path", str | None, field(None, "a final_model/, run, checkpoint-STEP/ or adapter file, as for "
                                           "synthesize_images.py (default: outputs/final_model, else the only "
                                           "outputs/*/final_model)")),
    ("output_dir", str | None, field(None, "where the samples go (default: RUN/samples/<prompt> beside a training "
                                           "run's model, else samples/<prompt>)")),
    ("grid_columns", int | None, field(None, "grid columns (default: --num_samples with several prompts, else "
                                             "ceil(sqrt(N)))")),
]
# SynthesisConfig's fields that choose WHAT to make: samples choose it with the fields above.
NOT_SHARED = {"model_path", "output_dir", "prompts", "prompts_file", "labels_csv", "caption_template", "findings",
              "num_images"}
SHARED = [f.name for f in dataclasses.fields(SynthesisConfig) if f.name not in NOT_SHARED]
SamplesConfig = dataclasses.make_dataclass(
    "SamplesConfig",
    OWN_FIELDS + [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                     metadata=f.metadata))
                  for f in dataclasses.fields(SynthesisConfig) if f.name in SHARED])
SamplesConfig.__module__ = __name__  # (where typing resolves the annotations; make_dataclass's module= is 3.12+)
SamplesConfig.__doc__ = "Samples of one or more prompts from a trained model, and a grid of them."


def default_model_path(outputs: Path = DEFAULT_OUTPUTS) -> str:
    """outputs/final_model (the tutorial's layout), else the one outputs/*/final_model; several: an error."""
    if (outputs / "final_model" / "model_index.json").is_file():
        return str(outputs / "final_model")
    found = sorted(p.parent for p in outputs.glob("*/final_model/model_index.json"))
    if len(found) == 1:
        return str(found[0])
    if not found:
        raise UserError(f"no trained model in {outputs}/ (looked for {outputs}/final_model and "
                        f"{outputs}/*/final_model): pass --model-path, e.g. outputs/lora")
    raise UserError(f"{len(found)} trained models in {outputs}/ ({', '.join(str(p) for p in found)}): "
                    "pass --model-path with the one to sample")


def slug(text: str, limit: int = 80) -> str:
    """A folder name from a prompt: lowercase words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def default_output_dir(model_path: str, base_model: str | None, prompts: list[str]) -> Path:
    """RUN/samples/<prompt> when the model belongs to a training run (it has a summary), else samples/<prompt>."""
    from sdtune.synthesis import resolve_model

    source = resolve_model(model_path, base_model)
    name = slug(prompts[0]) + (f"+{len(prompts) - 1}" if len(prompts) > 1 else "")
    if source.summary is None:
        return Path("samples") / name
    loaded = Path(source.path)  # final_model/, checkpoint-STEP/ or the adapter file: all inside the run
    return loaded.parent / "samples" / name


def image_grid(images: list, columns: int, gap: int = GRID_GAP):
    """One image of `images` (PIL, all one size) in rows of `columns`, `gap` white pixels between cells."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the grid")
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    grid = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for k, image in enumerate(images):
        if image.size != (w, h):
            raise ValueError(f"grid images differ in size: {image.size} and {(w, h)}")
        grid.paste(image.convert("RGB"), ((k % columns) * (w + gap), (k // columns) * (h + gap)))
    return grid


def generate_samples(cfg: SamplesConfig) -> dict:
    """The samples as a synthesis dataset (images/, metadata.csv, synthesis_config.json) plus grid.png."""
    from PIL import Image

    from sdtune.evaluation.images import load_image_set
    from sdtune.processes import process_state

    prompts = [p.strip() for p in cfg.prompt or [] if p.strip()]
    if not prompts:
        raise UserError('--prompt is required: the text to sample, e.g. --prompt "Chest x-ray of a patient with Edema"')
    if any("\n" in p for p in prompts):
        raise UserError("a prompt cannot contain a line break")
    if cfg.num_samples < 1 or (cfg.grid_columns is not None and cfg.grid_columns < 1):
        raise UserError("--num_samples and --grid_columns must be at least 1")
    model_path = cfg.model_path or default_model_path()
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(model_path, cfg.base_model, prompts)
    out.mkdir(parents=True, exist_ok=True)
    # Prompts go through a file: a prompt may contain commas, which --prompts would split on.
    # Written aside and renamed: under `accelerate launch` another process may be reading it already.
    prompts_file, partial = out / "prompts.txt", out / f".prompts.txt.{os.getpid()}"
    partial.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    partial.replace(prompts_file)
    synth = SynthesisConfig(model_path=model_path, output_dir=str(out), prompts_file=str(prompts_file),
                            num_images=cfg.num_samples, **{name: getattr(cfg, name) for name in SHARED})
    made = synthesize(synth)
    if not process_state().is_main_process:
        return made  # the main process writes metadata.csv (in synthesize), then the grid

    items = load_image_set(out).items  # metadata.csv order: prompt by prompt, sample by sample
    columns = cfg.grid_columns or (cfg.num_samples if len(prompts) > 1 else math.ceil(math.sqrt(len(items))))
    images = []
    for item in items:
        with Image.open(item.image) as image:
            images.append(image.convert("RGB"))
    grid = image_grid(images, columns)
    grid_path = out / "grid.png"
    grid.save(grid_path)
    print(f"{len(items)} samples in {out / 'images'}; grid ({grid.width}x{grid.height}, {columns} columns): {grid_path}")
    return {**made, "grid": str(grid_path), "columns": columns, "grid_size": grid.size}


def main(argv: list[str]) -> dict:
    parser = ArgumentParser(
        prog="evaluate.py --generate-samples",
        description="Generate samples of a prompt with a trained model and one grid image (visual inspection).")
    add_arguments(parser, SamplesConfig)
    return generate_samples(from_args(SamplesConfig, parser.parse_args(argv)))

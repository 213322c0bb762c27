"""Sampling speed: StableDiffusionPipeline against the toolkit's synthesis path, in one process, on one GPU.

    python bench/synth_speed.py --output synth_speed.json          # one GPU, ~1-2 min on an H100
    python bench/synth_speed.py --tiny --output /tmp/tiny.json     # CPU smoke run, no timing claims

Both sides sample the same SD1.5-architecture folder with random weights (no download) in fp16,
with PNDM, 50 steps, guidance 7.5, 512x512, batch 8 (REFERENCE.md section 9: 2.62 images/s
on one H100), the same prompts and the same noise: image k's generator is a CPU generator
seeded with sdtune.synthesis.image_seed(seed, k), as the toolkit draws it.

  reference  StableDiffusionPipeline.from_pretrained(folder, torch_dtype=float16).to("cuda"),
             called as pipe(prompts, num_inference_steps, guidance_scale, generator=[...]).
  toolkit    sdtune.synthesis: resolve_model -> load_pipeline -> set_scheduler -> prepare_pipeline
             -> render, the calls synthesize() makes per batch (PNG writing not included),
             with every option at the toolkit's default except those in --toolkit-args.

Timing: --warmup untimed batches, then --batches timed ones, the device synchronised around
them; images/s = timed images / elapsed. The timed batches' images of the two sides are
compared: the mean absolute difference (pixels in [0, 1]) must be at most --atol.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CAPTIONS, environment, fmt, free_memory, model_folder, peak_gib, pick_device,  # noqa: E402
                    quiet_libraries, start_memory, synchronize, table, write_json)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PUBLISHED_IMAGES_PER_SECOND = 2.62  # REFERENCE.md section 9: one H100, fp16, PNDM 50 steps, guidance 7.5, batch 8
TARGET = 1.5  # issue 7: the toolkit at least 1.5x StableDiffusionPipeline's images/s, same images


def plan(n: int, seed: int):
    """n images: the study's captions in turn, each with the toolkit's per-image seed."""
    from sdtune.synthesis import PlannedImage, image_seed

    return [PlannedImage(k, CAPTIONS[k % len(CAPTIONS)], "", image_seed(seed, k), {}) for k in range(n)]


def timed_batches(sample, items: list, batch_size: int, warmup: int, device: torch.device) -> tuple[float, np.ndarray]:
    """Run `sample` on consecutive batches; returns (images/s of the batches after the warm-up, their images)."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in batches[:warmup]:
        sample(batch)
    synchronize(device)
    start = time.perf_counter()
    images = [sample(batch) for batch in batches[warmup:]]
    synchronize(device)
    elapsed = time.perf_counter() - start
    images = np.concatenate(images)
    return len(images) / elapsed, images


def reference_side(model_dir: Path, items: list, args, device: torch.device) -> tuple[dict, np.ndarray]:
    from diffusers import StableDiffusionPipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[args.precision]
    with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype; older ones know only torch_dtype
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler = type(pipe.scheduler).__name__

    def sample(batch):
        return pipe([item.prompt for item in batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                    height=args.resolution, width=args.resolution, output_type="np",
                    generator=[torch.Generator().manual_seed(item.seed) for item in batch]).images

    rate, images = timed_batches(sample, items, args.batch_size, args.warmup, device)
    return {"images_per_second": rate, "scheduler": scheduler}, images


def toolkit_side(model_dir: Path, items: list, args, device: torch.device) -> tuple[dict, np.ndarray]:
    from sdtune import synthesis

    cfg = synthesis.parse_args(["--model_path", str(model_dir), "--prompts", "unused: the plan is given",
                                "--steps", str(args.steps), "--guidance_scale", str(args.guidance),
                                "--height", str(args.resolution), "--width", str(args.resolution),
                                "--batch_size", str(args.batch_size), "--scheduler", "pndm",
                                "--mixed_precision", args.precision, "--device", str(device),
                                *shlex.split(args.toolkit_args)])
    pipeline = synthesis.load_pipeline(synthesis.resolve_model(cfg.model_path, cfg.base_model), cfg.fuse_lora)
    scheduler = synthesis.set_scheduler(pipeline, cfg.scheduler)
    synthesis.prepare_pipeline(pipeline, cfg, device)
    rate, images = timed_batches(lambda batch: synthesis.render(pipeline, batch, cfg), items, cfg.batch_size,
                                 args.warmup, device)
    return {"images_per_second": rate, "scheduler": scheduler, "scheduler_class": type(pipeline.scheduler).__name__}, images


def measure(side, model_dir: Path, items: list, args, device: torch.device) -> tuple[dict, np.ndarray | None]:
    start_memory(device)
    start = time.perf_counter()
    result, images = side(model_dir, items, args, device)  # a failure here ends the run: it is short
    result.update(peak_gib=peak_gib(device), seconds=time.perf_counter() - start,
                  finite=bool(np.isfinite(images).all()))
    free_memory(device)
    return result, images


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """How far apart two sets of images are, pixels in [0, 1]; 8-bit levels as the PNGs would store them."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    levels = np.abs(np.round(a * 255).astype(int) - np.round(b * 255).astype(int))
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1 / mse)),
            "max_8bit_levels": int(levels.max()), "share_of_8bit_values_differing": float((levels > 0).mean())}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model at 64 px (no timing claims)")
    p.add_argument("--batch-size", type=int, default=None, help="images per call (default 8; tiny: 2)")
    p.add_argument("--steps", type=int, default=None, help="PNDM steps (default 50; tiny: 5)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--precision", default=None, choices=("fp16", "bf16", "no"), help="both sides (default fp16; CPU: no)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 3; tiny: 1)")
    p.add_argument("--atol", type=float, default=0.01, help="largest mean |difference| of pixels in [0, 1] "
                                                            "that still counts as the same images")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--toolkit-args", default="", help="extra synthesize_images.py flags for the toolkit side")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--output", default="synth_speed.json", help="JSON record")
    args = p.parse_args(argv)
    for name, full, small in (("batch_size", 8, 2), ("steps", 50, 5), ("resolution", 512, 64), ("batches", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)
    if args.batches < 1:
        p.error("--batches must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.tiny)
    if device.type == "cpu":
        args.precision = args.precision or "no"  # CPU fp16 kernels are slow; the CPU run checks code paths only
        torch.set_num_threads(1)
    args.precision = args.precision or "fp16"
    quiet_libraries()
    env = environment(device)
    n = (args.warmup + args.batches) * args.batch_size
    print(f"synth_speed: {env['device']}; torch {env['versions']['torch']}, diffusers {env['versions']['diffusers']}")
    print(f"{n} images a side ({args.warmup} warm-up + {args.batches} timed batches of {args.batch_size}), "
          f"{args.steps} PNDM steps, guidance {args.guidance}, {args.resolution} px, {args.precision}")
    if args.tiny:
        print("tiny model on the CPU: checks that every code path runs; the numbers mean nothing")
    else:
        seconds = 60 + 2 * (15 + n / PUBLISHED_IMAGES_PER_SECOND * args.steps / 50)
        print(f"estimated wall time on one H100: ~{seconds / 60:.1f} min")

    begin = time.perf_counter()
    items = plan(n, args.seed)
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as scratch:
        model_dir = model_folder(args.model_dir, args.tiny, Path(scratch), device)
        reference, ref_images = measure(reference_side, model_dir, items, args, device)
        print(f"reference StableDiffusionPipeline: {reference['images_per_second']:.2f} images/s, "
              f"peak {fmt(reference['peak_gib'], '.2f')} GiB", flush=True)
        toolkit, tk_images = measure(toolkit_side, model_dir, items, args, device)
        print(f"toolkit sdtune.synthesis:          {toolkit['images_per_second']:.2f} images/s, "
              f"peak {fmt(toolkit['peak_gib'], '.2f')} GiB", flush=True)

    difference = compare(ref_images, tk_images)
    same = difference["mean_abs"] <= args.atol
    speedup = toolkit["images_per_second"] / reference["images_per_second"]
    record = {"benchmark": "synth_speed", "tiny": args.tiny, **env,
              "settings": {"batch_size": args.batch_size, "steps": args.steps, "scheduler": "pndm",
                           "guidance_scale": args.guidance, "resolution": args.resolution, "precision": args.precision,
                           "warmup_batches": args.warmup, "timed_batches": args.batches, "seed": args.seed,
                           "atol_mean_abs": args.atol, "toolkit_args": args.toolkit_args,
                           "timing_rule": "device synchronised around the timed batches; images/s = timed images / "
                                          "elapsed; model loading and the warm-up batches excluded"},
              "published_reference_h100_images_per_second": PUBLISHED_IMAGES_PER_SECOND,
              "reference": reference, "toolkit": toolkit, "ratio": speedup, "image_difference": difference,
              "same_images": same, "total_seconds": time.perf_counter() - begin}
    if not args.tiny and args.batch_size == 8 and args.steps == 50:
        record["target_ratio"] = TARGET
        record["meets_target"] = speedup >= TARGET and same
    write_json(args.output, record)

    print()
    print(table([["StableDiffusionPipeline", fmt(reference["images_per_second"], ".2f"), "1.00",
                  fmt(reference["peak_gib"], ".2f"), ""],
                 ["sdtune.synthesis", fmt(toolkit["images_per_second"], ".2f"), fmt(speedup, ".2f"),
                  fmt(toolkit["peak_gib"], ".2f"), f"{TARGET:.1f}x {'met' if record.get('meets_target') else 'missed'}"
                  if "target_ratio" in record else ""]],
                ["side", "images/s", "ratio", "peak GiB", "target"]))
    print(f"images: mean |diff| {difference['mean_abs']:.2e}, max |diff| {difference['max_abs']:.2e}, "
          f"{difference['share_of_8bit_values_differing']:.2%} of 8-bit values differ (at most "
          f"{difference['max_8bit_levels']} levels): {'the same' if same else 'NOT the same'} within {args.atol}")
    print(f"({env['device']}; {record['total_seconds']:.0f} s in all; JSON in {args.output})")
    return record


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["same_images"] and result["reference"]["finite"] and result["toolkit"]["finite"] else 1)

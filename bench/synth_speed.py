"""Sampling speed: StableDiffusionPipeline against the toolkit's synthesis path, on one GPU.

    python bench/synth_speed.py --output synth_speed.json          # one GPU, ~3-5 min on an H100 (estimate)
    python bench/synth_speed.py --tiny --output /tmp/tiny.json     # CPU smoke run, no timing claims
    python bench/synth_speed.py --toolkit-configs defaults= +compile=--torch_compile \
        "+autotune=--torch_compile --torch_compile_mode max-autotune-no-cudagraphs"   # a third row (minutes more)

Both sides sample the same SD1.5-architecture folder with random weights (no download) in fp16,
with PNDM, 50 steps, guidance 7.5, 512x512, batch 8 (REFERENCE.md section 9: 2.62 images/s
on one H100), the same prompts and the same noise: image k's generator is a CPU generator
seeded with sdtune.synthesis.image_seed(seed, k), as the toolkit draws it.

  reference  StableDiffusionPipeline.from_pretrained(folder, torch_dtype=float16).to("cuda"),
             called as pipe(prompts, num_inference_steps, guidance_scale, generator=[...]).
  toolkit    sdtune.synthesis: resolve_model -> load_pipeline -> set_scheduler -> prepare_pipeline
             -> render, the calls synthesize() makes per batch (PNG writing not included), once per
             --toolkit-configs NAME=FLAGS entry: synthesize_images.py flags on top of the toolkit's
             defaults (default rows: "defaults=", i.e. fuse_qkv, cudnn_benchmark and, where torch's
             GroupNorm keeps NHWC, channels_last on a GPU, and "+compile=--torch_compile"), plus --toolkit-args for every row.
  fast recipe the toolkit's defaults with --fast-recipe (default: DPM-Solver++ at 25 steps): OTHER
             images (another sampler, half the U-Net calls), so never compared with the reference
             and never counted toward the 1.5x target; its row shows what the recipe buys.

Timing: --warmup untimed batches (torch.compile compiles and cuDNN autotunes in the first; their
seconds are recorded), then --batches timed ones, the device synchronised around them; images/s =
timed images / elapsed. Each toolkit configuration's timed images are compared with the
reference's: the mean absolute difference (pixels in [0, 1]) must be at most --atol and the largest
at most --max-abs (4/255: a genuine fp16 difference was 3.3e-4 mean, 1 level of 255 at most, while a
guidance of 7.0 for 7.5 gives 1.3e-3 mean on the tiny model). A row counts only with the
reference's U-Net work, the reference's scheduler timesteps (as the U-Net received them) and its
guidance scale.

Isolation (--isolate, on by default with CUDA): the reference and each toolkit configuration run in
their own Python process (this script with --child), which hands back its figures and images
(.npy); this process keeps the orchestration, the comparison and the JSON. In one process, state
no reset reaches would carry from row to row: cuDNN's algorithm cache (its key has no benchmark
flag, so a row with cudnn.benchmark would find the reference's heuristic choices and never
autotune, and a row without it would reuse an earlier row's autotuned ones), compiled graphs,
allocator pools. On the CPU (--tiny CI runs) rows share one process by default: a fresh pipeline
each, compiled graphs dropped and cudnn.benchmark restored between them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
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
FAST_RECIPE = "--scheduler dpm++ --steps 25"  # DPM-Solver++ (Lu et al. 2022): half PNDM's 50 U-Net calls, other images
MEAN_ABS, MAX_ABS = 1e-3, 4 / 255  # same images: fp16 noise was 3.3e-4 mean and 1 level at most on an H200


def plan(n: int, seed: int):
    """n images: the study's captions in turn, each with the toolkit's per-image seed."""
    from sdtune.synthesis import PlannedImage, image_seed

    return [PlannedImage(k, CAPTIONS[k % len(CAPTIONS)], "", image_seed(seed, k), {}) for k in range(n)]


def timed_batches(sample, items: list, batch_size: int, warmup: int, device: torch.device) -> tuple[float, np.ndarray, list]:
    """Run `sample` on consecutive batches; returns (images/s of the batches after the warm-up, their
    images, the seconds of each warm-up batch: compiling and autotuning happen there, once)."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    warmup_seconds = []
    for batch in batches[:warmup]:
        start = time.perf_counter()
        sample(batch)
        synchronize(device)
        warmup_seconds.append(time.perf_counter() - start)
    synchronize(device)
    start = time.perf_counter()
    images = [sample(batch) for batch in batches[warmup:]]
    synchronize(device)
    elapsed = time.perf_counter() - start
    images = np.concatenate(images)
    return len(images) / elapsed, images, warmup_seconds


def count_unet_work(unet) -> dict:
    """U-Net calls and the samples they denoise, counted as they happen: a faster row must do the
    reference's work (the image check alone would pass a row with a step or two fewer). The timesteps
    the calls received are kept as given (no device sync while timed) for sampled_settings."""
    work = {"unet_calls": 0, "unet_samples": 0, "_timesteps": []}

    def count(module, args, kwargs):
        work["unet_calls"] += 1
        work["unet_samples"] += int((args[0] if args else kwargs["sample"]).shape[0])
        work["_timesteps"].append(args[1] if len(args) > 1 else kwargs["timestep"])

    unet.register_forward_pre_hook(count, with_kwargs=True)
    return work


def sampled_settings(work: dict, batches: int, guidance: float) -> dict:
    """`work` made JSON-ready: the timesteps one batch's U-Net calls received (and whether every batch
    received the same), and the guidance scale the pipeline ran with."""
    steps = [float(t) for t in work.pop("_timesteps")]
    per_batch = len(steps) // batches
    first = steps[:per_batch]
    return {**work, "timesteps": [int(t) if t.is_integer() else t for t in first],
            "timesteps_every_batch": steps == first * batches, "guidance_scale": float(guidance)}


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

    work = count_unet_work(pipe.unet)
    ready = time.perf_counter()
    rate, images, warmup_seconds = timed_batches(sample, items, args.batch_size, args.warmup, device)
    # the pipeline's own record of the guidance it ran with (its property), not the argument
    work = sampled_settings(work, args.warmup + args.batches, getattr(pipe, "guidance_scale", args.guidance))
    return {"images_per_second": rate, "scheduler": scheduler, "warmup_seconds": warmup_seconds,
            "ready_at": ready, **work}, images


def toolkit_cfg(model_dir: Path, args, extra: str, device: torch.device):
    """The SynthesisConfig of one toolkit row: the benchmark's sampling settings, then `extra` flags
    (later flags win, so `extra` may change the sampler or steps, as the fast recipe does)."""
    from sdtune import synthesis

    return synthesis.parse_args(["--model_path", str(model_dir), "--prompts", "unused: the plan is given",
                                 "--steps", str(args.steps), "--guidance_scale", str(args.guidance),
                                 "--height", str(args.resolution), "--width", str(args.resolution),
                                 "--batch_size", str(args.batch_size), "--scheduler", "pndm",
                                 "--mixed_precision", args.precision, "--device", str(device), *shlex.split(extra)])


def toolkit_side(extra: str):
    """A side that samples with the toolkit's defaults plus `extra` and --toolkit-args."""

    def side(model_dir: Path, items: list, args, device: torch.device) -> tuple[dict, np.ndarray]:
        from sdtune import synthesis

        cfg = toolkit_cfg(model_dir, args, f"{extra} {args.toolkit_args}", device)
        synthesis.check_config(cfg)
        pipeline = synthesis.load_pipeline(synthesis.resolve_model(cfg.model_path, cfg.base_model), cfg.fuse_lora)
        scheduler = synthesis.set_scheduler(pipeline, cfg.scheduler)
        speed = synthesis.speed_settings(pipeline, cfg, device)
        synthesis.prepare_pipeline(pipeline, cfg, device, speed)
        work = count_unet_work(pipeline.unet)  # the compiled wrapper when compiled: counted around it
        ready = time.perf_counter()
        rate, images, warmup_seconds = timed_batches(lambda batch: synthesis.render(pipeline, batch, cfg), items,
                                                     cfg.batch_size, args.warmup, device)
        work = sampled_settings(work, args.warmup + args.batches,
                                getattr(pipeline, "guidance_scale", cfg.guidance_scale))
        return {"images_per_second": rate, "scheduler": scheduler, "scheduler_class": type(pipeline.scheduler).__name__,
                "steps": cfg.steps, "speed": speed, "warmup_seconds": warmup_seconds, "ready_at": ready,
                **work}, images

    return side


@contextlib.contextmanager
def isolated():
    """Compiled graphs and cudnn.benchmark do not reach the next configuration in this process. cuDNN's
    algorithm cache does (nothing clears it, and the benchmark flag is not part of its key): where
    that matters (CUDA), --isolate runs each side in its own process instead."""
    import torch._dynamo

    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch._dynamo.reset()


def measure(side, model_dir: Path, items: list, args, device: torch.device) -> tuple[dict, np.ndarray | None]:
    start_memory(device)
    start = time.perf_counter()
    with isolated():
        result, images = side(model_dir, items, args, device)  # a failure here ends the run: it is short
    result.update(peak_gib=peak_gib(device), seconds=time.perf_counter() - start,
                  load_seconds=result.pop("ready_at") - start, finite=bool(np.isfinite(images).all()),
                  pid=os.getpid())
    free_memory(device)
    return result, images


def side_spec(flags: str | None) -> str:
    """A side as --child names it: 'reference', or 'toolkit:FLAGS'."""
    return "reference" if flags is None else f"toolkit:{flags}"


def side_of(spec: str):
    return reference_side if spec == "reference" else toolkit_side(spec.partition(":")[2])


def measure_in_child(spec: str, argv: list[str], model_dir: Path, scratch: Path, keep_images: bool):
    """measure() in a fresh Python process (this script with --child): nothing process-wide (cuDNN's
    algorithm cache, compiled graphs, allocator pools) comes from another side; figures come back as
    JSON, images as .npy. Its output goes to this process's."""
    job = Path(tempfile.mkdtemp(prefix="side-", dir=scratch))
    (job / "job.json").write_text(json.dumps({"side": spec, "model_dir": str(model_dir), "images": keep_images}))
    start = time.perf_counter()
    sys.stdout.flush()
    # a SIGINT (the session's time limit) reaches the child too; run() kills it if this process stops first
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(job)])
    if done.returncode != 0 or not (job / "result.json").is_file():
        raise RuntimeError(f"the {spec} side failed in its own process (exit {done.returncode}; its output is above)")
    result = json.loads((job / "result.json").read_text())
    result["process_seconds"] = time.perf_counter() - start  # with Python's start, imports and loading
    images = np.load(job / "images.npy") if keep_images else None
    return result, images


def child(args) -> None:
    """--child JOB: measure one side, write result.json (and images.npy) beside the job file."""
    job = Path(args.child)
    spec = json.loads((job / "job.json").read_text())
    device = settle(args)
    quiet_libraries()
    items = plan((args.warmup + args.batches) * args.batch_size, args.seed)
    result, images = measure(side_of(spec["side"]), Path(spec["model_dir"]), items, args, device)
    if spec["images"]:
        np.save(job / "images.npy", images)
    write_json(job / "result.json", result)  # last: its presence says the side finished


def settle(args) -> torch.device:
    """The device, and the settings that follow from it (both processes of an isolated run decide alike)."""
    device = pick_device(args.tiny)
    if device.type == "cpu":
        args.precision = args.precision or "no"  # CPU fp16 kernels are slow; the CPU run checks code paths only
        torch.set_num_threads(1)
    args.precision = args.precision or "fp16"
    if args.isolate is None:
        args.isolate = device.type == "cuda"  # the CPU smoke run stays in one process (fast CI)
    return device


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """How far apart two sets of images are, pixels in [0, 1]; 8-bit levels as the PNGs would store them."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    levels = np.abs(np.round(a * 255).astype(int) - np.round(b * 255).astype(int))
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1 / mse)),
            "max_8bit_levels": int(levels.max()), "share_of_8bit_values_differing": float((levels > 0).mean())}


def refusals(row: dict, reference: dict, args) -> dict[str, list[str]]:
    """Why a compared row is refused, by check (all empty: it counts): other images, other U-Net work,
    other timesteps or another guidance scale than the reference's."""
    difference = row["image_difference"]
    over = [f"{name} |diff| {difference[key]:.1e} > {limit:.1e}" for name, key, limit in (
        ("mean", "mean_abs", args.atol), ("max", "max_abs", args.max_abs)) if not difference[key] <= limit]
    why = {"images": [f"other images ({', '.join(over)})"] if over else [],  # (not <=: a NaN difference is over)
           "work": [], "sampling": []}
    if (row["unet_calls"], row["unet_samples"]) != (reference["unet_calls"], reference["unet_samples"]):
        why["work"].append(f"other U-Net work ({row['unet_calls']} calls / {row['unet_samples']} samples; reference "
                           f"{reference['unet_calls']} / {reference['unet_samples']})")
    if row["timesteps"] != reference["timesteps"] or not row["timesteps_every_batch"]:
        why["sampling"].append("other timesteps than the reference's")
    if row["guidance_scale"] != reference["guidance_scale"]:
        why["sampling"].append(f"guidance {row['guidance_scale']} (reference {reference['guidance_scale']})")
    return why


def judge(row: dict, reference: dict, args) -> list[str]:
    """Every reason a compared row is refused (an empty list: it counts)."""
    return [reason for reasons in refusals(row, reference, args).values() for reason in reasons]


def toolkit_configs(entries: list[str]) -> dict[str, str]:
    """--toolkit-configs NAME=FLAGS entries -> {name: flags}, in order; names are unique."""
    configs = {}
    for entry in entries:
        name, sep, flags = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{entry!r} is not NAME=FLAGS (e.g. defaults= or +compile=--torch_compile)")
        if name.strip() in configs:
            raise ValueError(f"configuration name {name.strip()!r} given twice")
        configs[name.strip()] = flags.strip()
    return configs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model at 64 px (no timing claims)")
    p.add_argument("--batch-size", type=int, default=None, help="images per call (default 8; tiny: 2)")
    p.add_argument("--steps", type=int, default=None, help="PNDM steps (default 50; tiny: 5)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--precision", default=None, choices=("fp16", "bf16", "no"), help="both sides (default fp16; CPU: no)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (torch.compile compiles in the first)")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 3; tiny: 1)")
    p.add_argument("--atol", type=float, default=MEAN_ABS, help="largest mean |difference| of pixels in [0, 1] "
                                                                "that still counts as the same images")
    p.add_argument("--max-abs", type=float, default=MAX_ABS, help="largest |difference| of any pixel value in [0, 1] "
                                                                  "that still counts as the same images (4/255)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each side in its own Python process (default: on with CUDA, off on the CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one side (--isolate)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--toolkit-configs", nargs="+", default=None, metavar="NAME=FLAGS",
                   help="toolkit rows, each synthesize_images.py flags on top of the toolkit's defaults, all against "
                        "the same reference (default: defaults= +compile=--torch_compile; tiny: +compile traces "
                        "with --torch_compile_backend eager)")
    p.add_argument("--toolkit-args", default="", help="extra synthesize_images.py flags for every toolkit row")
    p.add_argument("--fast-recipe", default=FAST_RECIPE,
                   help=f"flags of the fast-recipe row: other images, not compared, not counted toward the target "
                        f"(default: {FAST_RECIPE!r}; '' leaves the row out)")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--output", default="synth_speed.json", help="JSON record")
    args = p.parse_args(argv)
    for name, full, small in (("batch_size", 8, 2), ("steps", 50, 5), ("resolution", 512, 64), ("batches", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)
    if args.batches < 1:
        p.error("--batches must be at least 1")
    if args.toolkit_configs is None:
        compile_flags = "--torch_compile" + (" --torch_compile_backend eager" if args.tiny else "")
        args.toolkit_configs = ["defaults=", f"+compile={compile_flags}"]
    try:
        args.toolkit_configs = toolkit_configs(args.toolkit_configs)
    except ValueError as err:
        p.error(f"--toolkit-configs: {err}")
    rows = {**args.toolkit_configs, **({"fast recipe": args.fast_recipe} if args.fast_recipe else {})}
    settled = argparse.Namespace(**{**vars(args), "precision": args.precision or "no"})  # (decided with the device)
    for name, flags in rows.items():  # bad flags fail now, not after the reference has run
        try:
            toolkit_cfg(Path("model"), settled, f"{flags} {args.toolkit_args}", torch.device("cpu"))
        except SystemExit:
            p.error(f"row {name!r}: the synthesize_images.py flags {flags} {args.toolkit_args} do not parse (above)")
    return args


def with_ratio(row: dict, reference: dict) -> dict:
    return {**row, "ratio": row["images_per_second"] / reference["images_per_second"]}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    device = settle(args)
    quiet_libraries()
    env = environment(device)
    n = (args.warmup + args.batches) * args.batch_size
    print(f"synth_speed: {env['device']}; torch {env['versions']['torch']}, diffusers {env['versions']['diffusers']}")
    print(f"{n} images a row ({args.warmup} warm-up + {args.batches} timed batches of {args.batch_size}), "
          f"{args.steps} PNDM steps, guidance {args.guidance}, {args.resolution} px, {args.precision}")
    print("rows: StableDiffusionPipeline (reference); " + "; ".join(
        f"toolkit {name} ({flags or 'no extra flags'})" for name, flags in args.toolkit_configs.items())
        + (f"; fast recipe ({args.fast_recipe}: other images, not compared)" if args.fast_recipe else ""))
    if args.tiny:
        print("tiny model on the CPU: checks that every code path runs; the numbers mean nothing")
    else:
        compiled = sum("--torch_compile" in flags for flags in args.toolkit_configs.values())
        sampling = n / PUBLISHED_IMAGES_PER_SECOND * args.steps / 50
        seconds = 60 + (2 + len(args.toolkit_configs)) * (15 + sampling + 15 * args.isolate) + 120 * compiled
        print(f"estimated wall time on one H100: ~{seconds / 60:.1f} min (compiling guessed at 2 min a row)")

    begin = time.perf_counter()
    items = plan(n, args.seed)
    full_settings = not args.tiny and args.batch_size == 8 and args.steps == 50
    record = {"benchmark": "synth_speed", "tiny": args.tiny, **env,
              "settings": {"batch_size": args.batch_size, "steps": args.steps, "scheduler": "pndm",
                           "guidance_scale": args.guidance, "resolution": args.resolution, "precision": args.precision,
                           "warmup_batches": args.warmup, "timed_batches": args.batches, "seed": args.seed,
                           "atol_mean_abs": args.atol, "atol_max_abs": args.max_abs,
                           "isolate": args.isolate, "toolkit_configs": args.toolkit_configs,
                           "toolkit_args": args.toolkit_args, "fast_recipe": args.fast_recipe,
                           "timing_rule": "device synchronised around the timed batches; images/s = timed images / "
                                          "elapsed; model loading, compiling and the warm-up batches excluded "
                                          "(their seconds recorded per side)",
                           "isolation": ("each side in its own Python process" if args.isolate else
                                         "all sides in one process (cuDNN's algorithm cache is shared)")},
              "published_reference_h100_images_per_second": PUBLISHED_IMAGES_PER_SECOND,
              "reference": None, "toolkit": [], "fast_recipe": None, "same_images": None, "status": "running"}
    if full_settings:
        record["target_ratio"] = TARGET

    def save(status: str = "running") -> None:  # after every row: a run cut short keeps the rows it finished
        record["same_images"] = all(row["same_images"] for row in record["toolkit"])
        record["same_work"] = all(row["same_work"] for row in record["toolkit"])
        record["same_sampling"] = all(row["same_sampling"] for row in record["toolkit"])
        if full_settings:
            for row in record["toolkit"]:
                row["meets_target"] = row["ratio"] >= TARGET and row["counts_toward_target"]
            record["meets_target"] = [row["name"] for row in record["toolkit"] if row["meets_target"]]
        record.update(status=status, total_seconds=time.perf_counter() - begin)
        write_json(args.output, record)

    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as scratch:
        model_dir = model_folder(args.model_dir, args.tiny, Path(scratch), device)
        free_memory(device)  # writing the model leaves ~4 GB in this process's allocator, held while children run

        def run(flags: str | None, keep_images: bool = True):  # flags None: the reference
            if args.isolate:
                return measure_in_child(side_spec(flags), argv, model_dir, Path(scratch), keep_images)
            return measure(side_of(side_spec(flags)), model_dir, items, args, device)

        reference, ref_images = run(None)
        record["reference"] = reference
        save()
        print(f"reference StableDiffusionPipeline: {reference['images_per_second']:.2f} images/s, "
              f"peak {fmt(reference['peak_gib'], '.2f')} GiB", flush=True)
        for name, flags in args.toolkit_configs.items():
            result, images = run(flags)
            difference = compare(ref_images, images)
            row = {"name": name, "flags": flags, **result, "image_difference": difference}
            why = refusals(row, reference, args)
            refused = [reason for reasons in why.values() for reason in reasons]
            row = with_ratio({**row, "same_images": not why["images"], "same_work": not why["work"],
                              "same_sampling": not why["sampling"], "refused": refused,
                              "counts_toward_target": not refused}, reference)
            record["toolkit"].append(row)
            save()
            print(f"toolkit {name}: {row['images_per_second']:.2f} images/s ({row['ratio']:.2f}x), peak "
                  f"{fmt(row['peak_gib'], '.2f')} GiB, mean |diff| {difference['mean_abs']:.2e}, U-Net "
                  f"{result['unet_calls']} calls / {result['unet_samples']} samples (reference "
                  f"{reference['unet_calls']} / {reference['unet_samples']})"
                  + (f"; REFUSED: {'; '.join(refused)}" if refused else ""), flush=True)
        if args.fast_recipe:
            result, _ = run(args.fast_recipe, keep_images=False)
            fast = with_ratio({"name": "fast recipe", "flags": args.fast_recipe, **result, "compared": False,
                               "counts_toward_target": False,
                               "note": "another sampler and step count: other images than the reference's"},
                              reference)
            record["fast_recipe"] = fast
            print(f"fast recipe ({args.fast_recipe}): {fast['images_per_second']:.2f} images/s "
                  f"({fast['ratio']:.2f}x, other images), peak {fmt(fast['peak_gib'], '.2f')} GiB", flush=True)
    save("complete")
    toolkit, fast = record["toolkit"], record["fast_recipe"]

    print()
    rows = [["StableDiffusionPipeline", fmt(reference["images_per_second"], ".2f"), "1.00",
             fmt(reference["peak_gib"], ".2f"), "reference", ""]]
    for row in toolkit:
        images = (f"{'same' if row['same_images'] else 'NOT THE SAME'} (mean |diff| "
                  f"{row['image_difference']['mean_abs']:.1e})" + ("" if row["same_sampling"] else ", OTHER SAMPLING"))
        target = f"{TARGET:.1f}x {'met' if row['meets_target'] else 'missed'}" if full_settings else ""
        rows.append([f"toolkit {row['name']}", fmt(row["images_per_second"], ".2f"), fmt(row["ratio"], ".2f"),
                     fmt(row["peak_gib"], ".2f"), images, target])
    if fast:
        rows.append([f"fast recipe: {fast['flags']}", fmt(fast["images_per_second"], ".2f"), fmt(fast["ratio"], ".2f"),
                     fmt(fast["peak_gib"], ".2f"), "other images (not compared)", "not counted"])
    print(table(rows, ["row", "images/s", "ratio", "peak GiB", "images vs reference", "target"]))
    for row in toolkit:
        difference = row["image_difference"]
        print(f"toolkit {row['name']}: max |diff| {difference['max_abs']:.2e}, "
              f"{difference['share_of_8bit_values_differing']:.2%} of 8-bit values differ (at most "
              f"{difference['max_8bit_levels']} levels); same within mean |diff| {args.atol:.1e} and max "
              f"{args.max_abs:.1e}: {'yes' if row['same_images'] else 'NO'}; warm-up "
              f"{', '.join(f'{s:.1f}' for s in row['warmup_seconds'])} s (reference "
              f"{', '.join(f'{s:.1f}' for s in reference['warmup_seconds'])} s)")
    print(f"({env['device']}; {record['total_seconds']:.0f} s in all; JSON in {args.output})")
    return record


def succeeded(record: dict) -> bool:
    """Every toolkit row gives the reference's images from the reference's U-Net work, timesteps and
    guidance, and no row has NaN/inf pixels."""
    rows = [record["reference"], *record["toolkit"], *([record["fast_recipe"]] if record["fast_recipe"] else [])]
    return (record["same_images"] and record["same_work"] and record.get("same_sampling", True)
            and all(row["finite"] for row in rows))


if __name__ == "__main__":
    record = main()
    sys.exit(0 if not record or succeeded(record) else 1)  # a --child's figures are in its files

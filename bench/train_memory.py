"""Peak GPU memory of every strategy at batch 1, 512 px: does each fit the tutorial's 12 GiB GPU?

    python bench/train_memory.py --output train_memory.json          # one GPU, ~3 min on an H100
    python bench/train_memory.py --tiny --output /tmp/tiny.json      # CPU smoke run, no memory claims

Runs sdtune.train.train() in-process (bench/train_speed.toolkit_run) for each of the eleven
strategies on SD1.5's exact architecture with random weights, batch 1, 512 px, a few steps,
with `--memory_profile low` (8-bit AdamW, gradient checkpointing, frozen encoders cached and
moved off the GPU) and --mixed_precision bf16, and with the plain defaults for comparison
(--profiles). Peak GiB is torch.cuda.max_memory_allocated; max_memory_reserved (what the
allocator held) is the figure judged against the budget, since a card must hold it all, plus
the CUDA context (~0.5 GiB, not counted by torch), which --budget-gib leaves room for.
REFERENCE.md section 9 gives the reference recipe's batch-1 peaks for comparison.

On a larger card each run first holds a ballast tensor, so that only --budget-gib stays free: the
run meets a 12 GiB card's limit for real (an out-of-memory error means it does not fit), and
bitsandbytes' paged optimizer state (--memory_profile low), which lives in CUDA unified memory
outside torch's counts, is pushed out to CPU memory as it would be there. Peaks are reported
without the ballast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (earlier_records, environment, fmt, model_folder, pick_device, quiet_libraries, table,  # noqa: E402
                    write_image_folder, write_json)
from train_speed import _backend_flags, measure, toolkit_run  # noqa: E402

import torch  # noqa: E402

from sdtune.strategies import STRATEGIES  # noqa: E402

# REFERENCE.md section 9: the reference recipe's peak GiB at batch 1, 512 px on an H100 (plain; 8-bit AdamW + checkpointing).
PUBLISHED_BATCH1 = {"unet": (16.6, 8.7), "lora": (3.7, None), "dora": (3.7, None), "bitfit": (6.3, None),
                    "unet+text": (18.7, None), "unet+vae+text": (22.5, 15.5)}
PROFILES = {"low": ["--memory_profile", "low"], "default": []}
# Settings that must match for an earlier run's peak to stand for this run's (--reuse).
SAME_SETTINGS = ("resolution", "steps", "mixed_precision", "budget_gib", "ballast", "lora_rank", "toolkit_args")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model at 64 px (no memory claims)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--profiles", nargs="+", default=["low"], choices=list(PROFILES),
                   help="memory profiles to measure (default: low; add default for the plain settings)")
    p.add_argument("--mixed-precision", default="bf16", choices=("fp16", "bf16", "no"), help="(CPU: no)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the peak comes in the first)")
    p.add_argument("--budget-gib", type=float, default=11.5,
                   help="reserved GiB allowed: 12 GiB less ~0.5 GiB of CUDA context")
    p.add_argument("--no-ballast", dest="ballast", action="store_false",
                   help="let runs use the whole card (peaks only) instead of leaving only --budget-gib free")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--toolkit-args", default="", help="extra train_text_to_image.py flags for every run")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--reuse", nargs="+", default=None, metavar="JSON_OR_DIR",
                   help="earlier train_memory JSON files (a folder: its train_memory*.json): strategies they measured "
                        "without error on this device with the same settings are not run again")
    p.add_argument("--output", default="train_memory.json", help="JSON record, rewritten after every run")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    return args


def ballast_bytes(free_bytes: int, budget_gib: float) -> int:
    """How much of the card's free memory to hold so that only `budget_gib` stays free."""
    return max(0, free_bytes - int(budget_gib * 2**30))


def run_on_budget(budget_gib: float | None, held: dict, device: torch.device, **kwargs) -> dict:
    """toolkit_run with only `budget_gib` of the card free (None: the whole card); held["gib"]: the ballast."""
    ballast = None
    if budget_gib is not None and device.type == "cuda":
        ballast = torch.empty(ballast_bytes(torch.cuda.mem_get_info(device)[0], budget_gib), dtype=torch.uint8,
                              device=device)
    held["gib"] = 0.0 if ballast is None else ballast.numel() / 2**30
    try:
        return toolkit_run(device=device, **kwargs)
    finally:
        del ballast


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.tiny)
    precision = args.mixed_precision
    if device.type == "cpu":
        precision = "no"  # BitFit/DiffFit refuse half precision on the CPU; the CPU run checks code paths only
        torch.set_num_threads(1)
    quiet_libraries()
    env = environment(device)
    print(f"train_memory: {env['device']}; torch {env['versions']['torch']}; {len(args.strategies)} strategies x "
          f"profiles {'/'.join(args.profiles)} at batch 1, {args.resolution} px, {precision}")
    record = {"benchmark": "train_memory", "tiny": args.tiny, **env,
              "settings": {"resolution": args.resolution, "batch_size": 1, "steps": args.steps, "mixed_precision": precision,
                           "profiles": {name: PROFILES[name] for name in args.profiles}, "budget_gib": args.budget_gib,
                           "ballast": args.ballast,
                           "lora_rank": args.lora_rank, "toolkit_args": args.toolkit_args},
              "published_reference_batch1_gib": PUBLISHED_BATCH1, "results": [], "status": "running"}
    flags = _backend_flags()
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as scratch:
        scratch = Path(scratch)
        model_dir = model_folder(args.model_dir, args.tiny, scratch, device)
        images = write_image_folder(scratch / "images", 4, args.resolution)
        done = {(r["strategy"], r["profile"]): {**r, "reused_from": path}
                for path, earlier in earlier_records(args.reuse, "train_memory*.json", record, SAME_SETTINGS)
                for r in earlier["results"] if not r["error"]}
        for profile in args.profiles:
            for strategy in args.strategies:
                if (strategy, profile) in done:
                    record["results"].append(done[(strategy, profile)])
                    print(f"{profile:7s} {strategy:13s}: reused from {done[(strategy, profile)]['reused_from']}")
                    write_json(args.output, record)
                    continue
                extra = PROFILES[profile] + shlex.split(args.toolkit_args)
                held = {}
                result = measure(run_on_budget, device, 1, 1, flags, budget_gib=args.budget_gib if args.ballast else None,
                                 held=held, model_dir=model_dir, strategy=strategy, images=images,
                                 resolution=args.resolution, steps=args.steps, precision=precision,
                                 out_dir=scratch / f"{profile}-{strategy}", lora_rank=args.lora_rank, extra=extra)
                result["ballast_gib"] = held.get("gib", 0.0)
                for key in ("peak_gib", "peak_reserved_gib"):  # the run's own memory, without the ballast
                    if result.get(key) is not None:
                        result[key] -= result["ballast_gib"]
                reserved = result.get("peak_reserved_gib")
                fits = None if reserved is None else ("error" not in result and reserved <= args.budget_gib)
                record["results"].append({"strategy": strategy, "profile": profile, "fits_budget": fits, **{
                    k: result.get(k) for k in ("peak_gib", "peak_reserved_gib", "ballast_gib", "seconds", "error",
                                               "optimizer", "encoded_once")}})
                print(f"{profile:7s} {strategy:13s}: peak {fmt(result.get('peak_gib'), '.2f')} GiB allocated, "
                      f"{fmt(reserved, '.2f')} reserved" + (f", {'fits' if fits else 'OVER'} {args.budget_gib} GiB"
                                                            if fits is not None else "")
                      + (f"  ERROR {result['error']}" if "error" in result else ""), flush=True)
                record["total_seconds"] = time.perf_counter() - begin
                write_json(args.output, record)
    record["status"] = "complete"
    write_json(args.output, record)
    rows = [[r["strategy"], r["profile"], fmt(r["peak_gib"], ".2f"), fmt(r["peak_reserved_gib"], ".2f"),
             fmt(PUBLISHED_BATCH1.get(r["strategy"], (None,))[0], ".1f"),
             {True: "yes", False: "NO", None: "-"}[r["fits_budget"]], r["error"] or ""] for r in record["results"]]
    print()
    print(table(rows, ["strategy", "profile", "peak GiB", "reserved GiB", "reference GiB", f"fits {args.budget_gib}", "error"]))
    return record


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["tiny"] and any(r["error"] for r in result["results"]) else 0)

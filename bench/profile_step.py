"""Where a training step's time goes: the reference recipe and the toolkit under torch.profiler.

    python bench/profile_step.py --strategy unet --output profile_unet.json          # one GPU, ~1 min
    python bench/profile_step.py --toolkit-args "--torch_compile --channels_last"    # the compiled step
    python bench/profile_step.py --tiny --output /tmp/profile.json                   # CPU smoke run

Each side runs as bench/train_speed.py runs it (same model, images, loader and step clock), with
the profiler recording the timed steps only (after the warm-up). Per step it prints the wall time,
the time the device spent in kernels (on the CPU: in operators, self time), their ratio ("busy": well
under 1 means the GPU waited for the host, e.g. for images decoded on the main thread), the time by
kind of kernel (convolution, matmul, attention, normalisation, optimizer, inductor's fused Triton
kernels, random numbers, copies and casts, layout changes, the rest) and the costliest kernels.
Kinds are read from kernel names, so they are a guide; the per-kernel times are the profiler's.
On a GPU only kernels, copies and memsets count (the operators that launch them and the
annotations that span them would count them twice). The profiler adds host time to every
operator (more to eager runs than to compiled ones), so these wall times are not train_speed's
figures and get no ratio or verdict: they say where to look, not how fast it is.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402
from common import (StepClock, environment, fmt, model_folder, pick_device, quiet_libraries, synchronize,  # noqa: E402
                    table, write_image_folder, write_json)

import torch  # noqa: E402

# Annotations, not work: the step's and record_function's ranges (ProfilerStep#N, Optimizer.step#AdamW.step,
# enumerate(DataLoader)#...). On the CPU their self time is the host's own (Python, the loader); on a GPU's
# timeline they span kernels already counted. Anchored: demangled kernel names hold "{lambda(int)#1}".
ANNOTATION = r"^(profilerstep|optimizer\.|enumerate\(dataloader\))"
# First match wins; names are lowercased (CUDA kernels, or aten operators on the CPU).
KINDS = (
    (HOST := "host (outside operators)", ANNOTATION),  # CPU only
    # inductor's generated kernels are named after what they fused (triton_per_fused_native_group_norm_silu_3)
    ("fused (inductor triton)", r"^triton|triton_"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("layout", r"nchwtonhwc|nhwctonchw|transpose|permute"),
    ("random numbers", r"normal|distribution|random|philox|randperm"),  # noise, timesteps, latent samples
    ("convolution", r"conv(?!ert)|dgrad|wgrad|fprop|implicit_gemm|winograd"),
    ("matmul", r"gemm|cutlass|cublas|nvjet|xmma|matmul|\bmm\b|::mm|addmm|bmm|(?<!bi)linear"),
    ("optimizer and gradient clipping", r"adam|foreach|multi_tensor|vector_norm|lpnorm|clip"),
    ("normalisation", r"norm|rowwisemoments|computefusedparams|compute1d"),  # GroupNorm's CUDA kernels too
    ("copy/cast", r"copy|memcpy|memset|(?<!broad)(?<!no)cast|_to_|convert"),  # not gpu_kernel_impl_nocast
)
OTHER = "other (element-wise, reductions, ...)"


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), OTHER)


def device_times(events, device: torch.device) -> dict[str, tuple[float, int]]:
    """Seconds and calls per kernel name over the profiled steps. CUDA: the kernels' own time (each runs
    once on the device, so nothing is counted twice); CPU: each operator's self time."""
    times: dict[str, tuple[float, int]] = {}
    if device.type == "cuda":
        # Kernels, copies and memsets only: an operator's device time is its kernels' again, and an
        # annotation on the GPU's timeline spans kernels (none recorded: summarise says so).
        annotation = lambda e: getattr(e, "is_user_annotation", False) or re.search(ANNOTATION, e.key.lower())  # noqa: E731
        chosen = [e for e in events
                  if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and not annotation(e)]
        seconds = lambda e: e.self_device_time_total / 1e6  # noqa: E731
    else:
        chosen, seconds = list(events), (lambda e: e.self_cpu_time_total / 1e6)
    for e in chosen:
        if seconds(e) > 0:
            total, calls = times.get(e.key, (0.0, 0))
            times[e.key] = (total + seconds(e), calls + e.count)
    return times


@contextlib.contextmanager
def profiling(device: torch.device, warmup: int, steps: int, found: dict):
    """torch.profiler over the timed steps: StepClock.tick, which both sides call once per optimizer step,
    also steps the profiler. `found` receives the kernel times when the last timed step ends."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def ready(prof) -> None:
        found["times"] = device_times(prof.key_averages(), device)

    # the last warm-up step is the profiler's own warm-up (its first recorded step is discarded)
    schedule = torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1)
    tick = StepClock.tick
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready) as prof:
        def ticking(self) -> None:
            if len(self.times) + 1 == warmup:  # the warm-up's last step: tracing starts before the clock's mark
                synchronize(self.device)
                prof.step()
                tick(self)
            else:
                tick(self)
                prof.step()

        StepClock.tick = ticking
        try:
            yield
        finally:
            StepClock.tick = tick


def summarise(times: dict[str, tuple[float, int]], steps: int, wall: float | None, top: int) -> dict:
    """Per-step seconds by kind and of the costliest kernels, and how busy the device was."""
    kinds: dict[str, float] = {}
    for name, (seconds, _) in times.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + seconds / steps
    busy = sum(kinds.values())
    ranked = sorted(times.items(), key=lambda item: -item[1][0])[:top]
    return {"wall_seconds_per_step": wall, "device_seconds_per_step": busy,
            "busy_fraction": busy / wall if wall else None,
            "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1])),
            "top": [{"name": name, "kind": kind_of(name), "seconds_per_step": seconds / steps,
                     "calls_per_step": calls / steps} for name, (seconds, calls) in ranked]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model at 64 px")
    p.add_argument("--strategy", default="unet", choices=train_speed.STRATEGIES)
    p.add_argument("--sides", nargs="+", default=["reference", "toolkit"], choices=("reference", "toolkit"))
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny: 2)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (default 3; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5; tiny: 2)")
    p.add_argument("--mixed-precision", default=None, choices=("fp16", "bf16", "no"), help="toolkit (default bf16; CPU: no)")
    p.add_argument("--reference-precision", default=None, choices=("fp16", "bf16", "no"), help="default fp16 (CPU: no)")
    p.add_argument("--reference-workers", type=int, default=None, help="as train_speed.py (default 4 on a GPU, 0 on the CPU)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--toolkit-args", default="", help="extra train_text_to_image.py flags for the toolkit side")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--top", type=int, default=15, help="costliest kernels listed per side")
    p.add_argument("--output", default="profile_step.json")
    args = p.parse_args(argv)
    for name, full, small in (("batch_size", 16, 2), ("resolution", 512, 64), ("warmup", 3, 1), ("steps", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else full)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.tiny)
    cpu = device.type == "cpu"
    if cpu:
        torch.set_num_threads(1)  # as train_speed --tiny: one thread, so operator self times add up to the wall time
    precision = "no" if cpu else args.mixed_precision or "bf16"
    reference_precision = "no" if cpu else args.reference_precision or "fp16"
    workers = args.reference_workers if args.reference_workers is not None else train_speed.default_reference_workers(device)
    quiet_libraries()
    total = args.warmup + args.steps
    record = {"benchmark": "profile_step", "tiny": args.tiny, **environment(device),
              "settings": {"strategy": args.strategy, "batch_size": args.batch_size, "resolution": args.resolution,
                           "warmup_steps": args.warmup, "profiled_steps": args.steps, "toolkit_mixed_precision": precision,
                           "reference_precision": reference_precision, "reference_workers": workers,
                           "lora_rank": args.lora_rank, "toolkit_args": args.toolkit_args},
              "sides": {}, "status": "running"}
    print(f"profile_step: {record['device']}; {args.strategy}, batch {args.batch_size}, {args.resolution} px; "
          f"{args.warmup} warm-up + {args.steps} profiled steps")
    flags = train_speed._backend_flags()
    with tempfile.TemporaryDirectory(prefix="sdtune-profile-") as scratch:
        scratch = Path(scratch)
        model_dir = model_folder(args.model_dir, args.tiny, scratch, device)
        images = write_image_folder(scratch / "images", max(args.batch_size * total, 8), args.resolution,
                                    distinct=train_speed.DISTINCT_IMAGES[args.tiny])
        common = dict(model_dir=model_dir, images=images, resolution=args.resolution, steps=total, lora_rank=args.lora_rank)
        for side in args.sides:
            if side == "reference":
                run, kwargs = train_speed.reference_run, dict(recipe=train_speed.REFERENCE_RECIPE.get(args.strategy, args.strategy),
                                                              precision=reference_precision, workers=workers)
            else:
                run, kwargs = train_speed.toolkit_run, dict(strategy=args.strategy, precision=precision,
                                                            out_dir=scratch / "toolkit", extra=shlex.split(args.toolkit_args))
            found: dict = {}
            started = time.perf_counter()
            with profiling(device, args.warmup, args.steps, found):
                result = train_speed.measure(run, device, args.warmup, args.batch_size, flags, **kwargs, **common)
            rate = result.get("samples_per_second")
            wall = args.batch_size / rate if rate else None
            summary = summarise(found.get("times", {}), args.steps, wall, args.top)
            recorded = None if found.get("times") else "the profiler recorded no kernels (is CUPTI there?)"
            summary.update(seconds=time.perf_counter() - started, error=result.get("error") or recorded)
            record["sides"][side] = summary
            write_json(args.output, record)
            print(f"\n{side}: {fmt(wall, '.4f')} s a step (profiled), device busy {fmt(summary['device_seconds_per_step'], '.4f')} s "
                  f"= {fmt(summary['busy_fraction'], '.0%')}" + (f"  ERROR {result['error']}" if result.get("error") else ""))
            print(table([[kind, f"{seconds:.4f}", f"{seconds / summary['device_seconds_per_step']:.0%}"]
                         for kind, seconds in summary["kinds"].items()], ["kind", "s/step", "share"]))
            print(table([[t["name"][:90], t["kind"], f"{t['seconds_per_step']:.4f}", fmt(t["calls_per_step"], ".1f")]
                         for t in summary["top"]], ["kernel", "kind", "s/step", "calls/step"]))
    record["status"] = "complete"
    write_json(args.output, record)
    return record


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(side.get("error") for side in result["sides"].values()) else 0)

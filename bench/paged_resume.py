"""Does a resumed `--memory_profile low` run keep its optimizer state in paged memory? A GPU check.

    python bench/paged_resume.py --output paged_resume.json     # one GPU, ~1 min
    python bench/paged_resume.py --tiny                          # CPU: the code path only (nothing pages there)

Trains the full U-Net of SD1.5's architecture (random weights, no download) for 2 steps at
batch 1 with `--memory_profile low` (paged 8-bit AdamW), saving a checkpoint after each step;
then deletes the last checkpoint and resumes from the first. A checkpoint's moments load as
ordinary tensors that still carry bitsandbytes' `is_paged` flag; sdtune.train.page_optimizer_state
copies them back into paged buffers. This records, at that moment, how many moments it moved,
whether every large moment is now listed in bitsandbytes' page manager, torch's allocated GPU
memory before and after (moments that were on the GPU leave torch's count), and each run's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, fmt, model_folder, peak_gib, pick_device, quiet_libraries, start_memory, write_image_folder, write_json  # noqa: E402
from train_speed import fresh_accelerator, patched  # noqa: E402

import torch  # noqa: E402


def inspect_paging(record: dict):
    """A stand-in for sdtune.train.page_optimizer_state that calls it and writes down what it did."""
    import sdtune.train as training

    page = training.page_optimizer_state

    def watched(optimizer) -> int:
        device = torch.device("cuda") if torch.cuda.is_available() else None
        before = torch.cuda.memory_allocated(device) if device else None
        moved = page(optimizer)
        inner = getattr(optimizer, "optimizer", optimizer)
        moments = [(p, s[k]) for p, s in inner.state.items() for k in ("state1", "state2") if k in s]
        listed = {id(t) for t in getattr(getattr(inner, "page_mng", None), "paged_tensors", [])}
        large = [m for p, m in moments if p.numel() >= 1e5]  # bitsandbytes pages only these (get_state_buffer)
        record.update(optimizer=type(inner).__name__, paged_optimizer=bool(getattr(inner, "is_paged", False)),
                      moments=len(moments), moved=moved, large_moments=len(large),
                      large_moments_in_pages=sum(id(m) in listed for m in large),
                      allocated_gib_before_paging=None if before is None else before / 2**30,
                      allocated_gib_after_paging=None if device is None else torch.cuda.memory_allocated(device) / 2**30)
        return moved

    return patched(training, page_optimizer_state=watched)


def run(argv: list[str], device: torch.device, watch: dict | None = None) -> dict:
    import sdtune.train as training

    start_memory(device)
    start = time.perf_counter()
    noop = lambda *args, **kwargs: None  # noqa: E731  (the 4 GB final model: disk time, nothing to check)
    with fresh_accelerator(), patched(training, save_final_model=noop), \
            inspect_paging(watch) if watch is not None else contextlib.nullcontext():
        summary, _ = training.train(*training.parse_args(argv))
    return {"steps": summary["steps"], "final_loss": summary.get("final_loss"), "optimizer": summary.get("optimizer"),
            "peak_gib": peak_gib(device), "seconds": time.perf_counter() - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU: the tiny model at 64 px (checks the code path; no paging)")
    p.add_argument("--resolution", type=int, default=None, help="default 256 (tiny: 64): paging is about the state")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--output", default="paged_resume.json")
    args = p.parse_args(argv)
    resolution = args.resolution or (64 if args.tiny else 256)
    device = pick_device(args.tiny)
    quiet_libraries()
    precision = "bf16" if device.type == "cuda" else "no"
    record = {"benchmark": "paged_resume", "tiny": args.tiny, **environment(device),
              "settings": {"strategy": "unet", "memory_profile": "low", "resolution": resolution, "batch_size": 1,
                           "mixed_precision": precision, "steps": 2, "resumed_from": "checkpoint-1"},
              "at_resume": {}, "status": "running"}
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as scratch:
        scratch = Path(scratch)
        model_dir = model_folder(args.model_dir, args.tiny, scratch, device)
        images = write_image_folder(scratch / "images", 2, resolution)
        out = scratch / "run"
        argv = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(images),
                "--resolution", str(resolution), "--strategy", "unet", "--memory_profile", "low",
                "--mixed_precision", precision, "--train_batch_size", "1", "--max_train_steps", "2",
                "--checkpointing_steps", "1", "--output_dir", str(out), "--report_to", "none"]
        record["straight"] = run(argv, device)
        shutil.rmtree(out / "checkpoint-2")
        record["resumed"] = run(argv + ["--resume_from_checkpoint", "latest"], device, watch=record["at_resume"])
    at = record["at_resume"]
    record["paged_again"] = at.get("paged_optimizer") and at.get("large_moments_in_pages") == at.get("large_moments")
    record["status"] = "complete"
    write_json(args.output, record)
    print(f"paged_resume: {record['device']}; optimizer {at.get('optimizer')}; {at.get('moved')} of "
          f"{at.get('moments')} moments copied back into pages; large moments in pages "
          f"{at.get('large_moments_in_pages')}/{at.get('large_moments')}; allocated "
          f"{fmt(at.get('allocated_gib_before_paging'), '.2f')} -> {fmt(at.get('allocated_gib_after_paging'), '.2f')} GiB; "
          f"peak straight {fmt(record['straight']['peak_gib'], '.2f')} GiB, resumed "
          f"{fmt(record['resumed']['peak_gib'], '.2f')} GiB; JSON in {args.output}")
    return record


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["tiny"] or result["paged_again"] else 1)

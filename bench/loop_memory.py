"""What the training loop allocates, measured on the CPU: an estimate of GPU memory where no GPU is at hand.

    python bench/loop_memory.py --strategies unet+vae+text unet --output loop_memory.json   # ~3 min a strategy
    python bench/loop_memory.py --tiny --output /tmp/tiny.json                              # CI smoke run

Runs sdtune.train.train() in-process on SD1.5's exact architecture (random weights), 512 px,
batch 1, two optimizer steps (the second has the optimizer state in place while the backward
pass runs), `--memory_profile low --mixed_precision bf16`, and counts, through a torch dispatch
mode, the bytes of every tensor storage the loop creates that is still alive: gradients,
optimizer state, activations and temporaries. Its peak plus the trained weights (fp32) and the
frozen weights that stay on the GPU estimate the GPU's peak allocated memory.

What it cannot see: the CUDA caching allocator's slack (reserved - allocated), cuDNN workspaces,
the CUDA context, and CPU autocast's dtype policy, which keeps GroupNorm in its input's dtype
where CUDA autocast runs it in fp32. bench/train_memory.py measures the real thing on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, fmt, model_folder, quiet_libraries, table, write_image_folder, write_json  # noqa: E402

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from sdtune.errors import UserError  # noqa: E402
from sdtune.strategies import STRATEGIES  # noqa: E402

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is on and still alive, and their peak.

    An output that shares an input's storage (a view, an in-place result) is not new memory;
    a storage's bytes are returned when its last tensor dies (a weakref finalizer)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key and size and key not in self.live and key not in inputs:
                self.live[key] = size
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out


def measure(model_dir: Path, images: Path, strategy: str, resolution: int, steps: int, extra: list[str],
            out_dir: Path) -> dict:
    """train() with the loop (from its first step to its last checkpoint) under LiveBytes."""
    import sdtune.train as training

    counter = LiveBytes()

    class CountedLoop(training.StopOnSignal):  # made just before the loop, restored just after it
        def __init__(self):
            super().__init__()
            counter.__enter__()

        def restore(self):
            counter.__exit__(None, None, None)
            super().restore()

    argv = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(images),
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--output_dir", str(out_dir), "--report_to", "none", "--checkpointing_steps", "100000",
            "--strategy", strategy, *extra]
    original, training.StopOnSignal = training.StopOnSignal, CountedLoop
    start = time.perf_counter()
    try:
        summary, models = training.train(*training.parse_args(argv))
    finally:
        training.StopOnSignal = original
    trained = frozen = 0
    for c in ("unet", "vae", "text_encoder"):
        module = getattr(models, c)
        params = list(module.parameters())
        if c == "unet" or any(p.requires_grad for p in params):  # frozen encoders are cached and leave the GPU
            trained += sum(p.numel() * p.element_size() for p in params if p.requires_grad)
            frozen += sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return {"strategy": strategy, "loop_peak_gib": counter.peak / GIB, "loop_live_at_end_gib": counter.now / GIB,
            "trained_weights_gib": trained / GIB, "frozen_weights_on_gpu_gib": frozen / GIB,
            "estimated_peak_gib": (counter.peak + trained + frozen) / GIB, "optimizer": summary["optimizer"],
            "seconds": time.perf_counter() - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64 px (CI smoke run, no claims)")
    p.add_argument("--strategies", nargs="+", default=["unet+vae+text", "unet"], choices=list(STRATEGIES))
    p.add_argument("--toolkit-args", nargs=argparse.REMAINDER, default=None,
                   help="train flags instead of the default --memory_profile low --mixed_precision bf16 (put last)")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--output", default="loop_memory.json")
    args = p.parse_args(argv)
    resolution = 64 if args.tiny else 512
    extra = args.toolkit_args if args.toolkit_args is not None else ["--memory_profile", "low", "--mixed_precision", "bf16"]
    quiet_libraries()
    record = {"benchmark": "loop_memory", "tiny": args.tiny, **environment(torch.device("cpu")),
              "settings": {"resolution": resolution, "batch_size": 1, "steps": 2, "toolkit_args": extra,
                           "counts": "tensor storages the training loop creates and holds (dispatch mode), CPU"},
              "results": []}
    with tempfile.TemporaryDirectory(prefix="sdtune-loop-memory-") as scratch:
        scratch = Path(scratch)
        model_dir = model_folder(args.model_dir, args.tiny, scratch, torch.device("cpu"))
        images = write_image_folder(scratch / "images", 4, resolution)
        for strategy in args.strategies:
            try:
                row = measure(model_dir, images, strategy, resolution, 2, extra, scratch / f"run-{strategy}")
                shutil.rmtree(scratch / f"run-{strategy}")  # its final model: up to 4 GB each at full size
            except (UserError, RuntimeError) as err:  # e.g. BitFit/DiffFit refuse bf16 on the CPU; the rest go on
                row = {"strategy": strategy, "error": str(err).splitlines()[0]}
                record["results"].append(row)
                print(f"{strategy}: not measured: {row['error']}", flush=True)
                write_json(args.output, record)
                continue
            record["results"].append(row)
            print(f"{strategy}: loop peak {row['loop_peak_gib']:.2f} GiB + weights {row['trained_weights_gib']:.2f} "
                  f"trained, {row['frozen_weights_on_gpu_gib']:.2f} frozen = ~{row['estimated_peak_gib']:.2f} GiB "
                  f"({row['seconds']:.0f} s)", flush=True)
            write_json(args.output, record)
    rows = [[r["strategy"], fmt(r.get("trained_weights_gib"), ".2f"), fmt(r.get("frozen_weights_on_gpu_gib"), ".2f"),
             fmt(r.get("loop_peak_gib"), ".2f"), fmt(r.get("estimated_peak_gib"), ".2f"), r.get("optimizer") or r["error"]]
            for r in record["results"]]
    print(table(rows, ["strategy", "trained weights GiB", "frozen on GPU GiB", "loop peak GiB", "estimated peak GiB",
                       "optimizer"]))
    return record


if __name__ == "__main__":
    main()

"""What the GPU benchmarks share: the model folder, the images, the clock, memory and the JSON record.

Both benchmarks time the reference and the toolkit in ONE process on the same device, one
after the other, with every model freed in between; peak memory is torch's
max_memory_allocated since the run began (it includes weights, gradients and optimizer state).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402

CAPTIONS = [  # the study's caption style (Pixels Under Pressure)
    "Chest X-ray showing Cardiomegaly",
    "Chest X-ray showing Pleural Effusion, Support Devices",
    "Normal chest X-ray with no significant findings",
    "Chest X-ray showing Lung Opacity, Pneumothorax",
]


def pick_device(tiny: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        sys.exit("no CUDA device: the full benchmark needs a GPU (use --tiny for the CPU smoke run)")
    return torch.device("cpu")


def model_folder(requested: str | None, tiny: bool, scratch: Path, device: torch.device) -> Path:
    """The pipeline both sides load: SD1.5's exact architecture with random weights, or the tiny model.

    `requested` is reused when it already holds a pipeline (model_index.json), so the two
    benchmarks can share one 4.3 GB folder; otherwise it is written there (or in `scratch`).
    """
    from sdtune.models import write_sd15_random_pipeline
    from sdtune.tiny import write_tiny_pipeline

    folder = Path(requested) if requested else scratch / ("tiny-sd15" if tiny else "sd15-random")
    if (folder / "model_index.json").is_file():
        print(f"model: reusing {folder}")
        return folder
    start = time.perf_counter()
    if tiny:
        write_tiny_pipeline(folder, seed=0)
    else:
        # fp32 files, as the hub's SD1.5 ships; weights initialised on the GPU (seconds, not a minute).
        write_sd15_random_pipeline(folder, seed=0, device=device)
    print(f"model: wrote {'the tiny model' if tiny else 'SD1.5 with random weights'} to {folder} "
          f"in {time.perf_counter() - start:.0f} s")
    return folder


def write_image_folder(folder: Path, n: int, size: int, seed: int = 0, distinct: int | None = None) -> Path:
    """n phantom chest X-rays (sdtune.phantom, 8-bit grayscale JPEG, size x size) with .txt captions,
    in the tutorial's layout, which both the reference and the toolkit read. With distinct, only that
    many are drawn and the rest are copies of them, file for file (a long dataset, quickly written:
    drawing a 512 px phantom takes ~0.2 s)."""
    import shutil

    import numpy as np

    from sdtune.phantom import render_chest_xray

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    drawn = n if distinct is None else min(n, distinct)
    for i in range(n):
        if i >= drawn:
            for suffix in (".jpg", ".txt"):
                shutil.copyfile(folder / f"{i % drawn:04d}{suffix}", folder / f"{i:04d}{suffix}")
            continue
        caption = CAPTIONS[i % len(CAPTIONS)]
        findings = {name: name in caption for name in ("Cardiomegaly", "Pleural Effusion", "Lung Opacity",
                                                        "Pneumothorax", "Support Devices")}
        render_chest_xray(findings, size=size, rng=rng).save(folder / f"{i:04d}.jpg", quality=95)
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """perf_counter after each optimizer step.

    Throughput is measured between the end of the last warm-up step and the end of the last
    step, so set-up, the first step's allocations and kernel selection never count. Only those
    two ticks wait for the device (`sync_at`, 1-based; None: every tick): a wait after every
    step would stop the host from queueing the next step while the GPU finishes this one, which
    the diffusers loop does not do. The other ticks are when the host got through each step.
    train_speed also waits at the end of step 1, a warm-up step: first_step_seconds is then the
    device's time too, and the timed window is unchanged.
    """

    def __init__(self, device: torch.device, sync_at: set[int] | None = None):
        self.device = device
        self.sync_at = sync_at
        self.times: list[float] = []
        self.started: float | None = None  # when the loop began (models loaded): start()

    def start(self) -> None:
        self.started = time.perf_counter()

    def first_step_seconds(self) -> float | None:
        """The loop's start to the end of its first step: the one-off costs (compiling, cuDNN's autotuning,
        the first allocations) that the throughput leaves out. Exact when step 1 is in sync_at."""
        return self.times[0] - self.started if self.started is not None and self.times else None

    def tick(self) -> None:
        if self.sync_at is None or len(self.times) + 1 in self.sync_at:
            synchronize(self.device)
        self.times.append(time.perf_counter())

    def samples_per_second(self, warmup: int, batch_size: int) -> float | None:
        timed = len(self.times) - warmup
        if warmup < 1 or timed < 1:
            return None
        return timed * batch_size / (self.times[-1] - self.times[warmup - 1])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def start_memory(device: torch.device) -> float:
    """Free what earlier runs left, reset the peak; returns the GiB still allocated (should be ~0)."""
    free_memory(device)
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_reserved_gib(device: torch.device) -> float | None:
    """What the caching allocator held at its peak: closer than the allocated peak to what a card must have."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def quiet_libraries() -> None:
    """No loading bars or dtype-cast notices from diffusers/transformers between the benchmark's lines."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def environment(device: torch.device) -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    env = {
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "peft": peft.__version__},
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        # which card, not only which model: --reuse matches on it (older torch has no uuid)
        env["gpu_uuid"] = str(properties.uuid) if hasattr(properties, "uuid") else None
    return env


def write_json(path: str | Path, record: dict) -> None:
    """Written aside and renamed: a run cut short leaves the last complete record, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, default=str))
    partial.replace(path)


SAME_MACHINE = ("device", "host", "gpu_uuid")  # environment()'s fields naming the card a record was measured on
# The target verdict of a row whose reference was measured in another process: issue 7 wants both sides in one.
NO_VERDICT = "reference from another process: no verdict"


def earlier_records(paths: list[str] | None, pattern: str, record: dict, same: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(path, record) of earlier JSON records (files, or folders: their `pattern` files) made on the same
    host and card (device name, host name, GPU UUID), in the same mode (tiny or not), with the same `same`
    settings: what they measured stands for this run's measurement (--reuse). Others are named and
    skipped; a record without the host or UUID (older ones) does not match one with them."""
    files = [f for p in paths or [] for f in (sorted(Path(p).glob(pattern)) if Path(p).is_dir() else [Path(p)])]
    found = []
    for path in files:
        if not path.is_file():
            continue
        earlier = json.loads(path.read_text())
        if any(earlier.get(k) != record.get(k) for k in SAME_MACHINE) or earlier.get("tiny") != record["tiny"] or any(
                earlier.get("settings", {}).get(k) != record["settings"][k] for k in same):
            print(f"--reuse {path}: another machine, device or other settings; nothing reused from it")
            continue
        found.append((str(path), earlier))
    return found


def mean_se(values: list[float]) -> tuple[float, float] | None:
    """Mean and its standard error (sample std / sqrt(n)); None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (var / len(values)) ** 0.5


def ratio_se(ratio: float | None, toolkit_steps: list[float], reference_steps: list[float]) -> float | None:
    """Standard error of toolkit/reference samples/s from both sides' timed step times (the delta method:
    se(ratio)/ratio = sqrt((se_t/mean_t)^2 + (se_r/mean_r)^2))."""
    tk, ref = mean_se(toolkit_steps), mean_se(reference_steps)
    if ratio is None or tk is None or ref is None or not tk[0] or not ref[0]:
        return None
    return ratio * ((tk[1] / tk[0]) ** 2 + (ref[1] / ref[0]) ** 2) ** 0.5


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])

"""Training speed and peak memory: the reference recipe against the toolkit, in one process, on one GPU.

    python bench/train_speed.py --output train_speed.json              # one GPU, ~5 min on an H100
    python bench/train_speed.py --tiny --output /tmp/tiny.json         # CPU smoke run, ~20 s, no timing claims

For each strategy and batch size, on SD1.5's exact architecture with random weights (no
download; sdtune.models.write_sd15_random_pipeline), 512 px phantom chest X-rays:

  reference  the diffusers text_to_image loop as REFERENCE.md section 9 ran it
             (train_text_to_image.py; train_text_to_image_lora.py for LoRA/DoRA): fp32 U-Net
             weights under fp16 autocast with a GradScaler, frozen fp16 VAE and text encoder run
             every step, torch AdamW, epsilon MSE on uniform timesteps. LoRA/DoRA: frozen fp16
             U-Net, fp32 adapters. BitFit: only the fp32 U-Net's biases train. unet+vae+text: all
             three fp32 and trained, under autocast, plus the study's reconstruction MSE. Its images
             are decoded by 4 loader workers on a GPU (--reference-workers: the script's
             --dataloader_num_workers; its default 0 decodes them on the main thread, ~0.1 s a batch
             of 16 during which the GPU idles), and one epoch holds the whole run.
  toolkit    sdtune.train.train() in-process with the same strategy, rank, batch and images, and
             every option at the toolkit's default except those given in --toolkit-args.

Timing rule, the same on both sides: the device is synchronised at the end of the last warm-up
step and of the last step only (common.StepClock; the reference still waits each step where the
diffusers script does, reading its loss); samples/s = timed steps x batch / (end of the last
step - end of the last warm-up step), so
model loading, the first step's allocations and kernel selection never count, while data
loading, tokenising, VAE/text encoding and the optimizer do. Those one-off costs are recorded
apart: first_step_seconds, from the loop's start (models loaded; for the toolkit, images encoded)
to the end of the first step, compiling and cuDNN's autotuning included. The reference's
data_wait_seconds_per_step (next(loader) + the copy to the device, timed steps) shows a
host-bound reference. ratio_se: the ratio's standard error from both sides' timed step times
(delta method); a verdict within 2 of them of the target is marked "within noise". The
toolkit's checkpoint and final-model writes are switched off for the benchmark (disk speed, not training speed; the
reference writes nothing either). The toolkit encodes the images and captions of its frozen
encoders once, before its loop (sdtune.caching); that pass is outside the step clock, as a
one-off cost per dataset, and its seconds are printed and recorded beside each toolkit row.
Peak GiB: torch.cuda.max_memory_allocated and max_memory_reserved over the whole run; the memory
criterion needs the toolkit at or under the reference on both. Both sides of a judged row are
measured in this process: a reference taken from an earlier run (--reuse-references) gives no verdict.
DiffFit has no reference recipe: it is compared with the BitFit reference (both train the
biases of an fp32 U-Net; DiffFit adds norms and its scales).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (NO_VERDICT, StepClock, earlier_records, environment, fmt, free_memory, model_folder,  # noqa: E402
                    peak_gib, peak_reserved_gib, pick_device, quiet_libraries, ratio_se, start_memory, table,
                    write_image_folder, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STRATEGIES = ("unet", "lora", "dora", "bitfit", "difffit", "unet+vae+text")
REFERENCE_RECIPE = {"difffit": "bitfit"}  # no reference DiffFit exists; BitFit is the nearest recipe
# REFERENCE.md section 9: the reference recipe on one H100 at batch 16, 512 px (samples/s, peak GiB).
PUBLISHED = {"unet": (48.7, 30.5), "lora": (56.4, 19.5), "dora": (43.7, 23.8), "bitfit": (58.9, 21.1)}
# Issue 7's targets at batch 16: toolkit samples/s at least this x the reference's, at no more peak memory.
TARGETS = {"unet": 2.5, "lora": 2.5, "bitfit": 2.5, "dora": 2.0}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def default_reference_workers(device: torch.device) -> int:
    """Loader workers for the reference: 4 on a GPU, so that decoding does not hold it up; none on the CPU."""
    return 4 if device.type == "cuda" else 0


DISTINCT_IMAGES = {False: 32, True: 8}  # phantoms drawn (GPU run, --tiny); the rest of --images are copies


# ------------------------------------------------------------------------------- the reference


class ReferenceImages(torch.utils.data.Dataset):
    """The script's preprocessing: RGB, Resize (bilinear) + CenterCrop, ToTensor, Normalize(0.5, 0.5);
    captions tokenised to 77 ids in the dataset, as its preprocess_train does."""

    def __init__(self, folder: Path, tokenizer, resolution: int):
        from torchvision import transforms

        self.images = sorted(folder.glob("*.jpg"))
        self.captions = [p.with_suffix(".txt").read_text().strip() for p in self.images]
        self.tokenizer = tokenizer
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        with Image.open(self.images[i]) as image:
            pixel_values = self.transform(image.convert("RGB"))
        ids = self.tokenizer(self.captions[i], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixel_values, "input_ids": ids}


def reference_collate(examples: list[dict]) -> dict:
    pixel_values = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}


def reference_run(model_dir: Path, recipe: str, images: Path, batch_size: int, resolution: int, steps: int,
                  precision: str, device: torch.device, lora_rank: int, seed: int = 0, warmup: int | None = None,
                  workers: int = 0) -> dict:
    """One run of the reference loop; returns the step clock, losses and trainable-parameter count.

    workers: the script's --dataloader_num_workers (its default is 0: images decoded on the main thread,
    while the GPU, done with the step the grad scaler waited for, idles). With workers they stay up
    across epochs (the script restarts them each epoch: a cost the reference is spared)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    weight_dtype = HALF[precision]  # what the frozen parts are cast to (the script's weight_dtype)
    amp = precision != "no"
    trains_all = recipe == "unet+vae+text"

    # ---- models, as the scripts load and cast them
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae.requires_grad_(trains_all)
    text_encoder.requires_grad_(trains_all)
    if recipe in ("lora", "dora"):  # train_text_to_image_lora.py
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS, use_dora=recipe == "dora"))
        if precision == "fp16":
            cast_training_params(unet, dtype=torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
        # The script clips `filter(...)` after the optimizer consumed it: an empty iterator (STYLE.md).
        clipped: list = []
    elif recipe == "bitfit":
        unet.requires_grad_(False)
        params = [p for name, p in unet.named_parameters() if name.endswith(".bias")]
        for p in params:
            p.requires_grad_(True)
        clipped = params
    elif recipe in ("unet", "unet+vae+text"):
        params = list(unet.parameters()) + (list(vae.parameters()) + list(text_encoder.parameters()) if trains_all else [])
        clipped = params
    else:
        raise ValueError(f"unsupported reference recipe {recipe!r}")
    unet.to(device).train()
    frozen_dtype = torch.float32 if trains_all else weight_dtype
    vae.to(device, dtype=frozen_dtype)
    text_encoder.to(device, dtype=frozen_dtype)
    if trains_all:
        vae.train()
        text_encoder.train()

    # ---- optimizer and data: the scripts' defaults
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if workers:  # the Rust tokenizer would warn in each forked worker once the toolkit side has used its threads
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(ReferenceImages(images, tokenizer, resolution), batch_size=batch_size,
                                         shuffle=True, collate_fn=reference_collate, num_workers=workers,
                                         persistent_workers=workers > 0)
    autocast = lambda on: torch.autocast(device.type, dtype=weight_dtype, enabled=amp and on)  # noqa: E731
    scale = vae.config.scaling_factor

    # ---- the loop
    clock, losses, waits, step = StepClock(device, {1, warmup, steps} if warmup else None), [], [], 0
    clock.start()
    batches = iter(loader)
    while step < steps:
        waited = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # the epoch ended: the script's next epoch
            batches = iter(loader)
            batch = next(batches)
        # accelerate's prepared loader moves the fp32 batch to the device (blocking: the script pins no
        # memory); the cast to weight_dtype runs there, not on the host
        pixel_values, input_ids = batch["pixel_values"].to(device), batch["input_ids"].to(device)
        waits.append(time.perf_counter() - waited)
        pixel_values = pixel_values.to(frozen_dtype)
        with autocast(trains_all):  # all three trained: the whole step under autocast
            latents = vae.encode(pixel_values).latent_dist.sample() * scale
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            with autocast(True):  # accelerate runs the prepared U-Net's forward under autocast
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            if trains_all:  # the study's VAE term
                decoded = vae.decode(latents / scale, return_dict=False)[0]
                loss = loss + F.mse_loss(decoded.float(), pixel_values.float())
        losses.append(loss.item())  # the script's train_loss += avg_loss.item()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # accelerator.clip_grad_norm_ unscales, then clips
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        scaler.step(optimizer)  # skips the update on non-finite gradients (counted after the loop:
        scaler.update()         # reading the scale here would wait for the GPU every step)
        lr_scheduler.step()
        optimizer.zero_grad()
        clock.tick()
        step += 1
    taken = int(optimizer.state[params[0]].get("step", 0)) if optimizer.state.get(params[0]) else 0
    timed_waits = waits[warmup or 0:]  # the steps inside the timed window
    return {"clock": clock, "losses": losses, "skipped_steps": steps - taken,
            "trainable_parameters": sum(p.numel() for p in params), "loader_workers": workers,
            # next(loader) + the copy to the device: a host-bound reference shows here
            "data_wait_seconds_per_step": sum(timed_waits) / len(timed_waits) if timed_waits else None}


# ------------------------------------------------------------------------------- the toolkit


class _ProgressClock:
    """Stands in for tqdm inside sdtune.train: the loop calls update(1) once per optimizer step."""

    clock: StepClock | None = None

    def __init__(self, *args, **kwargs):
        self.clock.start()  # sdtune.train makes its bar just before the loop: models loaded, images encoded

    def update(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.tick()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def patched(module, **replacements):
    missing = [name for name in replacements if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"{module.__name__} has no {', '.join(missing)} any more: update bench/train_speed.py")
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def fresh_accelerator():
    """Around one in-process training run: accelerate keeps its state in class-level singletons, so the
    next run would otherwise inherit this one's accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def toolkit_run(model_dir: Path, strategy: str, images: Path, batch_size: int, resolution: int, steps: int,
                precision: str, device: torch.device, lora_rank: int, out_dir: Path, extra: list[str],
                seed: int = 0, warmup: int | None = None) -> dict:
    """sdtune.train.train() as train_text_to_image.py calls it, with a clock on its progress bar."""
    import sdtune.train as training

    argv = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(images),
            "--resolution", str(resolution), "--strategy", strategy, "--train_batch_size", str(batch_size),
            "--max_train_steps", str(steps), "--mixed_precision", precision, "--lora_rank", str(lora_rank),
            "--lora_alpha", str(lora_rank), "--seed", str(seed), "--output_dir", str(out_dir), "--report_to", "none",
            "--checkpointing_steps", str(10**9), *extra]
    clock = StepClock(device, {1, warmup, steps} if warmup else None)
    _ProgressClock.clock = clock
    log = io.StringIO()
    noop = lambda *args, **kwargs: None  # noqa: E731
    try:
        with fresh_accelerator(), patched(training, tqdm=_ProgressClock, save_checkpoint=noop,
                                          save_final_model=noop), contextlib.redirect_stdout(log):
            summary, models = training.train(*training.parse_args(argv))
        del models
    except BaseException:
        print(log.getvalue(), end="")  # the toolkit's own messages say what went wrong
        raise
    if "interrupted" in summary:
        # The loop caught the time limit's SIGINT and stopped early: not a measurement; stop as Python would.
        raise KeyboardInterrupt(f"training interrupted by {summary['interrupted']} after {summary['steps']} steps")
    return {"clock": clock, "losses": [summary.get("final_loss")], "skipped_steps": summary.get("skipped_nonfinite_steps"),
            "log_tail": log.getvalue()[-1500:],  # the toolkit's own start-up lines (strategy, batch, trainable)
            "trainable_parameters": summary.get("trainable_parameters", {}).get("total"),
            "summary_samples_per_second": summary.get("samples_per_second"),
            "summary_peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            # latents/captions encoded once before the loop: outside the step clock, reported beside it
            "encoded_once": summary.get("encoded_once"), "optimizer": summary.get("optimizer")}


# ------------------------------------------------------------------------------- one measurement


def _backend_flags() -> tuple:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def _restore_backend_flags(flags: tuple) -> None:
    """A run may switch on TF32 or cudnn.benchmark; the next run starts from the process's defaults."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def measure(run, device: torch.device, warmup: int, batch_size: int, flags: tuple, **kwargs) -> dict:
    """Run one side; a failure (e.g. out of memory) is recorded and the benchmark goes on."""
    _restore_backend_flags(flags)
    torch._dynamo.reset()  # a compiled run's caches and graphs do not carry into the next run's peak
    leftover = start_memory(device)
    start = time.perf_counter()
    try:
        result = run(device=device, batch_size=batch_size, warmup=warmup, **kwargs)
    except Exception as err:  # noqa: BLE001  (recorded, not swallowed: it goes into the JSON and the table)
        if not isinstance(err, torch.cuda.OutOfMemoryError):
            traceback.print_exc()
        result = {"error": "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError)
                  else f"{type(err).__name__}: {err}".splitlines()[0]}
    result.update(peak_gib=peak_gib(device), peak_reserved_gib=peak_reserved_gib(device), seconds=time.perf_counter() - start, leftover_gib_at_start=round(leftover, 3))
    clock = result.pop("clock", None)
    if clock is not None and "steps" in kwargs and len(clock.times) != kwargs["steps"]:
        result["error"] = f"{len(clock.times)} of {kwargs['steps']} steps ran"  # never a figure from a cut run
    if clock is not None:
        result.update(samples_per_second=clock.samples_per_second(warmup, batch_size),
                      step_seconds=[round(b - a, 4) for a, b in zip(clock.times, clock.times[1:])],
                      first_step_seconds=clock.first_step_seconds())
    free_memory(device)  # outside the except block, so the exception's frames (and tensors) are gone
    return result


def note(result: dict) -> str:
    if "error" in result:
        return f"  ERROR {result['error']}"
    return f"  ({result['skipped_steps']} steps skipped: non-finite gradients)" if result.get("skipped_steps") else ""


def encoded(result: dict) -> str:
    once = result.get("encoded_once") or {}
    return f"; encoded once in {once['seconds']:.1f} s ({once['latents']})" if "seconds" in once else ""


def named(extra: str) -> str:
    return f" [{extra}]" if extra else ""


def toolkit_args_of(row: dict, record: dict) -> str:
    """The flags a row's toolkit ran with: its own (several sets a run), else its run's one set (older JSON)."""
    return row.get("toolkit_args", record["settings"].get("toolkit_args") or "")


def ratio(a, b):
    return a / b if a is not None and b else None


def judge(row: dict, timed_steps: int, target: float | None) -> dict:
    """The ratio's standard error and, where a target applies, the verdict: speed, and peak memory both
    allocated and reserved. A reference measured in another process (--reuse-references) gets none:
    the issue wants both sides measured in one process; nor does a toolkit run that skipped steps
    (non-finite gradients, e.g. from an attention kernel gone wrong): skipped updates are cheaper."""
    ref, tk, speedup = row["reference"], row["toolkit"], row["ratio"]
    # the timed steps' times (the warm-up's come first in step_seconds)
    steps = lambda side: (side.get("step_seconds") or [])[-timed_steps:]  # noqa: E731
    row["ratio_se"] = ratio_se(speedup, steps(tk), steps(ref))
    if target is None:
        return row
    row["target_ratio"] = target
    if ref.get("reused_from"):
        row.update(meets_target=None, no_verdict=NO_VERDICT)
        return row
    if tk.get("skipped_steps"):  # steps without an update are cheaper: not the training that was asked for
        row.update(meets_target=None, no_verdict=f"the toolkit skipped {tk['skipped_steps']} steps (non-finite "
                                                 "gradients): no verdict")
        return row
    memory_missed = [kind for kind, key in (("allocated", "peak_gib"), ("reserved", "peak_reserved_gib"))
                     if tk.get(key) is None or ref.get(key) is None or tk[key] > ref[key]]
    row.update(meets_target=speedup is not None and speedup >= target and not memory_missed,
               speed_met=speedup is not None and speedup >= target, memory_missed=memory_missed,
               # one of two runs of the same code could fall on the other side of the target
               within_noise=row["ratio_se"] is not None and speedup is not None
               and abs(speedup - target) < 2 * row["ratio_se"])
    return row


def verdict(row: dict) -> str:
    """The target column: met/missed, what missed, and whether the ratio is within noise of the target."""
    if "target_ratio" not in row:
        return ""
    if row.get("meets_target") is None or row["reference"].get("reused_from"):
        return row.get("no_verdict", NO_VERDICT)
    text = f"{row['target_ratio']:.1f}x {'met' if row['meets_target'] else 'missed'}"
    missed = (["speed"] if row.get("speed_met") is False else []) + [f"{m} peak" for m in row.get("memory_missed", [])]
    if missed and not row["meets_target"]:
        text += f" ({', '.join(missed)})"
    return text + (" within noise" if row.get("within_noise") else "")


# Settings that must match for an earlier run's measurement to stand for this run's.
SAME_SETTINGS = ("resolution", "warmup_steps", "timed_steps", "reference_precision", "lora_rank", "images",
                 "reference_workers")


def earlier_measurements(paths: list[str] | None, record: dict) -> tuple[dict, dict]:
    """What earlier train_speed JSON files measured on the same machine and card with the same settings:
    references keyed (recipe, batch), and finished toolkit rows keyed (strategy, batch, precision,
    toolkit args). A run cut short then goes on where it stopped (--reuse: rows, each with the reference
    it was measured beside); a reference alone stands for this run's only with --reuse-references, and
    its rows get no verdict. Failed measurements are measured again."""
    references, rows = {}, {}
    for path, earlier in earlier_records(paths, "train_speed*.json", record, SAME_SETTINGS):
        for row in earlier.get("results", []):
            ref, tk = row["reference"], row["toolkit"]
            if "error" not in ref and ref.get("samples_per_second") is not None:
                references.setdefault((ref["recipe"], row["batch_size"]), {"reused_from": path, **ref})
            if "error" not in tk and tk.get("samples_per_second") is not None:
                key = (row["strategy"], row["batch_size"], row["toolkit_mixed_precision"], toolkit_args_of(row, earlier))
                rows.setdefault(key, {**row, "reused_from": path})
    return references, rows


def estimate_minutes(strategies, batch_sizes, precisions, total_steps) -> float:
    """Rough H100 wall time: ~10 s of loading per run, steps at about the published reference speed."""
    seconds = 60.0  # imports, images, the 4.3 GB model folder
    for b in batch_sizes:
        for s in strategies:
            rate = PUBLISHED.get(REFERENCE_RECIPE.get(s, s), (15.0 if s == "unet+vae+text" else 50.0, 0))[0]
            step = max(b / rate, 0.08)
            seconds += (1 + len(precisions)) * (10 + total_steps * step)
    return seconds / 60


# ------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model at 64 px (no timing claims)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 16 1 (tiny: 2)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (tiny: 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 10; tiny: 2)")
    p.add_argument("--mixed-precision", nargs="+", default=["bf16"], choices=("fp16", "bf16", "no"),
                   help="the toolkit's --mixed_precision, one toolkit run each (default bf16: autocast without a "
                        "grad scaler; add fp16 to measure the scaler's path too; CPU: no)")
    p.add_argument("--reference-precision", default=None, choices=("fp16", "bf16", "no"),
                   help="the reference recipe's precision (default fp16, as section 9 ran it; CPU: no)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA/DoRA rank (alpha = rank on both sides)")
    p.add_argument("--images", type=int, default=None,
                   help="phantom X-rays in the dataset (default: enough for one epoch to hold every step of the "
                        "largest batch, so no loader waits at an epoch's start; 32 distinct, the rest copies)")
    p.add_argument("--reference-workers", type=int, default=None,
                   help="the reference's --dataloader_num_workers (default 4 on a GPU, so that decoding images does "
                        "not hold up its GPU; 0 is the script's default, images decoded on the main thread)")
    p.add_argument("--toolkit-args", nargs="+", default=[""],
                   help="extra train_text_to_image.py flags for the toolkit side, e.g. \"--allow_tf32 true\"; several "
                        "sets, one toolkit row each against the same reference (\"\" for the defaults). A set that is "
                        "one flag alone needs its value (\"--channels_last true\"): argparse reads a lone --flag as "
                        "an option of this script")
    p.add_argument("--model-dir", default=None, help="SD1.5-architecture folder to reuse, or to write once and keep")
    p.add_argument("--reuse", nargs="+", default=None, metavar="JSON_OR_DIR",
                   help="earlier train_speed JSON files (a folder: its train_speed*.json): their finished rows measured on "
                        "this machine and card with the same settings (strategy, batch, precision, --toolkit-args) are "
                        "not measured again, so a run cut short goes on where it stopped")
    p.add_argument("--reuse-references", action="store_true",
                   help="also take references from the --reuse files instead of measuring them: saves GPU time, but "
                        "the rows judged against them get no target verdict (the issue wants one process)")
    p.add_argument("--output", default="train_speed.json", help="JSON record, rewritten after every run")
    args = p.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (("batch_sizes", [16, 1], [2]), ("resolution", 512, 64), ("warmup", 3, 1),
                              ("steps", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.images is None:  # one epoch for the whole run (a compiled run also needs at least one full batch)
        args.images = max(8 if tiny else 32, max(args.batch_sizes) * (args.warmup + args.steps))
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the clock starts at the end of the warm-up)")
    if args.reference_workers is not None and args.reference_workers < 0:
        p.error("--reference-workers must be 0 or more")
    return args


def run_order(strategies, batch_sizes) -> list[tuple[int, str]]:
    """Batch sizes in the order given, U-Net+VAE+text last: the heaviest runs (which may not fit) come after the rest."""
    pairs = [(b, s) for b in batch_sizes for s in strategies]
    return sorted(pairs, key=lambda pair: pair[1] == "unet+vae+text")  # stable: the order is otherwise kept


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.tiny)
    total_steps = args.warmup + args.steps
    precisions = args.mixed_precision
    if device.type == "cpu":
        # BitFit/DiffFit refuse half precision on the CPU (sdtune.train), and CPU fp16 kernels are slow:
        # the CPU run checks code paths only, in fp32, on one thread (the tiny model's ops gain nothing from more).
        precisions = ["no"]
        args.reference_precision = args.reference_precision or "no"
        torch.set_num_threads(1)
    args.reference_precision = args.reference_precision or "fp16"
    if args.reference_workers is None:
        args.reference_workers = default_reference_workers(device)
    order = run_order(args.strategies, args.batch_sizes)
    flags = _backend_flags()
    quiet_libraries()
    env = environment(device)
    print(f"train_speed: {env['device']}; torch {env['versions']['torch']}, diffusers {env['versions']['diffusers']}, "
          f"peft {env['versions']['peft']}")
    print(f"{len(order)} (strategy, batch) pairs x (reference + toolkit {'/'.join(precisions)}) at {args.resolution} px; "
          f"{args.warmup} warm-up + {args.steps} timed steps each")
    if not args.tiny:
        print(f"estimated wall time on one H100: ~{estimate_minutes(args.strategies, args.batch_sizes, precisions, total_steps):.0f} min")
    else:
        print("tiny model on the CPU: checks that every code path runs; the numbers mean nothing")

    record = {"benchmark": "train_speed", "tiny": args.tiny, **env,
              "settings": {"resolution": args.resolution, "batch_sizes": args.batch_sizes, "warmup_steps": args.warmup,
                           "timed_steps": args.steps, "strategies": args.strategies, "toolkit_mixed_precision": precisions,
                           "reference_precision": args.reference_precision, "lora_rank": args.lora_rank,
                           "lora_alpha": args.lora_rank, "images": args.images, "distinct_images": DISTINCT_IMAGES[args.tiny],
                           "reference_workers": args.reference_workers, "toolkit_args": args.toolkit_args,
                           "timing_rule": "device synchronised at the end of the last warm-up step and of the last "
                                          "step; samples/s = timed steps x "
                                          "batch / (end of last step - end of last warm-up step)",
                           "reference_recipe_of": REFERENCE_RECIPE, "reuse": args.reuse,
                           "reuse_references": args.reuse_references},
              "published_reference_h100_batch16": {k: {"samples_per_second": v[0], "peak_gib": v[1]} for k, v in PUBLISHED.items()},
              "results": [], "status": "running"}
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as scratch:
        scratch = Path(scratch)
        model_dir = model_folder(args.model_dir, args.tiny, scratch, device)
        images = write_image_folder(scratch / "images", args.images, args.resolution, distinct=DISTINCT_IMAGES[args.tiny])
        common = dict(model_dir=model_dir, images=images, resolution=args.resolution, steps=total_steps,
                      lora_rank=args.lora_rank)
        references, done = earlier_measurements(args.reuse, record)
        if not args.reuse_references:
            references = {}  # each reference is measured beside its toolkit rows, in this process
        announced = set()
        for n, (batch, strategy) in enumerate(order, 1):
            recipe = REFERENCE_RECIPE.get(strategy, strategy)
            todo = []
            for extra, precision in [(extra, precision) for extra in args.toolkit_args for precision in precisions]:
                row = done.get((strategy, batch, precision, extra))
                if row is None:
                    todo.append((extra, precision))
                    continue
                # judged again by this version's rules (an older row may have been judged against a reused reference)
                row = judge(dict(row), args.steps, TARGETS[strategy] if "target_ratio" in row else None)
                record["results"].append(row)
                print(f"[{n}/{len(order)}] toolkit   {strategy:13s} batch {batch:2d} {precision}{named(extra)}: "
                      f"{fmt(row['toolkit'].get('samples_per_second'))} samples/s, x{fmt(row['ratio'], '.2f')} the "
                      f"reference (reused from {row['reused_from']})", flush=True)
                write_json(args.output, record)
            if not todo:
                continue
            if (recipe, batch) not in references:
                ref = measure(reference_run, device, args.warmup, batch, flags, recipe=recipe,
                              precision=args.reference_precision, workers=args.reference_workers, **common)
                references[(recipe, batch)] = {"recipe": recipe, **ref}
                print(f"[{n}/{len(order)}] reference {recipe:13s} batch {batch:2d}: "
                      f"{fmt(ref.get('samples_per_second'))} samples/s, peak {fmt(ref.get('peak_gib'), '.2f')} GiB, "
                      f"data wait {fmt(ref.get('data_wait_seconds_per_step'), '.3f')} s/step" + note(ref), flush=True)
            elif (recipe, batch) not in announced:
                ref = references[(recipe, batch)]
                print(f"[{n}/{len(order)}] reference {recipe:13s} batch {batch:2d}: "
                      f"{fmt(ref.get('samples_per_second'))} samples/s (reused from {ref['reused_from']})", flush=True)
            announced.add((recipe, batch))
            ref = references[(recipe, batch)]
            for k, (extra, precision) in enumerate(todo):
                out_dir = scratch / f"toolkit-{strategy}-{batch}-{precision}-{k}"
                tk = measure(toolkit_run, device, args.warmup, batch, flags, strategy=strategy, precision=precision,
                             out_dir=out_dir, extra=shlex.split(extra), **common)
                speedup = ratio(tk.get("samples_per_second"), ref.get("samples_per_second"))
                row = {"strategy": strategy, "batch_size": batch, "toolkit_mixed_precision": precision,
                       "toolkit_args": extra, "reference": ref, "toolkit": tk, "ratio": speedup,
                       "memory_ratio": ratio(tk.get("peak_gib"), ref.get("peak_gib"))}
                targeted = batch == 16 and strategy in TARGETS and not args.tiny
                judge(row, args.steps, TARGETS[strategy] if targeted else None)
                record["results"].append(row)
                print(f"[{n}/{len(order)}] toolkit   {strategy:13s} batch {batch:2d} {precision}{named(extra)}: "
                      f"{fmt(tk.get('samples_per_second'))} samples/s, peak {fmt(tk.get('peak_gib'), '.2f')} GiB, "
                      f"x{fmt(speedup, '.2f')} (se {fmt(row['ratio_se'], '.2f')}) the reference" + encoded(tk)
                      + (f"; {verdict(row)}" if verdict(row) else "") + note(tk), flush=True)
                record["total_seconds"] = time.perf_counter() - begin
                write_json(args.output, record)
    record["status"] = "complete"
    record["total_seconds"] = time.perf_counter() - begin
    write_json(args.output, record)
    print_table(record)
    print(f"{record['total_seconds']:.0f} s in all; JSON in {args.output}")
    return record


def print_table(record: dict) -> None:
    rows = []
    for r in record["results"]:
        ref, tk = r["reference"], r["toolkit"]
        name = r["strategy"] + (f" (vs {ref['recipe']})" if ref["recipe"] != r["strategy"] else "")
        peaks = lambda side: f"{fmt(side.get('peak_gib'), '.2f')}/{fmt(side.get('peak_reserved_gib'), '.2f')}"  # noqa: E731
        rows.append([name, r["batch_size"], r["toolkit_mixed_precision"] + named(toolkit_args_of(r, record)),
                     fmt(ref.get("samples_per_second")),
                     fmt(tk.get("samples_per_second")), fmt(r["ratio"], ".2f"), fmt(r.get("ratio_se"), ".3f"),
                     peaks(ref), peaks(tk), fmt(ref.get("data_wait_seconds_per_step"), ".3f"),
                     fmt(ref.get("first_step_seconds")), fmt(tk.get("first_step_seconds")), verdict(r),
                     ref.get("error") or tk.get("error") or ""])
    print()
    print(table(rows, ["strategy", "batch", "toolkit", "ref samples/s", "toolkit samples/s", "toolkit/ref", "se",
                       "ref peak GiB alloc/reserved", "toolkit peak GiB alloc/reserved", "ref data wait s/step",
                       "ref first step s", "toolkit first step s", "target", "error"]))
    print(f"({record['device']}; reference precision {record['settings']['reference_precision']}, "
          f"{record['settings'].get('reference_workers', 0)} loader workers; "
          f"{record['settings']['warmup_steps']} warm-up + {record['settings']['timed_steps']} timed steps)")


if __name__ == "__main__":
    result = main()
    failed = [r for r in result["results"] if "error" in r["reference"] or "error" in r["toolkit"]]
    sys.exit(1 if failed and result["tiny"] else 0)

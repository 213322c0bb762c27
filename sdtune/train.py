"""Fine-tune SD1.5 with any strategy of the table: one loop, read top to bottom.

Set-up resolves every option once (strategy, learning rates, dtypes, trainable parameters);
the loop then only computes the loss, steps, logs and checkpoints. Entry point:
`train_text_to_image.py`, launched with `accelerate launch` for one or many GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType,
                               InitProcessGroupKwargs, ProjectConfiguration, set_seed)
from tqdm.auto import tqdm

from sdtune import SD15_MODEL_ID
from sdtune.adapters import ADAPTERS, AdapterConfig, get_adapter
from sdtune.checkpoints import StepCounters, checkpoint_steps, register_checkpoint_hooks
from sdtune.config import ArgumentParser, check_bounds, field
from sdtune.caching import (MEMORY_LIMIT_BYTES, CachedLatentDataset, LatentStore, TextEmbeddingCache, cache_latents,
                            sample_latents)
from sdtune.data.dataset import (DataConfig, ImageCaptionDataset, load_examples, modality_of, split_examples,
                                 table_format)
from sdtune.data.splits import held_out_name
from sdtune.errors import UserError
from sdtune.loss import LatentEncoder, diffusion_loss, drops_caption, reconstruction_loss, sample_seeds
from sdtune.models import (COMPILE_MODES, SDPA_BACKENDS, check_compile_backend, check_compile_mode, current_model_id,
                           load_components, sdpa_preference)
from sdtune.processes import launched_without_cuda
from sdtune.provenance import package_versions
from sdtune.strategies import COMPONENTS, STRATEGIES, Strategy, apply_strategy, count_parameters, resolve_strategy

SD15_TOTAL_PARAMETERS = 859_520_964 + 83_653_863 + 123_060_480  # U-Net + VAE + text encoder


@dataclass
class TrainConfig:
    """Model, strategy, optimisation, precision and output settings of a training run."""

    # model
    pretrained_model_name_or_path: str = field(SD15_MODEL_ID, "hub id or local diffusers folder of the base model")
    revision: str | None = field(None, "hub revision of the base model")
    variant: str | None = field(None, "weights variant of the base model, e.g. fp16")
    # what trains
    strategy: str | None = field(None, "a row of the study's table", choices=tuple(STRATEGIES))
    train_unet: bool = field(False, "custom run: train the whole U-Net")
    train_text_encoder: bool = field(False, "custom run: train the text encoder")
    train_vae: bool = field(False, "custom run: train the VAE")
    peft: str | None = field(None, "custom run: a PEFT adapter on the U-Net", choices=tuple(ADAPTERS))
    # optimisation
    learning_rate: float | None = field(None, "learning rate of every trained component (default: the strategy's)",
                                        bounds=">=0")
    unet_lr: float | None = field(None, "U-Net (or U-Net adapter) learning rate (default: --learning_rate, else the strategy's)",
                                  bounds=">=0")
    text_encoder_lr: float | None = field(None, "text encoder learning rate (default: --learning_rate, else the strategy's)",
                                          bounds=">=0")
    vae_lr: float | None = field(None, "VAE learning rate (default: --learning_rate, else the strategy's)", bounds=">=0")
    adam_beta1: float = field(0.9, "AdamW beta1", bounds="0..<1")
    adam_beta2: float = field(0.999, "AdamW beta2", bounds="0..<1")
    adam_weight_decay: float = field(1e-2, "AdamW decoupled weight decay", bounds=">=0")
    adam_epsilon: float = field(1e-8, "AdamW epsilon", bounds=">0")
    use_8bit_adam: bool = field(False, "8-bit AdamW from bitsandbytes: a quarter of AdamW's optimizer memory")
    paged_optimizer: bool = field(False, "bitsandbytes' paged AdamW (8-bit with --use_8bit_adam): on a GPU that runs "
                                  "short, optimizer state waits in CPU memory instead of failing (CUDA unified memory)")
    lr_scheduler: str = field("constant", "learning-rate schedule", choices=(
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = field(0, "warm-up steps of the schedule", bounds=">=0")
    max_grad_norm: float = field(1.0, "clip the gradient norm of ALL trainable parameters to this (0: no clipping)",
                                 bounds=">=0")
    train_batch_size: int = field(4, "images per device per micro-step", bounds=">=1")
    gradient_accumulation_steps: int = field(1, "micro-steps per optimizer step", bounds=">=1")
    max_train_steps: int | None = field(None, "optimizer steps to train (overrides --num_train_epochs)", bounds=">=1")
    num_train_epochs: int = field(1, "passes over the data when --max_train_steps is not given", bounds=">=1")
    seed: int = field(42, "seed of noise, timesteps, caption dropout and data order", bounds="seed")
    # diffusion objective
    prediction_type: str | None = field(None, "training target (default: the model's scheduler's)",
                                        choices=("epsilon", "v_prediction"))
    snr_gamma: float | None = field(None, "min-SNR weighting gamma (Hang et al. 2023; 5.0 is typical); none: plain MSE",
                                    bounds=">0")
    noise_offset: float = field(0.0, "offset-noise strength (0.05-0.1 typical); 0 is off", bounds=">=0")
    caption_dropout_prob: float = field(0.0, "probability of training on the empty prompt, for classifier-free guidance",
                                        bounds="0..1")
    vae_recon_weight: float = field(1.0, "weight of the VAE reconstruction MSE when the VAE trains", bounds=">=0")
    use_ema: bool = field(False, "keep an exponential moving average of the trained weights; it is what gets saved")
    ema_decay: float = field(0.9999, "EMA decay", bounds="0..1")
    # precision and memory
    mixed_precision: str = field("no", "autocast precision; trained weights stay fp32, frozen parts run in it",
                                 choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass to save memory")
    allow_tf32: bool = field(False, "TF32 matmuls on Ampere+ GPUs")
    enable_xformers_memory_efficient_attention: bool = field(False, "use xFormers attention (default: PyTorch SDPA)")
    memory_profile: str = field("default", "low: the set that fits every strategy in 12 GiB at batch 1, 512 px "
                                "(8-bit AdamW, gradient checkpointing, frozen encoders cached and moved off the GPU)",
                                choices=("default", "low"))
    # speed
    cache_latents: bool = field(True, "encode each image once before training when the VAE is frozen and "
                                "preprocessing is deterministic (centre crop, no flips); the VAE then leaves the GPU")
    latent_cache_dir: str | None = field(None, "keep cached latents in this folder (one file per image, reused by later "
                                         "runs on the same data and VAE) instead of in memory")
    cache_text_embeddings: bool = field(True, "encode each distinct caption once before training when the text encoder "
                                        "is frozen; it then leaves the GPU")
    fused_adam: bool | None = field(None, "torch's fused AdamW kernel (default: on for GPUs)")
    channels_last: bool = field(False, "U-Net (and a trained VAE) in channels_last memory layout, faster convolutions on "
                                       "GPUs; with --torch_compile (eagerly, a GroupNorm that returns NCHW converts it)")
    cudnn_benchmark: bool | None = field(None, "let cuDNN time its convolution algorithms once per batch shape "
                                         "(torch.backends.cudnn.benchmark; default: on with CUDA)")
    torch_compile: bool = field(False, "torch.compile the U-Net with static shapes (the last partial batch of each "
                                "epoch is dropped, so nothing recompiles)")
    torch_compile_backend: str = field("inductor", "torch.compile backend")
    sdpa_backend: str = field("auto", "attention kernel PyTorch's SDPA tries first: cudnn, flash, efficient or math "
                              "(the rest stay as fallbacks); auto keeps torch's order (flash first, cuDNN last)",
                              choices=tuple(SDPA_BACKENDS))
    torch_compile_mode: str | None = field(None, "torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's)",
                                           choices=COMPILE_MODES)
    dataloader_num_workers: int | None = field(None, "data loading worker processes (default: 0 on CPU, "
                                               "up to 8 per GPU process)", bounds=">=0")
    # outputs
    output_dir: str = field("outputs", "run folder: checkpoint-STEP/, final_model/, training_summary.json")
    logging_dir: str = field("logs", "tensorboard folder, relative to --output_dir")
    report_to: str = field("tensorboard", "where to log", choices=("tensorboard", "wandb", "none"))
    overwrite_output_dir: bool = field(False, "replace the run already in --output_dir (default: refuse, unless resuming)")
    checkpointing_steps: int = field(500, "save a resumable checkpoint every N optimizer steps", bounds=">=1")
    checkpoints_total_limit: int | None = field(None, "keep at most this many checkpoints (oldest deleted)",
                                                bounds=">=1")
    resume_from_checkpoint: str | None = field(None, "'latest' or a checkpoint-STEP folder to continue from")
    validation_prompts: list[str] | None = field(None, "prompts rendered every --validation_steps into the logs")
    validation_steps: int = field(500, "render the validation prompts every N optimizer steps", bounds=">=1")
    validation_inference_steps: int = field(25, "denoising steps of validation images", bounds=">=1")
    validation_fid_steps: int = field(0, "every N optimizer steps, log the FID of --validation_fid_images images "
                                      "(prompts cycled from --validation_prompts) against --validation_real; 0 is off", bounds=">=0")
    validation_real: str | None = field(None, "real images for the validation FID: a folder, a table or a metadata file")
    validation_fid_images: int = field(64, "images generated for each validation FID (fixed seeds, so runs compare)",
                                       bounds=">=1")
    max_nonfinite_steps: int = field(25, "stop after this many consecutive steps with NaN/inf gradients (each is skipped)",
                                     bounds=">=1")


def resolve_learning_rates(cfg: TrainConfig, strategy: Strategy) -> dict[str, float]:
    """Per-component learning rate: the component's flag, else --learning_rate, else the strategy's."""
    defaults = {"unet": strategy.unet_lr, "text_encoder": strategy.text_encoder_lr, "vae": strategy.vae_lr}
    given = {"unet": cfg.unet_lr, "text_encoder": cfg.text_encoder_lr, "vae": cfg.vae_lr}
    return {c: next(v for v in (given[c], cfg.learning_rate, defaults[c]) if v is not None) for c in COMPONENTS}


# What `--memory_profile low` turns on. With 8-bit AdamW the optimizer state is a quarter of
# AdamW's, and paged, it can wait in CPU memory while the backward pass needs the GPU's (U-Net +
# VAE + text encoder at 512 px: ~10 GiB of weights, gradients and state before activations);
# checkpointing trades a second forward for the activations; the cached encoders leave the GPU
# (the defaults already cache them).
MEMORY_PROFILES = {"default": {}, "low": {"use_8bit_adam": True, "paged_optimizer": True, "gradient_checkpointing": True,
                                          "cache_latents": True, "cache_text_embeddings": True}}


def apply_memory_profile(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The config with the profile's settings on; returns (config, the settings it changed)."""
    changed = {k: v for k, v in MEMORY_PROFILES[cfg.memory_profile].items() if getattr(cfg, k) != v}
    return replace(cfg, **changed), changed


def optimizer_class(cfg: TrainConfig, device_type: str) -> tuple[type, dict]:
    """AdamW as asked: torch's (fused on GPUs), or bitsandbytes' 8-bit and/or paged one. Returns (class, kwargs)."""
    paged = cfg.paged_optimizer and device_type == "cuda"  # paging is CUDA unified memory; nothing to page on a CPU
    if cfg.use_8bit_adam or paged:
        import bitsandbytes as bnb

        return getattr(bnb.optim, ("Paged" if paged else "") + "AdamW" + ("8bit" if cfg.use_8bit_adam else "")), {}
    # One kernel for all parameters instead of a dozen per tensor group.
    return torch.optim.AdamW, {"fused": cfg.fused_adam if cfg.fused_adam is not None else device_type == "cuda"}


def page_optimizer_state(optimizer) -> int:
    """Put a paged optimizer's loaded state back in pages; returns how many tensors moved.

    bitsandbytes allocates a paged optimizer's moments in CUDA unified memory (which can wait in CPU
    memory while the GPU runs short) and lists them in its page manager. A checkpoint's moments load
    as ordinary tensors that still carry the saved `is_paged` flag, so bitsandbytes would neither
    move them to the GPU nor page them, and would hand them to its prefetch and kernels as managed
    memory. Each moment is copied into a buffer from the optimizer's own allocator (paged above its
    size threshold, an ordinary tensor on the parameter's device below it).
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not getattr(optimizer, "is_paged", False):
        return 0
    in_pages = {id(t) for t in optimizer.page_mng.paged_tensors}
    moved = 0
    for param, state in optimizer.state.items():
        for key in ("state1", "state2"):  # the moments; their small quantisation maps stay as they are
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or id(value) in in_pages or value.shape != param.shape:
                continue
            buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
            buffer.copy_(value)
            state[key] = buffer
            moved += 1
    return moved


def loader_workers(cfg: TrainConfig, accelerator: Accelerator) -> int:
    """Decoding and resizing 512 px images on the main thread would starve a GPU; on the CPU it only adds start-up."""
    if cfg.dataloader_num_workers is not None:
        return cfg.dataloader_num_workers
    if accelerator.device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // accelerator.num_processes - 1))


def select_trainable(models, strategy: Strategy, adapter_cfg: AdapterConfig):
    """Freeze everything, then unfreeze what the strategy trains. Returns ({component: [params]}, adapter)."""
    adapter = get_adapter(strategy.peft, adapter_cfg) if strategy.peft else None
    named = apply_strategy(models, strategy, adapter)
    return {c: list(params.values()) for c, params in named.items()}, adapter


def place_components(models, strategy: Strategy, trainable: dict, weight_dtype: torch.dtype, device, cfg: TrainConfig):
    """Each component on `device` in its precision, and in train mode, checkpointed and channels_last where it applies."""
    for c in COMPONENTS:
        model = getattr(models, c)
        fp32_values = [p.data.float() for p in trainable[c]]  # before any cast: rounding would change them
        if not strategy.full[c] and weight_dtype != torch.float32:
            model.to(dtype=weight_dtype)  # frozen (or adapter-carrying) parts run in half precision...
        for p, value in zip(trainable[c], fp32_values):
            p.data = value  # ...trained tensors stay fp32 (the fp16 GradScaler unscales them), unrounded
        model.to(device)
        # Gradients flow back through the U-Net whenever anything trains.
        if c == "unet" or trainable[c]:
            model.train()
            if cfg.gradient_checkpointing:
                if c != "text_encoder":
                    model.enable_gradient_checkpointing()
                else:  # transformers renamed it in 5.x
                    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        if cfg.channels_last and c != "text_encoder":
            model.to(memory_format=torch.channels_last)


def optimizer_groups(models, trainable, adapter, lrs: dict[str, float]) -> list[dict]:
    """A group per trained component, named after it; DiffFit adds "unet/difffit_gamma" for its scales'
    own rate. The names label the logged learning rates."""
    groups = []
    for c, params in trainable.items():
        if not params:
            continue
        if c == "unet" and adapter is not None:
            groups += [{**g, "name": c if g["name"] == adapter.name else f"{c}/{g['name']}"}
                       for g in adapter.param_groups(models.unet, lrs[c])]
        else:
            groups.append({"params": params, "lr": lrs[c], "name": c})
    return groups


def accumulation_window(index: int, batches: int, steps: int) -> int:
    """Batches in the accumulation window of batch `index` (0-based, of an epoch's `batches` on this
    process): `steps`, or what is left for the epoch's last window."""
    first = index // steps * steps
    return min(steps, batches - first)


def make_accelerator(cfg: TrainConfig, strategy: Strategy) -> Accelerator:
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=launched_without_cuda(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
        # Each epoch's order comes from (seed, epoch) alone, the same for every process count and
        # after a resume; accelerate then shards the batches once, across processes.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # The loop steps the schedule once per optimizer step, so a checkpoint's schedule position is
        # in optimizer steps and resumes alike on any number of processes (accelerate's own stepping
        # counts process-steps: a 2-GPU checkpoint resumed on one GPU would jump ahead).
        step_scheduler_with_optimizer=False,
        # A VAE trained without the reconstruction term leaves its decoder out of the graph.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=strategy.vae and cfg.vae_recon_weight == 0),
                         # Validation runs on the main process while the others wait at the next collective;
                         # a first FID over a large real set outlasts NCCL's 10-minute default.
                         InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    sharded = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(accelerator.distributed_type)
    if sharded:
        # Both replace the trained parameters with sharded ones, which the loop, the checkpoints
        # and the final model (written by one process) do not handle. SD1.5 does not need them.
        raise UserError(f"accelerate's {sharded} mode is not supported: launch with configs/accelerate/ddp.yaml, "
                        "and add --memory_profile low for less memory per GPU")
    return accelerator


def make_dataloader(dataset, cfg: TrainConfig, workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    # The loader's own seeded generator: nothing else draws from it, so the order is reproducible.
    # A compiled U-Net keeps static shapes: the last, smaller batch of an epoch is dropped.
    # Workers draw random crops and flips from the epoch they were started with (ImageCaptionDataset).
    persistent = workers > 0 and not getattr(dataset, "random_augmentation", False)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate,
                                       num_workers=workers, persistent_workers=persistent, pin_memory=pin_memory,
                                       drop_last=cfg.torch_compile, generator=torch.Generator().manual_seed(cfg.seed))


def stop_workers(loader) -> None:
    """Shut a loader's persistent worker processes down now. Left running after train() returns, they go
    down whenever the garbage collector reaches the loader (the Accelerator holds it in a reference cycle):
    possibly inside a later run's forked workers, where torch's shutdown fails with tracebacks."""
    loader = getattr(loader, "base_dataloader", loader)  # the DataLoader inside accelerate's wrapper
    iterator = getattr(loader, "_iterator", None)  # where torch keeps persistent workers; no public call stops them
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def collate(batch: list[dict]) -> dict:
    """Images as pixels, or as cached VAE moments (see sdtune.caching)."""
    key = "latent_moments" if "latent_moments" in batch[0] else "pixel_values"
    return {key: torch.stack([b[key] for b in batch]), "captions": [b["caption"] for b in batch],
            "indices": [b["index"] for b in batch]}


def encode_once(cfg: TrainConfig, data: DataConfig, models, trainable, dataset, accelerator: Accelerator,
                weight_dtype, workers: int, output_dir: Path):
    """Cache what the frozen VAE and text encoder compute (sdtune.caching) and move them off the GPU.

    Returns (the dataset to train on, the caption-embedding cache or None, a record for the summary).
    """
    record, start = {"latents": "not cached", "text_embeddings": "not cached"}, time.time()
    cache_dir = cfg.latent_cache_dir
    if not cfg.cache_latents:
        record["latents"] += " (--cache_latents false)"
    elif trainable["vae"]:
        record["latents"] += " (the VAE trains)"
    elif not data.center_crop or data.random_flip:
        record["latents"] += " (random crops or flips change the pixels every epoch)"
    else:
        size = LatentStore.estimated_bytes(len(dataset), data.resolution, weight_dtype)
        if cache_dir is None and size > MEMORY_LIMIT_BYTES:
            cache_dir = output_dir / "latent_cache"
            accelerator.print(f"latents of {len(dataset)} images need {size / 2**30:.1f} GiB: cached in {cache_dir}, "
                              "not in memory (pass --latent_cache_dir to share them between runs)")
        preprocessing = f"resolution={data.resolution}|crop=center"
        store = cache_latents(models.vae, dataset, accelerator, weight_dtype, cfg.train_batch_size, workers,
                              cache_dir, preprocessing)
        dataset = CachedLatentDataset(dataset, store)
        models.vae.to("cpu")  # back on the device only to render validation images
        record["latents"] = f"{len(dataset)} images, " + (f"on disk in {cache_dir}" if cache_dir else f"in memory ({size / 2**20:.0f} MiB)")
    text_cache = None
    if not cfg.cache_text_embeddings:
        record["text_embeddings"] += " (--cache_text_embeddings false)"
    elif trainable["text_encoder"]:
        record["text_embeddings"] += " (the text encoder trains)"
    else:
        captions = [ex.caption for ex in dataset.examples] + ([""] if cfg.caption_dropout_prob > 0 else [])
        size = TextEmbeddingCache.estimated_bytes(captions, models.tokenizer, models.text_encoder)
        if size > MEMORY_LIMIT_BYTES:  # every process would hold them all: encode each batch's instead
            record["text_embeddings"] += (f" ({len(set(captions))} distinct captions would take {size / 2**30:.1f} GiB "
                                          "of memory per process)")
        else:
            text_cache = TextEmbeddingCache(models.text_encoder, models.tokenizer, captions, accelerator.device,
                                            accelerator.autocast)
            models.text_encoder.to("cpu")
            record["text_embeddings"] = f"{len(text_cache)} distinct captions"
    record["seconds"] = round(time.time() - start, 2)
    accelerator.print(f"encoded once: latents {record['latents']}; text embeddings {record['text_embeddings']}")
    return dataset, text_cache, record


def library_versions() -> dict[str, str]:
    return package_versions("sdtune", "torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes")


def check_options(cfg: TrainConfig) -> None:
    """Option combinations that cannot work, refused before anything is loaded or written."""
    if cfg.torch_compile:
        check_compile_backend(cfg.torch_compile_backend)
        check_compile_mode(cfg.torch_compile_mode)
    if cfg.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UserError("--enable_xformers_memory_efficient_attention needs the xformers package (pip install -r "
                        "requirements-gpu.txt); without the flag, PyTorch's SDPA attention is used (flash attention "
                        "on recent GPUs)")
    if cfg.lr_warmup_steps and cfg.lr_scheduler == "constant":  # diffusers' constant schedule ignores warm-up
        raise UserError(f"--lr_warmup_steps {cfg.lr_warmup_steps} has no effect with --lr_scheduler constant: use "
                        "--lr_scheduler constant_with_warmup (or linear, cosine, ...), or --lr_warmup_steps 0")
    if cfg.validation_fid_steps and not (cfg.validation_real and cfg.validation_prompts):
        raise UserError("--validation_fid_steps needs --validation_real (the real images) and --validation_prompts")


def train(cfg: TrainConfig, data: DataConfig, adapter_cfg: AdapterConfig):
    """Train, save final_model/ (and the adapter file) and training_summary.json.

    Returns (summary, models): the summary dict and the in-memory components as trained
    (adapter not merged), for callers that go on to sample or evaluate.
    """
    # The attention backend's order is process-wide: set for this run (compiling and backward passes
    # included) and undone after it, for callers that go on in the same process.
    with sdpa_preference(cfg.sdpa_backend):
        return _train(cfg, data, adapter_cfg)


def _train(cfg: TrainConfig, data: DataConfig, adapter_cfg: AdapterConfig):
    # ---------------------------------------------------------------- resolve every option once
    check_bounds(cfg, data, adapter_cfg)  # every number out of range, in one line
    try:
        strategy = resolve_strategy(cfg.strategy, cfg.train_unet, cfg.train_text_encoder, cfg.train_vae, cfg.peft)
    except ValueError as err:
        raise UserError(str(err)) from None
    lrs = resolve_learning_rates(cfg, strategy)
    cfg, profile_changes = apply_memory_profile(cfg)
    base = current_model_id(cfg.pretrained_model_name_or_path)
    # A local one recorded absolute: synthesis from another folder would take "outputs/tiny-sd15" for a hub id.
    local = Path(base).expanduser()
    cfg = replace(cfg, pretrained_model_name_or_path=str(local.resolve()) if local.exists() else base)
    check_options(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, strategy)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate has neither fp16 autocast nor a grad scaler on the CPU: fp16 parts would meet fp32 ones.
        raise UserError("--mixed_precision fp16 needs a GPU: use --mixed_precision bf16 or no on CPU")
    half_norms = strategy.peft is not None and ADAPTERS[strategy.peft].trains_norms_or_biases
    if weight_dtype != torch.float32 and accelerator.device.type == "cpu" and half_norms:
        # CPU autocast leaves GroupNorm alone, so a half weight beside an fp32 trained bias fails there.
        raise UserError(f"--mixed_precision {cfg.mixed_precision} with {strategy.peft} needs a GPU: use --mixed_precision no on CPU")
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite_output_dir,
                           logging_dir=cfg.logging_dir)
    run_record = {"status": "running", "strategy": asdict(strategy),
                  # resolved, so that downstream.py can tell whether a classifier's test patients trained this model
                  "data_source": str(Path(data.source).expanduser().resolve()) if data.source else None,
                  # synthesis builds its prompts as these captions were built, wherever it runs from
                  "data_format": table_format(data),
                  "arguments": {"train": asdict(cfg), "data": asdict(data), "adapter": asdict(adapter_cfg)}}
    if profile_changes:
        accelerator.print(f"--memory_profile {cfg.memory_profile}: " + ", ".join(f"--{k} {v}" for k, v in profile_changes.items()))
    if cfg.report_to == "wandb":
        accelerator.print("warning: --report_to wandb sends losses, settings and validation images (with their "
                          "prompts) to Weights & Biases' servers; use tensorboard for data that must stay here")
    set_seed(cfg.seed)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    # An infinite bound still measures the norm, which decides whether a step is finite.
    max_grad_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    cudnn_benchmark = cfg.cudnn_benchmark if cfg.cudnn_benchmark is not None else accelerator.device.type == "cuda"
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # every batch has one shape (fixed resolution), bar an epoch's last

    # ---------------------------------------------------------------- models and what trains
    models = load_components(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    prediction_type = cfg.prediction_type or models.noise_scheduler.config.prediction_type
    models.noise_scheduler.register_to_config(prediction_type=prediction_type)
    trainable, adapter = select_trainable(models, strategy, adapter_cfg)
    place_components(models, strategy, trainable, weight_dtype, accelerator.device, cfg)
    if cfg.enable_xformers_memory_efficient_attention:
        models.unet.enable_xformers_memory_efficient_attention()
        models.vae.enable_xformers_memory_efficient_attention()
    all_trainable = [p for params in trainable.values() for p in params]
    if accelerator.is_main_process:
        check_free_space(output_dir, models, all_trainable, cfg.use_8bit_adam)

    # ---------------------------------------------------------------- optimizer and data
    optimizer_cls, optimizer_kwargs = optimizer_class(cfg, accelerator.device.type)
    groups = optimizer_groups(models, trainable, adapter, lrs)
    optimizer = optimizer_cls(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
        **optimizer_kwargs,
    )
    optimizer_name = f"{optimizer_cls.__module__.split('.')[0]} {optimizer_cls.__name__}" + (
        " (fused)" if optimizer_kwargs.get("fused") else "")
    examples = load_examples(data, report_path=output_dir / "data_problems.txt", tokenizer=models.tokenizer,
                             log=accelerator.print)
    held_out = []
    if data.validation_fraction > 0:
        if data.split == "patient" and all(e.group is None for e in examples):
            accelerator.print(f"warning: {data.source} has no patient ids (e.g. an images folder), so the held-out "
                              "split is by image and a patient may be on both sides; a table or metadata file with "
                              "a group column keeps patients together")
        examples, held_out = split_examples(examples, data.validation_fraction, data.split_seed, by=data.split)
    resume = resume_path(cfg, output_dir)
    if accelerator.is_main_process:  # the held-out set of the run whose checkpoint this one continues, if any
        record_held_out(output_dir, held_out, resume.parent if resume is not None else None)
    if not examples:
        raise UserError(f"no training images left in {data.source}")
    if cfg.validation_fid_steps:
        from sdtune.evaluation import cache_features

        n_real = cache_features(cfg.validation_real, log=accelerator.print, device=str(accelerator.device))
        accelerator.print(f"validation FID: features of {n_real} real images ready in the cache")
    if cfg.torch_compile and len(examples) < cfg.train_batch_size:
        raise UserError(f"--torch_compile drops each epoch's last partial batch, and {len(examples)} training images "
                        f"make no full batch of {cfg.train_batch_size}: lower --train_batch_size or add images")
    dataset = ImageCaptionDataset(examples, data.resolution, center_crop=data.center_crop, random_flip=data.random_flip,
                                  seed=cfg.seed,
                                  modality=modality_of(data))
    workers = loader_workers(cfg, accelerator)
    dataset, text_cache, encoded_once = encode_once(cfg, data, models, trainable, dataset, accelerator, weight_dtype,
                                                    workers, output_dir)
    # Cached moments need no decoding: worker processes would only add start-up time.
    dataloader = make_dataloader(dataset, cfg, 0 if isinstance(dataset, CachedLatentDataset) else workers,
                                 pin_memory=accelerator.device.type == "cuda")
    # Steps are optimizer steps, the scheduler's too (make_accelerator).
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / cfg.gradient_accumulation_steps)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)

    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    # Forward passes go through what accelerate returns (DDP wrappers on several GPUs), so that
    # gradients are synchronised; the VAE goes in as a LatentEncoder for the same reason.
    forward = {"unet": models.unet, "text_encoder": models.text_encoder, "vae": LatentEncoder(models.vae)}
    trained_names = [c for c in COMPONENTS if trainable[c]]
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *(forward[c] for c in trained_names), optimizer, dataloader, lr_scheduler)
    forward.update(zip(trained_names, prepared))
    if cfg.torch_compile:
        # Static shapes (drop_last in make_dataloader): one compilation, no recompiles across steps.
        forward["unet"] = torch.compile(forward["unet"], backend=cfg.torch_compile_backend, mode=cfg.torch_compile_mode,
                                        dynamic=False)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(all_trainable, decay=cfg.ema_decay)
        ema.to(accelerator.device)

    # Checkpoints hold only the trained tensors and the EMA (safetensors) plus optimizer/scheduler/RNG state.
    counters = StepCounters()
    register_checkpoint_hooks(accelerator, models, ema, counters)

    # ---------------------------------------------------------------- resume
    global_step = 0
    if cfg.resume_from_checkpoint:
        if resume is None:
            accelerator.print(f"no checkpoint in {output_dir}: starting from scratch")
        elif not resume.is_dir():
            raise UserError(f"checkpoint {resume} does not exist: pass 'latest' or a checkpoint-STEP folder")
        else:
            accelerator.load_state(str(resume))
            global_step = int(resume.name.split("-")[-1])
            paged = page_optimizer_state(optimizer)
            accelerator.print(f"resumed from {resume} at step {global_step}"
                              + (f"; {paged} optimizer state tensors back in paged memory" if paged else ""))
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * cfg.gradient_accumulation_steps
    if global_step >= max_train_steps:  # resumed from the last checkpoint (say the final save failed): only save
        first_epoch = num_epochs

    # ---------------------------------------------------------------- derived numbers, once
    counts = {c: count_parameters(trainable[c]) for c in COMPONENTS}
    total_batch = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    accelerator.print(
        f"strategy {strategy.name} ({strategy.description}); {len(dataset)} images, {updates_per_epoch} steps/epoch\n"
        f"global batch {total_batch} = {cfg.train_batch_size} per device x {accelerator.num_processes} processes x "
        f"{cfg.gradient_accumulation_steps} accumulation; {max_train_steps} steps ({num_epochs} epochs)\n"
        "trainable: " + ", ".join(f"{c} {n:,} (lr {lrs[c]:g})" for c, n in counts.items() if n)
        + f"; total {sum(counts.values()):,} = {sum(counts.values()) / SD15_TOTAL_PARAMETERS:.3%} of SD1.5"
    )
    per_round = cfg.train_batch_size * accelerator.num_processes  # one batch on every process
    if accelerator.num_processes > 1 and not cfg.torch_compile and len(dataset) % per_round:
        accelerator.print(f"note: {len(dataset)} images are not a multiple of {per_round} (per-device batch x "
                          "processes): accelerate fills each epoch's last batches with images from its start, so "
                          "those are seen twice that epoch, which one process with the whole batch would not do")
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("sdtune", config={k: str(v) if isinstance(v, (list, type(None))) else v
                                                    for k, v in {**asdict(cfg), **asdict(data)}.items()})

    if accelerator.is_main_process:
        # Written at the first step too, so the checkpoints of a run that never finishes say what they hold;
        # not before: a run stopped by bad input holds nothing, and the same command must run once it is fixed.
        write_summary(output_dir, {**run_record, "versions": library_versions()})

    # ---------------------------------------------------------------- the loop
    unet, text_encoder, encode, tokenizer = forward["unet"], forward["text_encoder"], forward["vae"], models.tokenizer
    train_reconstruction = bool(trainable["vae"]) and cfg.vae_recon_weight > 0
    latent_scale = models.vae.config.scaling_factor
    # disable= only off the main process: an explicit value would override tqdm's TQDM_DISABLE
    progress = tqdm(total=max_train_steps, initial=global_step, desc="steps",
                    **({} if accelerator.is_local_main_process else {"disable": True}))
    start, samples_seen, loss_sum, loss_count = time.time(), 0, 0.0, 0
    counters.started = start  # (a resume's earlier segments are in counters.earlier_seconds)
    last_loss = None  # None: no step taken in this run
    stop = StopOnSignal()  # SIGTERM (SLURM preemption) or Ctrl-C: checkpoint, then exit cleanly
    batches = dataloader
    try:
        for epoch in range(first_epoch, num_epochs):
            dataloader.set_epoch(epoch)
            if isinstance(dataset, ImageCaptionDataset):
                dataset.set_epoch(epoch)  # the epoch its random crops and flips are drawn from
            batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch and skip_batches else dataloader
            for index, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
                with accelerator.accumulate(*prepared):
                    # Every random draw of a sample comes from its own generator (see sample_seeds).
                    seeds = sample_seeds(cfg.seed, global_step, batch["indices"])
                    generators = [torch.Generator(accelerator.device).manual_seed(seed) for seed in seeds]
                    captions = ["" if drops_caption(seed, cfg.caption_dropout_prob) else c
                                for c, seed in zip(batch["captions"], seeds)]
                    with accelerator.autocast():
                        # Frozen encoders ran once, before the loop (sdtune.caching); trained ones run here,
                        # and the diffusion loss reaches them only when they train.
                        if "latent_moments" in batch:
                            latents = sample_latents(batch["latent_moments"].to(accelerator.device), generators, latent_scale)
                        else:
                            pixels = batch["pixel_values"].to(accelerator.device,
                                                              dtype=weight_dtype if not trainable["vae"] else torch.float32)
                            with torch.set_grad_enabled(bool(trainable["vae"])):
                                latents, decoded = encode(pixels, generators, reconstruct=train_reconstruction)
                        if text_cache is not None:
                            encoder_hidden_states = text_cache(captions, accelerator.device)
                        else:
                            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                            truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
                            with torch.set_grad_enabled(bool(trainable["text_encoder"])):
                                encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                        loss = diffusion_loss(unet, models.noise_scheduler, latents, encoder_hidden_states,
                                              prediction_type, cfg.snr_gamma, cfg.noise_offset, generators)
                        if train_reconstruction:
                            loss = loss + cfg.vae_recon_weight * reconstruction_loss(decoded, pixels)
                    # accelerate divides every loss by the accumulation steps; an epoch's last window can hold
                    # fewer batches, and its step would get a fraction of the gradient
                    window = accumulation_window(index, len(dataloader), cfg.gradient_accumulation_steps)
                    accelerator.backward(loss * (cfg.gradient_accumulation_steps / window))
                    finite = True
                    if accelerator.sync_gradients:
                        # The norm is of the synchronised gradients, so every process decides alike.
                        grad_norm = accelerator.clip_grad_norm_(all_trainable, max_grad_norm)
                        finite = bool(torch.isfinite(grad_norm))
                    # fp16's grad scaler skips non-finite steps itself and must see them to lower its scale.
                    if finite or cfg.mixed_precision == "fp16":
                        optimizer.step()
                    if accelerator.sync_gradients and finite:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()  # read (a device sync) once per optimizer step, below
                loss_count += 1
                samples_seen += len(captions) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step done (or skipped, with non-finite gradients)
                global_step += 1
                counters.count(finite)
                if counters.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise UserError(
                        f"{counters.nonfinite_in_a_row} steps in a row with NaN/inf gradients (up to step {global_step}), all skipped: "
                        "lower the learning rate, use --mixed_precision bf16 instead of fp16 (an fp16 VAE can overflow), "
                        "or check the data (python -m sdtune.data check); nothing was saved from these steps")
                if ema is not None and finite:
                    ema.step(all_trainable)
                # the mean over every process's samples (one scalar all-reduce), not process 0's alone
                last_loss = float(accelerator.reduce(loss_sum, reduction="mean")) / loss_count
                loss_sum, loss_count = 0.0, 0
                rates = {g["name"]: rate for g, rate in zip(groups, lr_scheduler.get_last_lr())}  # in the groups' order
                logs = {"loss": last_loss, "lr": next(rate for name, rate in rates.items() if "/" not in name),
                        "grad_norm": float(grad_norm), "skipped_steps": counters.skipped_steps,
                        "samples_per_second": samples_seen / (time.time() - start)}
                if len(groups) > 1:  # unet+text, DiffFit's scales: each group's rate under its own name
                    logs.update({f"lr/{name}": rate for name, rate in rates.items()})
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                if global_step % cfg.checkpointing_steps == 0 or global_step == max_train_steps:
                    save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
                if cfg.validation_prompts and global_step % cfg.validation_steps == 0:
                    log_validation(accelerator, models, cfg, output_dir, global_step, ema, all_trainable)
                if cfg.validation_fid_steps and global_step % cfg.validation_fid_steps == 0:
                    log_validation_fid(accelerator, models, cfg, output_dir, global_step, ema, all_trainable)
                if stop.requested(accelerator):
                    if global_step % cfg.checkpointing_steps:
                        save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
                    accelerator.print(f"stopped by {stop.name} after step {global_step}: checkpoint saved in "
                                      f"{output_dir / f'checkpoint-{global_step}'}; run the same command with "
                                      "--resume_from_checkpoint latest to continue")
                    break
                if global_step >= max_train_steps:
                    break
            if batches is not dataloader:  # a resume's first epoch: its skip-loader has workers of its own
                stop_workers(batches)
            if stop.name or global_step >= max_train_steps:
                break
    finally:  # also when an error ends the loop: the signal handlers and loader workers are this run's
        progress.close()
        stop.restore()
        stop_workers(batches)  # not left to the garbage collector (see stop_workers)
        stop_workers(dataloader)
    for module in (models.vae, models.text_encoder):  # the cached encoders come back: callers may sample
        module.to(accelerator.device)
    for module in (models.unet, models.vae, models.text_encoder):
        module.eval()  # sampling needs no adapter dropout
    wall_time = time.time() - start  # this segment's: its samples/s
    run_seconds = counters.seconds()  # every segment's: the run's GPU-hours
    if stop.name:
        if accelerator.is_main_process:
            write_summary(output_dir, {**run_record, "status": f"interrupted by {stop.name}", "steps": global_step,
                                       "versions": library_versions()})
        accelerator.end_training()
        return {"interrupted": stop.name, "steps": global_step}, models

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(all_trainable)
        if not all(torch.isfinite(p).all() for p in all_trainable):
            raise UserError("the trained weights hold NaN/inf values, so no final model was written: "
                            "lower the learning rate or use --mixed_precision bf16")
        save_final_model(models, strategy, adapter, cfg, output_dir, prediction_type)
        summary = {
            **run_record,
            "status": "complete",
            "trainable_parameters": {**counts, "total": sum(counts.values())},
            "trainable_percent_of_sd15": 100 * sum(counts.values()) / SD15_TOTAL_PARAMETERS,
            "learning_rates": {c: lr for c, lr in lrs.items() if trainable[c]},
            "steps": global_step,
            "final_loss": last_loss,
            "skipped_nonfinite_steps": counters.skipped_steps,
            "samples_per_second": samples_seen / wall_time if wall_time > 0 else None,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "wall_time_seconds": run_seconds,
            "resumes": counters.resumes,
            "global_batch_size": total_batch,
            "optimizer": optimizer_name,
            "encoded_once": encoded_once,
            "speed": {"cudnn_benchmark": cudnn_benchmark, "channels_last": cfg.channels_last,
                      "torch_compile": cfg.torch_compile_backend if cfg.torch_compile else None,
                      "sdpa_backend": cfg.sdpa_backend},
            "versions": library_versions(),
        }
        write_summary(output_dir, summary)
        accelerator.print(f"final model in {output_dir / 'final_model'}; summary in {output_dir / 'training_summary.json'}")
    accelerator.end_training()
    return summary, models


def write_summary(output_dir: Path, summary: dict) -> None:
    path = output_dir / "training_summary.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(summary, indent=2, default=str))
    partial.replace(path)  # never a half-written summary


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> None:
    """Write checkpoint-STEP atomically: into a temporary folder, renamed when complete, so a crash
    mid-save leaves the previous checkpoint as `latest`. Old ones go only after the new one exists."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit is not None:
            steps = checkpoint_steps(output_dir)
            for old in steps[: max(0, len(steps) - total_limit)]:
                shutil.rmtree(output_dir / f"checkpoint-{old}")
    accelerator.wait_for_everyone()


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a request the loop honours after the current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name = None
        self.previous = {}
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame):
        if self.name:  # a second signal: stop now, the default way
            self.restore()
            signal.raise_signal(signum)
        self.name = signal.Signals(signum).name

    def requested(self, accelerator: Accelerator) -> bool:
        """True on every process as soon as any process got a signal (they must stop together)."""
        flag = torch.tensor(float(self.name is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0 and self.name is None:
            self.name = "a signal to another process"
        return flag.item() > 0

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def prepare_output_dir(output_dir: Path, resuming: bool, overwrite: bool, logging_dir: str = "logs") -> None:
    """Refuse to mix a new run into an old one; check the folder is writable before any work."""
    existing = [p for p in (output_dir / "final_model", output_dir / "training_summary.json") if p.exists()]
    existing += [output_dir / f"checkpoint-{s}" for s in checkpoint_steps(output_dir)]
    if existing and not (resuming or overwrite):
        raise UserError(f"{output_dir} already holds a run ({existing[0].name}): pass --resume_from_checkpoint latest "
                        "to continue it, --overwrite_output_dir to replace it, or another --output_dir")
    if existing and overwrite and not resuming:
        # All the old run wrote, not just its model: its adapter file beside a new run's final_model would be
        # loaded as the new run's (load_lora_weights(OUTPUT_DIR)), its FID rows and logs would join the new
        # curves, its evaluation would be compared as the new model's (evaluate.py compare reads RUN/results.json
        # and RUN/evaluation/). The latent cache stays: its entries are keyed by what made them.
        old = [*existing, *(output_dir / name for name in (
            *(adapter.weights_name for adapter in ADAPTERS.values()), "data_problems.txt", "held_out.txt", "validation",
            "results.json", "evaluation", "samples"))]
        logs = (output_dir / logging_dir).resolve()
        if output_dir.resolve() in logs.parents:  # never a --logging_dir outside the run (or the run itself)
            old.append(logs)
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".sdtune-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --output_dir {output_dir}: {err.strerror}") from None


def resume_path(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: the newest for 'latest' (None when there is none), else the one named."""
    if cfg.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        return output_dir / f"checkpoint-{steps[-1]}" if steps else None
    return Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None


def record_held_out(output_dir: Path, held_out: list, resumed_run: Path | None) -> None:
    """held_out.txt, which downstream.py takes as its classifier's test patients, so that they must never
    have trained the model: a resume must hold out what the resumed run's checkpoints held out."""
    path = output_dir / "held_out.txt"
    text = "".join(f"{held_out_name(e)}\n" for e in held_out)
    resumed = resumed_run / "held_out.txt" if resumed_run is not None else None
    before = resumed.read_text(encoding="utf-8") if resumed is not None and resumed.is_file() else ""
    if resumed is not None and text != before:
        raise UserError(f"the checkpoints in {resumed_run} were trained with another held-out set ({len(before.splitlines())} "
                        f"images held out then, {len(held_out)} now): resume with the same data, --validation_fraction, "
                        "--split and --split_seed (its training_summary.json lists them), or start afresh with "
                        "--overwrite_output_dir")
    if text:
        path.write_text(text, encoding="utf-8")
    elif path.exists():  # a run that holds out nothing leaves no list of "unseen" patients behind
        path.unlink()


def check_free_space(output_dir: Path, models, trainable: list, use_8bit_adam: bool) -> None:
    """Stop before training when a checkpoint plus the final model cannot fit on the disk."""
    pipeline_bytes = 4 * sum(p.numel() for c in COMPONENTS for p in getattr(models, c).parameters())
    optimizer_factor = 1.5 if use_8bit_adam else 3  # weights + two moments (8-bit: a quarter each)
    needed = pipeline_bytes + optimizer_factor * 4 * count_parameters(trainable)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f"{output_dir} has {free / 2**30:.1f} GiB free, but a checkpoint and the final model need "
                        f"about {needed / 2**30:.1f} GiB: free some space or choose another --output_dir")


def build_pipeline(base: str, cfg: TrainConfig, prediction_type: str | None = None, **components):
    """A StableDiffusionPipeline of the base model with the given components swapped in, its
    sampler set to the training target (a v-prediction model sampled as epsilon gives noise)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base, revision=cfg.revision, variant=cfg.variant, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False, **components)
    if prediction_type:
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    return pipeline


def save_final_model(models, strategy: Strategy, adapter, cfg: TrainConfig, output_dir: Path, prediction_type: str) -> None:
    """final_model/: a complete fp32 pipeline; untouched components are reloaded from the base model.

    An adapter is saved on its own (e.g. pytorch_lora_weights.safetensors), then loaded onto a
    fresh fp32 base U-Net and merged, so half-precision training never rounds the base weights.
    """
    from diffusers import UNet2DConditionModel

    components = {c: getattr(models, c).float() for c in COMPONENTS if strategy.full[c]}
    if adapter is not None:
        adapter_file = adapter.save(models.unet, output_dir)
        unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet",
                                                    revision=cfg.revision, variant=cfg.variant)
        adapter.load(unet, adapter_file)
        unet = adapter.merge(unet)
        components["unet"] = unet
    pipeline = build_pipeline(cfg.pretrained_model_name_or_path, cfg, prediction_type, **components)
    for name in COMPONENTS:  # a --variant fp16 base's reloaded text encoder comes in fp16 (transformers 5)
        getattr(pipeline, name).float()
    # Written aside and renamed, so a final_model/ folder is always complete.
    partial = output_dir / ".final_model.partial"
    if partial.exists():
        shutil.rmtree(partial)
    pipeline.save_pretrained(partial, safe_serialization=True)
    if (output_dir / "final_model").exists():
        shutil.rmtree(output_dir / "final_model")
    partial.rename(output_dir / "final_model")


@contextmanager
def on_device(modules, device):
    """Modules moved to `device` for a while (the cached encoders live on the CPU during training)."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@contextmanager
def ema_weights(ema, params):
    """The EMA weights in place of the trained ones for a while: validation shows what gets saved."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


@contextmanager
def validation_pipeline(accelerator, models, cfg: TrainConfig, ema, params):
    """A pipeline over the current (EMA) weights for a while: the cached encoders back on the device,
    every component in eval mode (adapter dropout off), the sampler set to the training target."""
    pipeline = build_pipeline(cfg.pretrained_model_name_or_path, cfg, models.noise_scheduler.config.prediction_type,
                              unet=models.unet, vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    modules = [models.unet, models.vae, models.text_encoder]
    training = [m.training for m in modules]
    with on_device([models.vae, models.text_encoder], accelerator.device), ema_weights(ema, params), accelerator.autocast():
        for m in modules:
            m.eval()
        try:
            yield pipeline
        finally:
            for m, mode in zip(modules, training):
                m.train(mode)


@torch.no_grad()
def log_validation(accelerator, models, cfg: TrainConfig, output_dir: Path, step: int, ema, params) -> None:
    """Render the validation prompts with the current (EMA) weights into the logs and OUTPUT_DIR/validation/."""
    if not accelerator.is_main_process:
        return
    import numpy as np

    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    folder = output_dir / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with validation_pipeline(accelerator, models, cfg, ema, params) as pipeline:
        for i, prompt in enumerate(cfg.validation_prompts):
            image = pipeline(prompt, num_inference_steps=cfg.validation_inference_steps, generator=generator).images[0]
            image.save(folder / f"{i:02d}.png")
            images.append(np.asarray(image))
    (folder / "prompts.txt").write_text("".join(f"{i:02d}.png\t{p}\n" for i, p in enumerate(cfg.validation_prompts)))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, cfg.validation_prompts)]}, step=step)


@torch.no_grad()
def log_validation_fid(accelerator, models, cfg: TrainConfig, output_dir: Path, step: int, ema, params) -> None:
    """FID of images from the current (EMA) weights against --validation_real, into the logs and
    OUTPUT_DIR/validation/fid.csv. Image k always starts from the same noise, so the curve tracks the model."""
    if not accelerator.is_main_process:
        return
    from sdtune.evaluation import compute_metrics
    from sdtune.synthesis import write_atomic

    images = []
    with validation_pipeline(accelerator, models, cfg, ema, params) as pipeline:
        for start in range(0, cfg.validation_fid_images, 8):
            ks = range(start, min(start + 8, cfg.validation_fid_images))
            prompts = [cfg.validation_prompts[k % len(cfg.validation_prompts)] for k in ks]
            generators = [torch.Generator(accelerator.device).manual_seed(cfg.seed + k) for k in ks]
            images += pipeline(prompts, num_inference_steps=cfg.validation_inference_steps, generator=generators).images
    # The real set's features were cached before the first step, so only the generated images are encoded.
    results = compute_metrics(cfg.validation_real, images, metrics="fid", fid_bootstrap=0, log=lambda message: None,
                              all_processes=False)  # the main process alone is here
    fid = results["metrics"]["fid"]["value"]
    accelerator.log({"validation_fid": fid}, step=step)
    path = output_dir / "validation" / "fid.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rows from this step on are of a segment that a resume from an earlier checkpoint (or a kill after
    # them) left behind: this run's curve replaces them.
    rows = path.read_text().splitlines()[1:] if path.exists() else []
    rows = [row for row in rows if int(row.split(",")[0]) < step]
    write_atomic(path, "".join(f"{row}\n" for row in ["step,fid,real_images,generated_images", *rows,
                                                       f"{step},{fid},{results['samples']['real']},{len(images)}"]))


SETTINGS = (TrainConfig, DataConfig, AdapterConfig)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, DataConfig, AdapterConfig]:
    from sdtune.config import add_arguments, from_args

    parser = ArgumentParser(
        prog="train_text_to_image.py",
        description="Fine-tune Stable Diffusion 1.5 with one of the study's strategies (--strategy) or a custom one.",
    )
    for cls in SETTINGS:
        add_arguments(parser, cls)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for arg in argv:
        if arg.startswith("--") and (flag := arg.split("=")[0].replace("-", "_").lstrip("_")) in FOREIGN_FLAGS:
            raise UserError(f"--{flag} is not a flag of this toolkit: {FOREIGN_FLAGS[flag]}")
    args = parser.parse_args(argv)
    return tuple(from_args(cls, args) for cls in SETTINGS)


# Flags of other trainers that the tutorial or habit suggests, and what to use here instead.
_LOW_MEMORY = ("it is DeepSpeed's offload, which is not supported; --memory_profile low (8-bit paged AdamW, "
               "gradient checkpointing, cached latents) fits every strategy in 12 GiB")
FOREIGN_FLAGS = {"offload_param_device": _LOW_MEMORY, "offload_optimizer_device": _LOW_MEMORY}


def main(argv: list[str] | None = None) -> dict:
    try:
        return train(*parse_args(argv))[0]
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            "CUDA out of memory: lower --train_batch_size (raise --gradient_accumulation_steps to keep the global "
            "batch), add --gradient_checkpointing and --use_8bit_adam, use --mixed_precision bf16 or fp16, or a "
            "PEFT strategy (lora, dora, bitfit, difffit)") from None

"""The static GPU memory of every strategy, computed without a GPU: weights, gradients, optimizer state.

    python bench/memory_estimate.py                     # SD1.5, all eleven strategies, seconds
    python bench/memory_estimate.py --tiny              # the tiny model (CI)

Each strategy is set up on meta-device models (SD1.5's exact architecture, no storage) with the
toolkit's own functions (sdtune.train.select_trainable and place_components: what trains is
fp32, the rest half precision; frozen VAE and text encoder cached and moved off the GPU), and
the bytes that live on the GPU for the whole run are added up exactly:
  weights     the U-Net (fp32 when fully trained, else bf16 with fp32 adapters/biases) and each
              trained VAE/text encoder (fp32)
  gradients   fp32, one per trained parameter
  optimizer   AdamW: two fp32 moments; `--memory_profile low`'s 8-bit AdamW (bitsandbytes):
              two uint8 moments plus an fp32 scale per 256-value block each, tensors under 4096
              values keeping fp32 moments
Activations are NOT included: with gradient checkpointing at batch 1 and 512 px they are the
small part (REFERENCE.md section 9: the reference's full U-Net with 8-bit AdamW and checkpointing
peaks at 8.7 GiB, of which weights, gradients and 8-bit state are ~8.3), but they are what
bench/train_memory.py must measure on a GPU. The headroom column is 12 GiB, less ~0.5 GiB of
CUDA context, less the static memory: what is left for activations and the allocator.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, table, write_json  # noqa: E402

import torch  # noqa: E402

from sdtune.strategies import COMPONENTS, STRATEGIES, resolve_strategy  # noqa: E402
from sdtune.tiny import write_tiny_pipeline  # noqa: E402

BUDGET_GIB = 12.0  # the tutorial's minimum GPU
OVERHEAD_GIB = 0.5  # CUDA context: in no tensor
HALF = torch.bfloat16
BLOCK, MIN_8BIT_SIZE = 256, 4096  # bitsandbytes' blockwise 8-bit optimizers


def build_models(tiny_model: Path | None):
    """All three components with no storage (call under torch.device("meta")): SD1.5's, or the tiny model's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.models import build_sd15_text_encoder, build_sd15_unet, build_sd15_vae

    if tiny_model is None:
        return SimpleNamespace(unet=build_sd15_unet("meta"), vae=build_sd15_vae("meta"),
                               text_encoder=build_sd15_text_encoder("meta"))
    return SimpleNamespace(unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_model / "unet")),
                           vae=AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_model / "vae")),
                           text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_model / "text_encoder")))


def optimizer_state_bytes(params: list[torch.Tensor], eight_bit: bool) -> int:
    """AdamW: two fp32 moments per parameter. bitsandbytes' AdamW8bit: two uint8 moments plus one fp32
    scale per 256-value block each, except tensors under 4096 values, which keep fp32 moments."""
    total = 0
    for p in params:
        n = p.numel()
        if eight_bit and n >= MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * -(-n // BLOCK)
        else:
            total += 8 * n
    return total


def estimate(strategy_name: str, profile: str, lora_rank: int, tiny_model: Path | None = None) -> dict:
    """Static GPU memory of `strategy_name` under `profile`, in bytes by kind, from meta-device models."""
    from sdtune.adapters import AdapterConfig
    from sdtune.train import MEMORY_PROFILES, TrainConfig, place_components, select_trainable

    strategy = resolve_strategy(strategy_name, False, False, False, None)
    eight_bit = MEMORY_PROFILES[profile].get("use_8bit_adam", False)
    with torch.device("meta"):
        models = build_models(tiny_model)
        trainable, _ = select_trainable(models, strategy, AdapterConfig(lora_rank=lora_rank, lora_alpha=lora_rank))
        place_components(models, strategy, trainable, HALF, "meta", TrainConfig())  # sdtune.train's dtype policy
    # A frozen VAE or text encoder is cached before training and leaves the GPU (the default).
    on_gpu = [getattr(models, c) for c in COMPONENTS if c == "unet" or trainable[c]]
    params = [p for c in COMPONENTS for p in trainable[c]]
    tensors = {id(t): t for m in on_gpu for t in (*m.parameters(), *m.buffers())}.values()
    gib = 2**30
    row = {"strategy": strategy_name, "profile": profile, "trainable_parameters": sum(p.numel() for p in params),
           "weights_gib": sum(t.numel() * t.element_size() for t in tensors) / gib,
           "gradients_gib": sum(4 * p.numel() for p in params) / gib,
           "optimizer_state_gib": optimizer_state_bytes(params, eight_bit) / gib}
    row["static_gib"] = row["weights_gib"] + row["gradients_gib"] + row["optimizer_state_gib"]
    row["headroom_gib"] = BUDGET_GIB - OVERHEAD_GIB - row["static_gib"]
    # bitsandbytes' paged state moves to CPU memory when the GPU runs short (what --memory_profile low uses)
    row["headroom_paged_gib"] = (row["headroom_gib"] + row["optimizer_state_gib"]
                                 if MEMORY_PROFILES[profile].get("paged_optimizer") else None)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model (CI)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--profiles", nargs="+", default=["low", "default"], choices=("low", "default"))
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--output", default="memory_estimate.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdtune-tiny-") as scratch:
        tiny_model = write_tiny_pipeline(Path(scratch)) if args.tiny else None  # (only its configs are read)
        results = [estimate(name, profile, args.lora_rank, tiny_model)
                   for profile in args.profiles for name in args.strategies]
    record = {"benchmark": "memory_estimate", "tiny": args.tiny, "torch": torch.__version__,
              "settings": {"lora_rank": args.lora_rank, "budget_gib": BUDGET_GIB, "overhead_gib": OVERHEAD_GIB,
                           "activations": "not included"},
              "results": results}
    write_json(args.output, record)
    rows = [[r["strategy"], r["profile"], f"{r['trainable_parameters']:,}", fmt(r["weights_gib"], ".2f"),
             fmt(r["gradients_gib"], ".2f"), fmt(r["optimizer_state_gib"], ".2f"), fmt(r["static_gib"], ".2f"),
             fmt(r["headroom_gib"], ".2f"), fmt(r["headroom_paged_gib"], ".2f")] for r in record["results"]]
    print(table(rows, ["strategy", "profile", "trainable", "weights GiB", "gradients GiB", "optimizer GiB",
                       "static GiB", f"headroom in {BUDGET_GIB:g} GiB", "headroom, state paged out"]))
    return record


if __name__ == "__main__":
    main()

"""A tiny Stable Diffusion 1.5-family pipeline, built offline, for tests and demos.

    python -m sdtune.tiny OUT_DIR [--seed 0]

writes a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) that `StableDiffusionPipeline.from_pretrained(OUT_DIR)` and the toolkit's own
loaders open exactly as they open `stable-diffusion-v1-5/stable-diffusion-v1-5`:

- the same architecture family, scaled down: a UNet2DConditionModel with cross-attention
  blocks (so LoRA targets to_q/to_k/to_v/to_out.0 exist), an AutoencoderKL with SD's 8x
  downsampling and 4 latent channels, and a CLIPTextModel;
- CLIP's real tokenizer, built from the BPE vocabulary that open_clip_torch ships, so prompts
  map to the same ids as SD1.5's tokenizer;
- SD1.5's scheduler configuration.

The weights are random (seeded): images come out as noise until the model is trained. Two
builds with the same seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

import torch

from sdtune.errors import run_cli, writable_folder

# SD1.5's scheduler (scheduler/scheduler_config.json of the official weights; PNDM ignores
# clip_sample, which DDPM and DDIM read when loaded from the same file).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
)
SD15_VAE_SCALING_FACTOR = 0.18215

# CLIP's special tokens, as SD1.5's tokenizer/ folder declares them.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
SD15_TOKENIZER_CONFIG = dict(
    bos_token=BOS,
    eos_token=EOS,
    unk_token=EOS,
    pad_token=EOS,  # SD1.5 pads with <|endoftext|>
    do_lower_case=True,
    model_max_length=CLIP_MAX_LENGTH,
)

# Sizes chosen so that one training step at 64x64 runs well under a second on 2 CPU cores,
# while keeping every structural feature of SD1.5 that the toolkit touches.
TINY_RESOLUTION = 64
TINY_UNET = dict(
    sample_size=TINY_RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    # four blocks -> three downsamplings -> SD's 8x latent factor
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=TINY_RESOLUTION,
    scaling_factor=SD15_VAE_SCALING_FACTOR,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=CLIP_MAX_LENGTH,
    projection_dim=32,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def _open_clip_bpe_path() -> Path:
    """The BPE merges file inside the installed open_clip_torch wheel."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall open_clip_torch (make setup)")
    return path


def write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json and merges.txt for CLIP's tokenizer from open_clip's BPE file.

    The id order is CLIP's: 256 byte tokens, the same with '</w>', one token per merge,
    then <|startoftext|> (49406) and <|endoftext|> (49407).
    """
    lines = gzip.decompress(_open_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    # CLIP uses the first 49152 - 256 - 2 merges of the file (its header line skipped).
    merges = lines[1 : 49152 - 256 - 2 + 1]
    from open_clip.tokenizer import bytes_to_unicode  # CLIP's byte -> character table

    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_clip_tokenizer():
    """CLIP's tokenizer (model_max_length 77), built offline from open_clip's vocabulary."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        # from_pretrained on vocab.json + merges.txt is the one loading path that
        # transformers 4 (slow tokenizer) and 5 (tokenizers backend) share.
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(SD15_TOKENIZER_CONFIG))
        return CLIPTokenizer.from_pretrained(tmp)


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of the SD1.5 family with small random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Seed before each component so one component's size never changes another's weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        # SD1.5 ships a safety checker; a medical toolkit has no use for an NSFW filter.
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it (safetensors) to out_dir; returns the folder."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(seed).save_pretrained(out_dir, safe_serialization=True)
    # Also SD1.5's own tokenizer files, which every transformers version reads.
    write_clip_tokenizer_files(out_dir / "tokenizer")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdtune.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    writable_folder(args.out_dir, "OUT_DIR")
    out = write_tiny_pipeline(args.out_dir, args.seed)
    sizes = {
        name: sum(f.stat().st_size for f in (out / name).glob("*.safetensors"))
        for name in ("unet", "vae", "text_encoder")
    }
    print(
        f"tiny SD1.5-family pipeline written to {out} "
        f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items())}; "
        f"native resolution {TINY_RESOLUTION}px)"
    )


if __name__ == "__main__":
    run_cli(main)

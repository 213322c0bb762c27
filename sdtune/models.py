"""Loading SD1.5's components: one code path for the hub model, a local copy and the tiny model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdtune import SD15_MODEL_ID
from sdtune.errors import UserError

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x pipeline that training touches."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object  # DDPM, configured from the model's scheduler/ folder


def _check_local_folder(path: Path) -> None:
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise UserError(
            f"{path} is not a diffusers Stable Diffusion folder: missing {', '.join(name + '/' for name in missing)} "
            f"(save one with StableDiffusionPipeline.save_pretrained, or build a tiny one with "
            f"`python -m sdtune.tiny DIR`)"
        )


def load_components(
    pretrained_model_name_or_path: str | os.PathLike = SD15_MODEL_ID,
    revision: str | None = None,
    variant: str | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, U-Net and a DDPM noise scheduler, in fp32.

    `pretrained_model_name_or_path` is a hub id (downloaded unless HF_HUB_OFFLINE=1, then read
    from the local cache) or a local folder in diffusers' layout. Both go through the same
    from_pretrained calls; only the error message differs.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(pretrained_model_name_or_path)
    local = Path(source).expanduser()
    if local.exists():
        _check_local_folder(local)
        source = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are owner/name
        raise UserError(f"model folder {source} does not exist")

    try:
        common = dict(revision=revision)
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **common),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **common),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **common),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        )
    except OSError as err:  # huggingface_hub's not-found / offline errors are OSErrors
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local cache: unset it to download, "
            "or pass a local folder"
            if offline
            else "check the hub id, --revision and --variant, or pass a local folder"
        )
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {source!r}: {first_line} ({hint})") from None


# SD1.5's U-Net architecture: unet/config.json of stable-diffusion-v1-5, exactly. Used to count
# parameters (e.g. trainable % of SD1.5) without downloading 3.4 GB of weights.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_UNET_PARAMS = 859_520_964  # parameters of the model built from SD15_UNET_CONFIG


def build_sd15_unet(device: str | object = "meta"):
    """SD1.5's UNet2DConditionModel with no weights loaded; on "meta" it allocates nothing (~0.1 s)."""
    import torch
    from diffusers import UNet2DConditionModel

    kwargs = {key: value for key, value in SD15_UNET_CONFIG.items() if not key.startswith("_")}
    with torch.device(device):
        return UNet2DConditionModel(**kwargs)

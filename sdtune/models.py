"""Loading SD1.5's components: one code path for the hub model, a local copy and the tiny model."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from sdtune import SD15_MODEL_ID
from sdtune.errors import UserError

PIPELINE_SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")  # of a diffusers SD folder

# torch.compile's modes for inductor: "default" fuses the element-wise work (GroupNorm+SiLU, residual
# adds, the attention reshapes) and keeps cuBLAS/cuDNN for the GEMMs and convolutions; the
# max-autotune modes also time Triton kernels for every GEMM/conv shape (minutes more of compiling);
# the cudagraph modes (reduce-overhead, max-autotune) are listed only to be refused with a reason.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # refused: see check_compile_mode


def check_compile_backend(name: str) -> None:
    """One clear error for a torch.compile backend torch does not know, before any model is loaded."""
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"unknown --torch_compile_backend {name!r}: use inductor (eager and aot_eager only trace, "
                        "for tests; torch._dynamo.list_backends() lists the rest)")


def check_compile_mode(mode: str | None) -> None:
    """CUDA-graph modes replay into memory their last outputs used. PNDM keeps earlier U-Net outputs
    (the raw ones when guidance is off) and gradient accumulation keeps earlier gradients, so both
    would read overwritten tensors (pytorch#169545, #170604): refused, never run on a GPU here."""
    if mode in CUDA_GRAPH_MODES:
        raise UserError(f"--torch_compile_mode {mode} uses CUDA graphs, which overwrite the outputs that the "
                        "sampler's history and accumulated gradients still read: use default or "
                        "max-autotune-no-cudagraphs")


# --sdpa_backend's names for torch's SDPA backends (auto: torch's own order, flash first and cuDNN last)
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                 "cudnn": "CUDNN_ATTENTION"}


@contextlib.contextmanager
def sdpa_preference(name: str):
    """Within it, torch's SDPA (every diffusers attention) tries backend `name` first; the other enabled
    backends stay behind it, in their order, for inputs it cannot take. torch puts cuDNN's attention
    last, though its 2.5 release notes report it up to 75% faster than flash attention on an H100 (not
    measured here yet). The choice is global to the process, the backward pass included, and undone
    on leaving; a compiled model keeps the backend it was traced with. "auto": torch's order."""
    if name not in SDPA_BACKENDS:
        raise UserError(f"unknown --sdpa_backend {name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    if name == "auto":
        yield
        return
    import inspect

    import torch
    from torch.nn import attention

    if "set_priority" not in inspect.signature(attention.sdpa_kernel).parameters:
        raise UserError(f"--sdpa_backend {name} needs torch's sdpa_kernel(set_priority=...), which torch "
                        f"{torch.__version__} lacks: upgrade torch, or leave --sdpa_backend auto")
    first = getattr(attention.SDPBackend, SDPA_BACKENDS[name])
    enabled = attention._cur_sdpa_kernel_backends(with_priority=True)  # in their order
    # sdpa_kernel restores the enabled backends and their order, not where the disabled ones stood
    saved = torch._C._get_sdp_priority_order()
    try:
        with attention.sdpa_kernel([first, *(b for b in enabled if b != first)], set_priority=True):
            yield
    finally:
        torch._C._set_sdp_priority_order(saved)


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x pipeline that training touches."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object  # DDPM, configured from the model's scheduler/ folder


def _check_local_folder(path: Path) -> None:
    missing = [name for name in PIPELINE_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise UserError(
            f"{path} is not a diffusers Stable Diffusion folder: missing {', '.join(name + '/' for name in missing)} "
            f"(save one with StableDiffusionPipeline.save_pretrained, or build a tiny one with "
            f"`python -m sdtune.tiny DIR`)"
        )


# Hub ids the tutorial and older scripts use that no longer exist: the same weights moved.
MOVED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": SD15_MODEL_ID}


def current_model_id(name: str) -> str:
    """`name`, or where a retired hub id's weights now live (said in a note)."""
    moved = MOVED_MODEL_IDS.get(str(name).strip("/"))
    if moved is None or Path(name).expanduser().exists():
        return name
    print(f"note: {name} was removed from the Hugging Face hub; its weights are {moved}, used instead")
    return moved


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

    source = current_model_id(str(pretrained_model_name_or_path))
    local = Path(source).expanduser()
    if local.exists():
        _check_local_folder(local)
        source = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are owner/name
        raise UserError(f"model folder {source} does not exist")

    try:
        common = dict(revision=revision)
        # .float(): transformers 5 keeps a --variant fp16 text encoder in fp16 (dtype "auto"); diffusers
        # already gives fp32. The cast is exact, and a no-op on fp32 weights.
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **common).float(),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **common).float(),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **common).float(),
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


# SD1.5's VAE and text encoder: vae/config.json and text_encoder/config.json of
# stable-diffusion-v1-5, exactly (the text encoder is CLIP ViT-L/14's text tower).
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}
SD15_VAE_PARAMS = 83_653_863
SD15_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_TEXT_ENCODER_PARAMS = 123_060_480


def build_sd15_vae(device: str | object = "meta"):
    """SD1.5's AutoencoderKL (scaling factor 0.18215, the class default), randomly initialised on `device`."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**{key: value for key, value in SD15_VAE_CONFIG.items() if not key.startswith("_")})


def build_sd15_text_encoder(device: str | object = "meta"):
    """SD1.5's CLIPTextModel (CLIP ViT-L/14 text tower), randomly initialised on `device`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {key: value for key, value in SD15_TEXT_ENCODER_CONFIG.items() if key not in ("architectures", "model_type")}
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**config))


def build_sd15_random_pipeline(seed: int = 0, dtype=None, device: str | object = "cpu"):
    """A StableDiffusionPipeline with SD1.5's exact architecture and random (seeded) weights.

    For speed and memory benchmarks without downloading the weights: every layer, shape and
    the tokenizer and scheduler are SD1.5's, so FLOPs and memory are too; images are noise.
    On "meta" nothing is allocated (for counting parameters). Seeded per component, as
    sdtune.tiny does; the values depend on the device's random generator.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from sdtune.tiny import SD15_SCHEDULER_CONFIG, build_clip_tokenizer

    torch.manual_seed(seed)
    unet = build_sd15_unet(device)
    torch.manual_seed(seed + 1)
    vae = build_sd15_vae(device)
    torch.manual_seed(seed + 2)
    text_encoder = build_sd15_text_encoder(device)
    if dtype is not None:
        for model in (unet, vae, text_encoder):
            model.to(dtype=dtype)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_sd15_random_pipeline(out_dir: str | os.PathLike, seed: int = 0, dtype=None, device: str | object = "cpu") -> Path:
    """Save build_sd15_random_pipeline(...) as a diffusers folder (safetensors; 4.3 GB in fp32, 2.1 GB in fp16).

    `device="cuda"` initialises the 1.07B weights on the GPU (seconds instead of ~a minute on
    a few CPU cores); the files are the same size and layout either way.
    """
    from sdtune.tiny import write_clip_tokenizer_files

    out_dir = Path(out_dir)
    build_sd15_random_pipeline(seed, dtype, device).save_pretrained(out_dir, safe_serialization=True)
    write_clip_tokenizer_files(out_dir / "tokenizer")  # as write_tiny_pipeline: files every transformers reads
    return out_dir

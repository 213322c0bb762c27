"""The tiny SD1.5-family model: CLIP's real tokenizer, diffusers-loadable, deterministic."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sdtune.tiny import SD15_SCHEDULER_CONFIG, build_clip_tokenizer, write_tiny_pipeline

PROMPT = "Chest x-ray of a patient with Pleural Effusion"
# CLIP's ids for PROMPT (REFERENCE.md section 8), the same as SD1.5's tokenizer gives.
CLIP_IDS = [49406, 10563, 343, 268, 3077, 539, 320, 6262, 593, 926, 33948, 1490, 9364, 49407]


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tokenizer_gives_clip_ids():
    tokenizer = build_clip_tokenizer()
    assert tokenizer(PROMPT).input_ids == CLIP_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_saved_tokenizer_pads_and_truncates_like_sd15(tiny_model):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    ids = tokenizer(PROMPT, padding="max_length", truncation=True, max_length=77).input_ids
    assert ids[: len(CLIP_IDS)] == CLIP_IDS
    assert ids[len(CLIP_IDS) :] == [49407] * (77 - len(CLIP_IDS))  # SD1.5 pads with <|endoftext|>
    long_ids = tokenizer("effusion " * 200, truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407
    # SD1.5's own file format is there too, for transformers versions that need it.
    vocab = json.loads((tiny_model / "tokenizer" / "vocab.json").read_text())
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["chest</w>"] == 10563


def test_folder_layout_and_sd15_configuration(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for name in ("unet", "vae", "text_encoder"):
        weights = list((tiny_model / name).glob("*.safetensors"))
        assert len(weights) == 1 and not list((tiny_model / name).glob("*.bin"))
    scheduler = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    for key, value in SD15_SCHEDULER_CONFIG.items():
        assert scheduler[key] == value, key
    vae = json.loads((tiny_model / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.18215 and vae["latent_channels"] == 4


def test_pipeline_loads_and_generates_requested_size(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert pipe.vae_scale_factor == 8  # SD's latent factor
    unet_modules = dict(pipe.unet.named_modules())
    assert any(name.endswith("attn2.to_k") for name in unet_modules)  # cross-attention, LoRA targets
    out = pipe(
        PROMPT,
        height=64,
        width=96,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert image.shape == (64, 96, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_two_builds_are_byte_identical(tiny_model, tmp_path):
    again = write_tiny_pipeline(tmp_path / "again")
    assert _digests(again) == _digests(tiny_model)


def test_another_seed_gives_other_weights(tiny_model, tmp_path):
    other = write_tiny_pipeline(tmp_path / "other", seed=1)
    a = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])


def test_cli_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "sdtune.tiny", str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "written to" in result.stdout
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("bad", ["--seed=x", ""])
def test_cli_rejects_bad_arguments(bad, tmp_path):
    args = [sys.executable, "-m", "sdtune.tiny"] + ([str(tmp_path / "x"), bad] if bad else [])
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr

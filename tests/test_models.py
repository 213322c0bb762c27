"""The toolkit's loader reads the tiny model through the same calls as SD1.5, and fails clearly."""

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from sdtune import SD15_MODEL_ID
from sdtune.errors import UserError
from sdtune.models import load_components


def test_loads_every_component(tiny_model):
    c = load_components(tiny_model)
    assert isinstance(c.unet, UNet2DConditionModel)
    assert isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoder, CLIPTextModel)
    # Training uses DDPM noise with SD1.5's betas.
    assert isinstance(c.noise_scheduler, DDPMScheduler)
    assert c.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert c.noise_scheduler.config.num_train_timesteps == 1000
    expected_last_beta = 0.012  # scaled_linear ends at beta_end
    assert c.noise_scheduler.betas[-1].item() == pytest.approx(expected_last_beta, rel=1e-5)
    for model in (c.unet, c.vae, c.text_encoder):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_components_fit_together_for_one_denoising_step(tiny_model):
    c = load_components(tiny_model)
    ids = c.tokenizer(["Chest x-ray"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = c.text_encoder(ids)[0]
        latents = c.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.sample() * c.vae.config.scaling_factor
        assert latents.shape == (1, 4, 8, 8)
        noise_pred = c.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    assert noise_pred.shape == latents.shape


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_components(tmp_path / "nowhere")


def test_folder_that_is_not_a_pipeline_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match=r"missing tokenizer/, text_encoder/, vae/, scheduler/"):
        load_components(tmp_path)


def test_hub_id_offline_without_cache_says_what_to_do():
    # conftest sets HF_HUB_OFFLINE=1; an id no cache holds fails like an uncached SD1.5 would.
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*pass a local folder"):
        load_components("sdtune-tests/no-such-model")


def test_default_model_is_sd15():
    assert load_components.__defaults__[0] == SD15_MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_the_empty_keep_in_fp32_warning_of_diffusers_is_quiet_and_a_real_one_is_not(tiny_model):
    import logging

    import sdtune  # noqa: F401  (installs the filter)

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, kept = logging.getLogger("diffusers.models.modeling_utils"), Kept()
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left diffusers at (bench/common.py's)
    logger.addHandler(kept)  # the logger's filters decide before any of its handlers is called
    try:
        load_components(str(tiny_model)).vae.to(dtype=torch.bfloat16)  # diffusers 0.42 warned "...: []" here
        logger.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['time_embedding'].")
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)
    assert [m for m in kept.messages if "should be kept in float32" in m] == [
        "There are modules in UNet2DConditionModel that should be kept in float32: ['time_embedding']."]

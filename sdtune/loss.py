"""The training objective: noise, timesteps, target and weighting in one place, so the loop only calls it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Denoising loss of Ho et al. 2020 on uniformly drawn timesteps.

    prediction_type: "epsilon" (SD1.5) or "v_prediction" (Salimans & Ho 2022).
    snr_gamma: min-SNR-gamma weighting (Hang et al. 2023), None for plain MSE.
    noise_offset: per-channel offset noise (Guttenberg 2023), lets the model make very dark or
    bright images, which matters for radiographs with black borders.
    """
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon or v_prediction")

    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    # min(SNR, gamma) / SNR for epsilon; / (SNR + 1) for v, as in Hang et al.'s appendix.
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def reconstruction_loss(vae, latents: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """MSE between the VAE's decoding of the (scaled) latents and the image, for when the VAE trains."""
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return F.mse_loss(decoded.float(), pixel_values.float())

"""The training objective: noise, timesteps, target and weighting in one place, so the loop only calls it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def sample_seeds(seed: int, step: int, indices: list[int]) -> list[int]:
    """One seed per sample from (run seed, optimizer step, dataset index) alone.

    Noise, timesteps and caption dropout then depend on which sample is drawn for which update,
    not on how the global batch is split (processes, gradient accumulation) or on a resume.
    """
    return [int(np.random.SeedSequence([seed, step, i]).generate_state(1)[0]) for i in indices]


def drops_caption(seed: int, probability: float) -> bool:
    """Caption dropout's draw for a sample, from a stream of its own, on the CPU (reading a GPU draw would
    stall the GPU's queue). Not torch's CPU generator from the same seed: on a CPU that generator also
    draws the sample's noise, and the dropout would follow the first noise value."""
    return np.random.default_rng([seed, 1]).random() < probability


def _randn(shape, generators, device, dtype) -> torch.Tensor:
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


def _timesteps(n: int, num_train_timesteps: int, generators, device) -> torch.Tensor:
    if generators is None:
        return torch.randint(0, num_train_timesteps, (n,), device=device)
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device) for g in generators])


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Denoising loss of Ho et al. 2020 on uniformly drawn timesteps.

    prediction_type: "epsilon" (SD1.5) or "v_prediction" (Salimans & Ho 2022).
    snr_gamma: min-SNR-gamma weighting (Hang et al. 2023), None for plain MSE.
    noise_offset: per-channel offset noise (Guttenberg 2023), lets the model make very dark or
    bright images, which matters for radiographs with black borders.
    generators: one per sample (see sample_seeds); None draws from the global RNG.
    """
    b, c = latents.shape[:2]
    noise = _randn(latents.shape, generators, latents.device, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * _randn((b, c, 1, 1), generators, latents.device, latents.dtype)
    timesteps = _timesteps(b, noise_scheduler.config.num_train_timesteps, generators, latents.device)
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


class LatentEncoder(torch.nn.Module):
    """The VAE as training uses it, in one forward call, so that DDP synchronises its gradients
    when it trains (DDP only sees work done through forward, not through vae.encode)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generators=None, reconstruct: bool = False):
        scale = self.vae.config.scaling_factor
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generators) * scale
        decoded = self.vae.decode(latents / scale, return_dict=False)[0] if reconstruct else None
        return latents, decoded


def reconstruction_loss(decoded: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """MSE between the VAE's decoding of the latents and the image, for when the VAE trains."""
    return F.mse_loss(decoded.float(), pixel_values.float())

"""The training objective against independent computations, and where its gradients go."""

import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from sdtune.loss import LatentEncoder, diffusion_loss, drops_caption, reconstruction_loss, sample_seeds
from sdtune.train import main

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class ZeroUNet(torch.nn.Module):
    """Predicts 0, so the loss is the (weighted) mean square of the target."""

    def forward(self, sample, timesteps, encoder_hidden_states, return_dict=False):
        self.seen = (sample, timesteps)
        return (torch.zeros_like(sample),)


def _draws(latents, seed):
    """The noise and timesteps diffusion_loss draws after torch.manual_seed(seed), redrawn independently."""
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (latents.shape[0],))
    return noise, timesteps


def _alpha_bar(t):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)


LATENTS = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def test_epsilon_target_and_noising():
    unet = ZeroUNet()
    torch.manual_seed(0)
    loss = diffusion_loss(unet, SCHEDULER, LATENTS, None)
    noise, t = _draws(LATENTS, 0)
    a = _alpha_bar(t)
    torch.testing.assert_close(unet.seen[0], a.sqrt() * LATENTS + (1 - a).sqrt() * noise)
    assert torch.equal(unet.seen[1], t)
    torch.testing.assert_close(loss, (noise**2).mean())


def test_v_prediction_target():
    torch.manual_seed(0)
    loss = diffusion_loss(ZeroUNet(), SCHEDULER, LATENTS, None, prediction_type="v_prediction")
    noise, t = _draws(LATENTS, 0)
    a = _alpha_bar(t)
    v = a.sqrt() * noise - (1 - a).sqrt() * LATENTS  # Salimans & Ho 2022
    torch.testing.assert_close(loss, (v**2).mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting(prediction_type):
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    loss = diffusion_loss(ZeroUNet(), SCHEDULER, latents, None, prediction_type=prediction_type, snr_gamma=5.0)
    noise, t = _draws(latents, 0)
    a = _alpha_bar(t)
    snr = (a / (1 - a)).view(-1)
    weight = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    expected = ((target**2).mean(dim=(1, 2, 3)) * weight).mean()
    torch.testing.assert_close(loss, expected)
    assert weight.min() < 0.99 and weight.max() > 0.01  # the weighting does something for these timesteps


def test_noise_offset_shifts_each_channel():
    unet = ZeroUNet()
    torch.manual_seed(0)
    diffusion_loss(unet, SCHEDULER, LATENTS, None, noise_offset=0.1)
    torch.manual_seed(0)
    noise = torch.randn_like(LATENTS)
    offset = 0.1 * torch.randn(4, 4, 1, 1)
    t = torch.randint(0, 1000, (4,))
    a = _alpha_bar(t)
    torch.testing.assert_close(unet.seen[0], a.sqrt() * LATENTS + (1 - a).sqrt() * (noise + offset))


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        diffusion_loss(ZeroUNet(), SCHEDULER, LATENTS, None, prediction_type="sample")


def test_latent_encoder_decodes_unscaled_latents():
    class VAE(torch.nn.Module):
        config = type("C", (), {"scaling_factor": 0.5})

        def encode(self, x):
            dist = type("D", (), {"sample": lambda self, generator=None: x * 3})()
            return type("O", (), {"latent_dist": dist})()

        def decode(self, z, return_dict=False):
            return (z + 1,)

    pixels = torch.randn(2, 4, 8, 8)
    latents, decoded = LatentEncoder(VAE())(pixels, reconstruct=True)
    torch.testing.assert_close(latents, pixels * 3 * 0.5)
    torch.testing.assert_close(decoded, pixels * 3 + 1)  # decode sees the unscaled latents
    torch.testing.assert_close(reconstruction_loss(decoded, pixels), ((pixels * 2 + 1) ** 2).mean())
    assert LatentEncoder(VAE())(pixels)[1] is None


def test_per_sample_generators_make_noise_independent_of_batching():
    seeds = sample_seeds(7, step=3, indices=[10, 11, 12, 13])
    assert len(set(seeds)) == 4 and seeds == sample_seeds(7, 3, [10, 11, 12, 13])
    assert seeds[0] != sample_seeds(7, 4, [10])[0] and seeds[0] != sample_seeds(8, 3, [10])[0]

    def targets(batch_seeds, latents):
        unet = ZeroUNet()
        gens = [torch.Generator().manual_seed(s) for s in batch_seeds]
        diffusion_loss(unet, SCHEDULER, latents, None, noise_offset=0.1, generators=gens)
        return unet.seen

    whole = targets(seeds, LATENTS)
    halves = [targets(seeds[:2], LATENTS[:2]), targets(seeds[2:], LATENTS[2:])]
    torch.testing.assert_close(whole[0], torch.cat([h[0] for h in halves]))
    assert torch.equal(whole[1], torch.cat([h[1] for h in halves]))


def _run(tiny_model, phantom_chexpert, out, *extra):
    table = phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"
    return main(["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(table), "--resolution", "64",
                 "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3", "--output_dir", str(out),
                 "--report_to", "none", *extra])


def test_diffusion_loss_alone_reaches_the_vae_encoder(tiny_model, phantom_chexpert, tmp_path):
    # With no reconstruction term, only the encoder is on the loss's path: the decoder must not move.
    _run(tiny_model, phantom_chexpert, tmp_path, "--strategy", "vae", "--vae_recon_weight", "0")
    base = load_file(tiny_model / "vae" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "final_model" / "vae" / "diffusion_pytorch_model.safetensors")
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], trained[k])}
    assert changed == {"encoder", "quant_conv"}


def test_v_prediction_runs_save_a_v_prediction_scheduler(tiny_model, phantom_chexpert, tmp_path):
    _run(tiny_model, phantom_chexpert, tmp_path, "--strategy", "bitfit", "--prediction_type", "v_prediction",
         "--snr_gamma", "5", "--noise_offset", "0.05", "--caption_dropout_prob", "0.5")
    scheduler = json.loads((tmp_path / "final_model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_checkpoints_total_limit_keeps_the_newest(tiny_model, phantom_chexpert, tmp_path):
    _run(tiny_model, phantom_chexpert, tmp_path, "--strategy", "bitfit", "--checkpointing_steps", "1",
         "--checkpoints_total_limit", "1", "--max_train_steps", "3")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    saved = load_file(tmp_path / "checkpoint-3" / "unet_trained.safetensors")
    assert saved and all(k.endswith(".bias") for k in saved)  # only the trained tensors


def test_vae_reconstruction_term_is_weighted_by_vae_recon_weight(tiny_model, phantom_chexpert, tmp_path, monkeypatch):
    """A VAE run's loss is diffusion + weight x reconstruction, both terms spied as the loop computes them."""
    import sdtune.train as training

    seen = {"diffusion": [], "reconstruction": []}
    diffusion, reconstruction = training.diffusion_loss, training.reconstruction_loss

    def spy(name, function):
        def recorded(*args, **kwargs):
            value = function(*args, **kwargs)
            seen[name].append(value.item())
            return value
        return recorded

    monkeypatch.setattr(training, "diffusion_loss", spy("diffusion", diffusion))
    monkeypatch.setattr(training, "reconstruction_loss", spy("reconstruction", reconstruction))
    summary = _run(tiny_model, phantom_chexpert, tmp_path, "--strategy", "vae", "--vae_recon_weight", "0.25",
                   "--max_train_steps", "1")
    (d,), (r,) = seen["diffusion"], seen["reconstruction"]
    assert r > 1e-3  # large enough for its weight to show
    assert summary["final_loss"] == pytest.approx(d + 0.25 * r, rel=1e-5)


def test_caption_dropout_is_independent_of_the_samples_noise_on_a_cpu():
    """On a CPU the noise generator is torch's Mersenne Twister from the sample's seed; a dropout draw from
    the same generator and seed dropped a caption exactly when the first noise value was small."""
    seeds = sample_seeds(0, 0, list(range(2000)))
    first_noise = torch.tensor([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s))[0, 0, 0, 0].item()
                                for s in seeds])
    dropped = torch.tensor([drops_caption(s, 0.5) for s in seeds])
    assert 0.45 < dropped.float().mean() < 0.55
    # tied draws would split |noise| at 1.18 (dropped below it); independent ones spread both groups alike
    assert first_noise[dropped].abs().max() > 2 and first_noise[~dropped].abs().min() < 0.01
    assert abs(first_noise[dropped].abs().mean() - first_noise[~dropped].abs().mean()) < 0.1

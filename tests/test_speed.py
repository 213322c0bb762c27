"""Issue 7's training speed options on the tiny model: caching, fused AdamW, channels_last, compile, low memory.

Speed itself is measured by bench/train_speed.py; these tests check that each option computes
what the plain loop computes and that the work it saves is really skipped.
"""

import contextlib
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import CLIPTextModel

from sdtune.caching import sample_latents
from sdtune.errors import UserError
from sdtune.models import load_components, sdpa_preference
from sdtune.phantom import render_chest_xray
from sdtune.train import main, parse_args, train

CAPTIONS = ["Chest x-ray of a patient with Pleural Effusion", "Chest x-ray of a patient with Cardiomegaly",
            "Chest x-ray of a patient with No Finding"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tutorial's layout: 5 phantom films with captions (3 distinct), so batch 2 leaves a partial batch."""
    root = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(0)
    for k in range(5):
        render_chest_xray({"Pleural Effusion": k % 3 == 0, "Cardiomegaly": k % 3 == 1}, size=80, rng=rng).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text(CAPTIONS[k % 3])
    return root


def _argv(tiny_model, data, out, *extra, steps=3):
    return ["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data), "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--output_dir",
            str(out), "--report_to", "none", "--checkpointing_steps", "1000", *map(str, extra)]


class Calls:
    """Counts calls of a method, patched on its class."""

    def __init__(self, monkeypatch, cls, name):
        self.n, original = 0, getattr(cls, name)

        def counted(*args, **kwargs):
            self.n += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


def _run(tiny_model, data, out, *extra, steps=3):
    summary, models = train(*parse_args(_argv(tiny_model, data, out, *extra, steps=steps)))
    return summary, load_file(out / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_cached_latents_and_embeddings_train_exactly_as_encoding_every_step(tiny_model, folder, tmp_path, monkeypatch):
    encodes, texts = Calls(monkeypatch, AutoencoderKL, "encode"), Calls(monkeypatch, CLIPTextModel, "forward")
    common = ("--strategy", "unet", "--caption_dropout_prob", "0.5", "--seed", "3")
    plain_summary, plain = _run(tiny_model, folder, tmp_path / "plain", *common, "--cache_latents", "false",
                                "--cache_text_embeddings", "false", steps=4)
    assert (encodes.n, texts.n) == (4, 4)  # one batch each per step
    encodes.n = texts.n = 0
    summary, cached = _run(tiny_model, folder, tmp_path / "cached", *common, steps=4)
    # 5 images in batches of 2: 3 encoder calls before the loop; the 3 captions and "" in one call
    assert (encodes.n, texts.n) == (3, 1)
    assert summary["encoded_once"]["latents"].startswith("5 images, in memory")
    assert summary["encoded_once"]["text_embeddings"] == "4 distinct captions"
    # The same draws from the same distributions: the same training. Images encoded in other
    # batches round differently in the last bit (CPU kernels), and Adam's normalised step turns
    # that into differences far below what training moved.
    assert summary["final_loss"] == pytest.approx(plain_summary["final_loss"], rel=1e-5)
    assert_same_training(cached, plain, tiny_model)


def assert_same_training(got, expected, tiny_model):
    """Two runs' U-Nets agree far within what training moved them: rounding, not another computation.
    (A norm, not a maximum: a weight whose gradient is near Adam's epsilon can move by lr/10 on rounding.)"""
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    moved = sum(((expected[k] - base[k]) ** 2).sum() for k in base).sqrt().item()
    differ = sum(((got[k] - expected[k]) ** 2).sum() for k in base).sqrt().item()
    assert moved > 1e-2 and differ < 0.01 * moved, (moved, differ)


def test_sample_latents_draws_what_the_vae_would(tiny_model):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        expected = dist.sample(generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)]) * vae.config.scaling_factor
        got = sample_latents(dist.parameters, [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                             vae.config.scaling_factor)
    assert torch.equal(got, expected)


def test_latent_cache_on_disk_is_reused_and_keyed_by_preprocessing(tiny_model, folder, tmp_path, monkeypatch):
    encodes = Calls(monkeypatch, AutoencoderKL, "encode")
    cache = tmp_path / "latents"
    _, first = _run(tiny_model, folder, tmp_path / "a", "--strategy", "lora", "--latent_cache_dir", cache)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 5 and encodes.n == 3
    assert all(len(f.stem) == 32 and not any(str(k) == f.stem for k in range(5)) for f in files)  # hashes, not names
    moments = load_file(files[0])["moments"]
    assert moments.shape == (8, 8, 8)  # 4 means + 4 log-variances at 64 / 8 px
    encodes.n = 0
    summary, again = _run(tiny_model, folder, tmp_path / "b", "--strategy", "lora", "--latent_cache_dir", cache)
    assert encodes.n == 0 and "on disk" in summary["encoded_once"]["latents"]  # another run: nothing encoded
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=0)
    _run(tiny_model, folder, tmp_path / "c", "--strategy", "lora", "--latent_cache_dir", cache, "--resolution", "32")
    assert encodes.n == 3 and len(list(cache.glob("*.safetensors"))) == 10  # other preprocessing, other entries
    # A toolkit whose decoding code differs (an update) encodes again rather than read old latents.
    import sdtune.caching
    from sdtune.data.dataset import ImageCaptionDataset
    from sdtune.data.images import load_image

    assert {load_image.__module__, ImageCaptionDataset.__module__} <= set(sdtune.caching.LATENT_CODE)
    monkeypatch.setattr(sdtune.caching, "code_digest", lambda *modules: "another version")
    _run(tiny_model, folder, tmp_path / "d", "--strategy", "lora", "--latent_cache_dir", cache)
    assert encodes.n == 6 and len(list(cache.glob("*.safetensors"))) == 15


def test_a_latent_cache_key_changes_when_a_file_is_replaced_keeping_size_and_time(tmp_path):
    import os

    from PIL import Image

    from sdtune.caching import image_key

    path = tmp_path / "a.bmp"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(path)
    before, stat = image_key(path, "64|center"), path.stat()
    assert image_key(path, "64|center") == before != image_key(path, "32|center")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "b.bmp")  # same byte size
    os.replace(tmp_path / "b.bmp", path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or rsync -a leave it
    assert path.stat().st_size == stat.st_size and image_key(path, "64|center") != before


def test_latent_cache_is_keyed_by_every_encoder_weight_not_the_folder(tiny_model, folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cache = tmp_path / "latents"
    _run(tiny_model, folder, tmp_path / "a", "--strategy", "lora", "--latent_cache_dir", cache)
    encodes = Calls(monkeypatch, AutoencoderKL, "encode")
    _run(model, folder, tmp_path / "b", "--strategy", "lora", "--latent_cache_dir", cache)
    assert encodes.n == 0  # the same weights in another folder: the cache holds
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    deep = "encoder.down_blocks.0.resnets.0.conv1.weight"  # not the first or last layer
    state[deep] = state[deep] * 1.5
    save_file(state, weights)  # changed in place: same folder, same config
    _run(model, folder, tmp_path / "c", "--strategy", "lora", "--latent_cache_dir", cache)
    assert encodes.n == 3 and len(list(cache.glob("*.safetensors"))) == 10  # encoded anew, beside the first


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_caption_dropout_drops_exactly_what_each_samples_seed_says(p, tiny_model, folder, tmp_path, monkeypatch):
    import sdtune.train as training
    from sdtune.caching import TextEmbeddingCache

    seeds, captions = [], []
    sample_seeds, encode = training.sample_seeds, TextEmbeddingCache.__call__
    monkeypatch.setattr(training, "sample_seeds", lambda *args: seeds.append(sample_seeds(*args)) or seeds[-1])
    monkeypatch.setattr(TextEmbeddingCache, "__call__",
                        lambda self, batch, device: captions.append(list(batch)) or encode(self, batch, device))
    _run(tiny_model, folder, tmp_path, "--strategy", "lora", "--caption_dropout_prob", p)
    # The rule, computed independently: a sample's caption is dropped when its own draw is below p.
    dropped = [[np.random.Generator(np.random.PCG64(np.random.SeedSequence([s, 1]))).random() < p for s in batch]
               for batch in seeds]
    assert [[c == "" for c in batch] for batch in captions] == dropped
    assert any(map(any, dropped)) and (p == 1.0) == all(map(all, dropped))


@pytest.mark.parametrize("extra, reason", [
    (["--strategy", "unet+vae"], "the VAE trains"),
    (["--strategy", "lora", "--random_flip"], "random crops or flips"),
    (["--strategy", "lora", "--cache_latents", "false"], "--cache_latents false"),
])
def test_latents_are_encoded_every_step_when_they_cannot_be_cached(extra, reason, tiny_model, folder, tmp_path):
    summary, _ = _run(tiny_model, folder, tmp_path, *extra, steps=1)
    assert reason in summary["encoded_once"]["latents"]


def test_text_embeddings_are_not_cached_when_the_text_encoder_trains(tiny_model, folder, tmp_path):
    summary, _ = _run(tiny_model, folder, tmp_path, "--strategy", "text", steps=1)
    assert "the text encoder trains" in summary["encoded_once"]["text_embeddings"]
    assert summary["encoded_once"]["latents"].startswith("5 images")


def test_caption_embeddings_too_large_for_memory_are_encoded_every_step(tiny_model, folder, tmp_path, monkeypatch):
    from sdtune.caching import TextEmbeddingCache

    models = load_components(tiny_model)
    captions = ["a", "b", "a", ""]
    cache = TextEmbeddingCache(models.text_encoder, models.tokenizer, captions, "cpu", contextlib.nullcontext)
    assert TextEmbeddingCache.estimated_bytes(captions, models.tokenizer, models.text_encoder) == cache.embeddings.nbytes
    # free-text reports: one embedding per image, more than memory holds (8 GiB), for every process
    monkeypatch.setattr(TextEmbeddingCache, "estimated_bytes", staticmethod(lambda *args: 9 * 2**30))
    encoded = Calls(monkeypatch, CLIPTextModel, "forward")
    summary, _ = _run(tiny_model, folder, tmp_path, "--strategy", "lora", steps=2)
    assert summary["encoded_once"]["text_embeddings"] == ("not cached (3 distinct captions would take 9.0 GiB of "
                                                          "memory per process)")
    assert encoded.n == 2 and summary["encoded_once"]["latents"].startswith("5 images")  # latents still cached


def test_cached_encoders_leave_the_device_and_come_back_for_validation(tiny_model, folder, tmp_path, monkeypatch):
    import sdtune.train as training

    seen = []
    original = training.validation_pipeline

    def spy(accelerator, models, cfg, ema, params):
        seen.append(models.vae.device)
        return original(accelerator, models, cfg, ema, params)

    monkeypatch.setattr(training, "validation_pipeline", spy)
    moved = []
    monkeypatch.setattr(training, "on_device", _recording(training.on_device, moved))
    _run(tiny_model, folder, tmp_path, "--strategy", "lora", "--validation_prompts", CAPTIONS[0], "--validation_steps", "1",
         "--validation_inference_steps", "2", steps=1)
    assert len(seen) == 1 and moved and all(names == ["AutoencoderKL", "CLIPTextModel"] for names in moved)
    assert (tmp_path / "validation" / "step-1" / "00.png").is_file()


def _recording(context, log):
    def wrapper(modules, device):
        log.append([type(m).__name__ for m in modules])
        return context(modules, device)
    return wrapper


def test_fused_adamw_and_channels_last_train_as_the_plain_loop(tiny_model, folder, tmp_path):
    _, plain = _run(tiny_model, folder, tmp_path / "plain", "--strategy", "unet", "--fused_adam", "false")
    _, fast = _run(tiny_model, folder, tmp_path / "fast", "--strategy", "unet", "--fused_adam", "--channels_last")
    assert_same_training(fast, plain, tiny_model)


def test_fused_adamw_and_cudnn_benchmark_follow_the_device_unless_asked(tiny_model, folder, tmp_path, monkeypatch):
    made = []
    original = torch.optim.AdamW.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("fused"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test: it is process-wide
    default, _ = _run(tiny_model, folder, tmp_path / "a", "--strategy", "bitfit", steps=1)
    assert not torch.backends.cudnn.benchmark
    asked, _ = _run(tiny_model, folder, tmp_path / "b", "--strategy", "bitfit", "--fused_adam", "--cudnn_benchmark", steps=1)
    assert torch.backends.cudnn.benchmark
    assert made == [False, True]  # default: both on GPUs only (this is a CPU)
    assert (default["speed"]["cudnn_benchmark"], asked["speed"]["cudnn_benchmark"]) == (False, True)
    assert default["optimizer"] == "torch AdamW" and asked["optimizer"] == "torch AdamW (fused)"


def test_sdpa_backend_goes_first_in_every_forward_and_backward_of_the_run_then_torchs_order_returns(
        tiny_model, folder, tmp_path, monkeypatch):
    import sdtune.train as training
    from torch.nn.attention import SDPBackend

    first = lambda: torch._C._get_sdp_priority_order()[0]  # noqa: E731
    forward, backward, loss = [], [], training.diffusion_loss

    def spy(*args, **kwargs):
        forward.append(first())
        value = loss(*args, **kwargs)
        value.register_hook(lambda grad: backward.append(first()))  # runs in autograd's backward pass
        return value

    monkeypatch.setattr(training, "diffusion_loss", spy)
    before = torch._C._get_sdp_priority_order()
    summary, _ = _run(tiny_model, folder, tmp_path, "--strategy", "lora", "--sdpa_backend", "cudnn", steps=2)
    assert forward == backward == [int(SDPBackend.CUDNN_ATTENTION)] * 2  # on the CPU torch falls back to its own
    assert summary["speed"]["sdpa_backend"] == "cudnn" and torch._C._get_sdp_priority_order() == before
    with pytest.raises(UserError, match="unknown --sdpa_backend 'fa3'"):
        with sdpa_preference("fa3"):
            pass


def test_sdpa_preference_reorders_the_enabled_backends_and_switches_on_no_other():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]):  # flash and cuDNN switched off by a caller
        with sdpa_preference("cudnn"):
            assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    with sdpa_preference("auto"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)  # torch's own


def test_sdpa_preference_on_a_torch_without_priorities_says_so_in_one_line(monkeypatch):
    import torch.nn.attention

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", lambda backends: contextlib.nullcontext())  # torch < 2.6
    with pytest.raises(UserError, match="--sdpa_backend cudnn needs torch's sdpa_kernel.*leave --sdpa_backend auto"):
        with sdpa_preference("cudnn"):
            pass


@pytest.mark.parametrize("strategy, extra", [("lora", []), ("dora", []), ("difffit", []), ("bitfit", []),
                                             ("unet", ["--gradient_checkpointing"])])
def test_torch_compile_makes_one_graph_and_never_recompiles(strategy, extra, tiny_model, folder, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        # 5 images at batch 2: the partial batch is dropped, so 6 steps cross 2 epochs with one shape
        summary, _ = _run(tiny_model, folder, tmp_path, "--strategy", strategy, "--torch_compile",
                          "--torch_compile_backend", "eager", *extra, steps=6)
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    counters = torch._dynamo.utils.counters
    # the whole U-Net in one graph: no graph breaks (the fast DoRA forward avoids peft's)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_low_memory_profile_turns_on_paged_8bit_adam_and_checkpointing(tiny_model, folder, tmp_path, capsys):
    cfg, data, adapter_cfg = parse_args(_argv(tiny_model, folder, tmp_path, "--strategy", "unet",
                                              "--memory_profile", "low", steps=1))
    summary, models = train(cfg, data, adapter_cfg)
    assert "--use_8bit_adam True, --paged_optimizer True, --gradient_checkpointing True" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "training_summary.json").read_text())["arguments"]["train"]
    assert recorded["use_8bit_adam"] and recorded["paged_optimizer"] and recorded["gradient_checkpointing"]
    assert models.unet.is_gradient_checkpointing
    assert summary["optimizer"] == "bitsandbytes AdamW8bit"  # a CPU has nothing to page


@pytest.mark.parametrize("flags, device, expected", [
    ({}, "cuda", ("AdamW", {"fused": True})),
    ({}, "cpu", ("AdamW", {"fused": False})),
    ({"fused_adam": False}, "cuda", ("AdamW", {"fused": False})),
    ({"use_8bit_adam": True}, "cuda", ("AdamW8bit", {})),
    ({"use_8bit_adam": True, "paged_optimizer": True}, "cuda", ("PagedAdamW8bit", {})),
    ({"use_8bit_adam": True, "paged_optimizer": True}, "cpu", ("AdamW8bit", {})),
    ({"paged_optimizer": True}, "cuda", ("PagedAdamW", {})),
    ({"paged_optimizer": True}, "cpu", ("AdamW", {"fused": False})),
])
def test_optimizer_class_follows_the_flags_and_the_device(flags, device, expected):
    import bitsandbytes as bnb

    from sdtune.train import TrainConfig, optimizer_class

    cls, kwargs = optimizer_class(TrainConfig(**flags), device)
    name, want_kwargs = expected
    assert cls is (torch.optim.AdamW if name == "AdamW" else getattr(bnb.optim, name)) and kwargs == want_kwargs


def test_a_resumed_run_pages_its_optimizer_state_again(tiny_model, folder, tmp_path, monkeypatch, capsys):
    import shutil

    import bitsandbytes as bnb

    import sdtune.train as training

    # A CPU has no unified memory: stand in for bitsandbytes' pager, which flags each paged tensor and
    # lists it in its page manager, and run its PagedAdamW8bit where optimizer_class would on a GPU.
    pages = bnb.functional.GlobalPageManager.get_instance()
    monkeypatch.setattr(pages, "paged_tensors", [])

    def get_state_buffer(self, param, dtype=torch.float32):
        buffer = torch.zeros_like(param, dtype=dtype)
        buffer.is_paged, buffer.page_deviceid = True, 0
        pages.paged_tensors.append(buffer)
        return buffer

    monkeypatch.setattr(bnb.optim.optimizer.Optimizer8bit, "get_state_buffer", get_state_buffer)
    monkeypatch.setattr(bnb.optim.optimizer.Optimizer8bit, "prefetch_state", lambda self, param: None)  # pages only
    monkeypatch.setattr(training, "optimizer_class", lambda cfg, device_type: (bnb.optim.PagedAdamW8bit, {}))
    in_pages_at_step = []
    step = bnb.optim.PagedAdamW8bit.step

    def checked_step(self, *args, **kwargs):
        moments = [s[k] for s in self.state.values() for k in ("state1", "state2") if k in s]
        listed = {id(t) for t in pages.paged_tensors}
        in_pages_at_step.append((len(moments), sum(id(m) in listed for m in moments),
                                 sum(getattr(m, "is_paged", False) for m in moments)))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(bnb.optim.PagedAdamW8bit, "step", checked_step)
    flags = ("--strategy", "unet", "--checkpointing_steps", "2")
    _, straight = _run(tiny_model, folder, tmp_path, *flags, steps=4)
    shutil.rmtree(tmp_path / "checkpoint-4")
    in_pages_at_step.clear()
    capsys.readouterr()
    _, resumed = _run(tiny_model, folder, tmp_path, *flags, "--resume_from_checkpoint", "latest", steps=4)
    moments, listed, flagged = in_pages_at_step[0]  # the first step after loading checkpoint-2
    assert moments > 0 and flagged == moments  # the checkpoint kept the flags: bitsandbytes would trust them
    assert listed == moments, "the loaded optimizer state is not in pages"
    assert f"at step 2; {moments} optimizer state tensors back in paged memory" in capsys.readouterr().out
    for k in straight:  # the copy into pages kept every moment
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7)


def test_page_optimizer_state_leaves_unpaged_optimizers_alone():
    from sdtune.train import page_optimizer_state

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(4)
    optimizer.step()
    before = dict(optimizer.state[param])
    assert page_optimizer_state(optimizer) == 0
    assert all(optimizer.state[param][k] is v for k, v in before.items())


def test_loader_workers_and_settings(monkeypatch):
    from types import SimpleNamespace

    from sdtune.train import TrainConfig, loader_workers, make_dataloader

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=2)
    assert loader_workers(TrainConfig(), gpu) == 7  # 16 cores shared by 2 processes, one left for each main loop
    assert loader_workers(TrainConfig(), SimpleNamespace(device=torch.device("cpu"), num_processes=1)) == 0
    assert loader_workers(TrainConfig(dataloader_num_workers=3), gpu) == 3
    loader = make_dataloader(list(range(5)), TrainConfig(torch_compile=True, train_batch_size=2), workers=2, pin_memory=True)
    assert (loader.num_workers, loader.persistent_workers, loader.pin_memory, loader.drop_last) == (2, True, True, True)
    assert len(loader) == 2  # static shapes for the compiled U-Net: the partial batch is dropped


@pytest.mark.parametrize("disk", [False, True])
def test_nan_latents_stop_with_the_images_named_and_are_never_cached(disk, tiny_model, folder, tmp_path, monkeypatch):
    from sdtune.errors import UserError

    original = AutoencoderKL.encode

    def overflowing(self, pixels, *args, **kwargs):
        out = original(self, pixels, *args, **kwargs)
        out.latent_dist.parameters[0] = float("nan")  # the first image of every batch, as an fp16 overflow would
        return out

    monkeypatch.setattr(AutoencoderKL, "encode", overflowing)
    cache = ["--latent_cache_dir", tmp_path / "latents"] if disk else []
    with pytest.raises(UserError, match=r"encoded 3 image\(s\) to NaN/inf latents .* \(e\.g\. .*0\.png"):
        _run(tiny_model, folder, tmp_path / "out", "--strategy", "lora", *cache, steps=1)
    if disk:
        assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 2  # only the finite ones

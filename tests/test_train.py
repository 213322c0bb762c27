"""train_text_to_image.py on the tiny model and phantom X-rays: what trains, what is saved, resume, overfit."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from sdtune.adapters import ADAPTERS
from sdtune.data.dataset import DataConfig, read_examples
from sdtune.data.splits import held_out_name
from sdtune.errors import UserError
from sdtune.loss import diffusion_loss
from sdtune.models import load_components
from sdtune.phantom import render_chest_xray
from sdtune.strategies import COMPONENTS, STRATEGIES
from sdtune.train import main, parse_args, train

WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
PROMPT = "Chest x-ray of a patient with Pleural Effusion"


@pytest.fixture(scope="module")
def table(phantom_chexpert):
    return phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"


def _argv(tiny_model, table, out, *extra, steps=2):
    return ["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(table), "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--output_dir", str(out), "--report_to", "none", "--checkpointing_steps", "1000", *map(str, extra)]


def _weights(folder, component):
    return load_file(folder / component / WEIGHT_FILES[component])


def _norm_keys(unet):
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {f"{name}.{p}" for name, m in unet.named_modules() if isinstance(m, norms) for p in ("weight", "bias")
            if getattr(m, p, None) is not None}


def _expected_unet_changes(strategy, keys, tiny_model):
    """Which U-Net tensors of final_model differ from the base, computed from names alone."""
    attention = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    if strategy.unet in (None,):
        return set()
    if strategy.unet == "full":
        return set(keys)
    if strategy.unet in ("lora", "dora"):
        return {k for k in keys if k.endswith(attention)}
    biases = {k for k in keys if k.endswith(".bias")}
    if strategy.unet == "bitfit":
        return biases
    # DiffFit: biases, norms, and the output projections its scales gamma are folded into
    folded = {k for k in keys if k.endswith(("attn1.to_out.0.weight", "attn2.to_out.0.weight", "ff.net.2.weight"))}
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    return biases | _norm_keys(unet) | folded


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_exactly_the_strategys_tensors_change(name, tiny_model, table, tmp_path):
    strategy = STRATEGIES[name]
    summary = main(_argv(tiny_model, table, tmp_path, "--strategy", name))
    final = tmp_path / "final_model"
    for component in COMPONENTS:
        base, trained = _weights(tiny_model, component), _weights(final, component)
        assert base.keys() == trained.keys(), component  # a plain diffusers pipeline, adapters merged
        changed = {k for k in base if not torch.equal(base[k], trained[k])}
        if component == "unet":
            expected = _expected_unet_changes(strategy, base.keys(), tiny_model)
        else:
            expected = set(base) if strategy.trains[component] else set()
        assert changed == expected, (component, sorted(changed ^ expected)[:5])

    # the counts in the summary match the model
    counts = summary["trainable_parameters"]
    for component in COMPONENTS:
        if strategy.full[component]:
            assert counts[component] == sum(t.numel() for t in _weights(tiny_model, component).values())
        elif not strategy.trains[component]:
            assert counts[component] == 0
    if strategy.peft:
        saved = load_file(tmp_path / ADAPTERS[strategy.peft].weights_name)
        assert counts["unet"] == sum(t.numel() for t in saved.values())
    assert counts["total"] == sum(counts[c] for c in COMPONENTS)
    on_disk = json.loads((tmp_path / "training_summary.json").read_text())
    assert on_disk["trainable_parameters"] == counts and on_disk["strategy"]["name"] == name
    assert on_disk["steps"] == 2 and np.isfinite(on_disk["final_loss"])
    assert on_disk["arguments"]["train"]["strategy"] == name and "versions" in on_disk


def _eval_loss(unet, models, latents, states, seeds=range(8)):
    losses = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(diffusion_loss(unet, models.noise_scheduler, latents, states).item())
    return float(np.mean(losses))


# The tiny U-Net's attention is too small for LoRA on it alone to memorise images within a test's
# budget, so the LoRA run also adapts the feed-forward and convolution layers (same code path).
LORA_EVERYWHERE = ["--lora_rank", "8", "--lora_alpha", "8", "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0",
                   "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, lr, extra", [("unet", "2e-3", []), ("lora", "1e-2", LORA_EVERYWHERE)])
def test_overfits_a_small_batch(strategy, lr, extra, tiny_model, phantom_chexpert, tmp_path):
    # two images, one caption each: the model should memorise them
    images = tmp_path / "data"
    images.mkdir()
    table_dir = phantom_chexpert / "CheXpert-v1.0-small" / "train"
    for i, src in enumerate(sorted(table_dir.rglob("*_frontal.jpg"))[:2]):
        (images / f"{i}.jpg").write_bytes(src.read_bytes())
        (images / f"{i}.txt").write_text(PROMPT)
    out = tmp_path / "run"
    argv = _argv(tiny_model, images, out, "--strategy", strategy, *extra, steps=120)
    argv[argv.index("--train_csv")] = "--train_data_dir"
    argv[argv.index("--learning_rate") + 1] = lr
    cfg, data, adapter_cfg = parse_args(argv)

    base = load_components(tiny_model)
    from sdtune.data.dataset import ImageCaptionDataset, load_examples

    pixels = torch.stack([ImageCaptionDataset(load_examples(data), 64)[i]["pixel_values"] for i in range(2)])
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
        ids = base.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = base.text_encoder(ids)[0]
    before = _eval_loss(base.unet, base, latents, states)
    _, trained = train(cfg, data, adapter_cfg)
    after = _eval_loss(trained.unet.eval(), base, latents, states)
    assert after <= 0.5 * before, (before, after)


@pytest.mark.parametrize("strategy, extra", [
    ("unet", ["--use_ema"]), ("lora", []), ("bitfit", ["--use_8bit_adam"]),
    # random crops and flips drawn per (seed, epoch, sample), not from a stream a resume restarts
    ("unet+vae+text", ["--random_flip", "--center_crop", "false", "--dataloader_num_workers", "1"])])
def test_resume_equals_a_straight_run(strategy, extra, tiny_model, table, tmp_path):
    argv = _argv(tiny_model, table, tmp_path, "--strategy", strategy, "--checkpointing_steps", "2",
                 "--lr_scheduler", "linear", "--caption_dropout_prob", "0.3", *extra, steps=4)
    main(argv)
    straight = _weights(tmp_path / "final_model", "unet")
    optimizer_state = torch.load(tmp_path / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    assert any("__bnb_optimizer_quant_state__" in s for s in optimizer_state.values()) == ("--use_8bit_adam" in extra)
    # a crash right after step 2: its checkpoint is all that is left
    shutil.rmtree(tmp_path / "checkpoint-4")
    shutil.rmtree(tmp_path / "final_model")
    summary = main(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 4
    resumed, base = _weights(tmp_path / "final_model", "unet"), _weights(tiny_model, "unet")
    for k in straight:  # weights, optimizer, schedule, EMA, RNG and data position all restored
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(straight[k], base[k]) for k in straight)


def test_resuming_from_the_last_checkpoint_only_saves(tiny_model, table, tmp_path):
    argv = _argv(tiny_model, table, tmp_path, "--strategy", "bitfit", "--checkpointing_steps", "1")
    main(argv)
    straight = _weights(tmp_path / "final_model", "unet")
    shutil.rmtree(tmp_path / "final_model")  # say the final save was cut short: checkpoint-2 is the last step
    summary = main(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 2 and summary["final_loss"] is None  # no step taken, none logged
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    resumed = _weights(tmp_path / "final_model", "unet")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_resumed_ema_stays_on_the_device_of_the_weights_it_follows(tmp_path):
    from diffusers.training_utils import EMAModel

    from sdtune.checkpoints import load_ema, save_ema

    weights = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    save_ema(EMAModel(weights, decay=0.5), tmp_path / "ema.safetensors")
    resumed = EMAModel(weights, decay=0.5)
    resumed.to("meta")  # stands in for a GPU: the file itself loads onto the CPU
    load_ema(resumed, tmp_path / "ema.safetensors")
    assert [p.device.type for p in resumed.shadow_params] == ["meta", "meta"]


def _gradient_norms_at_each_step(monkeypatch) -> list[float]:
    """The total gradient norm the optimizer sees at each step (after clipping), recorded."""
    norms, step = [], torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return norms


def test_max_grad_norm_bounds_the_step_and_0_means_no_bound(tiny_model, table, tmp_path, monkeypatch):
    norms = _gradient_norms_at_each_step(monkeypatch)
    main(_argv(tiny_model, table, tmp_path / "tight", "--strategy", "lora", "--max_grad_norm", "1e-4", steps=3))
    assert len(norms) == 3 and max(norms) <= 1e-4 * (1 + 1e-5), norms
    norms.clear()
    runs = {}
    for bound in ("0", "1e9"):
        main(_argv(tiny_model, table, tmp_path / bound, "--strategy", "lora", "--max_grad_norm", bound))
        runs[bound] = load_file(tmp_path / bound / "pytorch_lora_weights.safetensors")
    assert min(norms) > 1e-4  # unclipped, where 1e-4 clipped every step
    assert runs["0"].keys() == runs["1e9"].keys()
    assert all(torch.equal(runs["0"][k], runs["1e9"][k]) for k in runs["0"])
    assert any(runs["0"][k].abs().max() > 0 for k in runs["0"] if k.endswith("lora.up.weight"))  # up starts at 0


def test_each_component_steps_with_its_own_learning_rate(tiny_model, table, tmp_path):
    # A text encoder at lr 0 beside a U-Net at 1e-3: one shared rate would move both or neither.
    main(_argv(tiny_model, table, tmp_path, "--strategy", "unet+text", "--unet_lr", "1e-3", "--text_encoder_lr", "0",
               steps=1))
    for component, moved in (("unet", True), ("text_encoder", False)):
        base, trained = _weights(tiny_model, component), _weights(tmp_path / "final_model", component)
        assert any(not torch.equal(base[k], trained[k]) for k in base) == moved, component


def test_only_the_trained_component_requires_grad(tiny_model, table, tmp_path):
    # Frozen parts that still required grad would cost memory for gradients never used.
    _, models = train(*parse_args(_argv(tiny_model, table, tmp_path, "--strategy", "text", steps=1)))
    assert {c for c in COMPONENTS if any(p.requires_grad for p in getattr(models, c).parameters())} == {"text_encoder"}


def test_validation_samples_the_training_target_without_dropout(tiny_model, table, tmp_path, monkeypatch):
    import sdtune.train as training

    sampled, trained = [], []
    call = StableDiffusionPipeline.__call__

    def spy_call(pipe, *args, **kwargs):
        dropout = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout)]
        sampled.append((pipe.scheduler.config.prediction_type, pipe.unet.training, any(m.training for m in dropout)))
        return call(pipe, *args, **kwargs)

    def spy_loss(unet, *args, **kwargs):
        trained.append(unet.training)
        return diffusion_loss(unet, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy_call)
    monkeypatch.setattr(training, "diffusion_loss", spy_loss)
    _, models = train(*parse_args(_argv(tiny_model, table, tmp_path, "--strategy", "lora", "--lora_dropout", "0.5",
                                        "--prediction_type", "v_prediction", "--validation_prompts", PROMPT,
                                        "--validation_steps", "1", "--validation_inference_steps", "2")))
    assert sampled == [("v_prediction", False, False)] * 2  # one validation after each of the two steps
    assert trained == [True, True]  # training goes on in train mode after a validation
    assert not models.unet.training  # what train() returns is ready to sample


def test_final_model_and_lora_file_reproduce_the_trained_model(tiny_model, table, tmp_path):
    cfg, data, adapter_cfg = parse_args(_argv(tiny_model, table, tmp_path, "--strategy", "lora", steps=3))
    _, models = train(cfg, data, adapter_cfg)

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    in_memory = image(StableDiffusionPipeline.from_pretrained(tiny_model, unet=models.unet.eval()))
    final = image(StableDiffusionPipeline.from_pretrained(tmp_path / "final_model"))
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    untrained = image(base)
    base.load_lora_weights(tmp_path)
    with_lora = image(base)
    assert np.abs(in_memory - untrained).max() > 1e-3  # training changed the picture...
    np.testing.assert_allclose(final, in_memory, atol=1e-4)  # ...and both saved forms reproduce it
    np.testing.assert_allclose(with_lora, in_memory, atol=1e-4)


def test_bf16_keeps_trained_weights_in_fp32(tiny_model, table, tmp_path):
    cfg, data, adapter_cfg = parse_args(_argv(tiny_model, table, tmp_path, "--strategy", "lora", "--mixed_precision", "bf16"))
    summary, models = train(cfg, data, adapter_cfg)
    assert np.isfinite(summary["final_loss"])
    dtypes = {n: p.dtype for n, p in models.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # trained: fp32 for the optimizer
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}  # frozen: half the memory
    assert models.vae.dtype == models.text_encoder.dtype == torch.bfloat16


def test_an_fp16_variant_trains_in_fp32_and_its_final_model_is_fp32(tiny_model, table, tmp_path):
    # transformers 5 loads a --variant fp16 text encoder in fp16 unless told otherwise: the fp32 U-Net
    # then failed on its fp16 embeddings under --mixed_precision no, and final_model/ held it in fp16.
    base = tmp_path / "base"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    for name in COMPONENTS:
        getattr(pipeline, name).half()
    pipeline.save_pretrained(base, variant="fp16")
    loaded = load_components(base, variant="fp16")
    assert {p.dtype for c in COMPONENTS for p in getattr(loaded, c).parameters()} == {torch.float32}
    summary, _ = train(*parse_args(_argv(base, table, tmp_path / "run", "--strategy", "lora", "--variant", "fp16")))
    assert np.isfinite(summary["final_loss"])
    for component, name in WEIGHT_FILES.items():
        saved = load_file(tmp_path / "run" / "final_model" / component / name)
        assert {t.dtype for t in saved.values()} == {torch.float32}, component


def _captioned_folder(phantom_chexpert, folder: Path, n: int) -> Path:
    """n phantom images with one caption each, in the tutorial's folder layout."""
    import shutil

    folder.mkdir()
    for i, image in enumerate(sorted((phantom_chexpert / "CheXpert-v1.0-small" / "train").rglob("*.jpg"))[:n]):
        shutil.copy(image, folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text("Chest x-ray of a patient with Edema")
    return folder


def test_a_short_last_accumulation_window_counts_like_a_short_batch(tiny_model, phantom_chexpert, tmp_path):
    """10 images: batch 2 x 3 accumulation gives windows of 3 and 2 batches; batch 6 gives batches of 6 and 4.
    The second step must see the same gradient both ways, not 2/3 of it (max_grad_norm 0: no clipping)."""
    data = _captioned_folder(phantom_chexpert, tmp_path / "data", 10)

    def trained(name, batch, accumulation):
        argv = _argv(tiny_model, data, tmp_path / name, "--strategy", "lora", "--max_grad_norm", "0",
                     "--gradient_accumulation_steps", accumulation)
        argv[argv.index("--train_csv")] = "--train_data_dir"
        argv[argv.index("--train_batch_size") + 1] = str(batch)
        summary, _ = train(*parse_args(argv))
        assert summary["steps"] == 2 and len(list(data.glob("*.jpg"))) == 10
        return load_file(tmp_path / name / "pytorch_lora_weights.safetensors")

    accumulated, whole = trained("accumulated", 2, 3), trained("whole", 6, 1)
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], atol=1e-5, rtol=1e-4)


def test_resume_across_epochs_with_random_flips_workers_and_a_short_window(tiny_model, phantom_chexpert, tmp_path,
                                                                            monkeypatch):
    """6 images, batch 2 x 2 accumulation: 2 steps an epoch, the second a window of 1 batch. Stopped at step 3
    (epoch 1, after its first window) and resumed, the run equals a straight one: each epoch draws its own
    flips in fresh loader workers, and the resumed short window is still known to be short."""
    from sdtune.data.dataset import ImageCaptionDataset

    data = _captioned_folder(phantom_chexpert, tmp_path / "data", 6)
    argv = _argv(tiny_model, data, tmp_path / "run", "--strategy", "lora", "--gradient_accumulation_steps", 2,
                 "--checkpointing_steps", 3, "--random_flip", "--dataloader_num_workers", 1, steps=5)
    argv[argv.index("--train_csv")] = "--train_data_dir"
    epochs, set_epoch = [], ImageCaptionDataset.set_epoch
    monkeypatch.setattr(ImageCaptionDataset, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e)))
    main(argv)
    assert list(dict.fromkeys(epochs)) == [0, 1, 2]  # each epoch draws anew (accelerate's loader also passes it on)
    straight = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    for left in ("checkpoint-5", "final_model"):  # a crash after step 3: its checkpoint is all that is left
        shutil.rmtree(tmp_path / "run" / left)
    (tmp_path / "run" / "pytorch_lora_weights.safetensors").unlink()
    assert main(argv + ["--resume_from_checkpoint", "latest"])["steps"] == 5
    resumed = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning",
                            "error::pytest.PytestUnraisableExceptionWarning")
def test_a_run_stops_its_loader_workers_before_the_next_starts(tiny_model, table, tmp_path, monkeypatch, capfd):
    """A trained VAE reads images through worker processes (persistent: no random crops or flips); the loop
    stops mid-epoch with them running. Left to the garbage collector, they went down wherever it next ran:
    in a later run's forked workers too (as bench/train_memory.py's in-process runs showed on a GPU machine),
    where torch's shutdown of the inherited copy fails with tracebacks. Here every worker collects at start."""
    import gc
    import multiprocessing
    import sys
    import threading

    import torch.utils.data._utils.worker as worker

    loop = worker._worker_loop

    def collecting_loop(*args, **kwargs):
        # Python's own reports (a worker inherits pytest's hooks, which would keep them to themselves)
        sys.unraisablehook, threading.excepthook = sys.__unraisablehook__, threading.__excepthook__
        gc.collect()
        return loop(*args, **kwargs)

    if multiprocessing.get_start_method() == "fork":  # only forked workers inherit the parent's garbage
        monkeypatch.setattr(worker, "_worker_loop", collecting_loop)
    argv = _argv(tiny_model, table, tmp_path, "--strategy", "vae", "--dataloader_num_workers", 2,
                 "--checkpointing_steps", 1, steps=1)
    gc.disable()  # the run alone must stop its workers
    try:
        main(argv)  # 1 of 39 steps an epoch
        assert multiprocessing.active_children() == []
        resume = _argv(tiny_model, table, tmp_path, "--strategy", "vae", "--dataloader_num_workers", 2,
                       "--resume_from_checkpoint", "latest", steps=2)
        assert main(resume)["steps"] == 2  # accelerate's loader that skips the first batch has its own workers
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_an_error_in_the_loop_still_stops_its_workers_and_gives_the_signals_back(tiny_model, table, tmp_path,
                                                                                   monkeypatch):
    """In-process callers (the benchmarks, a notebook) go on after an error such as a CUDA out-of-memory."""
    import gc
    import multiprocessing
    import signal

    from sdtune import train as train_module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_module, "diffusion_loss", out_of_memory)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gc.disable()  # the run alone must stop its workers
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            main(_argv(tiny_model, table, tmp_path, "--strategy", "vae", "--dataloader_num_workers", 2, steps=2))
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_bf16_does_not_round_the_trained_tensors_first(tiny_model, table, tmp_path):
    """DoRA's magnitudes start as the fp32 column norms of the base weights; the half-precision cast of the
    frozen weights must not round them (bf16 would, by up to 4e-3)."""
    from diffusers import UNet2DConditionModel

    cfg, data, adapter_cfg = parse_args(_argv(tiny_model, table, tmp_path, "--strategy", "dora", "--mixed_precision",
                                              "bf16", "--learning_rate", "1e-12", steps=1))
    train(cfg, data, adapter_cfg)
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    base = dict(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").named_modules())
    magnitudes = {k: v for k, v in saved.items() if k.endswith(".lora_magnitude_vector")}
    assert magnitudes
    for key, magnitude in magnitudes.items():
        weight = base[key.removeprefix("unet.").removesuffix(".lora_magnitude_vector")].weight
        torch.testing.assert_close(magnitude, weight.norm(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "lora", "--train_unet"], "not both"),
    (["--strategy", "lora", "--resume_from_checkpoint", "/nowhere/checkpoint-3"], "does not exist"),
    (["--strategy", "bitfit", "--mixed_precision", "bf16"], "needs a GPU"),
    (["--strategy", "unet", "--mixed_precision", "fp16"], "fp16 needs a GPU: use --mixed_precision bf16 or no"),
    (["--strategy", "lora", "--lr_warmup_steps", "100"], "has no effect with --lr_scheduler constant: use "
                                                           "--lr_scheduler constant_with_warmup"),
    (["--strategy", "lora", "--torch_compile", "--torch_compile_backend", "bogus"], "unknown --torch_compile_backend"),
    (["--strategy", "lora", "--torch_compile", "--torch_compile_mode", "reduce-overhead"], "uses CUDA graphs"),
    (["--strategy", "lora", "--torch_compile", "--torch_compile_backend", "eager", "--train_batch_size", "500"],
     "make no full batch of 500: lower --train_batch_size"),
])
def test_user_errors(extra, message, tiny_model, table, tmp_path):
    with pytest.raises(UserError, match=message):
        main(_argv(tiny_model, table, tmp_path, *extra))


def test_numbers_out_of_range_are_all_named_in_one_line_before_anything_is_written(tiny_model, table, tmp_path):
    out = tmp_path / "out"
    argv = _argv(tiny_model, table, out, "--strategy", "lora", "--checkpointing_steps", "0", "--validation_fraction",
                 "20", "--caption_dropout_prob", "2", "--lora_rank", "0")
    argv[argv.index("--resolution") + 1], argv[argv.index("--max_train_steps") + 1] = "60", "0"
    with pytest.raises(UserError) as error:
        main(argv)
    assert str(error.value) == (
        "--max_train_steps 0 must be at least 1; --caption_dropout_prob 2 must be from 0 to 1 (a fraction: 0.2 means "
        "20%); --checkpointing_steps 0 must be at least 1; --resolution 60 must be a positive multiple of 8 (the VAE divides "
        "images by 8); --validation_fraction 20 must be at least 0 and below 1 (a fraction: 0.2 means 20%); "
        "--lora_rank 0 must be at least 1")
    assert not out.exists()
    for flag, value in (("--train_batch_size", "0"), ("--gradient_accumulation_steps", "0"), ("--learning_rate", "-1")):
        with pytest.raises(UserError, match=f"^{flag} {value} must be at least "):  # (a rate of 0 holds a part still)
            main(_argv(tiny_model, table, out, "--strategy", "lora", flag, value))
    for flag, value in (("--seed", "-1"), ("--split_seed", "-5"), ("--seed", str(2**32))):  # numpy and torch refuse them
        with pytest.raises(UserError, match=f"^{flag} {value} must be from 0 to 4294967295"):
            main(_argv(tiny_model, table, out, "--strategy", "lora", "--validation_fraction", "0.5", flag, value))
    # the data check reads the same bounds
    from sdtune.data.__main__ import main as data_main

    with pytest.raises(UserError, match="--validation_fraction 20 must be at least 0 and below 1"):
        data_main(["check", "--train_csv", str(table), "--validation_fraction", "20"])


def test_a_refused_precision_leaves_the_previous_run_alone(tiny_model, table, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_summary.json").write_text('{"status": "complete"}')
    with pytest.raises(UserError, match="needs a GPU"):
        main(_argv(tiny_model, table, tmp_path / "run", "--strategy", "lora", "--mixed_precision", "fp16",
                   "--overwrite_output_dir"))
    assert (tmp_path / "run" / "training_summary.json").read_text() == '{"status": "complete"}'


def test_missing_table_is_one_clear_error(tiny_model, tmp_path):
    with pytest.raises(UserError, match="does not exist: check --train_csv"):
        main(_argv(tiny_model, tmp_path / "train.csv", tmp_path / "out", "--strategy", "lora"))


def test_a_held_out_split_without_patient_ids_warns(tiny_model, table, tmp_path, capsys):
    folder = tmp_path / "images"
    for i, path in enumerate(sorted((table.parent / "train").rglob("*.jpg"))[:4]):
        (folder / f"patient0000{i}").mkdir(parents=True)  # folders named by patient, as is common
        shutil.copy(path, folder / f"patient0000{i}" / "view1.jpg")
        (folder / f"patient0000{i}" / "view1.txt").write_text(PROMPT)
    argv = _argv(tiny_model, table, tmp_path / "run", "--strategy", "bitfit", "--validation_fraction", "0.25", steps=1)
    at = argv.index("--train_csv")
    argv[at:at + 2] = ["--train_data_dir", str(folder)]
    main(argv)
    out = capsys.readouterr().out
    assert "has no patient ids (e.g. an images folder), so the held-out split is by image" in out
    # held_out.txt names the held-out file by a digest of its path, never by its (patient) folder
    held = (tmp_path / "run" / "held_out.txt").read_text().splitlines()
    assert len(held) == 1 and re.fullmatch(r"file [0-9a-f]{16}", held[0])
    assert held[0] in {held_out_name(ex) for ex in read_examples(DataConfig(train_data_dir=str(folder)))[0]}
    main(_argv(tiny_model, table, tmp_path / "table-run", "--strategy", "bitfit", "--validation_fraction", "0.25", steps=1))
    assert "no patient ids" not in capsys.readouterr().out  # CheXpert's paths name the patient


def test_a_resume_must_hold_out_what_its_checkpoints_held_out(tiny_model, table, tmp_path):
    """downstream.py tests its classifier on held_out.txt's patients: a resume that changed the split
    would have trained on some of them, so it is refused, and held_out.txt is left as it was."""
    run = tmp_path / "run"
    main(_argv(tiny_model, table, run, "--strategy", "bitfit", "--checkpointing_steps", "1", steps=1))
    assert not (run / "held_out.txt").exists()
    resumed = ("--strategy", "bitfit", "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match=r"trained with another held-out set \(0 images held out then, \d+ now\)"):
        main(_argv(tiny_model, table, run, *resumed, "--validation_fraction", "0.25", steps=2))
    assert not (run / "held_out.txt").exists()

    main(_argv(tiny_model, table, run, "--strategy", "bitfit", "--checkpointing_steps", "1", "--overwrite_output_dir",
               "--validation_fraction", "0.25", steps=1))
    held_out = (run / "held_out.txt").read_text()
    with pytest.raises(UserError, match="another held-out set"):
        main(_argv(tiny_model, table, run, *resumed, "--validation_fraction", "0.25", "--split_seed", "1", steps=2))
    with pytest.raises(UserError, match="another held-out set"):
        main(_argv(tiny_model, table, run, *resumed, steps=2))
    with pytest.raises(UserError, match=f"the checkpoints in {run} were trained with another held-out set"):
        # continued in a new folder from a named checkpoint: compared with the folder it came from
        main(_argv(tiny_model, table, tmp_path / "elsewhere", "--strategy", "bitfit", "--resume_from_checkpoint",
                   run / "checkpoint-1", steps=2))
    assert (run / "held_out.txt").read_text() == held_out
    main(_argv(tiny_model, table, run, *resumed, "--validation_fraction", "0.25", steps=2))  # the same split: resumes
    assert json.loads((run / "training_summary.json").read_text())["steps"] == 2

    # started afresh without a held-out set: the old list of "unseen" patients goes
    main(_argv(tiny_model, table, run, "--strategy", "bitfit", "--overwrite_output_dir", steps=1))
    assert not (run / "held_out.txt").exists()


def test_a_resume_with_other_adapter_settings_or_parts_is_one_line(tiny_model, table, tmp_path):
    run = tmp_path / "run"
    main(_argv(tiny_model, table, run, "--strategy", "lora", "--lora_rank", "4", "--checkpointing_steps", "1", steps=1))
    resumed = ("--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match=r"unet_trained.safetensors: \d+ tensors have another shape, e.g. .*lora_A.* is "
                                        r"\(4, \d+\) there and \(8, \d+\) here: resume with the strategy"):
        main(_argv(tiny_model, table, run, "--strategy", "lora", "--lora_rank", "8", *resumed, steps=2))
    with pytest.raises(UserError, match="text_encoder_trained.safetensors is missing: the checkpoint was saved by a "
                                        "run that did not train this part"):
        main(_argv(tiny_model, table, run, "--peft", "lora", "--lora_rank", "4", "--train_text_encoder", *resumed,
                   steps=2))


def test_validation_fid_is_logged_during_training(tiny_model, table, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the real set's feature cache
    argv = _argv(tiny_model, table, tmp_path / "run", "--strategy", "lora", "--validation_fid_steps", "1",
                 "--validation_real", table.parent / "valid.csv", "--validation_prompts", PROMPT, "Chest x-ray",
                 "--validation_fid_images", "4", "--validation_inference_steps", "2", "--checkpointing_steps", "1")
    main(argv)
    lines = (tmp_path / "run" / "validation" / "fid.csv").read_text().splitlines()
    assert lines[0] == "step,fid,real_images,generated_images"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[1]) > 0 and r[3] == "4" for r in rows)
    # resumed from the earlier checkpoint: step 2's row is replaced, not repeated
    main([*argv, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-1")])
    again = (tmp_path / "run" / "validation" / "fid.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in again[1:]] == ["1", "2"] and again[1] == lines[1]


def test_a_bad_validation_real_set_stops_the_run_before_its_first_step(tiny_model, table, tmp_path, monkeypatch):
    # Its features are extracted (and cached) up front, not at the first validation hours later.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        render_chest_xray({}, 64, rng).save(real / f"{i}.png")
    (real / "3.png").write_bytes((real / "0.png").read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match="3.png"):
        main(_argv(tiny_model, table, tmp_path / "run", "--strategy", "lora", "--validation_fid_steps", "1",
                   "--validation_real", real, "--validation_prompts", PROMPT, "--checkpointing_steps", "1"))
    assert not (tmp_path / "run" / "checkpoint-1").exists()  # no step was trained
    (real / "3.png").unlink()  # fixed: the same command runs (a stopped run left nothing that looks like a run)
    main(_argv(tiny_model, table, tmp_path / "run", "--strategy", "lora", "--validation_fid_steps", "1",
               "--validation_real", real, "--validation_prompts", PROMPT, "--validation_fid_images", "2",
               "--validation_inference_steps", "1", steps=1))
    assert len(list((tmp_path / "cache" / "sdtune" / "features").glob("*.npy"))) == 1  # the real set's, read at step 1


def test_a_relative_base_model_path_is_recorded_absolute(tiny_model, table, tmp_path, monkeypatch):
    # Else synthesis of a checkpoint from another folder would read "tiny-sd150" as a hub id.
    from sdtune.synthesis import load_pipeline, resolve_model

    monkeypatch.chdir(tiny_model.parent)
    argv = _argv(tiny_model, table, tmp_path / "run", "--strategy", "bitfit", "--checkpointing_steps", "1", steps=1)
    argv[argv.index(str(tiny_model))] = tiny_model.name  # relative to the working folder
    main(argv)
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["arguments"]["train"]["pretrained_model_name_or_path"] == str(tiny_model.resolve())
    monkeypatch.chdir(tmp_path)
    source = resolve_model(str(tmp_path / "run" / "checkpoint-1"))
    assert source.base_model == str(tiny_model.resolve()) and load_pipeline(source).unet is not None


def test_validation_fid_needs_a_real_set(tiny_model, table, tmp_path):
    with pytest.raises(UserError, match="--validation_fid_steps needs --validation_real"):
        main(_argv(tiny_model, table, tmp_path, "--strategy", "lora", "--validation_fid_steps", "1"))


def test_validation_with_ema_renders_the_ema_weights_and_restores_the_trained_ones(tiny_model, table, tmp_path):
    from diffusers.training_utils import EMAModel

    from sdtune.train import ema_weights

    weights = [torch.nn.Parameter(torch.ones(3))]
    ema = EMAModel(weights, decay=0.5)
    ema.shadow_params[0].fill_(7.0)
    with ema_weights(ema, weights):
        assert torch.equal(weights[0].data, torch.full((3,), 7.0))  # validation sees what gets saved
    assert torch.equal(weights[0].data, torch.ones(3))  # training goes on with its own weights
    with ema_weights(None, weights):
        assert torch.equal(weights[0].data, torch.ones(3))


def test_each_learning_rate_is_logged_under_its_group(tiny_model, table, tmp_path):
    """DiffFit's scales train at 10x the U-Net's rate: "lr" is the U-Net's, each group's under lr/NAME."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = _argv(tiny_model, table, out, "--strategy", "difffit", "--lr_scheduler", "constant", steps=1)
    argv[argv.index("--report_to") + 1] = "tensorboard"
    main(argv)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert logged["lr"] == pytest.approx(1e-3)
    assert logged["lr/unet"] == pytest.approx(1e-3) and logged["lr/unet/difffit_gamma"] == pytest.approx(1e-2)


def test_accumulation_windows_cover_an_epoch_exactly():
    from sdtune.train import accumulation_window

    # each batch's window: how many batches share its optimizer step, listed by hand
    for batches, steps, expected in [(5, 3, [3, 3, 3, 2, 2]), (6, 3, [3] * 6), (1, 4, [1]), (7, 2, [2] * 6 + [1]),
                                     (4, 1, [1] * 4), (9, 4, [4] * 8 + [1])]:
        assert [accumulation_window(i, batches, steps) for i in range(batches)] == expected, (batches, steps)
    for batches in range(1, 12):
        for steps in range(1, 5):
            windows = [accumulation_window(i, batches, steps) for i in range(batches)]
            assert sum(1 / w for w in windows) == pytest.approx(-(-batches // steps))  # one step per window

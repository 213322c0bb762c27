"""synthesize_images.py on the tiny model: determinism, resume, sharding, labels CSV, every model-path kind,
speed options, wrappers."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from helpers.launch import recorded_launch
from PIL import Image

from sdtune import synthesis
from sdtune.data.records import DatasetError
from sdtune.data.tables import CHEXPERT_LABELS, read_table
from sdtune.errors import UserError, run_cli
from sdtune.strategies import STRATEGIES
from sdtune.synthesis import (SynthesisConfig, apply_speed, build_plan, image_seed, load_pipeline, main, parse_args,
                              prepare_pipeline, render, resolve_model, speed_settings)
from sdtune.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--height", "64", "--width", "64"]
PROMPTS = "Chest x-ray of a patient with Edema, Chest x-ray of a patient with no significant findings"


@pytest.fixture(scope="module")
def table(phantom_chexpert):
    return phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"


@pytest.fixture(scope="module")
def runs(tiny_model, table, tmp_path_factory):
    """run(strategy, *extra) -> a finished tiny training run folder, trained once per module.
    Plain runs sit in ROOT/outputs/<strategy>, where the synthesis wrappers look by default."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def run(strategy, *extra):
        key = (strategy, *extra)
        if key not in done:
            out = root / "outputs" / strategy if not extra else root / "custom" / f"{strategy}-{len(done)}"
            train_main(["--pretrained_model_name_or_path", str(tiny_model), "--train_csv", str(table),
                        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
                        "--learning_rate", "1e-3", "--output_dir", str(out), "--report_to", "none",
                        "--checkpointing_steps", "1000", "--strategy", strategy, *extra])
            done[key] = out
        return done[key]

    run.root = root
    return run


def synth(out, model, *extra, prompts=PROMPTS):
    argv = ["--model_path", str(model), "--output_dir", str(out), *FAST, *map(str, extra)]
    if prompts is not None:
        argv += ["--prompts", prompts]
    return main(argv)


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((Path(folder) / "images").glob("*.png"))}


def metadata(folder):
    return pd.read_csv(Path(folder) / "metadata.csv", dtype=str, keep_default_na=False)


def float_images(model, base=None, fuse_lora=True, **settings):
    settings = {"prompts": PROMPTS, "steps": 2, "height": 64, "width": 64, **settings}
    cfg = SynthesisConfig(model_path=str(model), **settings)
    pipeline = prepare_pipeline(load_pipeline(resolve_model(str(model), base), fuse_lora), cfg, "cpu")
    return render(pipeline, build_plan(cfg, None), cfg)


# ------------------------------------------------------------------------------- plan and seeds


def test_image_seed_depends_on_base_seed_and_index_only():
    assert image_seed(42, 0) == 3042642129590909369  # sha256("42:0"), first 63 bits: a stable, documented rule
    seeds_42 = {image_seed(42, k) for k in range(1000)}
    seeds_43 = {image_seed(43, k) for k in range(1000)}
    assert len(seeds_42) == 1000 and not seeds_42 & seeds_43  # neighbouring base seeds share no image
    assert all(0 <= s < 2**63 for s in seeds_42)


def test_plan_from_prompts_and_prompts_file(tmp_path):
    cfg = SynthesisConfig(model_path="m", prompts=" a ,b,, c ", num_images=2, seed=7)
    plan = build_plan(cfg, None)
    assert [p.prompt for p in plan] == ["a", "a", "b", "b", "c", "c"]
    assert [p.index for p in plan] == list(range(6)) and [p.seed for p in plan] == [image_seed(7, k) for k in range(6)]
    (tmp_path / "prompts.txt").write_text("first, with a comma\n\n  second  \n\n")
    plan = build_plan(SynthesisConfig(model_path="m", prompts_file=str(tmp_path / "prompts.txt")), None)
    assert [p.prompt for p in plan] == ["first, with a comma", "second"]
    # a byte-order mark (Windows editors) is not part of the first prompt: it would be tokenised
    (tmp_path / "prompts.txt").write_bytes("\ufefffirst\r\nsecond\r\n".encode("utf-8"))
    plan = build_plan(SynthesisConfig(model_path="m", prompts_file=str(tmp_path / "prompts.txt")), None)
    assert [p.prompt for p in plan] == ["first", "second"]


def test_an_output_folder_synthesis_did_not_start_is_refused(tmp_path):
    from sdtune.synthesis import check_config

    def check(out):
        check_config(SynthesisConfig(model_path="m", prompts="a", output_dir=str(out)))

    check(tmp_path / "new")  # a new folder
    (tmp_path / "killed" / "images").mkdir(parents=True)
    check(tmp_path / "killed")  # a run killed before it wrote synthesis_config.json leaves an empty images/
    (tmp_path / "killed" / "prompts.txt").write_text("a\n")  # this run's own prompts (--generate-samples)
    (tmp_path / "killed" / ".prompts.txt.123").write_text("a\n")  # another process writing its copy
    check_config(SynthesisConfig(model_path="m", prompts_file=str(tmp_path / "killed" / "prompts.txt"),
                                 output_dir=str(tmp_path / "killed")))
    with pytest.raises(UserError, match="did not write"):  # someone else's prompts are not this run's
        check(tmp_path / "killed")
    real = tmp_path / "real"  # a real dataset: its PNGs would count as made, its metadata.csv be replaced
    (real / "images").mkdir(parents=True)
    (real / "images" / "000000.png").write_bytes(b"png")
    (real / "metadata.csv").write_text("file_name,patient_id\nimages/000000.png,patient00017\n")
    with pytest.raises(UserError, match=r"already holds files that synthesize_images.py did not write"):
        check(real)
    (real / "synthesis_config.json").write_text("{}")  # one of its own: resumed (its settings are checked later)
    check(real)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file: pass a folder"):
        check(tmp_path / "a_file")
    assert (real / "metadata.csv").read_text().endswith("patient00017\n")


def test_hyphen_and_underscore_flags_give_the_same_settings():
    values = {"model_path": "m", "base_model": "b", "output_dir": "o", "prompts": "p", "labels_csv": "l.csv",
              "caption_template": "study", "negative_prompt": "blurry", "guidance_scale": "3.0", "num_images": "2",
              "batch_size": "4", "mixed_precision": "bf16", "fuse_lora": "false", "prompts_file": "f.txt",
              "channels_last": "true", "fuse_qkv": "false", "cudnn_benchmark": "false", "torch_compile": "true",
              "torch_compile_mode": "max-autotune-no-cudagraphs", "torch_compile_backend": "eager"}
    underscores = [x for k, v in values.items() for x in (f"--{k}", v)]
    hyphens = [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", v)]
    assert parse_args(underscores) == parse_args(hyphens)
    cfg = parse_args(hyphens)
    assert cfg.fuse_lora is False and cfg.guidance_scale == 3.0 and cfg.batch_size == 4 and cfg.mixed_precision == "bf16"
    assert (cfg.channels_last, cfg.fuse_qkv, cfg.cudnn_benchmark, cfg.torch_compile) == (True, False, False, True)
    assert (cfg.torch_compile_mode, cfg.torch_compile_backend) == ("max-autotune-no-cudagraphs", "eager")
    # a bare flag turns an option on; left out, the speed options are "auto" (None: decided by the device)
    bare = parse_args(["--channels_last", "--torch_compile"])
    assert (bare.channels_last, bare.torch_compile, bare.fuse_qkv, bare.cudnn_benchmark) == (True, True, None, None)


# ------------------------------------------------------------------------------- images


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' Euler a + numpy 2
def test_image_equals_the_pipeline_called_directly(runs, tmp_path):
    final = runs("lora") / "final_model"
    synth(tmp_path / "pndm", final, "--num_images", "2")
    # A stochastic sampler, and a guidance scale other than the pipeline's default (7.5)
    synth(tmp_path / "euler_a", final, "--scheduler", "euler_a", "--negative_prompt", "blurry", "--guidance_scale", "2")
    pipeline = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    for out, k, guidance in ((tmp_path / "pndm", 3, 7.5), (tmp_path / "euler_a", 1, 2.0)):
        row = metadata(out).iloc[k]
        if out.name == "euler_a":
            pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
        assert row["seed"] == str(image_seed(42, k)) and row["scheduler"] == out.name
        assert float(row["guidance"]) == guidance

        def direct(scale):
            return np.asarray(pipeline(row["prompt"], negative_prompt=row["negative_prompt"] or None,
                                       num_inference_steps=2, guidance_scale=scale, height=64, width=64,
                                       generator=torch.Generator().manual_seed(int(row["seed"]))).images[0])

        assert np.array_equal(direct(guidance), pixels(out)[row["file_name"].split("/")[1]])
    assert not np.array_equal(direct(2.0), direct(7.5))  # so the scale is seen, not just recorded


def test_batch_size_does_not_change_the_images(runs, tmp_path):
    final = runs("lora") / "final_model"
    synth(tmp_path / "b1", final, "--num_images", "3", "--batch_size", "1")
    synth(tmp_path / "b3", final, "--num_images", "3", "--batch_size", "3")
    one, three = pixels(tmp_path / "b1"), pixels(tmp_path / "b3")
    assert list(one) == list(three) == [f"{k:06d}.png" for k in range(6)]
    assert metadata(tmp_path / "b1").equals(metadata(tmp_path / "b3"))
    diff = np.stack([np.abs(one[n].astype(int) - three[n].astype(int)) for n in one])
    # Same seeds and noise; CPU conv/matmul kernels round differently for batch 1 and 3 (~1e-6),
    # which can move a pixel across a rounding boundary: at most 1 level, rarely.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_killed_run_resumes_without_duplicates_and_with_identical_images(runs, tmp_path, monkeypatch):
    final = runs("lora") / "final_model"
    reference = tmp_path / "reference"
    synth(reference, final, "--num_images", "3")
    out = tmp_path / "resumed"

    real_write, written = synthesis.write_png, []

    def killed_after_three(image, path, info):
        if len(written) == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"\x89PNG half an ima")  # the kill hits mid-write
            raise KeyboardInterrupt
        real_write(image, path, info)
        written.append(path.name)

    monkeypatch.setattr(synthesis, "write_png", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        synth(out, final, "--num_images", "3")
    monkeypatch.setattr(synthesis, "write_png", real_write)
    images = out / "images"
    assert sorted(p.name for p in images.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png.tmp"]
    assert not (out / "metadata.csv").exists()
    # a PNG cut short (e.g. copied from a full disk) is not done either
    images.joinpath("000001.png").write_bytes(images.joinpath("000001.png").read_bytes()[:200])
    kept = {n: images.joinpath(n).stat().st_mtime_ns for n in ("000000.png", "000002.png")}

    summary = synth(out, final, "--num_images", "3")
    assert summary["made"] == 4 and summary["skipped"] == 2  # 000001, 000003, 000004, 000005
    assert sorted(p.name for p in images.iterdir()) == [f"{k:06d}.png" for k in range(6)]  # no .tmp, no extras
    assert {n: images.joinpath(n).stat().st_mtime_ns for n in kept} == kept  # done images are not redone
    assert all(np.array_equal(a, b) for a, b in zip(pixels(out).values(), pixels(reference).values()))
    assert (out / "metadata.csv").read_text() == (reference / "metadata.csv").read_text()
    # a third run has nothing left to do
    assert synth(out, final, "--num_images", "3")["made"] == 0


def test_resume_refuses_a_folder_made_with_other_settings(runs, tmp_path):
    final = runs("lora") / "final_model"
    synth(tmp_path, final)
    with pytest.raises(UserError, match=r"other settings \(steps: 2 there, 3 now\)"):
        main(["--model_path", str(final), "--output_dir", str(tmp_path), "--prompts", PROMPTS, "--steps", "3",
              "--height", "64", "--width", "64"])
    with pytest.raises(UserError, match="other prompts, counts or seed"):
        synth(tmp_path, final, "--seed", "1")
    for flag, value in (("--guidance_scale", "3"), ("--scheduler", "ddim"), ("--fuse_lora", "false")):
        with pytest.raises(UserError, match=rf"other settings \({flag[2:]}: "):  # each setting that changes pixels
            synth(tmp_path, final, flag, value)
    assert synth(tmp_path, final, "--batch_size", "2")["made"] == 0  # batch size does not change images


def test_resume_knows_a_model_retrained_in_place_and_the_same_model_by_another_name(runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(runs("bitfit"), run)
    out = tmp_path / "set"
    synth(out, run / "final_model")
    # the run folder for its final_model/, and the model's own scheduler by name: the same images
    assert synth(out, run, "--scheduler", "pndm")["made"] == 0
    weights = next((run / "final_model" / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    save_file({k: v + 1e-3 for k, v in tensors.items()}, weights, metadata={"format": "pt"})  # retrained in place
    (out / "images" / "000000.png").unlink()
    with pytest.raises(UserError, match=r"other settings \(model: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now\)"):
        synth(out, run)
    assert not (out / "images" / "000000.png").exists()  # nothing of the new model mixed in


def test_prompts_are_encoded_as_training_encodes_captions(runs):
    pipeline = StableDiffusionPipeline.from_pretrained(runs("lora") / "final_model", safety_checker=None)
    prompt = "Chest x-ray of a patient with Pleural Effusion"
    tok = pipeline.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        trained_on = pipeline.text_encoder(ids, return_dict=False)[0]  # sdtune.train's call: no attention mask
        sampled_with = pipeline.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(trained_on, sampled_with)


def test_mixed_precision_sets_the_pipeline_dtype(tiny_model):
    cfg = SynthesisConfig(model_path=str(tiny_model), prompts="a", mixed_precision="bf16")
    pipeline = prepare_pipeline(load_pipeline(resolve_model(str(tiny_model))), cfg, "cpu")
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.bfloat16}


# ------------------------------------------------------------------------------- speed options

# The speed options must not change the images beyond float rounding. Tolerance: 1e-5 on pixels in
# [0, 1] (fp32, CPU, 2 steps). Measured on the tiny LoRA checkpoint: channels_last moves pixels by at
# most 3.0e-6 (NHWC convolution kernels sum in another order), fuse_qkv by 0 (each row of the fused
# matmul is a row of one of the three); 1e-5 leaves headroom and is ~400x below one 8-bit level
# (3.9e-3). A wrong fusion, the LoRA's q/k/v deltas dropped, is 3.6e-2 off after only two training
# steps (test_fuse_qkv_refuses_an_unmerged_adapter).


def _uses_channels_last(module):
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return bool(convs) and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def _fused(module):
    return {type(p).__name__ for p in module.attn_processors.values()} == {"FusedAttnProcessor2_0"}


def test_speed_options_default_on_with_cuda_and_off_on_the_cpu(tiny_model, monkeypatch):
    pipeline = load_pipeline(resolve_model(str(tiny_model)))  # speed_settings only reads it
    auto = SynthesisConfig(model_path=str(tiny_model), prompts="a")
    off = {"channels_last": False, "fuse_qkv": False, "cudnn_benchmark": False, "torch_compile": None,
           "sdpa_backend": "auto"}
    assert speed_settings(pipeline, auto, "cpu") == off
    probed = []
    monkeypatch.setattr(synthesis, "group_norm_keeps_channels_last", lambda device: probed.append(device) or True)
    assert speed_settings(pipeline, auto, "cuda:1") == {**off, "channels_last": True, "fuse_qkv": True,
                                                        "cudnn_benchmark": True}
    assert probed == ["cuda:1"]
    # A GroupNorm that returns NCHW (CUDA in torch 2.11) would convert the layout twice around each of
    # them: channels_last stays off, unless inductor chooses the layouts or the user asks for it.
    monkeypatch.setattr(synthesis, "group_norm_keeps_channels_last", lambda device: False)
    assert speed_settings(pipeline, auto, "cuda")["channels_last"] is False
    compiled = SynthesisConfig(model_path="m", prompts="a", torch_compile=True)
    assert speed_settings(pipeline, compiled, "cuda")["channels_last"] is True
    asked = SynthesisConfig(model_path="m", prompts="a", channels_last=True)
    assert speed_settings(pipeline, asked, "cuda")["channels_last"] is True
    chosen = SynthesisConfig(model_path="m", prompts="a", channels_last=True, fuse_qkv=False, torch_compile=True)
    assert speed_settings(pipeline, chosen, "cuda") == {
        "channels_last": True, "fuse_qkv": False, "cudnn_benchmark": True, "sdpa_backend": "auto",
        "torch_compile": {"modules": ["unet", "vae.decoder"], "backend": "inductor", "mode": "default", "dynamic": False}}
    eager = SynthesisConfig(model_path="m", prompts="a", torch_compile=True, torch_compile_backend="eager")
    assert speed_settings(pipeline, eager, "cpu")["torch_compile"]["mode"] is None  # modes are inductor's


def test_sdpa_backend_goes_first_while_the_pipeline_samples_and_torchs_order_returns_after(tiny_model):
    cfg = SynthesisConfig(model_path=str(tiny_model), prompts="a", steps=2, height=64, width=64, sdpa_backend="math")
    pipeline = prepare_pipeline(load_pipeline(resolve_model(str(tiny_model))), cfg, "cpu")
    first = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: first.append(torch._C._get_sdp_priority_order()[0]))
    before = torch._C._get_sdp_priority_order()
    images = render(pipeline, build_plan(cfg, None), cfg)
    # every U-Net call (PNDM makes 3 of 2 steps)
    assert first == [int(torch.nn.attention.SDPBackend.MATH)] * len(pipeline.scheduler.timesteps) == [0] * 3
    assert np.isfinite(images).all()
    assert torch._C._get_sdp_priority_order() == before


def test_group_norm_probe_tells_whether_the_layout_survives(monkeypatch):
    assert synthesis.group_norm_keeps_channels_last("cpu")  # torch's CPU GroupNorm has NHWC kernels
    group_norm = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm",  # as torch 2.11's CUDA kernel: NCHW out
                        lambda x, groups, *args, **kwargs: group_norm(x.contiguous(), groups, *args, **kwargs))
    assert not synthesis.group_norm_keeps_channels_last("cpu")


@pytest.mark.parametrize("options", [{"channels_last": True}, {"fuse_qkv": True},
                                     {"channels_last": True, "fuse_qkv": True}], ids=["channels_last", "fuse_qkv", "both"])
def test_channels_last_and_fuse_qkv_give_the_same_images(options, runs):
    checkpoint = runs("lora") / "checkpoint-2"  # a trained LoRA, merged at load, then fused
    cfg = SynthesisConfig(model_path=str(checkpoint), prompts=PROMPTS, steps=2, height=64, width=64, **options)
    pipeline = prepare_pipeline(load_pipeline(resolve_model(str(checkpoint))), cfg, "cpu")
    if options.get("fuse_qkv"):
        assert _fused(pipeline.unet) and _fused(pipeline.vae)
    if options.get("channels_last"):
        assert _uses_channels_last(pipeline.unet) and _uses_channels_last(pipeline.vae)
    fast = render(pipeline, build_plan(cfg, None), cfg)
    plain = float_images(checkpoint)
    assert np.abs(fast - plain).max() <= 1e-5, np.abs(fast - plain).max()


def test_fuse_qkv_refuses_an_unmerged_adapter(runs, capsys, monkeypatch):
    monkeypatch.setattr(synthesis, "group_norm_keeps_channels_last", lambda device: True)  # no CUDA to probe here
    checkpoint = str(runs("lora") / "checkpoint-2")
    pipeline = load_pipeline(resolve_model(checkpoint), fuse_lora=False)  # peft LoRA layers on to_q/k/v
    asked = SynthesisConfig(model_path=checkpoint, prompts=PROMPTS, steps=2, height=64, width=64, fuse_lora=False,
                            fuse_qkv=True)
    with pytest.raises(UserError, match=r"--fuse_qkv would drop weights: .*to_q is a peft\..*--fuse_qkv false"):
        speed_settings(pipeline, asked, "cpu")
    auto = SynthesisConfig(model_path=checkpoint, prompts=PROMPTS, fuse_lora=False)
    assert speed_settings(pipeline, auto, "cuda")["fuse_qkv"] is False  # auto: left off, with a note
    assert "note: fuse_qkv left off" in capsys.readouterr().out
    # Why: fused anyway, the adapter's q/k/v deltas drop out and the images change far beyond rounding.
    unfused = render(pipeline, build_plan(asked, None), asked)
    apply_speed(pipeline, {"fuse_qkv": True, "channels_last": False, "cudnn_benchmark": False, "torch_compile": None})
    assert np.abs(render(pipeline, build_plan(asked, None), asked) - unfused).max() > 1e-2


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters are process-wide: empty before, emptied after."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def test_torch_compile_gives_the_same_images_and_compiles_once_per_batch_shape(tiny_model, fresh_dynamo):
    """Backend eager: dynamo traces the U-Net and the VAE decoder as inductor would receive them,
    without inductor's minutes of code generation."""
    cfg = SynthesisConfig(model_path=str(tiny_model), prompts=PROMPTS, num_images=2, steps=2, height=64, width=64,
                          batch_size=2, torch_compile=True, torch_compile_backend="eager")
    plan = build_plan(cfg, None)  # 4 images: two batches of 2
    plain_cfg = dataclasses.replace(cfg, torch_compile=False)
    plain = prepare_pipeline(load_pipeline(resolve_model(str(tiny_model))), plain_cfg, "cpu")
    plain = np.concatenate([render(plain, plan[:2], plain_cfg), render(plain, plan[2:], plain_cfg)])  # same batches
    pipeline = prepare_pipeline(load_pipeline(resolve_model(str(tiny_model))), cfg, "cpu")
    first = render(pipeline, plan[:2], cfg)
    assert fresh_dynamo["stats"]["unique_graphs"] == 2  # one U-Net graph for all steps, one decoder graph
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])  # the whole U-Net is one graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = render(pipeline, plan[2:], cfg)  # same batch size, other prompts and seeds: no recompile
        with pytest.raises(torch._dynamo.exc.RecompileError):
            render(pipeline, plan[:1], cfg)  # another batch size does recompile (dynamic=False): the check is live
    assert np.abs(np.concatenate([first, second]) - plain).max() <= 1e-6


def test_speed_options_are_recorded_and_do_not_block_a_resume(tiny_model, tmp_path, capsys):
    synth(tmp_path, tiny_model, "--channels_last", "--fuse_qkv", "--cudnn_benchmark", "false", "--sdpa_backend", "cudnn")
    config = json.loads((tmp_path / "synthesis_config.json").read_text())
    settings, speed = config["settings"], config["resolved"]["speed"]
    assert (settings["channels_last"], settings["fuse_qkv"], settings["cudnn_benchmark"]) == (True, True, False)
    assert (settings["torch_compile"], settings["torch_compile_mode"], settings["torch_compile_backend"]) == \
        (False, "default", "inductor")
    assert speed == {"channels_last": True, "fuse_qkv": True, "cudnn_benchmark": False, "torch_compile": None,
                     "sdpa_backend": "cudnn"}
    assert ("speed: channels_last on, fuse_qkv on, cudnn_benchmark off, torch.compile off, attention: cudnn first"
            in capsys.readouterr().out)
    assert not {"channels_last", "fuse_qkv", "torch_compile", "sdpa_backend"} & set(config["fingerprint"])  # rounding only
    assert synth(tmp_path, tiny_model)["made"] == 0  # the set completes with other speed options
    resolved = json.loads((tmp_path / "synthesis_config.json").read_text())["resolved"]["speed"]
    assert resolved == {"channels_last": False, "fuse_qkv": False, "cudnn_benchmark": False, "torch_compile": None,
                        "sdpa_backend": "auto"}


# ------------------------------------------------------------------------------- labels CSV


@pytest.mark.parametrize("caption_args", [(), ("--caption_template", "study", "--uncertainty", "ones"),
                                          ("--demographics", "true")], ids=["chexpert", "study-uones", "demographics"])
def test_labels_csv_counts_are_exact_and_prompts_are_the_training_captions(caption_args, runs, table, tmp_path):
    run = runs("lora", *caption_args)
    template = dict(zip(caption_args[::2], caption_args[1::2]))
    demographics = "--demographics" in template
    examples, _ = read_table(table, template=template.get("--caption_template"),
                             uncertainty=template.get("--uncertainty", "ignore"), demographics=demographics)
    rows = pd.read_csv(table, dtype=str, keep_default_na=False)
    chosen = examples[:12]
    labels = list(reversed(CHEXPERT_LABELS))  # column order must not matter
    columns = labels + (["Age", "Sex"] if demographics else [])
    csv_rows = rows.iloc[[int(e.source.split("line ")[1]) - 2 for e in chosen]][columns].copy()
    counts = [(i * 2) % 5 for i in range(len(chosen))]  # 0, 2, 4, 1, 3, ... (a 0 asks for none)
    csv_rows["count"] = counts
    csv_rows.to_csv(tmp_path / "labels.csv", index=False)
    assert any("-1.0" in row for row in csv_rows[labels].to_numpy())  # uncertain labels are exercised

    out = tmp_path / "synthetic"
    assert json.loads((run / "training_summary.json").read_text())["data_format"] == "chexpert"  # as detected
    summary = synth(out, run, "--labels_csv", tmp_path / "labels.csv", "--batch_size", "4", prompts=None)
    meta = metadata(out)
    assert summary["num_images"] == len(meta) == sum(counts)
    expected = [e.caption for e, n in zip(chosen, counts) for _ in range(n)]
    assert meta["prompt"].tolist() == expected and meta["text"].tolist() == expected
    # Label columns as the prompts read them: blank is negative, and the run's policy turns -1 into
    # 1 (U-Ones) or 0 (U-Zeros); under U-Ignore a -1 stays as written: unknown.
    policy = template.get("--uncertainty", "ignore")

    def as_prompted(cell: str) -> str:
        if cell == "":
            return "0"
        if float(cell) == -1:
            return {"ones": "1", "zeros": "0"}.get(policy, cell)
        return f"{float(cell):g}"

    expected_labels = [{k: as_prompted(v) for k, v in row.items()}
                       for row, n in zip(csv_rows[labels].to_dict("records"), counts) for _ in range(n)]
    assert meta[labels].to_dict("records") == expected_labels
    if policy == "ones":  # the case the rule is for: an uncertain finding, prompted as positive, recorded so
        asked = csv_rows[labels].iloc[[i for i, n in enumerate(counts) for _ in range(n)]].to_numpy()
        assert ((asked == "-1.0") & (meta[labels].to_numpy() == "1")).any()
    assert len(pixels(out)) == sum(counts)
    # the dataset is a training input as it stands
    synthetic, problems = read_table(out / "metadata.csv")
    assert not problems and [e.caption for e in synthetic] == expected


def test_the_runs_table_format_is_found_wherever_synthesis_runs_from(table, tmp_path, monkeypatch, capsys):
    """Training records the format it detected; an older run's is detected from its table's absolute path."""
    from sdtune.synthesis import caption_settings

    cfg = SynthesisConfig(model_path="m")
    monkeypatch.chdir(tmp_path)  # not where training ran: the relative train_csv leads nowhere
    relative = {"arguments": {"data": {"train_csv": "CheXpert-v1.0-small/train.csv", "data_format": "auto"}}}
    assert caption_settings(cfg, {**relative, "data_format": "chexpert"})[4] == CHEXPERT_LABELS
    assert caption_settings(cfg, {**relative, "data_source": str(table)})[4] == CHEXPERT_LABELS
    assert capsys.readouterr().out == ""
    assert caption_settings(cfg, relative)[4] is None  # nothing to read it from: said, not silently assumed
    assert "training table CheXpert-v1.0-small/train.csv cannot be read to tell its format" in capsys.readouterr().out


def test_a_misspelt_label_column_and_bad_rows_are_reported_together(runs, tmp_path):
    (tmp_path / "labels.csv").write_text("Cardiomegally,Edema,count\n1.0,0.0,x\n1.0,0.0,2\n")
    with pytest.raises(DatasetError) as err:
        synth(tmp_path / "out", runs("lora"), "--labels_csv", tmp_path / "labels.csv", prompts=None)
    assert [str(p) for p in err.value.problems] == [
        "labels.csv line 1: column(s) Cardiomegally (did you mean Cardiomegaly?) are not labels of the run's "
        f"training table: fix the names (its labels: {', '.join(CHEXPERT_LABELS)})",
        "labels.csv line 2: count 'x' is not a whole number >= 0"]
    assert not (tmp_path / "out").exists()  # nothing is written before the inputs check out


def test_labels_csv_problems_of_every_row_are_reported_at_once(tmp_path):
    path = tmp_path / "labels.csv"
    cfg = SynthesisConfig(model_path="m", labels_csv=str(path))
    # line 7 is blank: lines are counted in the file, as an editor shows them
    path.write_text("Cardiomegaly,Edema,count\n1,0,1\nyes,0,2\n1,,-1\n2,0.5,1\ninf,nan,1\n\n1.0,-1,2.5\n")
    with pytest.raises(DatasetError) as err:
        build_plan(cfg, None)
    rule = ": a label is 1 (positive), 0 (negative), -1 (uncertain) or blank (unknown)"
    assert [str(p) for p in err.value.problems] == [
        f"labels.csv line 3: Cardiomegaly = 'yes'{rule}",
        "labels.csv line 4: count '-1' is not a whole number >= 0",
        f"labels.csv line 5: Cardiomegaly = '2', Edema = '0.5'{rule}",
        f"labels.csv line 6: Cardiomegaly = 'inf', Edema = 'nan'{rule}",
        "labels.csv line 8: count '2.5' is not a whole number >= 0",
    ]
    assert str(err.value).startswith(f"5 problem(s) in labels CSV {path}")

    path.write_text("Cardiomegaly;Edema;count\n1;0;2\n")
    with pytest.raises(UserError, match="look separated by ';', not commas: save it comma-separated"):
        build_plan(cfg, None)
    # a column of a run whose labels are unknown is named without its values, which may identify someone
    path.write_text("Cardiomegaly,Ward code,count\n1,CX-0047,1\n")
    with pytest.raises(DatasetError) as err:
        build_plan(cfg, None)
    assert "Ward code: a label is" in str(err.value) and "CX-0047" not in str(err.value)
    for column in ("PatientID", "Patient ID", "MRN", "Accession Number", "StudyID", "SOP Instance UID"):
        path.write_text(f"Cardiomegaly,{column},count\n1,CX-0047,1\n")
        with pytest.raises(UserError, match=rf"column\(s\) {column} identify patients") as err:
            build_plan(cfg, None)
        assert "CX-0047" not in str(err.value)

    path.write_text("Cardiomegaly,Edema,count\n1,0,1\n1.0,-1.0,2\n,0.0,0\n")  # every accepted spelling
    assert [p.labels for p in build_plan(cfg, None)] == [{"Cardiomegaly": "1", "Edema": "0"}] + \
        [{"Cardiomegaly": "1", "Edema": "-1.0"}] * 2  # U-Ignore: an uncertain label stays as written


# ------------------------------------------------------------------------------- every kind of model path


PEFT = ("lora", "dora", "bitfit", "difffit")


@pytest.mark.parametrize("strategy", ["unet", "vae+text", *PEFT])
def test_every_model_path_kind_gives_the_final_models_images(strategy, runs, tiny_model, tmp_path):
    run = runs(strategy)
    reference = float_images(run / "final_model")
    assert np.abs(reference - float_images(tiny_model)).max() > 0.02  # training changed the images
    assert np.array_equal(float_images(run), reference)  # the run folder means its final_model/
    assert np.allclose(float_images(run / "checkpoint-2"), reference, atol=1e-5)
    if strategy in PEFT:
        adapter_file = next(p for p in run.glob("*.safetensors"))
        alone = tmp_path / "adapter" / "weights.safetensors"  # no summary beside it, a name that says nothing
        alone.parent.mkdir()
        shutil.copy(adapter_file, alone)
        assert resolve_model(str(alone), str(tiny_model)).adapter == strategy  # told by the file's metadata
        assert np.allclose(float_images(adapter_file), reference, atol=1e-5)  # base from the run's summary
        assert np.allclose(float_images(alone, str(tiny_model)), reference, atol=1e-5)
    if strategy in ("lora", "dora"):
        unfused = float_images(run / "checkpoint-2", fuse_lora=False)
        assert np.allclose(unfused, reference, atol=1e-3)


def test_the_strategy_comes_from_the_summary_not_the_folder_name(runs, tmp_path):
    misnamed = tmp_path / "lora"
    shutil.copytree(runs("dora"), misnamed)
    for path in (misnamed, misnamed / "checkpoint-2", misnamed / "pytorch_lora_weights.safetensors"):
        assert resolve_model(str(path)).strategy == "dora"
    assert resolve_model(str(misnamed / "pytorch_lora_weights.safetensors")).adapter == "dora"


def test_checkpoint_of_an_ema_run_uses_the_ema_weights(runs):
    run = runs("unet", "--use_ema", "--ema_decay", "0.5")
    assert np.allclose(float_images(run / "checkpoint-2"), float_images(run / "final_model"), atol=1e-5)


# ------------------------------------------------------------------------------- errors


def _bad_labels(tmp_path, text):
    (tmp_path / "labels.csv").write_text(text)
    return ["--labels_csv", str(tmp_path / "labels.csv")]


@pytest.mark.parametrize("case, message", [
    ("missing model", "model path .*nowhere does not exist"),
    ("not trained yet", r"model path .*outputs/bitfit does not exist: train it first \(\./bitfit\.sh writes it\)"),
    ("unfinished run", r"has no final_model/ \(training did not finish\): resume it .* --model_path .*checkpoint-2$"),
    ("no count column", "has no 'count' column"),
    ("identifier column", "column\\(s\\) Path, subject_id identify patients or images"),
    ("fp16 on the CPU", r"--mixed_precision fp16 needs a GPU: use --mixed_precision no or bf16 on the CPU"),
    ("unknown scheduler", "unknown scheduler 'foo': use one of pndm, ddim"),
    ("two prompt sources", "exactly one of --prompts, --prompts_file, --labels_csv"),
    ("odd height", "--height 60 must be a positive multiple of 8"),
    ("checkpoint without summary", "training_summary.json is missing"),
    ("adapter without base", "pass --base_model"),
    ("base for a pipeline", "--base_model is for checkpoints and adapter files"),
    ("unknown compile backend", "unknown --torch_compile_backend 'nope': use inductor"),
    ("output into a training run", "holds a training run: pick another folder"),
    ("CUDA-graph compile mode", "max-autotune uses CUDA graphs"),
])
def test_bad_inputs_are_one_line_user_errors(case, message, runs, tmp_path, capsys):
    run = runs("lora")
    capsys.readouterr()  # the first case may train the run here: its progress is not this test's output
    args = {"--model_path": str(run), "--output_dir": str(tmp_path / "out"), "--prompts": "a"}
    extra = []
    if case == "missing model":
        args["--model_path"] = str(tmp_path / "nowhere")
    elif case == "not trained yet":  # the wrapper's default, outputs/bitfit, before ./bitfit.sh ran
        (tmp_path / "outputs").mkdir()
        args["--model_path"] = str(tmp_path / "outputs" / "bitfit")
    elif case == "unfinished run":
        (tmp_path / "cut").mkdir()
        for name in ("checkpoint-1", "checkpoint-2"):
            shutil.copytree(run / "checkpoint-2", tmp_path / "cut" / name)
        shutil.copy(run / "training_summary.json", tmp_path / "cut")
        args["--model_path"] = str(tmp_path / "cut")
    elif case == "no count column":
        del args["--prompts"]
        extra = _bad_labels(tmp_path, "Edema,Cardiomegaly\n1.0,0.0\n")
    elif case == "identifier column":
        del args["--prompts"]
        extra = _bad_labels(tmp_path, "Path,subject_id,Edema,count\nCheXpert-v1.0-small/train/patient00001/a.jpg,"
                                      "10000032,1.0,1\n")
    elif case == "fp16 on the CPU":
        extra = ["--mixed_precision", "fp16", "--device", "cpu"]
    elif case == "unknown scheduler":
        extra = ["--scheduler", "foo"]
    elif case == "two prompt sources":
        extra = _bad_labels(tmp_path, "Edema,count\n1.0,1\n")
    elif case == "odd height":
        extra = ["--height", "60"]
    elif case == "checkpoint without summary":
        shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2")
        args["--model_path"] = str(tmp_path / "checkpoint-2")
    elif case == "adapter without base":
        (tmp_path / "lone").mkdir()
        shutil.copy(run / "pytorch_lora_weights.safetensors", tmp_path / "lone")
        args["--model_path"] = str(tmp_path / "lone")
    elif case == "base for a pipeline":
        extra = ["--base_model", str(run)]
    elif case == "unknown compile backend":
        extra = ["--torch_compile", "--torch_compile_backend", "nope"]
    elif case == "CUDA-graph compile mode":
        extra = ["--torch_compile", "--torch_compile_mode", "max-autotune"]
    elif case == "output into a training run":  # OUTPUT_DIR exported for training, then read by synthesis_*.sh
        args["--output_dir"] = str(run)
    argv = [x for kv in args.items() for x in kv] + extra
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert "patient00001" not in err and "10000032" not in err  # a value is never echoed
    assert not (tmp_path / "out").exists()  # nothing is written before the inputs check out


# ------------------------------------------------------------------------------- processes and wrappers


SYNTH_WRAPPERS = {name: f"synthesis_{name}.sh" for name in STRATEGIES}


def test_one_synthesis_wrapper_per_strategy_differing_only_in_its_name():
    assert sorted(p.name for p in ROOT.glob("synthesis_*.sh")) == sorted(SYNTH_WRAPPERS.values())
    bodies = {}
    for name, script in SYNTH_WRAPPERS.items():
        lines = (ROOT / script).read_text().splitlines()
        assert f"STRATEGY={name}" in lines
        bodies[name] = [line for line in lines if not line.startswith("#") and line != f"STRATEGY={name}"]
    assert len({tuple(b) for b in bodies.values()}) == 1


WRAPPER_ENV = dict(NUM_INFERENCE_STEPS="2", HEIGHT="64", WIDTH="64", NUM_IMAGES_PER_PROMPT="2", BATCH_SIZE="3",
                   SEED="7", MIXED_PRECISION="no", ACCELERATE_ARGS="--num_machines 1 --mixed_precision no --dynamo_backend no")


def _recorded_launch(tmp_path, script, cwd, **env):
    return recorded_launch(tmp_path, script, cwd, "--scheduler", "ddim", **env)


def _check_wrapper_output(out, strategy, batch_size=3):
    config = json.loads((out / "synthesis_config.json").read_text())
    settings = config["settings"]
    assert config["resolved"]["model"]["strategy"] == strategy and config["resolved"]["model"]["kind"] == "run"
    assert (settings["steps"], settings["height"], settings["num_images"], settings["batch_size"], settings["seed"]) \
        == (2, 64, 2, batch_size, 7)
    meta = metadata(out)
    assert len(meta) == 4 and set(meta["scheduler"]) == {"ddim"}  # extra arguments pass through
    assert meta["seed"].tolist() == [str(image_seed(7, k)) for k in range(4)]
    assert {im.shape for im in pixels(out).values()} == {(64, 64, 3)}


@pytest.mark.parametrize("strategy", list(SYNTH_WRAPPERS))
def test_synthesis_wrapper_runs_with_environment_overrides(strategy, runs, tmp_path, monkeypatch):
    """Each wrapper's command line, from its defaults and the environment, run on the tiny model
    (a stand-in `accelerate` records it; the real launcher runs in the two-process test below)."""
    runs(strategy)  # trained into RUNS/outputs/<strategy>: the wrapper's default MODEL_PATH
    (tmp_path / "prompts.txt").write_text("Chest x-ray of a patient with Edema\n\nChest x-ray of a patient with Cardiomegaly\n")
    argv = _recorded_launch(tmp_path, SYNTH_WRAPPERS[strategy], runs.root, **WRAPPER_ENV,
                            PROMPTS_FILE=str(tmp_path / "prompts.txt"))
    script = argv.index(str(ROOT / "synthesize_images.py"))
    # accelerate's defaults spelt out (no notice about them each run), then the user's ACCELERATE_ARGS
    assert argv[:script] == ["launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", *WRAPPER_ENV["ACCELERATE_ARGS"].split()]
    monkeypatch.chdir(runs.root)  # MODEL_PATH and OUTPUT_DIR default to paths relative to where it runs
    main(argv[script + 1:])
    _check_wrapper_output(runs.root / "synthetic" / strategy, strategy)  # the default OUTPUT_DIR


def test_num_gpus_and_accelerate_config_become_launch_options(tmp_path):
    argv = _recorded_launch(tmp_path, "synthesis_unet.sh", tmp_path, NUM_GPUS="4", PROMPTS="a")
    assert argv[:5] == ["launch", "--quiet", "--num_processes", "4", "--multi_gpu"]
    argv = _recorded_launch(tmp_path, "synthesis_unet.sh", tmp_path, NUM_GPUS="2", PROMPTS="a",
                            ACCELERATE_CONFIG="configs/accelerate/ddp.yaml")
    assert argv[:6] == ["launch", "--quiet", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2"]


def _free_port():
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_make_the_same_set_as_one(runs, tmp_path):
    """synthesis_lora.sh with NUM_GPUS=2 through the real `accelerate launch` (gloo on CPU) against one process."""
    runs("lora")
    (tmp_path / "prompts.txt").write_text("Chest x-ray of a patient with Edema\nChest x-ray of a patient with Cardiomegaly\n")
    settings = {**WRAPPER_ENV, "BATCH_SIZE": "1"}
    env = {**os.environ, **settings, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PROMPTS_FILE": str(tmp_path / "prompts.txt"), "OUTPUT_DIR": str(tmp_path / "two"), "NUM_GPUS": "2",
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_ARGS": f"{settings['ACCELERATE_ARGS']} --main_process_port {_free_port()}"}
    result = subprocess.run(["bash", str(ROOT / "synthesis_lora.sh"), "--scheduler", "ddim"], env=env,
                            capture_output=True, text=True, cwd=runs.root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0/2: made 2 images" in result.stdout and "process 1/2: made 2 images" in result.stdout
    _check_wrapper_output(tmp_path / "two", "lora", batch_size=1)
    synth(tmp_path / "one", runs("lora"), "--prompts_file", tmp_path / "prompts.txt", "--num_images", "2",
          "--seed", "7", "--scheduler", "ddim", prompts=None)
    one, two = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert list(one) == list(two) and all(np.array_equal(one[n], two[n]) for n in one)
    assert (tmp_path / "one" / "metadata.csv").read_text() == (tmp_path / "two" / "metadata.csv").read_text()


def test_a_synthesis_wrapper_with_nothing_to_generate_names_its_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PROMPTS", "PROMPTS_FILE", "LABELS_CSV")}
    result = subprocess.run(["bash", str(ROOT / "synthesis_bitfit.sh")], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "PROMPTS=" in result.stderr and "PROMPTS_FILE=" in result.stderr and "LABELS_CSV=" in result.stderr
    assert "--help" in recorded_launch(tmp_path, "synthesis_bitfit.sh", tmp_path, "--help")  # help needs no prompts

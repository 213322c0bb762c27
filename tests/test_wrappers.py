"""The eleven strategy scripts run end to end through `accelerate launch`, with environment overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import recorded_launch

from sdtune.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
WRAPPERS = {"unet": "finetune_unet.sh", "text": "finetune_text.sh", "vae": "finetune_vae.sh",
            "unet+text": "finetune_unet+text.sh", "unet+vae": "finetune_unet+vae.sh", "vae+text": "finetune_vae+text.sh",
            "unet+vae+text": "finetune_unet+vae+text.sh", "lora": "lora.sh", "dora": "dora.sh", "bitfit": "bitfit.sh",
            "difffit": "difffit.sh"}


def test_one_wrapper_per_strategy():
    assert set(WRAPPERS) == set(STRATEGIES)
    # every script that launches train_text_to_image.py is a strategy's wrapper, and every wrapper exists
    training = [p.name for p in ROOT.glob("*.sh") if "scripts/train_args.sh" in p.read_text()]
    assert sorted(training) == sorted(WRAPPERS.values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(WRAPPERS))
def test_wrapper_runs_with_environment_overrides(strategy, tiny_model, phantom_chexpert, tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's accelerate
        "MODEL_NAME": str(tiny_model), "TRAIN_CSV": str(phantom_chexpert / "CheXpert-v1.0-small" / "train.csv"),
        "OUTPUT_DIR": str(out), "MAX_TRAIN_STEPS": "1", "RESOLUTION": "64", "TRAIN_BATCH_SIZE": "2",
        "GRADIENT_ACCUMULATION_STEPS": "1", "MIXED_PRECISION": "no", "USE_8BIT_ADAM": "false",
        "GRADIENT_CHECKPOINTING": "true", "LORA_RANK": "2", "VAE_LR": "3e-6",
    }
    result = subprocess.run(["bash", str(ROOT / WRAPPERS[strategy]), "--report_to", "none"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in result.stderr + result.stdout  # no launcher noise
    summary = json.loads((out / "training_summary.json").read_text())
    args = summary["arguments"]
    assert summary["strategy"]["name"] == strategy and summary["steps"] == 1
    assert args["data"]["resolution"] == 64 and args["train"]["train_batch_size"] == 2
    assert args["train"]["gradient_checkpointing"] is True and args["train"]["report_to"] == "none"
    if STRATEGIES[strategy].unet in ("lora", "dora"):
        assert args["adapter"]["lora_rank"] == 2 and args["adapter"]["lora_alpha"] == 16  # env, then header
    if STRATEGIES[strategy].vae:  # an override of a per-component rate from the header
        assert summary["learning_rates"]["vae"] == 3e-6
    assert (out / "final_model" / "model_index.json").is_file()


def _flags(argv: list[str]) -> dict[str, str]:
    """train_text_to_image.py's --flag value pairs from a recorded accelerate argv."""
    args = argv[next(i for i, a in enumerate(argv) if a.endswith("train_text_to_image.py")) + 1:]
    return dict(zip(args[::2], args[1::2]))


@pytest.mark.parametrize("script", ["finetune_unet+text.sh", "finetune_unet+vae.sh", "finetune_vae+text.sh",
                                    "finetune_unet+vae+text.sh"])
def test_learning_rate_sets_every_component_of_a_multi_component_wrapper(script, tmp_path):
    header = _flags(recorded_launch(tmp_path, script, tmp_path))
    given = _flags(recorded_launch(tmp_path, script, tmp_path, LEARNING_RATE="3e-4"))
    one = _flags(recorded_launch(tmp_path, script, tmp_path, LEARNING_RATE="3e-4", VAE_LR="2e-6"))
    rates = [f for f in ("--unet_lr", "--text_encoder_lr", "--vae_lr") if f in header]
    assert len(rates) == script.count("+") + 1 and all(header[f] in ("1e-5", "1e-6", "5e-6") for f in rates)
    assert all(given[f] == "3e-4" for f in rates)  # the header's rates gave way (they used to win silently)
    assert all(one[f] == ("2e-6" if f == "--vae_lr" else "3e-4") for f in rates)


def test_dora_reads_the_tutorials_rank_and_alpha(tmp_path):
    assert _flags(recorded_launch(tmp_path, "dora.sh", tmp_path))["--lora_rank"] == "8"
    flags = _flags(recorded_launch(tmp_path, "dora.sh", tmp_path, DORA_RANK="32", DORA_ALPHA="64"))
    assert (flags["--lora_rank"], flags["--lora_alpha"]) == ("32", "64")
    flags = _flags(recorded_launch(tmp_path, "dora.sh", tmp_path, DORA_RANK="32", LORA_RANK="4"))
    assert flags["--lora_rank"] == "4"  # the toolkit's own name wins


def test_an_accelerate_config_keeps_its_process_count_unless_num_gpus_is_given(tmp_path, monkeypatch):
    for name in ("NUM_GPUS", "ACCELERATE_CONFIG", "ACCELERATE_ARGS"):
        monkeypatch.delenv(name, raising=False)
    assert recorded_launch(tmp_path, "lora.sh", tmp_path)[:4] == ["launch", "--quiet", "--num_processes", "1"]
    argv = recorded_launch(tmp_path, "lora.sh", tmp_path, ACCELERATE_CONFIG="configs/accelerate/ddp.yaml")
    assert argv[:4] == ["launch", "--quiet", "--config_file", "configs/accelerate/ddp.yaml"] and "--num_processes" not in argv
    argv = recorded_launch(tmp_path, "lora.sh", tmp_path, ACCELERATE_CONFIG="configs/accelerate/ddp.yaml", NUM_GPUS="2")
    assert argv[:6] == ["launch", "--quiet", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2"]


def test_a_user_error_through_accelerate_launch_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OUTPUT_DIR": str(tmp_path / "run"), "MIXED_PRECISION": "fp16", "ACCELERATE_ARGS": "--num_machines 1 "
           "--dynamo_backend no", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "lora.sh")], env=env, capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode != 0
    assert "error: --mixed_precision fp16 needs a GPU" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout  # accelerate's CalledProcessError stays out (--quiet)


def test_training_wrapper_passes_split_and_seed_overrides(tmp_path):
    argv = recorded_launch(tmp_path, "lora.sh", tmp_path, VALIDATION_FRACTION="0.2", SPLIT_SEED="3", SEED="11",
                           LORA_DROPOUT="0.1", IMAGE_ROOT="/data/x", BATCH_SIZE="32", REPORT_TO="none")
    args = argv[next(i for i, a in enumerate(argv) if a.endswith("train_text_to_image.py")) + 1:]
    flags = dict(zip(args[::2], args[1::2]))
    assert (flags["--validation_fraction"], flags["--split_seed"], flags["--seed"]) == ("0.2", "3", "11")
    assert (flags["--lora_dropout"], flags["--image_root"], flags["--report_to"]) == ("0.1", "/data/x", "none")
    assert flags["--train_batch_size"] == "4"  # BATCH_SIZE is synthesis's (run_study passes it to every stage)

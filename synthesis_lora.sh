#!/usr/bin/env bash
# Synthetic images from strategy 8 of the study: LoRA on the U-Net's attention (Hu et al. 2022); trained by ./lora.sh.
# Every variable below can be overridden from the environment, e.g.
#   LABELS_CSV=labels.csv ./synthesis_lora.sh          (a label-combination CSV with a count column)
#   PROMPTS_FILE=prompts.txt NUM_GPUS=4 ./synthesis_lora.sh
# MODEL_PATH may be the run folder (its final_model/), a final_model/, a checkpoint-STEP/ or an
# adapter file (with BASE_MODEL). Rerunning completes an interrupted dataset.
# Extra arguments go straight to synthesize_images.py (see --help).
set -euo pipefail
STRATEGY=lora
: "${MODEL_PATH:=outputs/$STRATEGY}"          # the training wrapper's OUTPUT_DIR
: "${OUTPUT_DIR:=synthetic/$STRATEGY}"
: "${PROMPTS:=}"                               # "prompt a, prompt b"
: "${PROMPTS_FILE:=}"                          # one prompt a line
: "${LABELS_CSV:=}"                            # label columns + count: prompts are the training captions
: "${NUM_INFERENCE_STEPS:=50}"
: "${GUIDANCE_SCALE:=7.5}"
: "${NUM_IMAGES_PER_PROMPT:=1}"
: "${BATCH_SIZE:=1}"
: "${HEIGHT:=512}"
: "${WIDTH:=512}"
: "${SEED:=42}"                                # for reproducible results
: "${MIXED_PRECISION:=fp16}"
: "${NUM_GPUS:=}"                              # processes to launch (one per GPU; default: ACCELERATE_CONFIG's, else 1); images are sharded
: "${ACCELERATE_CONFIG:=}"                     # e.g. configs/accelerate/ddp.yaml (default: accelerate's own config)
source "$(dirname "$0")/scripts/synth_args.sh"
exec accelerate launch "${LAUNCH_ARGS[@]}" "$SYNTH_SCRIPT" "${SYNTH_ARGS[@]}" "$@"

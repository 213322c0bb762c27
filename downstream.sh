#!/usr/bin/env bash
# Downstream utility: train a chest X-ray classifier on four arms — (a) all real, (b) N real per
# class, (c) b plus synthetic, (d) synthetic only — and report per-label and mean AUROC on a
# held-out real test set split by patient, mean ± std over seeds, with 95% intervals from resampling
# the test patients (each arm's, and the differences between arms).
# Every variable below can be overridden from the environment, e.g.
#   SYNTHETIC=synthetic/lora OUTPUT_DIR=outputs/lora/downstream ./downstream.sh
#   ARCH=efficientnet_b0 PRETRAINED_WEIGHTS=weights/efficientnet_b0_rwightman-7f5810bc.pth ./downstream.sh
#   ARMS=a,b ./downstream.sh                        (the real-only arms need no synthetic set)
# Extra arguments go straight to downstream.py (see --help).
set -euo pipefail
synthetic_given=${SYNTHETIC+yes}
: "${REAL:=data/CheXpert-v1.0-small/train.csv}"   # a clinical table or a metadata file with label columns
: "${SYNTHETIC:=synthetic/lora}"                   # synthetic set folders (synthesize_images.py), space-separated
: "${LABELS:=}"                                    # comma-separated, e.g. "Cardiomegaly,Pleural Effusion" (default: the study's six)
: "${ARCH:=densenet121}"                           # densenet121, efficientnet_b0, resnet50 (small_cnn: tests/demos)
: "${PRETRAINED_WEIGHTS:=}"                        # local ImageNet weights file (default: random initialisation)
: "${RESOLUTION:=224}"
: "${EPOCHS:=5}"
: "${BATCH_SIZE:=32}"
: "${LR:=}"                                        # default: 1e-4 (1e-3 for small_cnn)
: "${N_PER_CLASS:=100}"                            # real images per label in arms b and c
: "${ARMS:=a,b,c,d}"
: "${SEEDS:=0,1,2}"
: "${TEST_FRACTION:=0.2}"                          # fraction of real patients held out for testing
: "${UNCERTAINTY:=ignore}"                         # CheXpert -1.0: ignore (masked), ones or zeros
: "${BOOTSTRAP:=1000}"                             # resamples of the test patients for 95% intervals (0: none)
: "${DEVICE:=auto}"
: "${OUTPUT_DIR:=outputs/downstream}"
: "${PYTHON:=python}"

ARGS=(--real "$REAL" --arch "$ARCH" --resolution "$RESOLUTION" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE"
      --n_per_class "$N_PER_CLASS" --arms "$ARMS" --seeds "$SEEDS" --test_fraction "$TEST_FRACTION"
      --uncertainty "$UNCERTAINTY" --bootstrap "$BOOTSTRAP" --device "$DEVICE" --output_dir "$OUTPUT_DIR")
read -r -a SYNTHETIC_SETS <<< "$SYNTHETIC"
# The default set is for arms c and d. A set you name also gives real-only arms their test set: the
# patients its generator held out, the test set of arms c and d.
if [[ -z $synthetic_given && $ARMS != *[cd]* ]]; then SYNTHETIC_SETS=(); fi
if (( ${#SYNTHETIC_SETS[@]} )); then ARGS+=(--synthetic "${SYNTHETIC_SETS[@]}"); fi
if [[ -n "$LABELS" ]]; then ARGS+=(--labels "$LABELS"); fi
if [[ -n "$PRETRAINED_WEIGHTS" ]]; then ARGS+=(--pretrained_weights "$PRETRAINED_WEIGHTS"); fi
if [[ -n "$LR" ]]; then ARGS+=(--lr "$LR"); fi
exec "$PYTHON" "$(dirname "$0")/downstream.py" "${ARGS[@]}" "$@"

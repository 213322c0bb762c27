#!/usr/bin/env bash
# `make demo`: the study in miniature, offline, on a CPU in a few minutes (on a GPU when there is one).
# Builds the tiny SD1.5-family model and phantom CheXpert data, fine-tunes the model with LoRA and
# with the full U-Net (train_text_to_image.py), makes a labelled synthetic set with each
# (synthesize_images.py), evaluates it against the phantom's held-out valid set (evaluate.py:
# FID, KID, Vendi, MS-SSIM; no CLIP score: its weights are not available offline), prints the
# comparison table (evaluate.py compare) and writes the plots.
# Every variable can be overridden from the environment, e.g. DEMO_DIR=/tmp/demo DEMO_STEPS=50 make demo.
set -euo pipefail
: "${DEMO_DIR:=outputs/demo}"
: "${DEMO_STRATEGIES:=lora unet}"      # any of the eleven (the VAE ones are slow on a CPU)
: "${DEMO_STEPS:=300}"                 # training steps per strategy
: "${DEMO_LR:=1e-3}"                   # the tiny model starts from random weights: higher than the study's rates
: "${DEMO_PHANTOMS:=400}"              # phantom images: 90% train, 10% valid (the real set of the metrics)
: "${DEMO_IMAGES:=10}"                 # synthetic images per condition (4 conditions)
: "${DEMO_SAMPLING_STEPS:=25}"
: "${DEMO_FID_BOOTSTRAP:=0}"           # resamples for FID's spread (each costs a few seconds on a CPU)
: "${RESOLUTION:=64}"                  # the tiny model's native size
: "${TRAIN_BATCH_SIZE:=8}"
: "${DEMO_FID_FEATURES:=inception}"   # FID/KID/Vendi features: inception, xrv or a TorchScript file
: "${DEMO_DEVICE:=}"                  # synthesis and evaluation: cpu, cuda, ... (empty: a GPU when there is one, as training)
: "${PYTHON:=python}"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="$DEMO_DIR/logs"
MODEL="$DEMO_DIR/tiny-sd15"
DATA="$DEMO_DIR/phantom/CheXpert-v1.0-small"
START=$SECONDS
mkdir -p "$LOGS"
DEVICE=(${DEMO_DEVICE:+--device "$DEMO_DEVICE"})

# Run one step quietly: its full output goes to a log, which is shown if it fails.
step() {
  local name=$1; shift
  local t=$SECONDS
  printf '%-44s' "$name"
  if "$@" > "$LOGS/$name.log" 2>&1; then
    printf ' %4ds   (log: %s)\n' $((SECONDS - t)) "$LOGS/$name.log"
  else
    echo " FAILED; the end of $LOGS/$name.log:"
    tail -n 30 "$LOGS/$name.log"
    exit 1
  fi
}

echo "sdtune demo: tiny model, phantom chest X-rays, strategies: $DEMO_STRATEGIES ($DEMO_STEPS steps each)"
step tiny-model "$PYTHON" -m sdtune.tiny "$MODEL"
step phantom-data "$PYTHON" -m sdtune.phantom "$DEMO_DIR/phantom" --n "$DEMO_PHANTOMS" --size "$RESOLUTION"

# The synthetic set: four conditions the phantoms draw (or leave out), DEMO_IMAGES each.
LABELS="$DEMO_DIR/labels.csv"
{
  echo "No Finding,Cardiomegaly,Pleural Effusion,Pneumothorax,count"
  echo "1,0,0,0,$DEMO_IMAGES"
  echo "0,1,0,0,$DEMO_IMAGES"
  echo "0,0,1,0,$DEMO_IMAGES"
  echo "0,0,0,1,$DEMO_IMAGES"
} > "$LABELS"

RUNS=() SYNTHETIC=()
for s in $DEMO_STRATEGIES; do
  run="$DEMO_DIR/runs/$s" synthetic="$DEMO_DIR/synthetic/$s"
  step "train-$s" "$PYTHON" "$ROOT/train_text_to_image.py" --strategy "$s" \
    --pretrained_model_name_or_path "$MODEL" --train_csv "$DATA/train.csv" --resolution "$RESOLUTION" \
    --train_batch_size "$TRAIN_BATCH_SIZE" --max_train_steps "$DEMO_STEPS" --learning_rate "$DEMO_LR" \
    --checkpointing_steps 100000 --report_to none --output_dir "$run" --overwrite_output_dir
  rm -rf "$synthetic"  # a new model: the images of an earlier demo must not be resumed
  step "synthesize-$s" "$PYTHON" "$ROOT/synthesize_images.py" --model-path "$run" --labels-csv "$LABELS" \
    --output-dir "$synthetic" --steps "$DEMO_SAMPLING_STEPS" --height "$RESOLUTION" --width "$RESOLUTION" \
    --batch-size 8 ${DEVICE[@]+"${DEVICE[@]}"}
  step "evaluate-$s" "$PYTHON" "$ROOT/evaluate.py" --real "$DATA/valid.csv" --fake "$synthetic" \
    --metrics fid,kid,vendi,ms_ssim --fid-features "$DEMO_FID_FEATURES" --per-condition --fid-bootstrap "$DEMO_FID_BOOTSTRAP" \
    --cache-dir "$DEMO_DIR/feature-cache" ${DEVICE[@]+"${DEVICE[@]}"} --output "$run/evaluation/inception.json"
  RUNS+=("$run") SYNTHETIC+=("$synthetic")
done
FIRST="${RUNS[0]}"
step "generate-samples-${FIRST##*/}" "$PYTHON" "$ROOT/evaluate.py" --generate-samples --num-samples 4 \
  --prompt "Chest x-ray of a patient with Cardiomegaly" --model-path "$FIRST" --steps "$DEMO_SAMPLING_STEPS" \
  --height "$RESOLUTION" --width "$RESOLUTION" ${DEVICE[@]+"${DEVICE[@]}"} --output-dir "$FIRST/samples/cardiomegaly"
step compare "$PYTHON" "$ROOT/evaluate.py" compare "${RUNS[@]}" --output-dir "$DEMO_DIR/comparison"
step phantom-findings "$PYTHON" -m sdtune.evaluation.phantom_findings "${SYNTHETIC[@]}" \
  --real "$DATA/valid.csv"

echo
cat "$DEMO_DIR/comparison/comparison.md"
echo
sed -n '/^|/,$p' "$LOGS/phantom-findings.log"
echo "(The tiny model's VAE is random and stays untrained here, so its images are not X-rays: the scores"
echo " are reported, not claimed. CLIP score: skipped offline; pass --clip-model a local CLIP folder to evaluate.py.)"
echo
echo "demo done in $((SECONDS - START)) s; everything is in $DEMO_DIR:"
echo "  tiny-sd15/                 the tiny SD1.5-family model"
echo "  phantom/                   phantom CheXpert (train.csv for training, valid.csv as the real set)"
echo "  runs/<strategy>/           final_model/, training_summary.json, evaluation/inception.json"
echo "  synthetic/<strategy>/      images/, metadata.csv, synthesis_config.json"
echo "  ${FIRST#"$DEMO_DIR"/}/samples/cardiomegaly/grid.png   evaluate.py --generate-samples"
echo "  comparison/                comparison.md, comparison.csv, fid_vs_*.png, sample_grid.png"
echo "  logs/                      every step's output"

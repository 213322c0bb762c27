#!/usr/bin/env bash
# The study in one command: every strategy trained by its script (finetune_*.sh, lora.sh, ...),
# a synthetic set made by its synthesis_*.sh, evaluated by evaluate.py against the real set, and
# the comparison table and plots (evaluate.py compare). The downstream stage (opt-in) adds the
# classifier arms of downstream.py: c and d per strategy, the real-only a and b once.
# Every variable below can be overridden from the environment, e.g.
#   TRAIN_CSV=data/CheXpert-v1.0-small/train.csv REAL_CSV=data/CheXpert-v1.0-small/valid.csv \
#   LABELS_CSV=labels.csv NUM_GPUS=4 ./run_study.sh
#   STRATEGIES="lora dora" STAGES="evaluate compare" ./run_study.sh      (some strategies, some stages)
#   VALIDATION_FRACTION=0.2 STAGES="train synthesize evaluate downstream compare" ./run_study.sh
# Anything else the strategy and synthesis scripts read (TRAIN_BATCH_SIZE, LORA_RANK, BATCH_SIZE,
# MIXED_PRECISION, ACCELERATE_ARGS, ...) passes through from the environment to every strategy.
# Rerunning continues: complete runs are not retrained (RESUME=false retrains them), unfinished
# ones resume from their latest checkpoint, unfinished synthetic sets are completed.
# A failing strategy does not stop the others; the script lists the failures and exits 1.
set -euo pipefail
: "${MODEL_NAME:=stable-diffusion-v1-5/stable-diffusion-v1-5}"
: "${DATA_DIR:=data}"                  # training images + .txt captions (or TRAIN_CSV, a clinical table)
: "${TRAIN_CSV:=}"
: "${REAL_DIR:=}"                      # the real images of the metrics: a folder, a table (REAL_CSV, e.g. a
: "${REAL_CSV:=}"                      #   held-out CheXpert valid.csv) or a metadata file
: "${LABELS_CSV:=}"                    # label combinations + count (the study: 5,000 images per model)
: "${PROMPTS_FILE:=}"                  # or one prompt a line (NUM_IMAGES_PER_PROMPT each)
: "${PROMPTS:=}"                       # or "prompt a, prompt b"
: "${STRATEGIES:=unet text vae unet+text unet+vae vae+text unet+vae+text lora dora bitfit difffit}"
: "${STAGES:=train synthesize evaluate compare}"  # downstream too, to add the classifier arms (needs
                                       #   TRAIN_CSV, and VALIDATION_FRACTION when training: the test patients)
: "${OUTPUT_ROOT:=outputs/study}"      # runs/<strategy>/, synthetic/<strategy>/, comparison/, logs/
: "${MAX_TRAIN_STEPS:=1000}"
: "${RESOLUTION:=512}"
: "${HEIGHT:=$RESOLUTION}"             # synthetic images
: "${WIDTH:=$RESOLUTION}"
: "${NUM_INFERENCE_STEPS:=50}"
: "${GUIDANCE_SCALE:=7.5}"
: "${NUM_IMAGES_PER_PROMPT:=1}"
: "${FID_FEATURES:=inception xrv}"     # one results file per feature network (xrv: the study's DenseNet-121)
: "${METRICS:=fid,kid,vendi,ms_ssim,clip}"
: "${PER_CONDITION:=true}"             # FID per condition from the label columns
: "${FID_BOOTSTRAP:=10}"
: "${EVAL_ARGS:=}"                     # more evaluate.py flags, e.g. "--clip-model PATH --xrv-weights FILE"
: "${DOWNSTREAM_LABELS:=}"             # labels of the downstream classifier, comma-separated (default: the
                                       #   study's six; LABELS_CSV must give the synthetic sets these columns)
: "${DOWNSTREAM_ARGS:=}"               # more downstream.py flags, e.g. "--arch efficientnet_b0 --pretrained_weights FILE"
: "${RESUME:=true}"
: "${LATENT_CACHE_DIR:=$OUTPUT_ROOT/latent_cache}"  # VAE latents encoded once, shared by every strategy with a frozen VAE
: "${PYTHON:=python}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LATENT_CACHE_DIR MODEL_NAME DATA_DIR TRAIN_CSV MAX_TRAIN_STEPS RESOLUTION HEIGHT WIDTH NUM_INFERENCE_STEPS GUIDANCE_SCALE \
       NUM_IMAGES_PER_PROMPT LABELS_CSV PROMPTS_FILE PROMPTS
REAL="${REAL_CSV:-$REAL_DIR}"
LOGS="$OUTPUT_ROOT/logs"
mkdir -p "$LOGS"
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# Settings that cannot work fail here, not after hours of training.
if has_stage synthesize && [[ -z "$LABELS_CSV$PROMPTS_FILE$PROMPTS" ]]; then
  echo "error: set LABELS_CSV (label columns + count), PROMPTS_FILE or PROMPTS: the prompts of the synthetic sets" >&2
  exit 2
fi
if has_stage evaluate && [[ -z "$REAL" ]]; then
  echo "error: set REAL_CSV or REAL_DIR: the real images the synthetic sets are compared with" >&2; exit 2
fi
for stage in $STAGES; do
  if [[ " train synthesize evaluate downstream compare " != *" $stage "* ]]; then
    echo "error: unknown stage '$stage' in STAGES: use train, synthesize, evaluate, downstream, compare" >&2; exit 2
  fi
done
if has_stage downstream; then
  if [[ -z "$TRAIN_CSV" ]]; then
    echo "error: the downstream stage trains classifiers on the labelled table the strategies train on: set TRAIN_CSV" >&2
    exit 2
  fi
  if has_stage train && [[ ${VALIDATION_FRACTION:-0} =~ ^0*\.?0*$ ]]; then
    echo "error: the downstream stage tests on patients no generator saw: set VALIDATION_FRACTION (e.g. 0.2) so" \
         "that training holds them out" >&2
    exit 2
  fi
fi
for s in $STRATEGIES; do
  if [[ ! -f "$ROOT/synthesis_$s.sh" ]]; then
    echo "error: unknown strategy '$s' in STRATEGIES (there is no synthesis_$s.sh)" >&2; exit 2
  fi
done
if has_stage evaluate; then  # each feature network loads now (xrv's weights offline), not after the training
  read -r -a extra <<< "$EVAL_ARGS"
  for features in $FID_FEATURES; do
    "$PYTHON" "$ROOT/evaluate.py" --check-features --fid-features "$features" ${extra[@]+"${extra[@]}"} >/dev/null \
      || { echo "error: FID_FEATURES names $features, which cannot be loaded (above): fix it, or leave it out" >&2; exit 2; }
  done
fi

train_script() { if [[ -f "$ROOT/$1.sh" ]]; then echo "$ROOT/$1.sh"; else echo "$ROOT/finetune_$1.sh"; fi; }
complete() { [[ -f "$1/final_model/model_index.json" ]] && grep -q '"status": "complete"' "$1/training_summary.json" 2>/dev/null; }
# Run a step with its output on the terminal and in a log; a failure is recorded, not fatal.
FAILED=()
step() {
  local name=$1; shift
  echo "== $name ($(date '+%H:%M:%S'); log: $LOGS/$name.log)"
  if ! "$@" 2>&1 | tee "$LOGS/$name.log"; then
    FAILED+=("$name"); echo "== $name FAILED (see $LOGS/$name.log)"; return 1
  fi
}

read -r -a downstream_args <<< "$DOWNSTREAM_ARGS"
if [[ -n "$DOWNSTREAM_LABELS" ]]; then downstream_args+=(--labels "$DOWNSTREAM_LABELS"); fi
if [[ -n "${IMAGE_ROOT:-}" ]]; then downstream_args+=(--image_root "$IMAGE_ROOT"); fi
RUNS=() SETS=()
for s in $STRATEGIES; do
  run="$OUTPUT_ROOT/runs/$s" synthetic="$OUTPUT_ROOT/synthetic/$s"
  if has_stage train; then
    if [[ "$RESUME" == true ]] && complete "$run"; then
      echo "== train-$s: complete in $run (RESUME=false retrains it)"
    else
      resume=(--resume_from_checkpoint latest)  # from scratch when there is no checkpoint
      [[ "$RESUME" == true ]] || resume=(--overwrite_output_dir)
      step "train-$s" env OUTPUT_DIR="$run" bash "$(train_script "$s")" "${resume[@]}" || continue
      # an earlier model's images must not be completed with the new one, nor its scores shown as the new one's
      rm -rf "$synthetic" "$run/evaluation" "$run/downstream"
    fi
  fi
  if has_stage synthesize; then
    step "synthesize-$s" env MODEL_PATH="$run" OUTPUT_DIR="$synthetic" bash "$ROOT/synthesis_$s.sh" || continue
  fi
  if has_stage evaluate; then
    metrics=$METRICS
    for features in $FID_FEATURES; do
      per_condition=()
      if [[ "$PER_CONDITION" == true && ",$metrics," == *",fid,"* ]]; then per_condition=(--per-condition); fi
      read -r -a extra <<< "$EVAL_ARGS"
      step "evaluate-$s-${features##*/}" "$PYTHON" "$ROOT/evaluate.py" --real "$REAL" --fake "$synthetic" \
        --metrics "$metrics" --fid-features "$features" --fid-bootstrap "$FID_BOOTSTRAP" ${per_condition[@]+"${per_condition[@]}"} \
        --output "$run/evaluation/${features##*/}.json" --overwrite ${extra[@]+"${extra[@]}"} || true
      # CLIP score and MS-SSIM do not depend on the features: computed with the first network only.
      metrics=$(echo ",$METRICS," | sed -e 's/,clip,/,/; s/,ms_ssim,/,/; s/^,//; s/,$//')
      [[ -n "$metrics" ]] || break
    done
  fi
  if has_stage downstream; then
    # arms c and d: this strategy's images, tested on the patients its generator held out
    step "downstream-$s" "$PYTHON" "$ROOT/downstream.py" --real "$TRAIN_CSV" --synthetic "$synthetic" --arms c,d \
      --output_dir "$run/downstream" ${downstream_args[@]+"${downstream_args[@]}"} || true
  fi
  if [[ -f "$run/training_summary.json" ]]; then RUNS+=("$run"); fi
  if [[ -f "$synthetic/metadata.csv" ]]; then SETS+=("$synthetic"); fi
done
# arms a and b once, real only: the same test patients as every strategy's c and d, whose generators they name
BASELINE="$OUTPUT_ROOT/downstream_real"
if has_stage downstream && (( ${#SETS[@]} )); then
  step downstream-real "$PYTHON" "$ROOT/downstream.py" --real "$TRAIN_CSV" --synthetic "${SETS[@]}" --arms a,b \
    --output_dir "$BASELINE" ${downstream_args[@]+"${downstream_args[@]}"} || true
fi

if has_stage compare && (( ${#RUNS[@]} )); then
  baseline=()
  if [[ -f "$BASELINE/downstream.json" ]]; then baseline=(--downstream-real "$BASELINE"); fi
  step compare "$PYTHON" "$ROOT/evaluate.py" compare "${RUNS[@]}" --output-dir "$OUTPUT_ROOT/comparison" \
    ${baseline[@]+"${baseline[@]}"} || true
fi
if (( ${#FAILED[@]} )); then
  echo "failed: ${FAILED[*]} (logs in $LOGS)" >&2
  exit 1
fi
done_msg="study done ($STAGES): runs in $OUTPUT_ROOT/runs, synthetic sets in $OUTPUT_ROOT/synthetic"
if has_stage compare && [[ -d "$OUTPUT_ROOT/comparison" ]]; then done_msg+=", table in $OUTPUT_ROOT/comparison"; fi
echo "$done_msg"

# Sourced by the synthesis wrappers (synthesis_lora.sh, synthesis_unet.sh, ...): turns their
# header variables into synthesize_images.py flags, in the array SYNTH_ARGS. Holds no defaults
# of its own: every value comes from the wrapper's header or the environment.
SYNTH_ARGS=(--model_path "$MODEL_PATH" --output_dir "$OUTPUT_DIR")
# variable -> flag, passed only when set and non-empty (give one of PROMPTS, PROMPTS_FILE, LABELS_CSV)
for pair in PROMPTS:prompts PROMPTS_FILE:prompts_file LABELS_CSV:labels_csv NUM_INFERENCE_STEPS:steps \
            GUIDANCE_SCALE:guidance_scale NUM_IMAGES_PER_PROMPT:num_images BATCH_SIZE:batch_size HEIGHT:height \
            WIDTH:width SEED:seed MIXED_PRECISION:mixed_precision SCHEDULER:scheduler NEGATIVE_PROMPT:negative_prompt \
            BASE_MODEL:base_model CAPTION_TEMPLATE:caption_template FUSE_LORA:fuse_lora DEVICE:device; do
  var=${pair%%:*}
  if [[ -n "${!var:-}" ]]; then SYNTH_ARGS+=("--${pair#*:}" "${!var}"); fi
done
# `accelerate launch` options, as scripts/train_args.sh builds them: a config file
# (configs/accelerate/), the process count (images are sharded across processes), and any extra
# options in ACCELERATE_ARGS.
LAUNCH_ARGS=()
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then LAUNCH_ARGS+=(--config_file "$ACCELERATE_CONFIG"); fi
if [[ -n "${NUM_GPUS:-}" ]]; then
  LAUNCH_ARGS+=(--num_processes "$NUM_GPUS")
  if (( NUM_GPUS > 1 )) && [[ -z "${ACCELERATE_CONFIG:-}" ]]; then LAUNCH_ARGS+=(--multi_gpu); fi
fi
read -r -a EXTRA_LAUNCH_ARGS <<< "${ACCELERATE_ARGS:-}"
LAUNCH_ARGS+=("${EXTRA_LAUNCH_ARGS[@]}")
SYNTH_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/synthesize_images.py"

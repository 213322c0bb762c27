# Sourced by the synthesis wrappers (synthesis_lora.sh, synthesis_unet.sh, ...): turns their
# header variables into synthesize_images.py flags, in the array SYNTH_ARGS. Holds no defaults
# of its own: every value comes from the wrapper's header or the environment.
if [[ -z "${PROMPTS:-}${PROMPTS_FILE:-}${LABELS_CSV:-}" && " $* " != *" --prompts"* && " $* " != *" --labels"* \
      && " $* " != *" -h "* && " $* " != *" --help "* ]]; then
  echo "error: say what to generate: set PROMPTS=\"prompt a, prompt b\", PROMPTS_FILE=prompts.txt (one a line) or" \
       "LABELS_CSV=labels.csv (label columns + count; prompts read like the training captions)" >&2
  exit 2
fi
SYNTH_ARGS=(--model_path "$MODEL_PATH" --output_dir "$OUTPUT_DIR")
# variable -> flag, passed only when set and non-empty (give one of PROMPTS, PROMPTS_FILE, LABELS_CSV)
for pair in PROMPTS:prompts PROMPTS_FILE:prompts_file LABELS_CSV:labels_csv NUM_INFERENCE_STEPS:steps \
            GUIDANCE_SCALE:guidance_scale NUM_IMAGES_PER_PROMPT:num_images BATCH_SIZE:batch_size HEIGHT:height \
            WIDTH:width SEED:seed MIXED_PRECISION:mixed_precision SCHEDULER:scheduler NEGATIVE_PROMPT:negative_prompt \
            BASE_MODEL:base_model CAPTION_TEMPLATE:caption_template FUSE_LORA:fuse_lora DEVICE:device; do
  var=${pair%%:*}
  if [[ -n "${!var:-}" ]]; then SYNTH_ARGS+=("--${pair#*:}" "${!var}"); fi
done
source "$(dirname "${BASH_SOURCE[0]}")/launch_args.sh"
SYNTH_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/synthesize_images.py"

# Sourced by the strategy wrappers (lora.sh, finetune_unet.sh, ...): turns their header
# variables into train_text_to_image.py flags, in the array TRAIN_ARGS. Holds no defaults of
# its own: every value comes from the wrapper's header or the environment.
TRAIN_ARGS=(--strategy "$STRATEGY" --pretrained_model_name_or_path "$MODEL_NAME" --output_dir "$OUTPUT_DIR")
if [[ -n "${TRAIN_CSV:-}" ]]; then
  TRAIN_ARGS+=(--train_csv "$TRAIN_CSV")
else
  TRAIN_ARGS+=(--train_data_dir "$DATA_DIR")
fi
# variable -> flag, passed only when set and non-empty
for pair in LEARNING_RATE:learning_rate UNET_LR:unet_lr TEXT_ENCODER_LR:text_encoder_lr VAE_LR:vae_lr \
            TRAIN_BATCH_SIZE:train_batch_size MAX_TRAIN_STEPS:max_train_steps RESOLUTION:resolution \
            GRADIENT_ACCUMULATION_STEPS:gradient_accumulation_steps MIXED_PRECISION:mixed_precision \
            CHECKPOINTING_STEPS:checkpointing_steps LORA_RANK:lora_rank LORA_ALPHA:lora_alpha \
            LORA_DROPOUT:lora_dropout USE_8BIT_ADAM:use_8bit_adam GRADIENT_CHECKPOINTING:gradient_checkpointing \
            IMAGE_ROOT:image_root LOGGING_DIR:logging_dir SEED:seed MEMORY_PROFILE:memory_profile \
            LATENT_CACHE_DIR:latent_cache_dir TORCH_COMPILE:torch_compile CHANNELS_LAST:channels_last SDPA_BACKEND:sdpa_backend \
            VALIDATION_FRACTION:validation_fraction SPLIT_SEED:split_seed REPORT_TO:report_to; do
  var=${pair%%:*}
  if [[ -n "${!var:-}" ]]; then TRAIN_ARGS+=("--${pair#*:}" "${!var}"); fi
done
source "$(dirname "${BASH_SOURCE[0]}")/launch_args.sh"
TRAIN_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/train_text_to_image.py"

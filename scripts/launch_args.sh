# Sourced by scripts/train_args.sh and scripts/synth_args.sh: the `accelerate launch` options, in
# the array LAUNCH_ARGS: a config file (ACCELERATE_CONFIG, see configs/accelerate/), the process
# count (NUM_GPUS; empty: the config file's, else 1), and any extra options in ACCELERATE_ARGS
# (e.g. "--machine_rank 1 --main_process_ip HOST" on a cluster).
# --quiet: a failing single-process run ends with its own one-line error, not the launcher's traceback.
LAUNCH_ARGS=(--quiet)
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then LAUNCH_ARGS+=(--config_file "$ACCELERATE_CONFIG"); fi
if [[ -n "${NUM_GPUS:-}" ]]; then
  LAUNCH_ARGS+=(--num_processes "$NUM_GPUS")
  if (( NUM_GPUS > 1 )) && [[ -z "${ACCELERATE_CONFIG:-}" ]]; then LAUNCH_ARGS+=(--multi_gpu); fi
elif [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
  LAUNCH_ARGS+=(--num_processes 1)
fi
if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
  # What a config file would say; left out, accelerate prints four lines about its defaults every run.
  # Precision is the scripts' own flag (an explicit Accelerator setting wins over the launcher's).
  LAUNCH_ARGS+=(--num_machines 1 --mixed_precision no --dynamo_backend no)
fi
if [[ -n "${ACCELERATE_ARGS:-}" ]]; then
  read -r -a EXTRA_LAUNCH_ARGS <<< "$ACCELERATE_ARGS"
  LAUNCH_ARGS+=("${EXTRA_LAUNCH_ARGS[@]}")
fi
if ! command -v accelerate >/dev/null; then
  echo "error: accelerate is not on PATH: activate the environment (source .venv/bin/activate after make setup)" >&2
  exit 1
fi

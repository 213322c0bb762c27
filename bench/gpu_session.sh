#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md is waiting for, in two parts that each fit one 10-minute device call:
#
#   bash bench/gpu_session.sh train    # train_speed.py (6 strategies, batch 16; unet/lora compiled) + dora_overhead.py ~8 min
#   bash bench/gpu_session.sh synth    # synth_speed.py (defaults, +compile, fast recipe) + train_memory.py
#                                      # + the fp16 grad-scaler path of a full U-Net ~9 min
#
# JSON and logs go to $OUT (the device tool's result folder) or ./bench-results. Wheels the GPU
# machine lacks travel in .whl/ (see BENCHMARKS.md) and are installed first when present.
set -uo pipefail
part=${1:?usage: bench/gpu_session.sh train|synth}
out=${OUT:-bench-results}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
model=/tmp/sd15-random  # written once per machine by the first script, reused by the next
# Fail in seconds, not after the first benchmark: the SD1.5 builder needs open_clip's CLIP vocabulary.
python3 -c "import diffusers, bitsandbytes, open_clip, pydicom, peft, accelerate" \
  || { echo "missing packages: carry the wheels BENCHMARKS.md lists, in .whl/" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"

run() {  # name, command...: its log and JSON in $out; a failure is recorded and the next one still runs
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}
case $part in
  train)
    # the issue's targets are at batch 16; batch-1 memory comes from train_memory.py (synth part)
    run train_speed python3 bench/train_speed.py --model-dir "$model" --batch-sizes 16 --output "$out/train_speed.json"
    run train_speed_compiled python3 bench/train_speed.py --model-dir "$model" --batch-sizes 16 --strategies unet lora \
      --toolkit-args "--torch_compile --channels_last" --output "$out/train_speed_compiled.json"
    run dora_overhead python3 bench/dora_overhead.py --device cuda --output "$out/dora_overhead.json"
    ;;
  synth)
    run synth_speed python3 bench/synth_speed.py --model-dir "$model" --output "$out/synth_speed.json"
    run train_memory python3 bench/train_memory.py --model-dir "$model" --output "$out/train_memory.json"
    # fp16's path (fp32 master weights, grad scaler, fused AdamW), which no CPU can run
    run train_speed_fp16 python3 bench/train_speed.py --model-dir "$model" --batch-sizes 16 --strategies unet \
      --mixed-precision fp16 --output "$out/train_speed_fp16.json"
    ;;
  *) echo "unknown part $part: use train or synth" >&2; exit 2 ;;
esac

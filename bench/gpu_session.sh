#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md is waiting for, most important first, within a time budget:
#
#   bash bench/gpu_session.sh [SECONDS] [TASK ...]   # default 480 s and every task, in this order:
#
#   task           what it measures                                                  measured, H200
#   compiled       train_speed.py: unet lora with --torch_compile --channels_last           5.7 min
#   profile        profile_step.py: the eager full-U-Net step of both sides, by kernel      (~1.5 min)
#   profile_main_thread  profile_step.py: the reference decoding on its main thread (session 10's way) (~1 min)
#   fp16           train_speed.py: unet with fp16 (grad scaler + fused AdamW)                 (~1 min)
#   attention      train_speed.py: unet lora eager, torch's attention order and cuDNN's first  (~2 min)
#   e2e            gpu_e2e.sh: ./lora.sh (fp16) + ./synthesis_lora.sh on SD1.5, the demo    (~3 min)
#   compiled_peft  train_speed.py: dora bitfit with --torch_compile --channels_last          (~6.5 min)
#   synth_compile  synth_speed.py: the +compile row                                          (~3 min)
#   profile_compiled  profile_step.py: the compiled toolkit step, by kernel                  (~3 min)
#   compiled_cudnn train_speed.py: unet compiled with cuDNN's attention first               (~3 min)
#   synth_compile_cudnn  synth_speed.py: +compile with cuDNN's attention first              (~3 min)
#   ablation       synth_speed.py: defaults, + channels_last, fused q/k/v alone, none, cuDNN attention (~3.3 min)
#   more           train_speed.py: difffit (vs the BitFit reference), unet+vae+text          (~1.5 min)
#   dora           dora_overhead.py: peft's DoRA against the toolkit's, batch 16             (~1 min)
#   resume         paged_resume.py: a resumed low-profile run keeps its state paged          (~1 min)
#   batch1         train_speed.py: unet lora dora bitfit at batch 1 (the issue's second size) (~2 min)
#   targets        train_speed.py: unet lora dora bitfit at batch 16 (issue 7's targets)     2 min
#   synth          synth_speed.py: StableDiffusionPipeline, toolkit defaults, fast recipe    (~1.8 min)
#   memory         train_memory.py: 11 strategies, batch 1, 512 px, --memory_profile low,
#                  11.5 GiB left free by a ballast; heaviest first                           3.3 min
#
# Session 10 (H200) measured targets, synth, memory and compiled (a guess in brackets for the
# others; synthesis tasks now run each side in a process of its own, ~15 s more a side). Its
# compiled rows were judged against references from another process, which now gives no verdict,
# and its references decoded their images on the main thread (now in loader workers): so the
# compiled full U-Net and LoRA, which issue 7's targets rest on, come first, then the profile of
# both sides' steps (what to speed up next), then the fp16 paths no CPU can run (the full U-Net's
# grad scaler; lora.sh's default precision, end to end) and cuDNN's attention, then the other
# compiled rows and the rest; all stay, to be measured again on an H100.
#
# A device call is short and its end is fixed, so each task runs with the time left (timeout) and
# one without enough left is skipped, not started. Every script rewrites its JSON after each row:
# a task cut short keeps what it finished. $OUT (the device tool's result folder, else
# ./bench-results) gets logs, JSON and session.txt (each task's exit and seconds; 124: cut at the
# deadline). A second call on the same warm machine can name the tasks the first did not reach: the
# installed wheels, the 4.3 GB model folder and the JSON (/tmp/sdtune-gpu) are reused, and --reuse
# lets train_speed and train_memory go on where a task was cut (train_speed: finished rows only;
# every train_speed task measures its references in its own process, as a verdict needs).
# A task starts only with about one reference + one row of it left (the H200 seconds of
# bench/results/2026-11-27-h200: a compiled row ~150 s, the U-Net reference ~15 s, start-up ~20 s),
# and runs for the time left less 20 s: timeout's 15 s of grace after SIGINT stay inside the budget.
# Wheels the GPU machine lacks travel in .whl/ (BENCHMARKS.md says which).
set -uo pipefail
budget=480
if [[ ${1:-} =~ ^[0-9]+$ ]]; then budget=$1; shift; fi
all=(compiled profile profile_main_thread fp16 attention e2e compiled_peft synth_compile profile_compiled compiled_cudnn synth_compile_cudnn
     ablation more dora resume batch1 targets synth memory)
tasks=("$@")
(( ${#tasks[@]} )) || tasks=("${all[@]}")
for t in "${tasks[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "unknown task $t: use ${all[*]}" >&2; exit 2; }
done
start=$SECONDS
out=$(realpath -m "${OUT:-bench-results}")  # absolute: the script moves to the repository's root
state=${SDTUNE_GPU_STATE:-/tmp/sdtune-gpu}   # survives between calls while the machine stays warm
model=$state/sd15-random
tiny=() quick=() batch=(--batch-sizes 16) batch1=(--batch-sizes 1) e2e=(env) resolution=512 profile_batch=()
if [[ ${SDTUNE_GPU_TINY:-} == 1 ]]; then  # a CPU dry run of this script's logic (tests/test_bench.py): the tiny model
  tiny=(--tiny) quick=(--quick) batch=(--tiny --batch-sizes 2) batch1=(--tiny --batch-sizes 1) model=$state/tiny-sd15 resolution=64
  profile_batch=(--tiny)
  e2e=(env MIXED_PRECISION=no DEMO_STEPS=20 DEMO_PHANTOMS=60 DEMO_IMAGES=2 DEMO_SAMPLING_STEPS=3)
fi
mkdir -p "$out" "$state"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null && [[ ! -e $state/site/.installed ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$state/site" .whl/*.whl \
    && touch "$state/site/.installed" || exit 1
fi
[[ -d $state/site ]] && export PYTHONPATH=$state/site
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
# Fail in seconds, not after the first benchmark: the SD1.5 builder needs open_clip's CLIP vocabulary.
python3 -c "import diffusers, bitsandbytes, open_clip, pydicom, peft, accelerate" \
  || { echo "missing packages: carry the wheels BENCHMARKS.md lists, in .whl/" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers, accelerate, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
echo "budget ${budget} s; tasks: ${tasks[*]}" | tee -a "$out/session.txt"

task() {  # name, seconds worth starting with, command...
  local name=$1 need=$2 left begin rc; shift 2
  left=$(( budget - (SECONDS - start) ))
  if (( left < need )); then
    echo "$name skipped: ${left} s left, worth starting with ${need}" | tee -a "$out/session.txt"
    return
  fi
  echo "=== $name (${left} s left): $*"
  begin=$SECONDS
  # SIGINT: Python stops with KeyboardInterrupt; the JSON already holds every finished row.
  # left - 20: a task that ignores SIGINT is killed 15 s later, still within the budget
  timeout --signal=INT --kill-after=15 "$(( left - 20 ))" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name exit $rc after $(( SECONDS - begin )) s" | tee -a "$out/session.txt"
  cp "$out"/*.json "$state"/ 2>/dev/null
}

# --reuse: rows an earlier call finished here are not measured again; references are (no --reuse-references):
# the issue's verdicts need both sides measured in one process
speed=(python3 bench/train_speed.py --model-dir "$model" "${batch[@]}" --reuse "$state")
synth=(python3 bench/synth_speed.py --model-dir "$model" "${tiny[@]}")
for t in "${tasks[@]}"; do
  case $t in
    targets) task targets 150 "${speed[@]}" --strategies unet lora dora bitfit --output "$out/train_speed.json" ;;
    synth) task synth 105 "${synth[@]}" --toolkit-configs defaults= --output "$out/synth_speed.json" ;;
    memory) task memory 60 python3 bench/train_memory.py --model-dir "$model" "${tiny[@]}" --reuse "$state" \
              --output "$out/train_memory.json" \
              --strategies unet+vae+text unet+vae unet+text unet vae+text vae text bitfit difffit dora lora ;;
    more) task more 90 "${speed[@]}" --strategies difffit unet+vae+text --output "$out/train_speed_more.json" ;;
    compiled) task compiled 240 "${speed[@]}" --strategies unet lora --toolkit-args "--torch_compile --channels_last" \
                --output "$out/train_speed_compiled.json" ;;
    compiled_peft) task compiled_peft 240 "${speed[@]}" --strategies dora bitfit \
                     --toolkit-args "--torch_compile --channels_last" --output "$out/train_speed_compiled_peft.json" ;;
    # which of the synthesis defaults cost speed on the GPU (channels_last without torch's NHWC GroupNorm?)
    ablation) task ablation 165 "${synth[@]}" --fast-recipe "" --toolkit-configs defaults= \
                "channels_last=--channels_last true" "fuse_qkv_only=--channels_last false --cudnn_benchmark false" \
                "none=--channels_last false --fuse_qkv false --cudnn_benchmark false" "sdpa_cudnn=--sdpa_backend cudnn" \
                --output "$out/synth_speed_ablation.json" ;;
    # fp16's path (fp32 master weights, grad scaler, fused AdamW), which no CPU can run
    fp16) task fp16 75 "${speed[@]}" --strategies unet --mixed-precision fp16 --output "$out/train_speed_fp16.json" ;;
    resume) task resume 45 python3 bench/paged_resume.py --model-dir "$model" "${tiny[@]}" \
              --output "$out/paged_resume.json" ;;
    e2e) task e2e 120 "${e2e[@]}" bash bench/gpu_e2e.sh "$model" "$state/e2e" "$resolution" ;;
    synth_compile) task synth_compile 150 "${synth[@]}" --fast-recipe "" --toolkit-configs +compile=--torch_compile \
                     --output "$out/synth_speed_compiled.json" ;;
    compiled_cudnn) task compiled_cudnn 200 "${speed[@]}" --strategies unet \
                      --toolkit-args "--torch_compile --channels_last --sdpa_backend cudnn" \
                      --output "$out/train_speed_compiled_cudnn.json" ;;
    synth_compile_cudnn) task synth_compile_cudnn 150 "${synth[@]}" --fast-recipe "" \
                           --toolkit-configs "+compile_cudnn=--torch_compile --sdpa_backend cudnn" \
                           --output "$out/synth_speed_compiled_cudnn.json" ;;
    batch1) task batch1 60 python3 bench/train_speed.py --model-dir "$model" "${batch1[@]}" --reuse "$state" \
              --strategies unet lora dora bitfit --output "$out/train_speed_batch1.json" ;;
    # where the eager step's time goes on both sides (is the reference host-bound? which kernels lead?)
    profile) task profile 75 python3 bench/profile_step.py --model-dir "$model" "${profile_batch[@]}" --strategy unet \
               --output "$out/profile_step.json" ;;
    # cuDNN's attention first (torch tries it last) beside torch's order, eager, against one reference each
    attention) task attention 120 "${speed[@]}" --strategies unet lora --toolkit-args "" "--sdpa_backend cudnn" \
                 --output "$out/train_speed_attention.json" ;;
    # the same reference with its images decoded on the main thread (the script's default, session 10's
    # reference): its busy fraction beside profile's says how host-bound that reference was
    profile_main_thread) task profile_main_thread 60 python3 bench/profile_step.py --model-dir "$model" \
                          "${profile_batch[@]}" --strategy unet --sides reference --reference-workers 0 \
                          --output "$out/profile_step_main_thread.json" ;;
    # the compiled toolkit step (inductor's cache from the compiled task, if it ran, shortens compiling)
    profile_compiled) task profile_compiled 200 python3 bench/profile_step.py --model-dir "$model" "${profile_batch[@]}" \
                        --strategy unet --sides toolkit --toolkit-args "--torch_compile --channels_last" \
                        --output "$out/profile_step_compiled.json" ;;
    dora) task dora 40 python3 bench/dora_overhead.py --device "${SDTUNE_GPU_DEVICE:-cuda}" "${quick[@]}" \
            --output "$out/dora_overhead.json" ;;
  esac
done
echo "session: $(( SECONDS - start )) s of ${budget}" >> "$out/session.txt"
echo; cat "$out/session.txt"  # the device tool returns only the output's tail: the summary comes last

#!/usr/bin/env bash
# The built-in world under each shipped accelerate config, on the GPUs of one machine (issue 17, item 6).
#
# For each config (DDP in fp32 and bf16, FSDP, DeepSpeed ZeRO-2 and ZeRO-3 in bf16) one small study: one-round FFT and
# LoRA of every built-in task for a few optimizer steps (launched as N processes with that accelerate config), an
# FFT-MoE and a LoRA-MoE with one router-training step (launched the same way), and the evaluation of every model
# (on the GPU when one is there). Each study's output goes to its own dir, its console to a log file, and one line
# per config (ok / FAILED / skipped, with the seconds it took) to summary.txt. The world is built once and copied
# into each study (a launch setting is not part of a step's key, so one study dir would skip the later configs).
#
#   scripts/gpu-check.sh                      # every config, the full world, all GPUs, into gpu-check/
#   scripts/gpu-check.sh --configs "ddp fsdp" --processes 2 --preset quick --out /tmp/check
#   scripts/gpu-check.sh --cpu                # what runs without a GPU: DDP (gloo) on 2 CPU processes, test world
#
# Exit status: 0 when every config that ran passed, 1 otherwise. Not yet run on a GPU (docs/paper-config.md).
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT=gpu-check
PRESET=full
CONFIGS="ddp-fp32 ddp fsdp deepspeed-zero2 deepspeed-zero3"
PROCESSES=""
STEPS=3
CPU=0

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --processes) PROCESSES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --cpu) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$CPU" = 1 ]; then
  # accelerate runs FSDP and DeepSpeed only on accelerators (train/launch.py refuses them on CPU)
  CONFIGS="ddp-fp32"; PROCESSES=${PROCESSES:-2}
  [ "$PRESET" = full ] && PRESET=test
fi
if [ -z "$PROCESSES" ]; then
  PROCESSES=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if [ "$CPU" = 0 ] && [ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  echo "gpu-check.sh: no CUDA device here; run with --cpu for the part that runs without one" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
{
  echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ): preset $PRESET, $PROCESSES processes, $STEPS steps per task, cpu=$CPU"
  "$PYTHON" - <<'EOF'
import torch, transformers, accelerate, peft
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"peft {peft.__version__}; GPUs: {', '.join(gpus) or 'none'}")
EOF
} > "$SUMMARY"

# One study config per accelerate config: name, shipped config, mixed precision.
write_config() {
  local name=$1 accelerate=$2 precision=$3 batch=$((4 * PROCESSES))
  cat > "$OUT/$name.yaml" <<EOF
name: gpu-check-$name
seed: 0
base: {builtin: $PRESET}
tasks: builtin
old_knowledge: {tasks: builtin, limit: 16}
training:
  lr_of_pretrain_peak: 0.33
  max_steps: $STEPS
  batch_size: $batch
  micro_batch_size: 2
  max_length: 384
evaluation: {batch_size: 32, max_test: 16}
launch:
  num_processes: $PROCESSES
  accelerate_config: $accelerate
  mixed_precision: "$precision"   # quoted: YAML reads a bare no as false
  cpu: $([ "$CPU" = 1 ] && echo true || echo false)
methods:
  one-round: {finetune: [fft, lora]}
  moe:
    experts: [fft, lora]
    router: prompts
    router_training: {steps: 1, examples_per_task: 4, batch_size: $batch}
EOF
}

# The world is built once, by the first study, and its artifact copied into the others.
WORLD=""
share_world() {
  local run=$1
  if [ -n "$WORLD" ]; then
    mkdir -p "$run/artifacts"
    [ -d "$run/artifacts/$(basename "$WORLD")" ] || cp -r "$WORLD" "$run/artifacts/"
  fi
}

failed=0
for name in $CONFIGS; do
  case "$name" in
    ddp-fp32) accelerate=ddp; precision=no ;;
    ddp|fsdp|deepspeed-zero2|deepspeed-zero3) accelerate=$name; precision=$([ "$CPU" = 1 ] && echo no || echo bf16) ;;
    *) echo "gpu-check.sh: unknown config '$name'" >&2; exit 2 ;;
  esac
  if [[ $accelerate == deepspeed-* ]] && ! "$PYTHON" -c 'import deepspeed' 2>/dev/null; then
    echo "$name: skipped (deepspeed is not installed: pip install deepspeed)" | tee -a "$SUMMARY"
    continue
  fi
  write_config "$name" "$accelerate" "$precision"
  run="$OUT/run-$name"
  share_world "$run"
  started=$(date +%s)
  if "$PYTHON" -m knowstack.cli study "$OUT/$name.yaml" --out "$run" > "$OUT/$name.log" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?, see $name.log)"; failed=1
  fi
  seconds=$(( $(date +%s) - started ))
  models=$([ -f "$run/results.csv" ] && "$PYTHON" -c "import csv,sys; print(len({r['model'] for r in csv.DictReader(open(sys.argv[1]))}))" "$run/results.csv" || echo 0)
  echo "$name ($accelerate, mixed precision $precision): $status in ${seconds}s, $models models evaluated" | tee -a "$SUMMARY"
  if [ -z "$WORLD" ]; then
    WORLD=$(find "$run/artifacts" -maxdepth 1 -type d -name 'world-*' | head -n 1)
  fi
done
echo "summary: $SUMMARY"
exit $failed

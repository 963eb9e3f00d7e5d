#!/usr/bin/env bash
# MTT expert buffers, memory and accuracy on one GPU (H100/H200), in under 10 minutes (DEADLINE); JSON to $OUT.
#
#   A. expert buffers, alone on the GPU: BreastMNIST and the unofficial PneumoniaMNIST subset, with the
#      settings of the presets mtt-28-ipc* (so the MTT runs reuse them): time and size on disk
#      (buffer_breast.json, buffer_pneumonia.json).
#   B. memory benchmark, alone: s/iteration and peak CUDA memory vs syn_steps 10,20,40,80, plain unroll
#      vs bounded memory, IPC 10 and 50 (mtt_memory.json).
#   C. accuracy, every run at once as its own process (launch-bound runs share the GPU well): MTT at
#      IPC 1 and 10 with the presets, the random subset at the same IPCs, and DC when it is registered,
#      on both datasets; 5 evaluation networks, 1000 epochs with DSA (MTT; random also gets its own
#      reference, 300 epochs without augmentation, in test_acc_*, and MTT's protocol in dsa_eval) /
#      DC's reference.
#      MTT iterations are cut where phase B's s/iteration says the preset's would not fit
#      DISTILL_BUDGET seconds under SLOWDOWN-fold sharing (the iterations used are in grid.json).
#
# The GPU machine needs no network: it gets the repository and .gpu_carry/ (data, the medmnist wheel).
#     bash benchmarks/campaigns/gpu_mtt.sh prepare   # where the data is: data and the medmnist wheel into .gpu_carry/
# then, on the GPU machine: bash benchmarks/campaigns/gpu_mtt.sh
# Smoke test on a CPU: DEVICE=cpu QUICK=1 bash benchmarks/campaigns/gpu_mtt.sh
set -u
OUT=${OUT:-runs/gpu_mtt}
source "$(dirname "$0")/gpu_setup.sh" "$@"
DISTILL_BUDGET=${DISTILL_BUDGET:-240}
SLOWDOWN=${SLOWDOWN:-4}
RUNS=${RUNS:-/tmp/mtt_runs}
EXPERTS=${EXPERTS:-/tmp/mtt_experts}
EVAL_ARGS=${EVAL_ARGS:---eval-models 5}
BENCH_ARGS=${BENCH_ARGS:-}
if [ -n "${QUICK:-}" ]; then  # CPU smoke test: tiny everything
  EVAL_ARGS="--eval-models 1 --eval-epochs 2"; BENCH_ARGS="--syn-steps 2 --ipcs 1 --iterations 1 --width 16"
  QUICK_SET="--set iterations=2 --set num_experts=2 --set buffer_epochs=3 --set max_start_epoch=1 --set eval_every=0 --set model_kwargs={\"width\":16}"
  DISTILL_BUDGET=60
fi
mkdir -p "$RUNS" "$EXPERTS"
setting() { $PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# A. expert buffers (the presets share one buffer setting; read it from the IPC 1 preset)
PRESET=src/medistill/presets/mtt-28-ipc1.yaml
E=$(setting $PRESET num_experts); T=$(setting $PRESET buffer_epochs); B=$(setting $PRESET expert_batch)
[ -n "${QUICK:-}" ] && E=2 T=3
for pair in "breastmnist:breast" "$PNEUMONIA:pneumonia"; do
  ds=${pair%%:*}; tag=${pair##*:}
  extra=""; [ -n "${QUICK:-}" ] && extra="--model-arg width=16"
  timeout 120 $PY -m medistill experts "$ds" --num-experts "$E" --epochs "$T" --batch-size "$B" --out "$EXPERTS" \
    --device "$DEVICE" --no-progress --json "$OUT/buffer_$tag.json" $extra >> "$LOG" 2>&1 || echo "experts $tag: exit $?" >> "$LOG"
done

# B. memory benchmark, alone on the GPU
limit=$(( $(left) - DISTILL_BUDGET - 120 )); [ "$limit" -gt 200 ] && limit=200
if [ "$limit" -ge 30 ]; then
  timeout "$limit" $PY benchmarks/mtt_memory.py --device "$DEVICE" --out "$OUT/mtt_memory.json" --buffer-root "$EXPERTS/bench" $BENCH_ARGS \
    > /dev/null 2>> "$LOG" || echo "mtt_memory: exit $?" >> "$LOG"
else
  echo "mtt_memory: skipped, no time left" >> "$LOG"
fi

# C. accuracy, all runs at once
$PY - "$OUT/mtt_memory.json" "$DISTILL_BUDGET" "$SLOWDOWN" > "$RUNS/plan.txt" <<'EOF'
import json, sys, yaml
budget, slowdown = float(sys.argv[2]), float(sys.argv[3])
try:
    cases = json.load(open(sys.argv[1]))["results"]
except (OSError, ValueError, KeyError):
    cases = []
for ipc in (1, 10):
    preset = yaml.safe_load(open(f"src/medistill/presets/mtt-28-ipc{ipc}.yaml"))
    steps, unroll = preset["syn_steps"], preset.get("unroll", "plain")
    # s/iteration at IPC 10 (an upper bound for IPC 1), scaled linearly to the preset's syn_steps
    known = [c["seconds_per_iteration"] * steps / c["syn_steps"] for c in cases
             if c.get("seconds_per_iteration") and c["ipc"] == 10 and c["unroll"] == unroll]
    per_it = min(known) if known else 0.5
    print(ipc, max(20, min(preset["iterations"], int(budget / (per_it * slowdown)))))
EOF
cat "$RUNS/plan.txt" >> "$LOG"
HAS_DC=$($PY -m medistill methods 2>/dev/null | grep -qw dc && echo 1 || echo "")
job() {  # dataset tag method ipc [args...]
  local ds=$1 tag=$2 method=$3 ipc=$4; shift 4
  local dir="$RUNS/${tag}_${method}_${ipc}"
  timeout $(( DISTILL_BUDGET + 150 )) $PY -m medistill distill "$ds" -m "$method" --ipc "$ipc" --out "$dir" --device "$DEVICE" \
    $EVAL_ARGS --seed 0 --no-progress "$@" > "$dir.log" 2>&1
  if [ "$method" = random ]; then  # also score it with MTT's protocol (DSA, 1000 epochs)
    timeout 150 $PY -m medistill evaluate "$dir" --augment --device "$DEVICE" $EVAL_ARGS --seed 0 --no-progress \
      --out "$dir/dsa_eval.json" >> "$dir.log" 2>&1
  fi
}
bg() { if [ -n "${QUICK:-}" ]; then "$@"; else "$@" & fi; }  # one at a time in the CPU smoke test
for pair in "breastmnist:breast" "$PNEUMONIA:pneumonia"; do
  ds=${pair%%:*}; tag=${pair##*:}
  while read -r ipc its; do
    bg job "$ds" "$tag" mtt "$ipc" --config "mtt-28-ipc$ipc" --set "buffer_root=$EXPERTS" --set "iterations=$its" ${QUICK_SET:-}
    bg job "$ds" "$tag" random "$ipc"
    if [ -n "$HAS_DC" ]; then
      dc_its=200; [ "$ipc" = 10 ] && dc_its=20; [ -n "${QUICK:-}" ] && dc_its=1
      bg job "$ds" "$tag" dc "$ipc" --config dc --set "iterations=$dc_its"
    fi
  done < "$RUNS/plan.txt"
done
wait
$PY benchmarks/collect_grid.py "$RUNS" --out "$OUT/grid.json" > /dev/null
for f in "$RUNS"/*.log; do echo "== $f"; grep -v Warning "$f" | tail -4; done >> "$LOG"
echo "done in $SECONDS s" >> "$LOG"

#!/usr/bin/env bash
# DC, DSA and DM speed and accuracy on one GPU (H100/H200), in under 10 minutes (DEADLINE); JSON to $OUT.
#
#   A. speed, alone on the GPU: s/iteration and peak memory of DC, DSA, DM at IPC 1, 10, 50
#      (BreastMNIST): default (per-class loop), class_batching=vmap, bf16; DC also at 32x32 (the
#      feasibility study's code resized 28->32).
#   B. accuracy, every run at once as its own process (the runs are launch-bound, so they share
#      the GPU well): BreastMNIST and the unofficial PneumoniaMNIST subset; DC, DSA, DM at IPC 1,
#      10, 50, 5 evaluation networks, 300 epochs (DC) / 1000 epochs with DSA (DSA, DM); random
#      subsets at the same IPCs scored both ways; the full training set. Iterations: 1000 (the
#      reference), cut per run where phase A's s/iteration says it would not fit DISTILL_BUDGET
#      seconds under SLOWDOWN-fold sharing; the iterations used are in grid.json.
#   C. torch.compile speed (DC and DM at IPC 10), if time is left.
#
# The GPU machine needs no network: it gets the repository and .gpu_carry/ (data, the medmnist wheel).
#     bash benchmarks/campaigns/gpu_pixel_methods.sh prepare   # where the data is: data and the medmnist wheel into .gpu_carry/
# then, on the GPU machine: bash benchmarks/campaigns/gpu_pixel_methods.sh
set -u
OUT=${OUT:-runs/gpu_pixel_methods}
source "$(dirname "$0")/gpu_setup.sh" "$@"
DISTILL_BUDGET=${DISTILL_BUDGET:-200}
SLOWDOWN=${SLOWDOWN:-8}  # ~26 launch-bound processes share one GPU and 16 cores
RUNS=${RUNS:-/tmp/pixel_methods_runs}
# smoke test of this script on a CPU: DEVICE=cpu IPCS=1 EVAL_ARGS="--eval-models 1 --eval-epochs 2" SPEED_ITERS=1 COMPILE_IPC=1
IPCS=${IPCS:-1 10 50}
EVAL_ARGS=${EVAL_ARGS:---eval-models 5}
SPEED_ITERS=${SPEED_ITERS:-5}
SPEED_IPCS=$(echo $IPCS | tr ' ' ,)
mkdir -p "$RUNS"

speed() {  # name, timeout, extra args
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  [ "$limit" -lt 20 ] && { echo "speed $name: skipped, no time left" >> "$LOG"; return; }
  timeout "$limit" $PY benchmarks/distill_speed.py --device "$DEVICE" --dataset breastmnist "$@" --out "$OUT/$name.json" > /dev/null 2>> "$LOG" \
    || echo "speed $name: exit $?" >> "$LOG"
}
# A. speed, alone
speed speed 90 --iterations "$SPEED_ITERS" --ipcs "$SPEED_IPCS"
speed speed_variants 60 --iterations "$SPEED_ITERS" --ipcs "$SPEED_IPCS" --methods dc,dsa --set class_batching=vmap
cp "$OUT/speed_variants.json" "$RUNS/vmap.json"
speed speed_variants 60 --iterations "$SPEED_ITERS" --ipcs "$SPEED_IPCS" --bf16
cp "$OUT/speed_variants.json" "$RUNS/bf16.json"
speed speed_variants 40 --iterations "$SPEED_ITERS" --ipcs "$SPEED_IPCS" --methods dc --image-size 32
cp "$OUT/speed_variants.json" "$RUNS/size32.json"

# B. accuracy grid, all runs at once
$PY - "$OUT/speed.json" "$DISTILL_BUDGET" "$SLOWDOWN" > "$RUNS/plan.txt" <<'EOF'
import json, sys
budget, slowdown = float(sys.argv[2]), float(sys.argv[3])
try:
    measured = {(c["method"], c["ipc"]): c["seconds_per_iteration"] for c in json.load(open(sys.argv[1]))["cases"] if "error" not in c}
except (OSError, ValueError, KeyError):
    measured = {}
guess = {1: 0.02, 10: 0.5, 50: 1.0}  # s/iteration when phase A gave nothing
for method in ("dc", "dsa", "dm"):
    for ipc in (1, 10, 50):
        s = measured.get((method, ipc)) or (0.01 if method == "dm" else guess[ipc])
        print(method, ipc, max(10, min(1000, int(budget / (s * slowdown)))))
EOF
cat "$RUNS/plan.txt" >> "$LOG"
job() {  # dataset tag method ipc iterations
  local dir="$RUNS/$2_$3_$4"
  local its=""; [ -n "$5" ] && its="--iterations $5"
  local limit=$(( DISTILL_BUDGET + 150 )); [ "$limit" -gt "$(left)" ] && limit=$(left)
  timeout "$limit" $PY -m medistill distill "$1" -m "$3" --ipc "$4" $its --out "$dir" --device "$DEVICE" $EVAL_ARGS --seed 0 --no-progress > "$dir.log" 2>&1 \
    || { echo "exit $? after ${limit}s limit" >> "$dir.log"; return; }
  if [ "$3" = random ]; then
    timeout 100 $PY -m medistill evaluate "$dir" --augment --device "$DEVICE" $EVAL_ARGS --seed 0 --no-progress --out "$dir/dsa_eval.json" >> "$dir.log" 2>&1
  fi
}
for pair in "breastmnist:breast" "$PNEUMONIA:pneumonia"; do
  ds=${pair%%:*}; tag=${pair##*:}
  job "$ds" "$tag" full 1 "" &
  for ipc in $IPCS; do
    job "$ds" "$tag" random "$ipc" "" &
    while read -r method pipc its; do
      [ "$pipc" = "$ipc" ] && job "$ds" "$tag" "$method" "$ipc" "$its" &
    done < "$RUNS/plan.txt"
  done
done
wait
$PY benchmarks/collect_grid.py "$RUNS" --note "iterations < 1000 were cut to fit DEADLINE (see the plan in logs.txt)" --out "$OUT/grid.json" > /dev/null
for f in "$RUNS"/*.log; do echo "== $f"; grep -v Warning "$f" | tail -5; done >> "$LOG"
$PY - "$RUNS" "$OUT/speed_variants.json" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
merged = {name: json.loads((runs / f"{name}.json").read_text()) for name in ("vmap", "bf16", "size32") if (runs / f"{name}.json").exists() and (runs / f"{name}.json").stat().st_size}
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
EOF
# C. torch.compile, with what is left
speed speed_compile 100 --iterations "$SPEED_ITERS" --ipcs "${COMPILE_IPC:-10}" --methods dc,dm --compile
echo done >> "$LOG"

#!/usr/bin/env bash
# The study runner (local and Ray executors) on one GPU (H100/H200), in under 10 minutes (DEADLINE); results to $OUT.
#
#   A. configs/quick.yaml on the GPU with the local executor: wall time, tables, correlation.
#   B. the same study through `--executor ray` (a local Ray instance) with fractional requests
#      (num_gpus 0.25, num_cpus 2: four runs share the GPU): wall time, and whether its numbers
#      equal A's (same seeds; cuDNN may differ in the last bits, so the differences are listed).
#   C. a small replay of the per-dataset protocol on the two real datasets (DC and MTT at IPC 1 and
#      10 with 200 iterations, random, full; 5 networks, each method's reference epochs) through
#      Ray, stopped at DEADLINE (a study resumes: rerun the same command to finish it).
#
# The GPU machine needs no network: it gets the repository and .gpu_carry/ with the data, the medmnist
# wheel and the ray wheels, e.g.
#   bash benchmarks/campaigns/gpu_study.sh prepare   # data and the medmnist wheel into .gpu_carry/ (gpu_setup.sh)
#   .venv/bin/pip download -d .gpu_carry/whl 'ray>=2.9'
# then, on the GPU machine: bash benchmarks/campaigns/gpu_study.sh
set -u
OUT=${OUT:-runs/gpu_study}
[ "${1:-}" = "prepare" ] && source "$(dirname "$0")/gpu_setup.sh" prepare
DATA_DIR=$(realpath "${DATA_DIR:-$( [ -d .gpu_carry/data ] && echo .gpu_carry/data || dirname "${MEDISTILL_DATA:?run 'prepare' first or set MEDISTILL_DATA}" )}")
PY=${PY:-python3}
DEADLINE=${DEADLINE:-540}  # seconds from the start: part C is cut off here
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu DEADLINE=120: a smoke test of this script
START=$(date +%s)
mkdir -p "$OUT"
if [ -d .gpu_carry/whl ]; then
  $PY -m pip install --quiet --no-index --find-links .gpu_carry/whl medmnist 'ray>=2.9' >/dev/null 2>&1 || true
fi
$PY -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

# Write a copy of a study config with its data paths pointing at DATA_DIR and the given changes.
derive() {  # derive SRC DEST PYTHON-EXPRESSION-ON-c
  $PY - "$1" "$2" "$DATA_DIR" "$DEVICE" "$3" <<'EOF'
import sys, yaml
src, dest, data, device, change = sys.argv[1:]
text = open(src).read().replace("../../shared/data", data)
c = yaml.safe_load(text)
c["device"] = device
exec(change)
open(dest, "w").write(yaml.safe_dump(c, sort_keys=False))
EOF
}

run() {  # run NAME SECONDS ARGS...: a timed study, its log and wall time in $OUT
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" $PY -m medistill study "$@" > "$OUT/$name.log" 2>&1
  echo "{\"step\": \"$name\", \"rc\": $?, \"wall_s\": $(( $(date +%s) - t0 ))}" >> "$OUT/timings.jsonl"
}

derive configs/quick.yaml "$OUT/quick-local.yaml" 'c["executor"]["threads"] = None'
derive configs/quick.yaml "$OUT/quick-ray.yaml" 'c["executor"] = {"threads": None, "resources": {"num_cpus": 2, "num_gpus": 0.25 if c["device"] != "cpu" else 0}}'
run A_local 200 "$OUT/quick-local.yaml" --out "$OUT/A_local"
run B_ray 200 "$OUT/quick-ray.yaml" --out "$OUT/B_ray" --executor ray
$PY - "$OUT" <<'EOF' > "$OUT/A_vs_B.txt" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(d):
    return {p.stem: json.loads(p.read_text()) for p in (out / d / "runs").glob("*.json")}
a, b = load("A_local"), load("B_ray")
same = [k for k in a if k in b and a[k]["status"] == b[k]["status"] == "ok" and a[k]["result"]["test_acc"] == b[k]["result"]["test_acc"]]
print(f"runs: local {len(a)}, ray {len(b)}, identical test ACC lists {len(same)}")
for k in sorted(set(a) & set(b)):
    if k not in same and a[k]["status"] == b[k]["status"] == "ok":
        print(k, a[k]["dataset_label"], a[k]["spec"]["method"], a[k]["spec"]["ipc"], a[k]["result"]["test_acc"], b[k]["result"]["test_acc"])
hosts = {r["result"]["device"] for r in b.values() if r["status"] == "ok"}
print("ray runs' devices:", hosts)
EOF

LEFT=$(( DEADLINE - ($(date +%s) - START) ))
derive configs/quick.yaml "$OUT/replay.yaml" '
c["name"] = "replay-lite"
c["datasets"] = c["datasets"][:2]; c.pop("simulations")
c["data"]["image_size"] = 32; c["seeds"] = [0]; c["ipcs"] = [1, 10]
c["eval"] = {"num_models": 5}
c["executor"] = {"resources": {"num_cpus": 2, "num_gpus": 0.25 if c["device"] != "cpu" else 0}}
c["methods"] = {"random": None, "full": None, "dc": {"settings": {"iterations": 200}},
                "mtt": {"settings": {"iterations": 200, "syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 20}, "resources": {"num_gpus": 0.5 if c["device"] != "cpu" else 0}}}'
if [ "$LEFT" -gt 60 ]; then
  run C_replay "$LEFT" "$OUT/replay.yaml" --out "$OUT/C_replay" --executor ray
  $PY -m medistill report "$OUT/C_replay" >> "$OUT/C_replay.log" 2>&1
fi
cat "$OUT/timings.jsonl"

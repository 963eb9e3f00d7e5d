#!/usr/bin/env bash
# Privacy audit and share/receive at reference settings (issue 7), for a GPU machine.
# Usage (repo root): bash benchmarks/privacy_audit.sh [OUT_DIR]
# Writes OUT_DIR/*.audit.txt (Markdown), OUT_DIR/*/audit/audit.json and OUT_DIR/*.train.txt; copy the
# tables into docs/RESULTS.md with the card (nvidia-smi -L) that ran them.
set -euo pipefail
OUT=${1:-runs/privacy_gpu}
DATA=${MEDISTILL_DATA:-../shared/data/medmnist}
M=".venv/bin/medistill"
COMMON=(--data-root "$DATA" --device cuda --no-progress)
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"

# 1. The audit must fail on real images: a random subset (exit code 1 is the expected outcome).
$M distill breastmnist --method random --ipc 10 --out "$OUT/random_ipc10" "${COMMON[@]}"
set +e
$M audit "$OUT/random_ipc10" --lira-shadows 16 "${COMMON[@]}" > "$OUT/random_ipc10.audit.txt"
echo "random audit exit code: $? (1 = near-copies found, as expected)" | tee -a "$OUT/random_ipc10.audit.txt"
set -e

# 2. DC from noise at IPC 1 (reference 1000 iterations) and IPC 10 (200 iterations); reference-epoch
#    membership inference with 16 LiRA shadows; then export and train at a "receiving site".
for spec in "1 1000" "10 200"; do
  set -- $spec
  ipc=$1 iters=$2
  run="$OUT/dc_noise_ipc${ipc}"
  /usr/bin/time -f "distill seconds %e" $M distill breastmnist --method dc --ipc "$ipc" --set init=noise --set iterations="$iters" \
      --out "$run" "${COMMON[@]}"
  /usr/bin/time -f "audit seconds %e" $M audit "$run" --lira-shadows 16 "${COMMON[@]}" > "$run.audit.txt"
  $M export "$run" --out "$OUT/bundle_dc_ipc${ipc}"
  for model in convnet resnet18; do
    $M train "$OUT/bundle_dc_ipc${ipc}" --model "$model" --out "$OUT/bundle_dc_ipc${ipc}.$model.pt" \
        --eval-data "$DATA/breastmnist.npz" --device cuda --no-progress | tee -a "$run.train.txt"
  done
done

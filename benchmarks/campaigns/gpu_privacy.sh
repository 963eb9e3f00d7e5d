#!/usr/bin/env bash
# Privacy audit and share/receive at reference settings on one GPU: near-copy screening and membership
# inference (16 LiRA shadows) of a random subset and of DC sets, then export and training at a receiving site.
#     bash benchmarks/campaigns/gpu_privacy.sh prepare   # where the data is: data and the medmnist wheel into .gpu_carry/
# then, on the GPU machine (the repository with .gpu_carry/): bash benchmarks/campaigns/gpu_privacy.sh
# Writes $OUT/*.audit.txt (Markdown), $OUT/*-audit/audit.json and $OUT/*.train.txt.
set -euo pipefail
OUT=${OUT:-runs/gpu_privacy}
source "$(dirname "$0")/gpu_setup.sh" "$@"
DATA=$MEDISTILL_DATA
M="$PY -m medistill"
COMMON=(--data-root "$DATA" --device "$DEVICE" --no-progress)
nvidia-smi -L > "$OUT/device.txt" 2>&1 || true

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
  $M export "$run" --out "$OUT/bundle_dc_ipc${ipc}" --audit "$run-audit" --data-root "$DATA" --device cuda
  for model in convnet resnet18; do
    $M train "$OUT/bundle_dc_ipc${ipc}" --model "$model" --out "$OUT/bundle_dc_ipc${ipc}.$model.pt" \
        --eval-data "$DATA/breastmnist.npz" --device "$DEVICE" --no-progress | tee -a "$run.train.txt"
  done
done

#!/usr/bin/env bash
# Evaluation speed on one GPU, in one short run (about 3-5 minutes on an H100/H200), through `python -m benchmarks.run`:
#   1. must_show.json: K=10 stacked vs 10 sequential trainings on BreastMNIST random IPC 10 (300 epochs,
#      time and ACC), and one cell's evaluation (K=5, 1000 epochs with DSA, IPC 10, 11 classes).
#   2. bench.json: the throughput grid (K = 1/5/10/20, IPC 1/10/50, 1 and 3 channels, both backends,
#      with and without DSA), full-set epoch times (fp32 / channels_last / bf16 / stacked) and DC/MTT s/iteration.
#
#     bash benchmarks/campaigns/gpu_evaluation.sh prepare   # where the data is: data and the medmnist wheel into .gpu_carry/
# then, on the GPU machine (the repository with .gpu_carry/): bash benchmarks/campaigns/gpu_evaluation.sh
set -u
OUT=${OUT:-runs/gpu_evaluation}
source "$(dirname "$0")/gpu_setup.sh" "$@"
$PY -c "import torch, medistill.train, medistill.methods; print('torch', torch.__version__, torch.cuda.get_device_name())"

run() { timeout "$1" $PY -m benchmarks.run --device "$DEVICE" --data "$MEDISTILL_DATA" "${@:2}" 2>&1 | tee -a "$LOG"; }
run 240 --out "$OUT/must_show.json" --sections equivalence,cell || echo "must-show sections stopped early (partial JSON kept)"
run 270 --out "$OUT/bench.json" --sections throughput,full_set,methods || echo "grid sections stopped early (partial JSON kept)"

#!/usr/bin/env bash
# Issue 6 on the GPU, in one short run (about 3-5 minutes on an H100/H200):
#   1. must_show.json: K=10 stacked vs 10 sequential trainings on BreastMNIST random IPC 10 (300 epochs,
#      time and ACC), and one cell's evaluation (K=5, 1000 epochs with DSA, IPC 10, 11 classes).
#   2. bench.json: the throughput grid (K = 1/5/10/20, IPC 1/10/50, 1 and 3 channels, both backends,
#      with and without DSA), full-set epoch times (fp32 / channels_last / bf16 / stacked) and DC/MTT s/iteration.
#
# Step 1, on the CPU machine, from the repository root (the device has no medmnist package and
# cannot reach ../shared or the internet):
#     bash benchmarks/gpu_issue6.sh prepare
# Step 2, the device call (run tool):  command "bash benchmarks/gpu_issue6.sh", carry [".whl", ".gpu_data"], timeout_s 560
set -euo pipefail

if [ "${1:-}" = "prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl medmnist==3.0.2
    mkdir -p .gpu_data && cp ../shared/data/medmnist/breastmnist.npz .gpu_data/
    echo "prepared .whl and .gpu_data; now run the device call with carry [\".whl\", \".gpu_data\"]"
    exit 0
fi

OUT=${OUT:-runs/gpu_issue6}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch, medistill.train, medistill.methods; print('torch', torch.__version__, torch.cuda.get_device_name())"

run() { timeout "$1" python3 -m benchmarks.run --device cuda --data .gpu_data "${@:2}" 2>&1 | tee -a "$OUT/log.txt"; }
run 240 --out "$OUT/must_show.json" --sections equivalence,cell || echo "must-show sections stopped early (partial JSON kept)"
run 270 --out "$OUT/bench.json" --sections throughput,full_set,methods || echo "grid sections stopped early (partial JSON kept)"

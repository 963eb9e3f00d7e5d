# Shared set-up of the GPU campaign scripts (gpu_*.sh), sourced once they have set OUT:
#   source "$(dirname "$0")/gpu_setup.sh" "$@"
# With the argument "prepare" (run where the data is, before the repository goes to a GPU machine
# without network access) it copies the data folder (the one holding medmnist/ and unofficial/:
# DATA_SRC, default the parent of $MEDISTILL_DATA) and the medmnist wheel into .gpu_carry/ (ignored
# by .gitignore) and exits; copy .gpu_carry/ along with the repository. Otherwise it sets DATA_DIR,
# PY, DEVICE, DEADLINE, PNEUMONIA, LOG and left(), installs the wheel from .gpu_carry/ where medmnist
# is missing, and puts src/ on PYTHONPATH.
if [ "${1:-}" = "prepare" ]; then
  DATA_SRC=${DATA_SRC:-$(dirname "${MEDISTILL_DATA:?set MEDISTILL_DATA (the MedMNIST folder) or DATA_SRC}")}
  mkdir -p .gpu_carry/data && cp -r "$DATA_SRC/medmnist" "$DATA_SRC/unofficial" .gpu_carry/data/
  python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/whl medmnist==3.0.2
  exit 0
fi
DATA_DIR=${DATA_DIR:-$( [ -d .gpu_carry/data ] && echo .gpu_carry/data || dirname "${MEDISTILL_DATA:?run 'prepare' first or set MEDISTILL_DATA}" )}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-570}  # seconds: nothing is started that could run past this
mkdir -p "$OUT"
if [ -d .gpu_carry/whl ] && ! $PY -c "import medmnist" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MEDISTILL_DATA="$DATA_DIR/medmnist"
PNEUMONIA="$DATA_DIR/unofficial/pneumoniamnist_balanced.npz"
LOG="$OUT/logs.txt"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
left() { echo $(( DEADLINE - SECONDS )); }

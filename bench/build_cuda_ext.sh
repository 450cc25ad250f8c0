#!/usr/bin/env bash
# Build noprop's CUDA extension in place (kernels/cuda/_C*.so + _build_info.py), for CI and GPU
# checks. Fails loudly (NOPROP_BUILD_CUDA=1) when it cannot build. Env overrides: CUDA_HOME,
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; "9.0" alone halves the time), MAX_JOBS (default 2), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [[ -z "${CUDA_HOME:-}" ]]; then
  for cand in /usr/local/cuda-13.0 /usr/local/cuda; do
    [[ -x "$cand/bin/nvcc" ]] && { CUDA_HOME=$cand; break; }
  done
fi
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
[[ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]] || { echo "build_cuda_ext: no nvcc: set CUDA_HOME" >&2; exit 1; }
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-2}
export NOPROP_BUILD_CUDA=1

# setup.py adds site-packages/nvidia/*/include when the toolkit lacks cusparse.h etc.
echo "build_cuda_ext: CUDA_HOME=$CUDA_HOME arch=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
start=$(date +%s)
"$PYTHON" setup.py -q build_ext --inplace
echo "build_cuda_ext: built in $(( $(date +%s) - start )) s"
"$PYTHON" -c 'import noprop.kernels.cuda as c; c.require_loaded(); print("build_cuda_ext: loaded", c.build_info())'

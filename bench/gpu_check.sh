#!/usr/bin/env bash
# THE one command for a GPU machine: build, test, benchmark, profile, plot; results in OUTDIR.
#
#   bench/gpu_check.sh [--dry-run] [--pack DEST] [OUTDIR]   (default OUTDIR: bench/results/<device-name-slug>/)
#
# On the lent GPU machine (whose tool returns at most 8 files from $OUT): `bash bench/gpu_check.sh
# --pack "$OUT"`. Results then go to a scratch folder, and after every step DEST receives
# results.tgz (the whole folder, rewritten atomically), steps.tsv and summary.txt: a run cut short
# still returns what it measured. Unpack with `tar -xzf results.tgz -C bench/results/<device>/`.
#
# Runs from the source tree (PYTHONPATH=repo root) and installs nothing. Every step runs under
# `timeout`, against a global deadline (GPU_CHECK_BUDGET seconds, default 450, plus a short reserve
# for plots and the summary), so the whole script ends in under 8 minutes even if a step hangs. A
# failing step is recorded and the script goes on; the summary table at the end lists every step.
# Without a CUDA device (or with --dry-run) it runs the CPU fallback: GPU-only steps are skipped
# with a message, the rest run tiny (noprop bench --quick, a one-step profile) so the script itself
# is tested end to end. Exit status: 0 if no step failed or timed out, else 1.
#
# Env: PYTHON (default python3: the interpreter that holds torch on the lent machines),
# GPU_CHECK_BUDGET (s), BENCH_REPEATS (default 3), GPU_CHECK_ONLY (space-separated step names: run
# only those, plus the set-up, build, plots and summary: a second call for what the first one's
# budget skipped, e.g. GPU_CHECK_ONLY="bench-compile bench-b4096"), MAX_JOBS /
# TORCH_CUDA_ARCH_LIST for the extension build (default 8 / "9.0": H100/H200 only, to keep it fast),
# NOPROP_COMMIT: the commit the tree is. The lent machines copy the working tree with a .git that
# still says the session's first commit: write the hash into the command (`NOPROP_COMMIT=abc1234
# bash bench/gpu_check.sh --pack "$OUT"`) and the bench records and plots name the right commit.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1            # a step killed at its time limit still leaves its log
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}      # seconds for the main steps
RESERVE=25                           # extra seconds kept for plots + summary
REPEATS=${BENCH_REPEATS:-3}
unset TRITON_INTERPRET               # real kernels on the GPU (pytest gets TRITON_INTERPRET=0)

DRY=0
OUT=""
PACK=""
while (( $# )); do
  case "$1" in
    --dry-run|--cpu) DRY=1 ;;
    --pack) PACK=${2:?--pack needs a folder}; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done

if [[ -n ${GPU_CHECK_ONLY:-} ]]; then  # a misspelt name would skip every step and still exit 0
  KNOWN=" $(grep -oE '^ *(step|skip) [a-z0-9-]+' "$0" | awk '{print $2}' | sort -u | tr '\n' ' ') "
  for name in $GPU_CHECK_ONLY; do
    [[ $KNOWN == *" $name "* ]] || { echo "gpu_check: GPU_CHECK_ONLY names no step '$name' (steps:$KNOWN)" >&2; exit 2; }
  done
fi

START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(printf '%3d' "$(now)")s] $*"; }

if [[ $DRY == 0 ]] && ! probe=$(timeout 60 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>&1); then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    # A GPU is there but this Python's torch cannot use it: a dry run would waste the machine.
    say "nvidia-smi sees a GPU but '$PYTHON' has no CUDA torch (set PYTHON=...): ${probe:-torch.cuda.is_available() is False}"
    exit 2
  fi
  say "no CUDA device visible to torch: running the CPU dry run (GPU-only steps are skipped)"
  DRY=1
fi
if [[ $DRY == 0 ]]; then
  NAME=$(timeout 60 "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo unknown-gpu)
else
  NAME="cpu-dryrun-$(uname -m)"
fi
SLUG=$(echo "$NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
OUT=${OUT:-bench/results/$SLUG}
if [[ -n $PACK ]]; then
  mkdir -p "$PACK"
  PACK=$(cd "$PACK" && pwd)
  [[ $OUT == "$PACK" || $OUT == bench/results/$SLUG ]] && OUT=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tnote\n' > "$SUMMARY"
say "device: $NAME | output: $OUT | budget ${BUDGET}s (+${RESERVE}s reserve)"

FAILED=0
pack() {  # --pack: OUT as one tarball (+ the step table and summary) in PACK, replaced atomically
  [[ -z $PACK ]] && return 0
  tar -C "$OUT" -czf "$PACK/results.tgz.tmp" . 2>/dev/null && mv -f "$PACK/results.tgz.tmp" "$PACK/results.tgz"
  cp -f "$SUMMARY" "$PACK/steps.tsv" 2>/dev/null
  [[ -f $OUT/summary.log ]] && cp -f "$OUT/summary.log" "$PACK/summary.txt"
  return 0
}
# step NAME LIMIT_S [--final] CMD...: run CMD (output in OUT/NAME.log) under min(LIMIT, time left).
# SIGINT first (pytest prints its summary, noprop bench keeps its cases so far), SIGKILL 10 s later.
step() {
  local name=$1 limit=$2; shift 2
  if [[ -n ${GPU_CHECK_ONLY:-} && " $GPU_CHECK_ONLY nvidia-smi env info-before-build build-cuda-ext info plots summary " != *" $name "* ]]; then
    printf '%s\tskipped\t0\tnot in GPU_CHECK_ONLY\n' "$name" >> "$SUMMARY"
    return 0
  fi
  local deadline=$BUDGET
  if [[ ${1:-} == --final ]]; then deadline=$((BUDGET + RESERVE)); shift; fi
  local left=$((deadline - $(now) - 3))
  if (( left < 5 )); then
    printf '%s\tSKIPPED\t0\tno time left in the budget\n' "$name" >> "$SUMMARY"
    say "$name: SKIPPED (no time left)"; FAILED=1; return 0
  fi
  (( limit > left )) && limit=$left
  say "$name: running (limit ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAILED(rc=$rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" >> "$SUMMARY"
  say "$name: $status in $(( $(date +%s) - t0 ))s"
  if [[ $status != ok ]]; then tail -n 8 "$OUT/$name.log" | sed 's/^/    | /'; fi
  pack
  return 0
}
skip() {  # skip NAME REASON
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$SUMMARY"
  say "$1: skipped ($2)"
}

NOPROP=("$PYTHON" -m noprop)

# 1. the machine and the toolchain ---------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  step nvidia-smi 20 bash -c 'nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv'
else
  skip nvidia-smi "nvidia-smi not found"
fi
step env 30 bash -c "echo NOPROP_COMMIT=${NOPROP_COMMIT:-unset}; $PYTHON -VV; $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())'; $PYTHON -c 'import triton; print(\"triton\", triton.__version__)' || true; (command -v nvcc && nvcc --version) || echo 'nvcc: not on PATH'; nproc; free -g; git -C '$ROOT' log -1 --oneline; git -C '$ROOT' status --short | head -20"
step info-before-build 60 "${NOPROP[@]}" info

# 2. the CUDA extension and the GPU tests --------------------------------------------------------
if [[ $DRY == 0 ]]; then
  # The Triton kernel tests need no extension, and Triton compiles every kernel specialization on
  # first use (~280 of them in these files, one core per process): one pytest process per op file
  # starts now, in the background, and overlaps the extension build. --maxfail instead of -x: one
  # rare GPU run should show every broken case, not only the first.
  TRITON_LIMIT=$(( BUDGET - $(now) - 60 )); (( TRITON_LIMIT > 300 )) && TRITON_LIMIT=300
  (( TRITON_LIMIT < 30 )) && TRITON_LIMIT=30  # `timeout 0` would mean no limit at all
  rm -f "$OUT"/tests-triton-*.rc "$OUT"/tests-triton-*.log  # a rerun into the same OUT must not read old results
  TRITON_OPS="noise_inject local_loss denoise_step bank_conv"
  [[ -n ${GPU_CHECK_ONLY:-} && " $GPU_CHECK_ONLY " != *" tests-triton "* ]] && TRITON_OPS=""
  for op in $TRITON_OPS; do
    ( timeout -s INT -k 10 "$TRITON_LIMIT" env TRITON_INTERPRET=0 NOPROP_BACKEND=auto "$PYTHON" -m pytest -q \
        --maxfail=10 -o faulthandler_timeout=60 -p no:cacheprovider "tests/test_triton_$op.py" \
        > "$OUT/tests-triton-$op.log" 2>&1
      echo $? > "$OUT/tests-triton-$op.rc.tmp" && mv "$OUT/tests-triton-$op.rc.tmp" "$OUT/tests-triton-$op.rc"
    ) > /dev/null 2>&1 &
  done
  step build-cuda-ext 200 env MAX_JOBS="${MAX_JOBS:-8}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHON="$PYTHON" bash bench/build_cuda_ext.sh
  step info 60 "${NOPROP[@]}" info
  # The extension's kernels against the float64 reference, dispatch, engine and CUDA-graph tests.
  step tests-gpu 150 env TRITON_INTERPRET=0 NOPROP_BACKEND=auto "$PYTHON" -m pytest -q --maxfail=10 -p no:cacheprovider \
    -o faulthandler_timeout=60 \
    tests/test_cuda_ext.py tests/test_dispatch.py tests/test_engine.py tests/test_info.py tests/test_graphs.py
  # The block bank's layers on cuDNN / cuBLAS against float64, its captured step against its eager
  # steps, and the banked backprop baseline replayed (the Triton bank convolution's tests run in the
  # background with the other Triton tests).
  step tests-bank-gpu 90 env TRITON_INTERPRET=0 NOPROP_BACKEND=auto "$PYTHON" -m pytest -q --maxfail=10 -p no:cacheprovider \
    -o faulthandler_timeout=60 -k "cuda and not triton" tests/test_bank_layers.py tests/test_bank.py tests/test_backprop_bank.py
  # Collect the background Triton test runs (their logs: tests-triton-<op>.log).
  step tests-triton "$TRITON_LIMIT" bash -c 'rc=0; for op in $1; do
      while [[ ! -f "$0/tests-triton-$op.rc" ]]; do sleep 1; done
      r=$(cat "$0/tests-triton-$op.rc"); echo "== tests/test_triton_$op.py: exit $r"; tail -n 25 "$0/tests-triton-$op.log"
      (( r != 0 )) && rc=1; done; exit $rc' "$OUT" "$TRITON_OPS"
else
  skip build-cuda-ext "GPU-only (dry run)"
  skip tests-gpu "GPU-only (dry run): CPU tests run with python -m pytest tests"
fi

# 3. benchmarks ----------------------------------------------------------------------------------
HAVE_PYTEST_BENCHMARK=0
timeout 60 "$PYTHON" -c 'import pytest_benchmark' 2>/dev/null && HAVE_PYTEST_BENCHMARK=1
if [[ $DRY == 0 ]]; then
  # Most wanted first (a short budget skips the tail). The whole step in each precision at B = 1024,
  # DT and backprop treated alike (same precision, CUDA-graph capture, and `auto` stacking: a block
  # bank for both), with TFLOP/s and the share of the bf16 peak; the accuracy of the GPU run in bf16
  # against fp32; the bf16 step's profile shares and operator calls; which bank convolution wins.
  step bench-precision 150 "${NOPROP[@]}" bench --device cuda --batch 1024 --methods dt,backprop --modes parallel \
    --precision fp32,tf32,bf16 --cuda-graph --repeats 2 --json "$OUT/bench_precision_b1024.json" \
    --csv "$OUT/bench_precision_b1024.csv"
  # The main job on the GPU: accuracy and wall time of DT (fp32, bf16) and backprop, each step replayed as a graph.
  step train 100 env PYTHON="$PYTHON" bash bench/gpu_train.sh "$OUT"
  step profile-bf16 60 "${NOPROP[@]}" profile --device cuda --steps 3 --precision bf16 --out "$OUT/profile_bf16"
  # Which T-batched convolution the bank should run here (noprop.models.bank_layers): each choice in
  # a run of its own against the per-step stacked vmap step (NOPROP_BANK_CONV is per process).
  step bench-bank-conv 100 bash -c "rc=0; for c in grouped gemm triton; do echo \"== NOPROP_BANK_CONV=\$c\"; NOPROP_BANK_CONV=\$c ${NOPROP[*]} bench --device cuda --batch 1024 --methods dt --modes parallel --execution vmap,bank --precision fp32,bf16 --cuda-graph --repeats 2 --json '$OUT/bench_bank_conv_'\$c.json || { echo \"conv \$c failed\"; rc=1; }; done; exit \$rc"
  # One graph per step, two ways: the CUDA-graph replay against torch.compile of the step (inductor's
  # default mode: max-autotune's timing of every template would not fit the budget), bf16, B = 1024.
  step bench-compile 150 env NOPROP_COMPILE_MODE=default "${NOPROP[@]}" bench --device cuda --batch 1024 \
    --methods dt,backprop --modes parallel --precision bf16 --compile --cuda-graph --repeats 2 \
    --json "$OUT/bench_compile_b1024.json" --csv "$OUT/bench_compile_b1024.csv"
  # B = 128 and B = 4096 beside B = 1024, in fp32 and bf16, like for like.
  step bench-b128-precision 90 "${NOPROP[@]}" bench --device cuda --batch 128 --methods dt,backprop --modes parallel \
    --precision fp32,bf16 --cuda-graph --repeats 2 --json "$OUT/bench_precision_b128.json" \
    --csv "$OUT/bench_precision_b128.csv"
  step bench-b4096 120 "${NOPROP[@]}" bench --device cuda --batch 4096 --methods dt,backprop --modes parallel \
    --precision fp32,bf16 --cuda-graph --repeats 2 --json "$OUT/bench_b4096.json" --csv "$OUT/bench_b4096.csv"
  # Then the rest: the op roofline, every mode and execution in fp32, the fp32 profile, the op backends.
  step bench-ops 90 "$PYTHON" bench/bench_ops.py "$OUT/ops_fp32"
  step bench-b1024 120 "${NOPROP[@]}" bench --device cuda --batch 1024 --execution loop,vmap,bank --cuda-graph --repeats "$REPEATS" \
    --json "$OUT/bench_b1024.json" --csv "$OUT/bench_b1024.csv"
  step bench-b128 150 "${NOPROP[@]}" bench --device cuda --batch 128 --chunk-size 5 --execution loop,vmap,bank --cuda-graph --repeats "$REPEATS" \
    --json "$OUT/bench_b128.json" --csv "$OUT/bench_b128.csv"
  step profile 60 "${NOPROP[@]}" profile --device cuda --steps 3 --nvtx --out "$OUT/profile"
  # The same DT step with each op backend (end-to-end effect of the fused kernels).
  step bench-backends 100 bash -c "rc=0; for b in eager triton cuda; do echo \"== NOPROP_BACKEND=\$b\"; NOPROP_BACKEND=\$b ${NOPROP[*]} bench --device cuda --batch 1024 --methods dt,backprop --modes parallel,lean --repeats 2 --json '$OUT/bench_backend_'\$b.json || { echo \"backend \$b failed\"; rc=1; }; done; exit \$rc"
  step bench-ops-bf16 60 "$PYTHON" bench/bench_ops.py "$OUT/ops_bf16" --dtype bfloat16
  # The same ops as pytest-benchmark cases (every backend side by side per op, d=784), kept as JSON.
  if [[ $HAVE_PYTEST_BENCHMARK == 1 ]]; then
    step bench-ops-pytest 60 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider bench/bench_ops.py \
      --benchmark-max-time=0.25 --benchmark-json "$OUT/bench_ops_pytest.json"
  else
    skip bench-ops-pytest "pytest-benchmark is not installed (the bench or test extra)"
  fi
else
  step bench-b128 120 "${NOPROP[@]}" bench --quick --device cpu --execution loop,vmap,bank \
    --json "$OUT/bench_b128.json" --csv "$OUT/bench_b128.csv"
  step bench-ops 60 "$PYTHON" bench/bench_ops.py "$OUT/ops_fp32" --allow-cpu
  if [[ $HAVE_PYTEST_BENCHMARK == 1 ]]; then
    step bench-ops-pytest 60 "$PYTHON" -m pytest -q -p no:cacheprovider bench/bench_ops.py --benchmark-disable
  else
    skip bench-ops-pytest "pytest-benchmark is not installed (the bench or test extra)"
  fi
  skip bench-b1024 "GPU-only (dry run)"
  skip bench-backends "GPU-only (dry run): only eager runs CPU tensors"
  step profile 60 "${NOPROP[@]}" profile --device cpu --steps 1 -T 3 --batch 16 --out "$OUT/profile"
fi

# 4. plots and the summary -----------------------------------------------------------------------
shopt -s nullglob
jsons=("$OUT"/bench_b[0-9]*.json "$OUT"/bench_precision_*.json "$OUT"/bench_backend_*.json)
if (( ${#jsons[@]} )); then
  step plots 40 --final "$PYTHON" bench/plots.py "${jsons[@]}" --out "$OUT"
else
  skip plots "no bench JSON was written"
fi
step summary 20 --final "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for path in sorted(out.glob("bench_*.json")):
    try:
        recs = json.loads(path.read_text())
    except Exception as exc:
        print(f"{path.name}: unreadable ({exc})"); continue
    r0 = recs[0] if recs else {}
    print(f"\n{path.name}: {r0.get('device_name')} batch {r0.get('batch')} T {r0.get('T')} backend {r0.get('backend')}")
    print(f"  {'config':<32}{'ms/step':>9}{'samples/s':>11}{'TFLOP/s':>9}{'%peak':>7}{'x bp':>7}{'peak MB':>9}"
          f"{'saved MB':>9}  unlike")
    for r in recs:
        if not r.get("ms_per_step"):
            print(f"  {r.get('label', r.get('method')):<32} error: {r.get('error')}"); continue
        ratio = f"{r['ratio_to_backprop']:.2f}" if r.get("ratio_to_backprop") else "-"
        tflops = f"{r['tflops']:.3g}" if r.get("tflops") else "-"
        pct = f"{r['pct_of_bf16_peak']:.1f}" if r.get("pct_of_bf16_peak") else "-"
        print(f"  {r['label']:<32}{r['ms_per_step']:>9.2f}{r['samples_per_s']:>11.0f}{tflops:>9}{pct:>7}{ratio:>7}"
              f"{r['peak_mem_mb']:>9.0f}{(r.get('saved_mb') or 0):>9.1f}  {r.get('ratio_unlike') or ''}")
for path in sorted(out.glob("train_*.jsonl")):
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if recs:
        last = recs[-1]
        print(f"\n{path.stem}: {last.get('method')} epoch {last.get('epoch')}: test accuracy {last.get('test_acc', 0):.2%}, "
              f"{last.get('elapsed_s', 0):.1f} s of training, {last.get('samples_per_s', 0):.0f} samples/s, "
              f"peak {last.get('peak_mem_mb') or 0:.0f} MB")
ops = out / "ops_fp32" / "bench_ops.json"
if ops.exists():
    rows = [r for r in json.loads(ops.read_text()) if "ms" in r]
    print(f"\nbench_ops (fp32): {len(rows)} timed op x backend rows; best fraction of the copy roofline per op:")
    best = {}
    for r in rows:
        key = (r["op"], r["d"])
        if key not in best or r["fraction_of_roofline"] > best[key]["fraction_of_roofline"]:
            best[key] = r
    for (op, d), r in sorted(best.items()):
        print(f"  {op:<24} d={d:<4} {r['backend']:<7} {r['ms']:.4f} ms  {r['gbs']:.0f} GB/s  {r['fraction_of_roofline']:.0%}")
EOF
cat "$OUT/summary.log"

echo
say "steps (full logs in $OUT):"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
say "done in $(now)s; results in $OUT${PACK:+ (packed into $PACK/results.tgz)}"
pack
exit $FAILED

"""Microbenchmarks of NoProp's fused ops, per op x backend.

1. pytest-benchmark (``python -m pytest bench/bench_ops.py``; pytest.ini's testpaths leave bench/
   out of a plain ``pytest``): every op x backend, grouped per op so a group's table puts the
   backends side by side, plus the torch.randn composition (see 2.) for the ops that draw noise.
   On a CUDA device at K=11, B=4096, m=10, d=784, every backend that can run (bench/gpu_check.sh);
   without one at a small CPU shape, eager and torch only (Triton's CPU interpreter is a test
   vehicle, not something to time). CI runs it with ``--benchmark-disable``: each case runs once,
   a smoke test of this file and of every op at the bench's shapes.
2. ``python bench/bench_ops.py OUT_DIR [--dtype bfloat16]`` on a GPU: times every op x backend
   (eager composition, triton, cuda extension when loaded) with ``triton.testing.do_bench`` at
   K=11, B=4096, m=10 and d=10 / d=784 (plus NoProp-FM's variants: local_loss without softmax and
   with a target offset, denoise_step as an Euler step), turns each time into achieved GB/s from the bytes the op
   must move at least (inputs read once, outputs written once), compares that with the device's
   copy bandwidth (a large clone: the roofline), prints a table and writes JSON rows to
   OUT_DIR/bench_ops.json. The eager backend draws the backends' bit-compatible Philox noise with
   int64 torch ops, which is slow, so the ops that draw noise also get a `torch` row: the plain
   composition a user would write with torch.randn (its noise differs), the honest baseline for
   "x torch". Without a GPU it says so and exits 0 (``--allow-cpu`` times eager on the
   CPU with a wall clock, to smoke-test this script).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from noprop import dispatch
from noprop.atomic import write_text_atomically
from noprop.ops import new_seed

CONFIGS = [(11, 4096, 10, 10), (11, 4096, 10, 784)]  # (K, B, m, d) on a GPU
CPU_CONFIG = (11, 128, 10, 20)  # small enough for the eager CPU reference
OPS = ("noise_inject", "noise_inject_backward", "local_loss", "local_loss_backward", "denoise_step",
       "local_loss_fm", "local_loss_fm_backward", "euler_step")
# NoProp-FM's variants of the same ops: (function, what they add to its arguments).
VARIANTS = {"local_loss_fm": "local_loss", "local_loss_fm_backward": "local_loss_backward",
            "euler_step": "denoise_step"}


def _torch_noise_inject(W, y, sa, s1m, seed):
    K, (B, d) = sa.shape[0], (y.shape[0], W.shape[1])
    return sa[:, None, None] * W[y] + s1m[:, None, None] * torch.randn(K, B, d, device=W.device, dtype=W.dtype)


def _torch_noise_inject_backward(eps):
    # Autograd of the line above; the composition keeps its forward's ε (passed in, not timed).
    def backward(grad, W, y, sa, s1m, seed):
        h = (sa[:, None, None] * grad).sum(0)
        dW = torch.zeros_like(W).index_add_(0, y, h)
        return dW, (grad * W[y]).sum((1, 2)), (grad * eps).sum((1, 2))
    return backward


def _torch_denoise_step(logits, W, z, a, b, sqrt_c, seed, softmax=True):
    act = torch.softmax(logits, -1) if softmax else logits
    return a * (act @ W) + b * z + sqrt_c * torch.randn_like(z)


def torch_baseline(op: str, args: tuple):
    """The torch.randn composition of an op that draws noise (None for the others, whose eager
    composition is already the plain one)."""
    if op == "noise_inject":
        return _torch_noise_inject
    if op == "noise_inject_backward":
        return _torch_noise_inject_backward(torch.randn_like(args[0]))
    if op == "denoise_step":
        return _torch_denoise_step
    return None


def op_function(backend: str, op: str):
    """The backend's function that `op` (a row name, variants included) times."""
    return getattr(dispatch.backend_module(backend), VARIANTS.get(op, op))



def backend_reason(backend: str, device: torch.device) -> str | None:
    if backend == "triton" and device.type != "cuda":
        return "Triton is benchmarked on CUDA devices only (the CPU interpreter is not a benchmark)"
    return dispatch.why_unavailable(backend, device)


def make_case(op: str, K: int, B: int, m: int, d: int, dtype: torch.dtype, device) -> tuple[tuple, int]:
    """(args of `op`, bytes the op must move at least: every input read once, every output written once)."""
    elt = torch.empty((), dtype=dtype).element_size()
    W = torch.randn(m, d, device=device).to(dtype)
    y = torch.randint(0, m, (B,), device=device)
    seed = new_seed(device)
    common = m * d * elt + B * 8  # W and the labels
    if op in ("noise_inject", "noise_inject_backward"):
        sa, s1m = torch.rand(K, device=device), torch.rand(K, device=device)
        if op == "noise_inject":
            return (W, y, sa, s1m, seed), common + 2 * K * 4 + K * B * d * elt
        grad = torch.randn(K, B, d, device=device).to(dtype)
        # reads grad_z, W, y and the coefficients; writes dW and the coefficient gradients
        return (grad, W, y, sa, s1m, seed), K * B * d * elt + 2 * m * d * elt + B * 8 + 4 * K * 4
    if op in ("local_loss", "local_loss_backward", "local_loss_fm", "local_loss_fm_backward"):
        logits = torch.randn(K, B, m, device=device).to(dtype)
        weight = torch.rand(K, device=device)
        fm = op.startswith("local_loss_fm")  # the velocity loss: no softmax, target offset z_0 [B, d]
        extra = (torch.randn(B, d, device=device).to(dtype), False) if fm else ()
        extra_bytes = B * d * elt if fm else 0
        if op in ("local_loss", "local_loss_fm"):
            return (logits, W, y, weight, *extra), K * B * m * elt + common + 2 * K * 4 + extra_bytes
        grad = torch.randn(K, device=device)
        return ((grad, logits, W, y, weight, *extra),
                2 * K * B * m * elt + common + m * d * elt + 3 * K * 4 + extra_bytes)
    if op in ("denoise_step", "euler_step"):
        logits = torch.randn(B, m, device=device).to(dtype)
        z = torch.randn(B, d, device=device).to(dtype)
        coefs = (0.3, 0.8, 0.2) if op == "denoise_step" else (1e-3, 1.0, 0.0)  # FM: z + h·logits·W
        return ((logits, W, z, *coefs, seed, op == "denoise_step"),
                B * m * elt + m * d * elt + 2 * B * d * elt)
    raise ValueError(op)


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds per call: do_bench on a GPU, a synchronised wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Roofline: GB/s of cloning a large tensor (read + write)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    ms = time_ms(lambda: x.clone(), device)
    return 2 * nbytes / ms / 1e6


def run(out_dir: Path | None, dtype: torch.dtype, device: torch.device) -> list[dict]:
    configs = CONFIGS if device.type == "cuda" else [CPU_CONFIG]
    roof = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    rows = []
    path = None if out_dir is None else out_dir / "bench_ops.json"
    print(f"device: {name} | copy bandwidth (roofline): {roof:.0f} GB/s | dtype {dtype}")
    print(f"{'K':>3} {'B':>5} {'m':>4} {'d':>5}  {'op':<24}{'backend':<8}{'ms':>10}{'GB/s':>9}{'of roof':>9}"
          f"{'x eager':>9}{'x torch':>9}")

    def add(row):  # print it now and rewrite the JSON: a run cut short keeps every row so far
        rows.append(row)
        head = f"{row['K']:>3} {row['B']:>5} {row['m']:>4} {row['d']:>5}  {row['op']:<24}{row['backend']:<8}"
        if "ms" in row:
            speedup = "".join(f"{row[key]:>9.2f}" if row.get(key) else f"{'-':>9}"
                              for key in ("speedup_vs_eager", "speedup_vs_torch"))
            print(head + f"{row['ms']:>10.4f}{row['gbs']:>9.1f}{row['fraction_of_roofline']:>9.1%}" + speedup,
                  flush=True)
        else:
            print(head + "  " + row.get("skipped", row.get("error", "")), flush=True)
        if path is not None:
            write_text_atomically(path, json.dumps(rows, indent=1))

    for K, B, m, d in configs:
        for op in OPS:
            args, nbytes = make_case(op, K, B, m, d, dtype, device)
            eager_ms = torch_ms = None
            plain = torch_baseline(op, args)
            backends = ("torch",) if plain is not None else ()
            backends += ("eager",) + tuple(b for b in dispatch.BACKENDS if b != "eager")  # the bases first
            for backend in backends:
                row = dict(op=op, backend=backend, K=K, B=B, m=m, d=d, dtype=str(dtype).removeprefix("torch."),
                           bytes=nbytes, device=name, torch=torch.__version__, triton=triton_version,
                           roofline_gbs=round(roof, 1))
                reason = None if backend == "torch" else backend_reason(backend, device)
                if reason:
                    add(dict(row, skipped=reason))
                    continue
                fn = plain if backend == "torch" else op_function(backend, op)
                try:
                    ms = time_ms(lambda: fn(*args), device)
                except Exception as exc:  # report and keep going: one broken backend must not hide the rest
                    add(dict(row, error=f"{type(exc).__name__}: {exc}"))
                    continue
                eager_ms = ms if backend == "eager" else eager_ms
                torch_ms = ms if backend == "torch" else torch_ms
                gbs = nbytes / ms / 1e6
                add(dict(row, ms=round(ms, 5), gbs=round(gbs, 1), fraction_of_roofline=round(gbs / roof, 3),
                         speedup_vs_eager=round(eager_ms / ms, 3) if eager_ms and backend != "torch" else None,
                         speedup_vs_torch=round(torch_ms / ms, 3) if torch_ms else None))
    if path is not None:
        print(f"wrote {len(rows)} rows to {path}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="directory for bench_ops.json")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--allow-cpu", action="store_true", help="time eager on the CPU (smoke test)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("bench_ops needs a CUDA GPU (none visible to torch); nothing timed.")
        return 0
    run(args.out_dir, dtype, device)
    return 0


# ---- pytest-benchmark: python -m pytest bench/bench_ops.py [--benchmark-disable] ----------------------

PYTEST_CPU_CONFIG = (4, 64, 10, 20)  # (K, B, m, d): the eager CPU reference draws noise with int64 ops


def pytest_case(device: torch.device) -> tuple[int, int, int, int]:
    """(K, B, m, d) the pytest-benchmark cases time on `device`."""
    return CONFIGS[-1] if device.type == "cuda" else PYTEST_CPU_CONFIG


def _bench_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


try:
    import pytest
except ImportError:  # running as a script without pytest installed
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("backend", ("torch",) + dispatch.BACKENDS)
    @pytest.mark.parametrize("op", OPS)
    def test_bench(benchmark, op, backend):
        device = _bench_device()
        K, B, m, d = pytest_case(device)
        args, nbytes = make_case(op, K, B, m, d, torch.float32, device)
        if backend == "torch":
            fn = torch_baseline(op, args)
            if fn is None:
                pytest.skip(f"{op} draws no noise: its eager composition is the plain torch one")
        else:
            reason = backend_reason(backend, device)
            if reason:
                pytest.skip(reason)
            fn = op_function(backend, op)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def call():
            fn(*args)
            sync()
        call()  # compile / warm up outside the timing
        benchmark.group = f"{op} K={K} B={B} m={m} d={d} float32 on {device.type}"
        benchmark.extra_info.update(op=op, backend=backend, K=K, B=B, m=m, d=d, bytes=nbytes)
        benchmark(call)


if __name__ == "__main__":
    sys.exit(main())

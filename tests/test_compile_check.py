"""noprop.kernels.triton.compile_check: every Triton kernel compiles for sm_90 on a machine without a GPU.

The interpreter (which runs the other Triton tests on CPU) accepts programs a GPU compiler rejects,
so this compiles the real kernels ahead of time. It runs in a subprocess: conftest switched this
process's kernels to the interpreter, and the check needs them compiled.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")


def _nvidia_backend_reason():
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA backend is not importable: {exc}"
    return None


pytestmark = pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason()))


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, never reuse another run's cubins
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "cc.json"
    proc = _run(["-m", "noprop.kernels.triton.compile_check", "--quick", "--arch", "90", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    kernels = {r["kernel"] for r in results}
    assert {"_noise_inject_fwd", "_noise_inject_bwd_rows", "_sum_rows_by_label", "_local_loss_fwd",
            "_local_loss_bwd_rows", "_local_loss_bwd_dW", "_denoise_step", "_bank_conv_fwd", "_bank_conv_dgrad",
            "_bank_conv_wgrad"} <= kernels
    assert all(r["ok"] and r["registers"] for r in results)
    # The FM variant (no softmax, target offset) is among the compiled specializations.
    assert any(r["kernel"] == "_local_loss_fwd" and r["constexprs"].get("HAS_OFFSET") is True
               and r["constexprs"].get("SOFTMAX") is False for r in results)


def test_a_kernel_that_does_not_compile_for_the_gpu_fails_the_check(tmp_path):
    # tl.dot on 4 x 4 tiles runs in the interpreter, but a GPU needs larger dimensions (>= 16 for
    # fp16/bf16, >= 8 for fp32 with Triton 3.8).
    mod = tmp_path / "tiny_dot.py"
    mod.write_text(textwrap.dedent('''
        import torch, triton, triton.language as tl
        from noprop.kernels.triton import compile_check as cc

        @triton.jit
        def tiny_dot(a_ptr, out_ptr, N: tl.constexpr):
            i = tl.arange(0, N)
            a = tl.load(a_ptr + i[:, None] * N + i[None, :])
            tl.store(out_ptr + i[:, None] * N + i[None, :], tl.dot(a, a))

        launches = []
        with cc.recording(launches):
            tiny_dot[(1,)](torch.zeros(4, 4), torch.zeros(4, 4), N=4)
        bad = cc.compile_launch(launches[0], 90)
        launches.clear()
        with cc.recording(launches):
            tiny_dot[(1,)](torch.zeros(16, 16), torch.zeros(16, 16), N=16)
        good = cc.compile_launch(launches[0], 90)
        print("RESULT", bad.ok, "CompilationError" in (bad.error or ""), good.ok, launches[0].signature["a_ptr"],
              launches[0].constexprs)
    '''))
    proc = _run([str(mod)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RESULT False True True *fp32 {'N': 16}" in proc.stdout, proc.stdout[-2000:]

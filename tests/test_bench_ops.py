"""bench/bench_ops.py's harness: the bytes each op must move (the GB/s and roofline figures rest on
them) and the cases its pytest-benchmark path runs. Timing itself is never judged here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops_under_test", ROOT / "bench" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_are_every_input_read_once_and_every_output_written_once(bench_ops, dtype):
    # Counted here from the tensors themselves: what eager's function takes and returns. The seed
    # (one int64) is left out on both sides, as bench_ops leaves it out.
    K, B, m, d = 3, 5, 4, 7
    for op in bench_ops.OPS:
        args, claimed = bench_ops.make_case(op, K, B, m, d, dtype, torch.device("cpu"))
        inputs = [a for a in args if isinstance(a, torch.Tensor) and not (a.dtype == torch.int64 and a.numel() == 1)]
        out = bench_ops.op_function("eager", op)(*args)
        outputs = out if isinstance(out, tuple) else (out,)
        counted = sum(map(_nbytes, inputs)) + sum(map(_nbytes, outputs))
        assert claimed == counted, f"{op}: make_case says {claimed} bytes, the tensors are {counted}"


def test_every_row_has_a_function_and_the_variants_change_the_call(bench_ops):
    for op in bench_ops.OPS:
        assert callable(bench_ops.op_function("eager", op))
    cpu = torch.device("cpu")
    K, B, m, d = bench_ops.pytest_case(cpu)
    plain, _ = bench_ops.make_case("local_loss", K, B, m, d, torch.float32, cpu)
    fm, _ = bench_ops.make_case("local_loss_fm", K, B, m, d, torch.float32, cpu)
    assert len(fm) == len(plain) + 2 and fm[-1] is False  # offset z_0 and softmax=False
    euler, _ = bench_ops.make_case("euler_step", K, B, m, d, torch.float32, cpu)
    assert euler[5] == 0.0 and euler[-1] is False  # no noise, no softmax: FM's Euler step


def test_the_pytest_cases_skip_triton_on_the_cpu_with_the_reason(bench_ops):
    cpu = torch.device("cpu")
    assert "CUDA devices only" in bench_ops.backend_reason("triton", cpu)
    assert bench_ops.backend_reason("eager", cpu) is None
    assert bench_ops.pytest_case(torch.device("cuda")) in bench_ops.CONFIGS
    K, B, m, d = bench_ops.pytest_case(cpu)
    assert K * B * d <= 11 * 128 * 20  # no larger than the script's own CPU smoke shape

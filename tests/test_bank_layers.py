"""The T-batched layers of a block bank (noprop.models.bank_layers) against T separate layers in
float64: forward and both gradients, irregular batches and channel counts, fp32/fp16/bf16, under
the project's error rule (tests/error_rule.py). The reference is plain per-block torch on separate
tensors, never the bank code."""
import pytest
import torch
import torch.nn.functional as F

from noprop.models import bank_layers as L
from noprop.models.dropout import Dropout, keyed_masks
from tests.error_rule import assert_error_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# CUDA as well where there is one (bench/gpu_check.sh runs `-k cuda`): cuDNN's grouped convolution
# and cuBLAS's batched GEMM are what the bank runs there.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
T, C, O = 3, 3, 5  # odd channel counts


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _per_block_conv(x, w, b, shared, stride, padding):
    """T separate convolutions: block t reads x (shared) or its own rows b*T + t."""
    B = x.shape[0] if shared else x.shape[0] // T
    xs = x if shared else x.view(B, T, *x.shape[1:])
    outs = [F.conv2d(x if shared else xs[:, t], w[t], b[t], stride, padding) for t in range(T)]
    return torch.stack(outs, 1).flatten(0, 1)


def _check(run, ref_fn, inputs, dtype, name):
    """run/ref_fn(*leaves) -> output; compares the output and every input's gradient."""
    g = torch.Generator().manual_seed(5)
    ref_in = _leaves(*inputs, dtype=torch.float64)
    ref = ref_fn(*ref_in)
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
    ref.backward(grad_out)
    same_in = _leaves(*inputs, dtype=dtype)
    same = ref_fn(*same_in)
    same.backward(grad_out.to(dtype))
    got_in = _leaves(*inputs, dtype=dtype)
    got = run(*got_in)
    got.backward(grad_out.to(dtype))
    assert_error_rule(got.detach(), same.detach(), ref.detach(), f"{name} forward", "bank")
    for i, (a, s, r) in enumerate(zip(got_in, same_in, ref_in)):
        assert_error_rule(a.grad, s.grad, r.grad, f"{name} grad of input {i}", "bank")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("impl", L.CONV_IMPLS)
def test_bank_conv2d_is_t_separate_convolutions(impl, shared, B, dtype, device):
    g = torch.Generator().manual_seed(B)
    stride, padding = (1, 1), (0, 0) if B != 7 else (1, 1)  # one batch size also pads
    x = torch.randn((B if shared else B * T), C, 9, 7, generator=g)
    w = torch.randn(T, O, C, 3, 3, generator=g) / 3
    b = torch.randn(T, O, generator=g)
    _check(lambda x, w, b: L.conv2d(x, w, b, T, shared, impl, stride, padding),
           lambda x, w, b: _per_block_conv(x, w, b, shared, stride, padding), _on(device, x, w, b), dtype,
           f"conv {impl} shared={shared} B={B}")


@pytest.mark.parametrize("impl", L.CONV_IMPLS)
def test_bank_conv2d_without_bias_and_with_one_block(impl):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, C, 5, 5, generator=g), torch.randn(1, O, C, 3, 3, generator=g)
    got = L.conv2d(x, w, None, 1, False, impl)
    torch.testing.assert_close(got, F.conv2d(x, w[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("shared", [True, False])
def test_bank_linear_is_t_separate_linears(shared, B, dtype, device):
    g = torch.Generator().manual_seed(B)
    K = 13
    x = torch.randn((B if shared else B * T), K, generator=g)
    w, b = torch.randn(T, O, K, generator=g) / 4, torch.randn(T, O, generator=g)

    def ref(x, w, b):
        xs = x if shared else x.view(-1, T, K)
        return torch.stack([F.linear(x if shared else xs[:, t], w[t], b[t]) for t in range(T)], 1).flatten(0, 1)

    _check(lambda x, w, b: L.linear(x, w, b, T, shared), ref, _on(device, x, w, b), dtype,
           f"linear shared={shared} B={B}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [2, 7, 129])  # BatchNorm cannot normalise a batch of one in training
@pytest.mark.parametrize("training", [True, False])
def test_bank_batch_norm_is_t_separate_batch_norms(training, B, dtype, device):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B * T, O, generator=g) * 3 + 1
    w, b = torch.rand(T, O, generator=g) + 0.5, torch.randn(T, O, generator=g)
    stats = _on(device, torch.randn(T, O, generator=g), torch.rand(T, O, generator=g) + 0.5)

    per_dtype = {}  # the float64 reference and the same-dtype eager run each move statistics of their own

    def ref(x, w, b):
        rm, rv = per_dtype.setdefault(x.dtype, [s.clone().to(x.dtype) for s in stats])
        xs = x.view(B, T, O)
        return torch.stack([F.batch_norm(xs[:, t], rm[t], rv[t], w[t], b[t], training, 0.1, 1e-5)
                            for t in range(T)], 1).flatten(0, 1)

    got_stats = [s.clone().to(dtype) for s in stats]
    _check(lambda x, w, b: L.batch_norm(x, got_stats[0], got_stats[1], w, b, T, training, 0.1, 1e-5),
           ref, _on(device, x, w, b), dtype, f"batch_norm training={training} B={B}")
    ref_stats = per_dtype[torch.float64]
    for got, same, r in zip(got_stats, per_dtype[dtype], ref_stats):  # the running statistics moved alike
        assert_error_rule(got, same, r, "running statistics", "bank")
    if not training:
        assert all(torch.equal(s.to(dtype), r) for s, r in zip(stats, got_stats))


def test_bank_dropout_with_block_generators_draws_each_block_s_keyed_mask():
    B, p = 5, 0.3
    x = torch.randn(B * T, 4, 6)
    keys = [11, 12, 13]
    got = L.dropout(x, p, True, T, [torch.Generator().manual_seed(k) for k in keys])
    drop = Dropout(p).train()
    xs = x.view(B, T, 4, 6)
    for t, key in enumerate(keys):
        with keyed_masks(key):
            assert torch.equal(got.view(B, T, 4, 6)[:, t], drop(xs[:, t].contiguous()))
    assert torch.equal(L.dropout(x, p, False, T, None), x)
    unkeyed = L.dropout(torch.ones(4000), 0.25, True, 1, None)
    assert unkeyed.unique().tolist() == pytest.approx([0.0, 1 / 0.75])


def test_conv_impl_is_chosen_per_device_and_by_the_environment(monkeypatch):
    monkeypatch.delenv("NOPROP_BANK_CONV", raising=False)
    assert L.conv_impl("cpu") == "loop" and L.conv_impl("cuda") == "grouped"
    monkeypatch.setenv("NOPROP_BANK_CONV", "gemm")
    assert L.conv_impl("cpu") == "gemm"
    monkeypatch.setenv("NOPROP_BANK_CONV", "winograd")
    with pytest.raises(ValueError, match="NOPROP_BANK_CONV must be auto or one of grouped, gemm, loop"):
        L.conv_impl("cpu")

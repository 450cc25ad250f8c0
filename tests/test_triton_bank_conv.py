"""The Triton bank convolution (kernels/triton/bank_conv.py) against T separate float64 convolutions:
forward, input, weight and bias gradients, irregular batches and channel counts, shared and per-block
inputs, fp32/fp16/bf16 under the error rule (tests/error_rule.py), determinism, refused inputs, and a
block bank running it against the per-block loop.

The reference is plain F.conv2d per block, never these kernels. CPU tensors run the kernels in
Triton's interpreter (conftest sets TRITON_INTERPRET=1); the `cuda` variants run them compiled
(bench/gpu_check.sh runs `-k cuda` with TRITON_INTERPRET=0). Spatial sizes stay small: the
interpreter runs programs one by one.
"""
import pytest
import torch
import torch.nn.functional as F

from noprop import dispatch
from noprop.kernels.triton import bank_conv as BC
from noprop.models import bank_layers as L
from tests.error_rule import assert_error_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not dispatch.triton_interpreted(),
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available() or dispatch.triton_interpreted(),
                                                         reason="compiled kernels need a GPU and TRITON_INTERPRET=0"))]
T = 3


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _per_block(x, w, b, T, shared, padding=(0, 0)):
    """T separate convolutions: block t reads x (shared) or its rows b*T + t."""
    B = x.shape[0] if shared else x.shape[0] // T
    xs = x if shared else x.reshape(B, T, *x.shape[1:])
    outs = [F.conv2d(x if shared else xs[:, t], w[t], None if b is None else b[t], padding=padding) for t in range(T)]
    return torch.stack(outs, 1).flatten(0, 1)


def _run(fn, x, w, b, dy, dtype, grad_x=True):
    """(out, dx, dw, db) of fn(x, w, b) in `dtype` with incoming gradient dy."""
    x = x.detach().to(dtype).requires_grad_(grad_x)
    w, b = (t.detach().to(dtype).requires_grad_() for t in (w, b))
    out = fn(x, w, b)
    out.backward(dy.to(dtype))
    return out.detach(), x.grad, w.grad, b.grad


def _inputs(B, C, O, H, W, shared, device, kernel=(3, 3), seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B if shared else B * T, C, H, W, generator=g)
    w = torch.randn(T, O, C, *kernel, generator=g) / (C * kernel[0] * kernel[1]) ** 0.5
    b = torch.randn(T, O, generator=g)
    return [t.to(device) for t in (x, w, b)]


def _check(x, w, b, dtype, shared, padding=(0, 0), T=T, name=""):
    ref_fn = lambda x, w, b: _per_block(x, w, b, T, shared, padding)  # noqa: E731
    kernel = lambda x, w, b: BC.conv2d(x, w, b, T, shared, padding=padding)  # noqa: E731
    dy = torch.randn(ref_fn(x, w, b).shape, generator=torch.Generator().manual_seed(7)).to(x.device)
    ref = _run(ref_fn, x, w, b, dy, torch.float64)
    same = _run(ref_fn, x, w, b, dy, dtype)
    got = _run(kernel, x, w, b, dy, dtype)
    for what, g, s, r in zip(("out", "dx", "dw", "db"), got, same, ref):
        assert_error_rule(g, s, r, f"{name} {what}")
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 129])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-block"])
def test_matches_float64_reference(shared, B, dtype, device):
    x, w, b = _inputs(B, 3, 5, 6, 5, shared, device, seed=B)  # odd channel counts, 4 x 3 outputs
    _check(x, w, b, dtype, shared, name=f"B={B} shared={shared}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_channel_and_reduction_tiles_and_a_non_square_kernel(dtype, device):
    # O = 80, C = 40: two output-channel tiles, K = 360 in many K tiles; kernel 3 x 2 with padding.
    x, w, b = _inputs(2, 40, 80, 5, 4, False, device, kernel=(3, 2), T=2)
    _check(x, w, b, dtype, False, padding=(1, 2), T=2, name="C=40 O=80 3x2 pad (1, 2)")
    x, w, b = _inputs(3, 2, 17, 5, 6, True, device, kernel=(2, 3), T=2)
    _check(x, w, b, dtype, True, padding=(0, 1), T=2, name="shared 2x3 pad (0, 1)")


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_strided_inputs_give_the_same_values(device):
    x, w, b = _inputs(7, 3, 5, 6, 5, False, device)
    dense = BC.conv2d(x, w, b, T, False)
    assert torch.equal(BC.conv2d(x.to(memory_format=torch.channels_last), w, b, T, False), dense)
    wide = torch.randn(x.shape[0], 3, 6, 9, device=device)
    wide[..., 2:7] = x
    assert torch.equal(BC.conv2d(wide[..., 2:7], w, b, T, False), dense)  # a column slice: strides, no copy


@pytest.mark.parametrize("device", DEVICES)
def test_without_bias_and_input_gradient_only_when_asked(device):
    x, w, _ = _inputs(7, 3, 5, 6, 5, True, device)
    w.requires_grad_()
    out = BC.conv2d(x, w, None, T, True)
    torch.testing.assert_close(out, _per_block(x, w, None, T, True), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_is_deterministic_over_several_splits(device):
    B, C, O, H, W = 129, 3, 5, 6, 5
    x, w, b = _inputs(B, C, O, H, W, False, device)
    target = BC._WGRAD_PROGRAMS if device == "cuda" else BC._WGRAD_PROGRAMS_INTERPRETED
    block_r = BC.wgrad_tiles(O, C * 9, True)[2]
    splits, _ = BC.wgrad_splits(B * 4 * 3, T, T * O * C * 9, block_r, target)
    assert splits > 1  # the reduction really is split here
    dy = torch.randn(B * T, O, 4, 3, device=device)
    runs = [_run(lambda x, w, b: BC.conv2d(x, w, b, T, False), x, w, b, dy, torch.float32) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_refused_inputs_say_why():
    x, w, b = _inputs(2, 3, 5, 6, 5, False, "cpu")
    cases = [(dict(stride=(2, 2)), "stride 1 and dilation 1 only"),
             (dict(dilation=(2, 1)), "stride 1 and dilation 1 only"),
             (dict(padding=(-1, 0)), "padding >= 0"),
             (dict(x=x[..., :2, :]), "at least the kernel's size"),
             (dict(x=x.double(), w=w.double(), b=b.double()), "one dtype among float32, float16 and bfloat16"),
             (dict(b=b.half()), "got float16, float32"),
             (dict(x=x[:5]), "not a multiple of T = 3"),
             (dict(b=b[:, :4]), r"bias must be \[T, O\]"),
             (dict(w=w[:2]), "weight \\[T, O, C, kh, kw\\] with T = 3")]
    for change, message in cases:
        args = dict(x=x, w=w, b=b)
        args.update({k: v for k, v in change.items() if k in args})
        kw = {k: v for k, v in change.items() if k not in args}
        with pytest.raises(ValueError, match=message):
            BC.conv2d(args["x"], args["w"], args["b"], T, False, **kw)


def test_bank_layers_run_other_configurations_grouped_and_refuse_a_cpu_without_the_interpreter(monkeypatch):
    x, w, b = _inputs(2, 3, 5, 7, 7, False, "cpu")
    grouped = L.conv2d(x, w, b, T, False, "grouped", stride=(2, 2))
    assert torch.equal(L.conv2d(x, w, b, T, False, "triton", stride=(2, 2)), grouped)
    monkeypatch.setenv("NOPROP_BANK_CONV", "triton")
    assert L.conv_impl("cpu") == "triton"
    monkeypatch.setattr(BC, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="NOPROP_BANK_CONV=triton cannot run on cpu: .*TRITON_INTERPRET=1"):
        L.conv_impl("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        L.conv2d(x, w, b, T, False, "triton")


@pytest.mark.parametrize("device", DEVICES)
def test_under_autocast_the_bank_layer_runs_in_autocast_s_dtype(device):
    x, w, b = _inputs(7, 3, 5, 6, 5, False, device)
    with torch.autocast(device, torch.bfloat16):
        got = L.conv2d(x, w, b, T, False, "triton")
        same = L.conv2d(x, w, b, T, False, "loop")
    assert got.dtype == same.dtype == torch.bfloat16
    assert_error_rule(got, same, _per_block(x.double(), w.double(), b.double(), T, False), "autocast out")


@pytest.mark.parametrize("device", DEVICES)
def test_a_block_bank_on_the_triton_convolution_equals_the_per_block_loop(monkeypatch, device):
    from tests.helpers import assert_grads_close_per_block, batch
    from tests.test_bank import IMAGE, grads_per_block, separate_and_bank

    _, bank = separate_and_bank(T=2)
    x, y = batch(B=3, m=5, image_shape=IMAGE)
    bank, x, y = bank.to(device), x.to(device), y.to(device)
    results = []
    for impl in ("loop", "triton"):
        monkeypatch.setenv("NOPROP_BANK_CONV", impl)
        bank.zero_grad()
        out = bank.train().losses(x, y, seed=torch.tensor(1234, device=device), dropout_seed=99)
        out.total.backward()
        results.append((out.local.detach(), {n: g.clone() for n, g in grads_per_block(bank).items()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    assert_grads_close_per_block(results[1][1], results[0][1])


def test_bench_counts_the_triton_convolution_as_the_per_block_one():
    """noprop bench's TFLOP/s: the custom ops count what the per-block convolutions count (torch's
    FlopCounterMode would count them 0)."""
    from noprop.bench.measure import flop_per_step

    T, B = 3, 2
    x = torch.randn(B * T, 4, 7, 6)
    w = torch.randn(T, 5, 4, 3, 3, requires_grad=True)
    b = torch.randn(T, 5, requires_grad=True)

    def step(impl, shared_x):
        L.conv2d(shared_x, w, b, T, shared_x.shape[0] == B, impl).square().sum().backward()

    for shared_x in (x, x[:B]):
        assert flop_per_step(lambda: step("triton", shared_x)) == flop_per_step(lambda: step("loop", shared_x)) > 0

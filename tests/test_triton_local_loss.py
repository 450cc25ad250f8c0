"""Triton `local_loss` (kernels/triton/local_loss.py) against the float64 eager reference,
opcheck and input validation.

Error rule (project standard): error(triton vs float64) <= 2 x error(eager in the same dtype vs
float64) + floor. The floor: the kernel accumulates in float32 like eager but in another order
(row blocks, d-tiles, tl.dot, split partials of dW), which may differ from eager by a few float32
ulps of the result's magnitude: 1e-6 relative (~8 ulps at 2**-23). fp16/bf16 results (dlogits, dW,
dweight) are then rounded once more, and a float32 value that differs from eager's near a rounding
midpoint may round to the neighbouring value: one ulp of the output dtype at that magnitude
(ulp(x) >= eps·|x|/2, hence eps/2 x scale).
"""
import pytest
import torch

import noprop.kernels.triton as T
from noprop import dispatch, ops
from tests.error_rule import LOW, assert_error_rule


@pytest.fixture(autouse=True)
def _setup(one_torch_thread, triton_device):
    yield  # one torch thread; tensors on the device the kernels run on (see conftest)







def _inputs(K, B, m, d, dtype, per_sample, logit_scale=3.0, offset=False):
    logits = (logit_scale * torch.randn(K, B, m)).to(dtype)
    W = torch.randn(m, d).to(dtype)
    y = torch.randint(0, m, (B,))
    weight = torch.rand((K, B) if per_sample else (K,)).to(dtype)
    grad = torch.randn(K)  # the loss is float32
    off = torch.randn(B, d).to(dtype) if offset else None
    return logits, W, y, weight, grad, off


def _run(backend, logits, W, y, weight, grad, offset=None, dtype=None, softmax=True):
    """Forward and backward through the public op: (loss, dlogits, dW, dweight[, doffset])."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    logits, W, weight = (cast(t).detach().clone().requires_grad_() for t in (logits, W, weight))
    if offset is not None:
        offset = cast(offset).detach().clone().requires_grad_()
    with dispatch.use_backend(backend):
        loss = ops.local_loss(logits, W, y, weight, offset, softmax=softmax)
        loss.backward(grad.to(loss.dtype))
    return (loss.detach(), logits.grad, W.grad, weight.grad) + (() if offset is None else (offset.grad,))


NAMES = ("loss", "dlogits", "dW", "dweight", "doffset")


def _check_against_reference(shape, dtype, per_sample, softmax=True, offset=False, **kw):
    args = _inputs(*shape, dtype, per_sample, offset=offset, **kw)
    ref = _run("eager", *args, dtype=torch.float64, softmax=softmax)
    same = _run("eager", *args, softmax=softmax)
    got = _run("triton", *args, softmax=softmax)
    assert got[0].dtype == torch.float32
    assert len(got) == len(ref) == (5 if offset else 4)
    for name, g, s, r in zip(NAMES, got, same, ref):
        assert_error_rule(g, s, r, name)


SHAPES = [  # (K, B, m, d)
    (1, 1, 10, 10),
    (10, 7, 100, 20),
    (10, 128, 10, 20),
    (2, 1000, 10, 10),
    (1, 1000, 100, 20),
]
LARGE = (3, 128, 10, 784)  # 25 d-tiles x 12 row blocks in the interpreter: one weight layout only


@pytest.mark.parametrize("per_sample", [False, True], ids=["weight[K]", "weight[K,B]"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference_fp32(shape, per_sample):
    _check_against_reference(shape, torch.float32, per_sample)


@pytest.mark.slow
def test_matches_float64_reference_fp32_large():
    _check_against_reference(LARGE, torch.float32, per_sample=True)


@pytest.mark.parametrize("per_sample", [False, True], ids=["weight[K]", "weight[K,B]"])
@pytest.mark.parametrize("shape", [(10, 7, 100, 20), (1, 128, 10, 784)])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_matches_float64_reference_low_precision(shape, dtype, per_sample):
    _check_against_reference(shape, dtype, per_sample)


# The softmax-free variants (NoProp-FM: velocity logits·W against the target u_y − z_0, i.e.
# softmax=False with offset = z_0), and an offset under the softmax.
VARIANTS = {"fm": dict(softmax=False, offset=True), "identity": dict(softmax=False),
            "softmax+offset": dict(softmax=True, offset=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [(1, 1, 10, 10), (1, 129, 10, 20), (3, 7, 100, 20)])
def test_variants_match_float64_reference_fp32(shape, variant):
    _check_against_reference(shape, torch.float32, per_sample=shape[0] == 1, **VARIANTS[variant])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fm_variant_matches_float64_reference_low_precision(dtype):
    _check_against_reference((1, 128, 10, 784), dtype, per_sample=True, **VARIANTS["fm"])


def test_fm_variant_is_the_flow_matching_loss():
    # Written out independently of the eager helpers: mean_b w_b · ‖logits_b · W − (u_y − z_0)‖².
    logits, W, y, weight, _, z0 = _inputs(1, 33, 10, 20, torch.float64, True, offset=True)
    want = (weight[0] * (logits[0] @ W - (W[y] - z0)).pow(2).sum(-1)).mean()
    for backend in ("eager", "triton"):
        cast = torch.float64 if backend == "eager" else torch.float32
        a = [t.to(cast) for t in (logits, W, weight, z0)]
        with dispatch.use_backend(backend):
            got = ops.local_loss(a[0], a[1], y, a[2], a[3], softmax=False)
        torch.testing.assert_close(got[0].double(), want, rtol=1e-5 if cast == torch.float32 else 1e-12, atol=0)


def test_variant_gradients_pass_gradcheck_in_float64():
    logits, W, y, weight, _, off = _inputs(2, 5, 4, 3, torch.float64, True, offset=True)
    for softmax in (False, True):
        inputs = [t.clone().requires_grad_() for t in (logits, W, weight, off)]
        assert torch.autograd.gradcheck(
            lambda lg, w_, wt, o: ops.local_loss(lg, w_, y, wt, o, softmax=softmax), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_saturated_softmax_stays_finite(dtype):
    # logits of +-hundreds: softmax is one-hot up to underflow; padding must not create NaN/inf.
    _check_against_reference((3, 20, 10, 20), dtype, True, logit_scale=200.0)


def test_backward_is_deterministic():
    args = _inputs(2, 300, 10, 20, torch.float32, False)
    first, second = _run("triton", *args), _run("triton", *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_kernel_clamps_labels_it_is_never_given_unchecked():
    # The op rejects such labels; called directly, the kernel clamps instead of reading out of bounds.
    logits, W, _, weight, grad, _ = _inputs(2, 4, 10, 20, torch.float32, False)
    bad, clamped = torch.tensor([-3, 0, 9, 42]), torch.tensor([0, 0, 9, 9])
    assert torch.equal(T.local_loss(logits, W, bad, weight), T.local_loss(logits, W, clamped, weight))
    for a, b in zip(T.local_loss_backward(grad, logits, W, bad, weight),
                    T.local_loss_backward(grad, logits, W, clamped, weight)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["default", "fm"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["weight[K]", "weight[K,B]"])
def test_opcheck(per_sample, variant):
    logits, W, y, weight, _, off = _inputs(3, 9, 10, 20, torch.float32, per_sample, offset=True)
    for t in (logits, W, weight):
        t.requires_grad_()
    args = (logits, W, y, weight) if variant == "default" else (logits, W, y, weight, off, False)
    with dispatch.use_backend("triton"):
        torch.library.opcheck(torch.ops.noprop.local_loss.default, args)


BAD = {  # name -> (mutation of valid args, expected error, message fragment)
    "label out of range": (lambda a: a.update(y=a["y"] + 10), ValueError, "labels must lie in"),
    "labels of wrong length": (lambda a: a.update(y=torch.zeros(6, dtype=torch.int64)), ValueError, r"\[B\] = \[5\]"),
    "W rows != m": (lambda a: a.update(W=torch.randn(11, 20)), ValueError, "m = 10 classes"),
    "weight K mismatch": (lambda a: a.update(weight=torch.rand(4)), ValueError, "K = 3"),
    "weight B mismatch": (lambda a: a.update(weight=torch.rand(3, 4)), ValueError, "B = 5"),
    "logits not 3-D": (lambda a: a.update(logits=torch.randn(5, 10)), ValueError, "dimensions"),
    "integer logits": (lambda a: a.update(logits=torch.ones(3, 5, 10, dtype=torch.int32)), TypeError, "float16"),
    "float labels": (lambda a: a.update(y=a["y"].float()), TypeError, "int64 or int32"),
    "W on meta": (lambda a: a.update(W=a["W"].to("meta")), ValueError, "one device"),
    "non-contiguous logits": (lambda a: a.update(logits=torch.randn(3, 10, 5).transpose(1, 2)), ValueError,
                              "contiguous"),
    "offset shape": (lambda a: a.update(offset=torch.randn(5, 21)), ValueError, r"offset must have shape \[B, d\]"),
    "offset not 2-D": (lambda a: a.update(offset=torch.randn(3, 5, 20)), ValueError, "dimensions"),
    "integer offset": (lambda a: a.update(offset=torch.zeros(5, 20, dtype=torch.int64)), TypeError, "float16"),
    "offset on meta": (lambda a: a.update(offset=torch.randn(5, 20, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_before_any_kernel(case, monkeypatch):
    def boom(*args):
        raise AssertionError("a kernel ran on invalid inputs")
    monkeypatch.setattr(T, "local_loss", boom)
    a = dict(logits=torch.randn(3, 5, 10), W=torch.randn(10, 20), y=torch.randint(0, 10, (5,)), weight=torch.rand(3),
             offset=None)
    mutate, error, fragment = BAD[case]
    mutate(a)
    with dispatch.use_backend("triton"), pytest.raises(error, match=fragment):
        ops.local_loss(a["logits"], a["W"], a["y"], a["weight"], a["offset"])

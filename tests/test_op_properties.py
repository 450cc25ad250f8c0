"""Property tests of the fused ops (noise_inject, local_loss, denoise_step) as dispatched on CPU,
forward and backward, against float64 references written here (formulas from the ops' docstrings
and paper Eq. 3; reference gradients by autograd through those formulas, not the ops' hand-written
backwards).

Shapes are drawn irregular (1, 3, 7, 17 ...), coefficients per block [K] or per sample [K, B],
ᾱ down to 1e-6 and up to 1 − 1e-6. Accuracy is the project's error rule (tests/error_rule.py):
error(op vs float64) <= 2 x error(the same formula evaluated here in float32, the compute dtype of
fp16/bf16/fp32 inputs, rounded to the output dtype) + floor. That baseline is the dtype-appropriate
tolerance. A wrong formula, element mapping or noise draw exceeds it by orders of magnitude, and so
do local_loss (forward or backward) and a bf16 denoise_step computed in the input dtype instead of
float32; fp16 arithmetic in the element-wise noise_inject / denoise_step forward stays within 2x
and is not caught here. The floor is the rule's (relative to the result's magnitude) plus 1e-6 of the magnitude of the terms
that are summed (written out below per output): where terms cancel (dW of one class, m = 1), a
float32 sum taken in another order may leave a few ulps of the terms that the baseline's order
happens not to.

The noise ε is the Philox stream of noprop.ops.philox_randn (tested against Triton's own generator
in tests/test_philox.py) for the op's seed and shape, drawn in the compute dtype (float32, or
float64 for float64 inputs) exactly as the ops document; the references reuse those draws so the
comparison measures the op's arithmetic and its mapping of draws to elements.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from noprop import dispatch
from noprop.ops import denoise_step, local_loss, noise_inject
from noprop.ops.philox import philox_randn
from tests.error_rule import floor

PROPERTIES = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TINY = 1e-6  # ᾱ at the noisy extreme; 1 − TINY at the clean one


@pytest.fixture(autouse=True)
def _dispatched_on_cpu(one_torch_thread):
    # CPU tensors under the default backend: the dispatched op is the eager implementation. The
    # interpreted Triton kernels have their own tests (tests/test_triton_*.py).
    with dispatch.use_backend("auto"):
        yield


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps_draws(seed, shape, dtype):
    """The op's ε for (seed, shape): the Philox stream in the compute dtype."""
    return philox_randn(seed, shape, dtype=compute_dtype(dtype))


def alpha_bars(regime, shape, g):
    """ᾱ in float64: all near 0, all near 1, a mix of both extremes with interior values, or interior."""
    inner = 0.01 + 0.98 * torch.rand(shape, generator=g, dtype=torch.float64)
    if regime == "noisy":
        return torch.full(shape, TINY, dtype=torch.float64)
    if regime == "clean":
        return torch.full(shape, 1 - TINY, dtype=torch.float64)
    if regime == "mixed":
        pick = torch.randint(0, 3, shape, generator=g)
        return torch.where(pick == 0, TINY, torch.where(pick == 1, 1 - TINY, inner))
    return inner


@st.composite
def sizes(draw):
    return dict(K=draw(st.sampled_from([1, 2, 3, 7])), B=draw(st.sampled_from([1, 3, 7, 17])),
                m=draw(st.sampled_from([1, 2, 3, 7, 17])), d=draw(st.sampled_from([1, 3, 4, 7, 17])),
                data_seed=draw(st.integers(0, 2**31 - 1)), philox_seed=draw(st.integers(0, 2**62)))


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def check(got, same, ref, mag, name):
    """The error rule with a cancellation allowance: mag [like ref] bounds the summed |terms|."""
    assert got.shape == ref.shape and got.dtype == same.dtype, f"{name}: {tuple(got.shape)} {got.dtype}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values where the float64 reference is finite"
    ref = ref.double()
    err_op = (got.double() - ref).abs().max().item()
    err_same = (same.double() - ref).abs().max().item()
    fl = floor(got.dtype, ref.abs().max().item()) + 1e-6 * mag.abs().max().item()
    assert err_op <= 2 * err_same + fl, (f"{name}: op err {err_op:.3g} > 2 x float32-formula err {err_same:.3g} "
                                         f"+ {fl:.3g}")


def representable(refs, dtype):
    """Skip draws whose exact results overflow the dtype (then inf is the right answer)."""
    assume(all(bool((r.abs() < torch.finfo(dtype).max / 4).all()) for r in refs))


# --- noise_inject --------------------------------------------------------------------------------

def ref_noise_inject(W, y, sa, s1m, eps, grad_z, ct):
    """z[k, b] = sa[k(, b)]·W[y_b] + s1m[k(, b)]·ε[k, b] in dtype ct, and its gradients by autograd."""
    W, sa, s1m = (_leaf(t.to(ct)) for t in (W, sa, s1m))
    K, B = eps.shape[:2]
    col = lambda c: (c[:, None] if c.ndim == 1 else c).expand(K, B)[..., None]  # noqa: E731
    z = col(sa) * W[y] + col(s1m) * eps.to(ct)
    z.backward(grad_z.to(ct))
    return z.detach(), W.grad, sa.grad, s1m.grad


@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTIES
@given(s=sizes(), regime=st.sampled_from(["noisy", "clean", "mixed", "interior"]),
       scale=st.sampled_from([0.5, 1.0, 4.0]))
def test_noise_inject_matches_the_float64_formula(dtype, per_sample, s, regime, scale):
    K, B, m, d = s["K"], s["B"], s["m"], s["d"]
    g = torch.Generator().manual_seed(s["data_seed"])
    W = (scale * torch.randn(m, d, generator=g)).to(dtype)
    y = torch.randint(0, m, (B,), generator=g)
    ab = alpha_bars(regime, (K, B) if per_sample else (K,), g)
    sa, s1m = ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)
    grad_z = torch.randn(K, B, d, generator=g).to(dtype)
    seed = torch.tensor([s["philox_seed"]], dtype=torch.int64)

    leaves = [_leaf(t) for t in (W, sa, s1m)]
    z = noise_inject(leaves[0], y, leaves[1], leaves[2], seed)
    z.backward(grad_z)
    got = (z.detach(), *(t.grad for t in leaves))
    eps = eps_draws(seed, (K, B, d), dtype)
    ref = ref_noise_inject(W, y, sa, s1m, eps, grad_z, torch.float64)
    same = [t.to(dtype) for t in ref_noise_inject(W, y, sa, s1m, eps, grad_z, compute_dtype(dtype))]
    # Multilinear in (W, sa, s1m, ε, grad_z): the same formula on absolute values sums the |terms|.
    mag = ref_noise_inject(W.abs(), y, sa.abs(), s1m.abs(), eps.abs(), grad_z.abs(), torch.float64)
    representable(ref, dtype)
    for name, a, b, r, mg in zip(("z", "dW", "d_sqrt_abar", "d_sqrt_one_minus_abar"), got, same, ref, mag):
        check(a, b, r, mg, f"noise_inject {name} ({dtype}, K={K} B={B} m={m} d={d}, {regime})")
    assert torch.equal(z.detach(), noise_inject(W, y, sa, s1m, seed)), "same seed, different noise"


# --- local_loss ----------------------------------------------------------------------------------

def ref_local_loss(logits, W, y, weight, offset, softmax, grad_loss, ct):
    """loss[k] = mean_b w[k(, b)]·‖act(logits[k, b])·W − (W[y_b] − offset_b)‖² (SUM over d) in dtype
    ct, and the gradients of Σ_k grad_loss[k]·loss[k] by autograd."""
    logits, W, weight = (_leaf(t.to(ct)) for t in (logits, W, weight))
    off = None if offset is None else _leaf(offset.to(ct))
    K, B, _ = logits.shape
    p = torch.softmax(logits, -1) if softmax else logits
    r = p @ W - W[y] + (0 if off is None else off)
    w = (weight[:, None] if weight.ndim == 1 else weight).expand(K, B)
    loss = (w * r.pow(2).sum(-1)).sum(1) / B
    (loss * grad_loss.to(ct)).sum().backward()
    grads = (logits.grad, W.grad, weight.grad) + (() if off is None else (off.grad,))
    return (loss.detach(),) + grads


def local_loss_magnitudes(logits, W, y, weight, offset, softmax, grad_loss):
    """Per output, the summed |terms| of its formula (float64): R = |p|·|W| + |u_y| + |offset| bounds
    r's terms, and each gradient's terms are built from R as the gradient is built from r."""
    logits, W, weight, grad_loss = (t.double() for t in (logits, W, weight, grad_loss))
    K, B, _ = logits.shape
    p = torch.softmax(logits, -1) if softmax else logits.abs()
    R = p @ W.abs() + W.abs()[y] + (0 if offset is None else offset.double().abs())
    w = (weight[:, None] if weight.ndim == 1 else weight).expand(K, B).abs()
    C = (2 / B) * grad_loss.abs()[:, None] * w  # |d loss / d r| per unit r
    CR = C[..., None] * R
    GP = CR @ W.abs().T
    dlogits = p * (GP + (GP * p).sum(-1, keepdim=True)) if softmax else GP
    dW = torch.einsum("kbm,kbd->md", p, CR).index_add(0, y, CR.sum(0))
    dweight = grad_loss.abs()[:, None] * R.pow(2).sum(-1) / B
    mags = [(w * R.pow(2).sum(-1)).mean(1), dlogits, dW, dweight.sum(1) if weight.ndim == 1 else dweight]
    return mags + ([] if offset is None else [CR.sum(0)])


@pytest.mark.parametrize("per_sample", [False, True], ids=["weight[K]", "weight[K,B]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTIES
@given(s=sizes(), logit_scale=st.sampled_from([0.1, 1.0, 8.0, 40.0]), weight_decades=st.sampled_from([0, 3, 6]),
       softmax=st.booleans(), with_offset=st.booleans())
def test_local_loss_and_its_backward_match_the_float64_formula(dtype, per_sample, s, logit_scale, weight_decades,
                                                               softmax, with_offset):
    """weight_decades: weights log-uniform in [10^-w, 10^w] (the DT weights (T/2)·η·ΔSNR span many
    decades when ᾱ_T is near 1); fp16 keeps to 10^±1 so that its gradients stay in range."""
    K, B, m, d = s["K"], s["B"], s["m"], s["d"]
    if dtype == torch.float16:
        weight_decades = min(weight_decades, 1)
    g = torch.Generator().manual_seed(s["data_seed"])
    logits = (logit_scale * torch.randn(K, B, m, generator=g)).to(dtype)
    W = torch.randn(m, d, generator=g).to(dtype)
    y = torch.randint(0, m, (B,), generator=g)
    wshape = (K, B) if per_sample else (K,)
    weight = (10.0 ** (weight_decades * (2 * torch.rand(wshape, generator=g) - 1))).to(dtype)
    offset = torch.randn(B, d, generator=g).to(dtype) if with_offset else None
    loss_dtype = compute_dtype(dtype)  # the loss comes back in the compute dtype
    grad_loss = torch.randn(K, generator=g).to(loss_dtype)

    leaves = [_leaf(t) for t in (logits, W, weight)] + ([] if offset is None else [_leaf(offset)])
    loss = local_loss(leaves[0], leaves[1], y, leaves[2], leaves[3] if with_offset else None, softmax)
    assert loss.dtype == loss_dtype and loss.shape == (K,)
    (loss * grad_loss).sum().backward()
    got = (loss.detach(), *(t.grad for t in leaves))
    ref = ref_local_loss(logits, W, y, weight, offset, softmax, grad_loss, torch.float64)
    base = ref_local_loss(logits, W, y, weight, offset, softmax, grad_loss, loss_dtype)
    same = (base[0],) + tuple(t.to(dtype) for t in base[1:])
    representable(ref[:1], loss_dtype)
    representable(ref[1:], dtype)
    mag = local_loss_magnitudes(logits, W, y, weight, offset, softmax, grad_loss)
    names = ("loss", "dlogits", "dW", "dweight", "doffset")
    for name, a, b, r, mg in zip(names, got, same, ref, mag):
        check(a, b, r, mg, f"local_loss {name} ({dtype}, K={K} B={B} m={m} d={d}, softmax={softmax})")


# --- denoise_step --------------------------------------------------------------------------------

def eq3(ab_prev, ab_t):
    """Paper Eq. 3 (a, b, √c) for one step from ᾱ_{t−1} = ab_prev to ᾱ_t = ab_t, α_{t−1} = ab_prev/ab_t."""
    alpha = ab_prev / ab_t
    a = math.sqrt(ab_t) * (1 - alpha) / (1 - ab_prev)
    b = math.sqrt(alpha) * (1 - ab_t) / (1 - ab_prev)
    c = (1 - ab_t) * (1 - alpha) / (1 - ab_prev)
    return a, b, math.sqrt(c)


def ref_denoise_step(logits, W, z_prev, a, b, sqrt_c, eps, softmax, ct, terms=False):
    """a·act(logits)·W + b·z_prev + √c·ε in dtype ct; terms=True: the sum of the |terms| instead."""
    p = torch.softmax(logits.to(ct), -1) if softmax else logits.to(ct)
    if terms:
        return abs(a) * (p.abs() @ W.to(ct).abs()) + abs(b) * z_prev.to(ct).abs() + abs(sqrt_c) * eps.to(ct).abs()
    return a * (p @ W.to(ct)) + b * z_prev.to(ct) + sqrt_c * eps.to(ct)


STEPS = {  # (ᾱ_{t−1}, ᾱ_t) of one step, or an FM Euler step (a = h, b = 1, no noise)
    "noisy start": (TINY, 0.3),
    "clean end": (0.7, 1 - TINY),
    "whole range": (TINY, 1 - TINY),
    "tiny step at the noisy end": (TINY, 2 * TINY),
    "interior": (0.2, 0.5),
    "euler": None,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTIES
@given(s=sizes(), step=st.sampled_from(sorted(STEPS)), mean_chain=st.booleans(),
       logit_scale=st.sampled_from([0.1, 1.0, 20.0]))
def test_denoise_step_matches_the_float64_formula(dtype, s, step, mean_chain, logit_scale):
    B, m, d = s["B"], s["m"], s["d"]
    g = torch.Generator().manual_seed(s["data_seed"])
    logits = (logit_scale * torch.randn(B, m, generator=g)).to(dtype)
    W = torch.randn(m, d, generator=g).to(dtype)
    z_prev = torch.randn(B, d, generator=g).to(dtype)
    seed = torch.tensor([s["philox_seed"]], dtype=torch.int64)
    softmax = STEPS[step] is not None
    a, b, sqrt_c = eq3(*STEPS[step]) if softmax else (1 / 7, 1.0, 0.0)
    if mean_chain:
        sqrt_c = 0.0

    got = denoise_step(logits, W, z_prev, a, b, sqrt_c, seed, softmax=softmax)
    eps = eps_draws(seed, (B, d), dtype)  # row b of the stream: counters b·⌈d/4⌉ + j // 4
    ref = ref_denoise_step(logits, W, z_prev, a, b, sqrt_c, eps, softmax, torch.float64)
    same = ref_denoise_step(logits, W, z_prev, a, b, sqrt_c, eps, softmax, compute_dtype(dtype)).to(dtype)
    mag = ref_denoise_step(logits, W, z_prev, a, b, sqrt_c, eps, softmax, torch.float64, terms=True)
    representable([ref], dtype)
    check(got, same, ref, mag, f"denoise_step ({dtype}, B={B} m={m} d={d}, {step}, sqrt_c={sqrt_c:.3g})")
    assert torch.equal(got, denoise_step(logits, W, z_prev, a, b, sqrt_c, seed, softmax=softmax))

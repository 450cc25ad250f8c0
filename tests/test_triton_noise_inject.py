"""Triton `noise_inject` (kernels/triton/noise_inject.py) against the float64 eager reference,
its noise (Philox counters shared with eager), opcheck, and input validation.

Error rule (project standard): error(triton vs float64) <= 2 x error(eager in the same dtype vs
float64) + floor. The floor: the kernel accumulates in float32 like eager but in another order
(tiles, FMA, tl.dot), which may differ from eager by a few float32 ulps of the result's magnitude:
1e-6 relative (~8 ulps at 2**-23). fp16/bf16 results are then rounded once more, and a float32
value that differs from eager's near a rounding midpoint may round to the neighbouring value: one
ulp of the output dtype at that magnitude (ulp(x) >= eps·|x|/2, hence eps/2 x scale).
"""
import importlib

import pytest
import torch

import noprop.kernels.triton as T
from noprop import dispatch, ops
from tests.error_rule import LOW, assert_error_rule
from noprop.ops.philox import philox_randn

NI = importlib.import_module("noprop.kernels.triton.noise_inject")  # the module: T.noise_inject is the function


@pytest.fixture(autouse=True)
def _setup(one_torch_thread, triton_device):
    yield  # one torch thread; tensors on the device the kernels run on (see conftest)







def _inputs(K, B, m, d, dtype, per_sample):
    W = torch.randn(m, d).to(dtype)
    y = torch.randint(0, m, (B,))
    shape = (K, B) if per_sample else (K,)
    sa = torch.rand(shape).to(dtype)
    s1m = torch.rand(shape).to(dtype)
    grad = torch.randn(K, B, d).to(dtype)
    return W, y, sa, s1m, ops.new_seed(), grad


def _run(backend, W, y, sa, s1m, seed, grad, dtype=None):
    """Forward and backward through the public op: (z, dW, d_sqrt_abar, d_sqrt_one_minus_abar)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    W, sa, s1m = (cast(t).detach().clone().requires_grad_() for t in (W, sa, s1m))
    with dispatch.use_backend(backend):
        z = ops.noise_inject(W, y, sa, s1m, seed)
        z.backward(cast(grad))
    return z.detach(), W.grad, sa.grad, s1m.grad


SHAPES = [  # (K, B, m, d)
    (1, 1, 10, 10),
    (10, 7, 100, 20),
    (10, 128, 10, 20),
    (4, 1000, 100, 10),
]
LARGE = (1, 1000, 10, 784)  # the philox stream dominates interpreter time: one coefficient layout only


def _check_against_reference(shape, dtype, per_sample):
    args = _inputs(*shape, dtype, per_sample)
    ref = _run("eager", *args, dtype=torch.float64)
    same = _run("eager", *args)
    got = _run("triton", *args)
    for name, g, s, r in zip(("z", "dW", "d_sqrt_abar", "d_sqrt_one_minus_abar"), got, same, ref):
        assert_error_rule(g, s, r, name)


@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference_fp32(shape, per_sample):
    _check_against_reference(shape, torch.float32, per_sample)


@pytest.mark.slow
def test_matches_float64_reference_fp32_large():
    _check_against_reference(LARGE, torch.float32, per_sample=True)


@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
@pytest.mark.parametrize("shape", [(10, 7, 100, 20), (2, 128, 10, 784)])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_matches_float64_reference_low_precision(shape, dtype, per_sample):
    _check_against_reference(shape, dtype, per_sample)


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    W, y, sa, s1m, seed, _ = _inputs(3, 50, 10, 20, torch.float32, False)
    with dispatch.use_backend("triton"):
        z1 = ops.noise_inject(W, y, sa, s1m, seed)
        z2 = ops.noise_inject(W, y, sa, s1m, seed.clone())
        z3 = ops.noise_inject(W, y, sa, s1m, seed + 1)
    assert torch.equal(z1, z2)
    assert (z1 != z3).float().mean() > 0.99


# d = 20: whole quads; d = 5: a tail quad per row; d = 261: two column tiles (BLOCK_D = 256) and a tail.
@pytest.mark.parametrize("K,B,d", [(4, 128, 20), (3, 171, 5), (2, 5, 261)])
def test_eps_is_standard_normal_and_equals_eager_philox(K, B, d):
    W, y, sa, s1m, seed, _ = _inputs(K, B, 10, d, torch.float32, True)
    with dispatch.use_backend("triton"):
        z, eps = ops.noise_inject(W, y, sa, s1m, seed, return_eps=True)
    n = eps.numel()
    mean, var = eps.double().mean().item(), eps.double().var().item()
    assert abs(mean) < 4 / n ** 0.5, mean  # standard error of the mean: 1/sqrt(n)
    assert abs(var - 1) < 4 * (2 / (n - 1)) ** 0.5, var  # of the sample variance: sqrt(2/(n-1))
    # Element (k, b, j) is lane j % 4 of counter (k·B + b)·⌈d/4⌉ + j // 4: the eager Philox replica agrees.
    torch.testing.assert_close(eps, philox_randn(seed, (K, B, d)), rtol=0, atol=1e-5)
    # z is built from that very ε.
    expect = sa[..., None] * W[y] + s1m[..., None] * eps
    torch.testing.assert_close(z, expect, rtol=1e-6, atol=1e-6)


def test_k_runs_choice():
    # (k_per_run, runs): K cut into runs until the (b, j) tiles make the target number of programs.
    assert NI._k_runs(10, 1, target=4) == (3, 4)  # runs of 3, 3, 3, 1
    assert NI._k_runs(10, 2, target=5) == (4, 3)  # 3 runs wanted: 4, 4, 2
    assert NI._k_runs(10, 1, target=7) == (2, 5)  # 7 runs wanted; runs of 2 need only 5: none empty
    assert NI._k_runs(10, 3, target=100) == (1, 10)  # never more runs than blocks
    assert NI._k_runs(10, 4, target=4) == (10, 1)  # the tiles alone reach it: W[y] reused by all K
    assert NI._k_runs(1, 1, target=512) == (1, 1)
    # The production target (an H100): B = 1 or B·d = 128 x 10 is one tile -> one block per program;
    # enough tiles keep one run.
    assert NI._k_runs(10, 1) == (1, 10)
    assert NI._k_runs(10, NI._TARGET_PROGRAMS) == (10, 1)
    for K in range(1, 40):
        for tiles in (1, 2, 3, 7, 16):
            for target in (1, 4, 5, 64):
                per, runs = NI._k_runs(K, tiles, target)
                assert 1 <= runs <= K and (runs - 1) * per < K <= runs * per  # every run non-empty, K covered


def _launched_grid(monkeypatch):
    """Records the grid and the k_per_run of each forward launch (the launch still runs)."""
    seen = []
    kernel = NI._noise_inject_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((tuple(grid), args[14]))  # args[14]: K_PER_RUN
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(NI, "_noise_inject_fwd", Spy())
    return seen


# K split into runs of uneven length (target lowered so that interpreter-sized shapes split):
# one (b, j) tile with K = 10 in runs 3, 3, 3, 1; two column tiles (d = 261) with runs 4, 4, 2;
# a tail quad (d = 5) with runs of 2. Each is compared with the single run over all K (target 1,
# the large-problem path) too.
@pytest.mark.parametrize("K,B,d,target,expect", [
    (10, 7, 20, 4, ((1, 1, 4), 3)),
    (10, 5, 261, 5, ((1, 2, 3), 4)),
    (10, 7, 5, 7, ((1, 1, 5), 2)),
])
@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
def test_forward_split_into_k_runs_matches_eager(K, B, d, target, expect, per_sample, monkeypatch):
    monkeypatch.setattr(NI, "_TARGET_PROGRAMS", target)
    seen = _launched_grid(monkeypatch)
    W, y, sa, s1m, seed, _ = _inputs(K, B, 10, d, torch.float32, per_sample)
    with dispatch.use_backend("triton"):
        z, eps = ops.noise_inject(W, y, sa, s1m, seed, return_eps=True)
    assert seen and all(s == expect for s in seen), seen
    # Every block's noise, in every run: element (k, b, j) is lane j % 4 of counter (k·B + b)·⌈d/4⌉ + j // 4.
    ref_eps = philox_randn(seed, (K, B, d))
    torch.testing.assert_close(eps, ref_eps, rtol=0, atol=1e-5)
    # The same noise as the one-run launch, bit for bit.
    monkeypatch.setattr(NI, "_TARGET_PROGRAMS", 1)
    with dispatch.use_backend("triton"):
        z1, eps1 = ops.noise_inject(W, y, sa, s1m, seed, return_eps=True)
    assert torch.equal(eps, eps1) and torch.equal(z, z1)
    # And z against the float64 eager reference by the project's error rule.
    with dispatch.use_backend("eager"):
        ref = ops.noise_inject(W.double(), y, sa.double(), s1m.double(), seed)
        same = ops.noise_inject(W, y, sa, s1m, seed)
    assert_error_rule(z, same, ref, "z")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_forward_split_into_k_runs_low_precision(dtype, monkeypatch):
    monkeypatch.setattr(NI, "_TARGET_PROGRAMS", 4)  # K = 10, one tile: runs 3, 3, 3, 1
    W, y, sa, s1m, seed, _ = _inputs(10, 6, 10, 12, dtype, True)
    with dispatch.use_backend("triton"):
        z = ops.noise_inject(W, y, sa, s1m, seed)
    with dispatch.use_backend("eager"):
        ref = ops.noise_inject(W.double(), y, sa.double(), s1m.double(), seed)
        same = ops.noise_inject(W, y, sa, s1m, seed)
    assert_error_rule(z, same, ref, "z")


@pytest.mark.parametrize("d", [20, 5, 261])
@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
def test_backward_regenerates_the_forward_noise(per_sample, d):
    W, y, sa, s1m, seed, grad = _inputs(3, 40, 10, d, torch.float32, per_sample)
    with dispatch.use_backend("triton"):
        _, eps = ops.noise_inject(W, y, sa, s1m, seed, return_eps=True)
    _, _, _, d_s1m = _run("triton", W, y, sa, s1m, seed, grad)
    expect = (grad.double() * eps.double()).sum(-1)
    expect = expect if per_sample else expect.sum(1)
    torch.testing.assert_close(d_s1m.double(), expect, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    args = _inputs(5, 300, 10, 20, torch.float32, False)
    first, second = _run("triton", *args), _run("triton", *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("per_sample", [False, True], ids=["coef[K]", "coef[K,B]"])
def test_opcheck(per_sample):
    W, y, sa, s1m, seed, _ = _inputs(3, 9, 10, 20, torch.float32, per_sample)
    W.requires_grad_()
    sa.requires_grad_()
    s1m.requires_grad_()
    with dispatch.use_backend("triton"):
        torch.library.opcheck(torch.ops.noprop.noise_inject.default, (W, y, sa, s1m, seed))


def _no_kernel(monkeypatch):
    def boom(*args):
        raise AssertionError("a kernel ran on invalid inputs")
    monkeypatch.setattr(T, "noise_inject", boom)


BAD = {  # name -> (mutation of valid args, expected error, message fragment)
    "label out of range": (lambda a: a.update(y=a["y"] + 10), ValueError, "labels must lie in"),
    "negative label": (lambda a: a["y"].__setitem__(0, -1), ValueError, "labels must lie in"),
    "K mismatch": (lambda a: a.update(s1m=torch.rand(4)), ValueError, "K = 3"),
    "B mismatch": (lambda a: a.update(sa=torch.rand(3, 6)), ValueError, "B = 5"),
    "W not 2-D": (lambda a: a.update(W=torch.randn(10)), ValueError, "dimensions"),
    "integer W": (lambda a: a.update(W=torch.ones(10, 20, dtype=torch.int64)), TypeError, "float16"),
    "float labels": (lambda a: a.update(y=a["y"].float()), TypeError, "int64 or int32"),
    "int32 seed": (lambda a: a.update(seed=torch.zeros(1, dtype=torch.int32)), TypeError, "seed"),
    "W on meta": (lambda a: a.update(W=a["W"].to("meta")), ValueError, "one device"),
    "non-contiguous W": (lambda a: a.update(W=torch.randn(20, 10).t()), ValueError, "contiguous"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_before_any_kernel(case, monkeypatch):
    _no_kernel(monkeypatch)
    a = dict(W=torch.randn(10, 20), y=torch.randint(0, 10, (5,)), sa=torch.rand(3), s1m=torch.rand(3),
             seed=torch.zeros(1, dtype=torch.int64))
    mutate, error, fragment = BAD[case]
    mutate(a)
    with dispatch.use_backend("triton"), pytest.raises(error, match=fragment):
        ops.noise_inject(a["W"], a["y"], a["sa"], a["s1m"], a["seed"])

"""Triton `denoise_step` (kernels/triton/denoise_step.py) against the float64 eager reference,
its noise (Philox counters shared with eager), opcheck and input validation.

Error rule (project standard): error(triton vs float64) <= 2 x error(eager in the same dtype vs
float64) + floor. The floor: the kernel computes in float32 like eager but in another order (tl.dot,
FMA), which may differ from eager by a few float32 ulps of the result's magnitude: 1e-6 relative
(~8 ulps at 2**-23). fp16/bf16 results are then rounded once more, and a float32 value that differs
from eager's near a rounding midpoint may round to the neighbouring value: one ulp of the output
dtype at that magnitude (ulp(x) >= eps·|x|/2, hence eps/2 x scale).
"""
import pytest
import torch

import noprop.kernels.triton as T
from noprop import dispatch, ops
from tests.error_rule import LOW, assert_error_rule
from noprop.ops.philox import philox_randn


@pytest.fixture(autouse=True)
def _setup(one_torch_thread, triton_device):
    yield  # one torch thread; tensors on the device the kernels run on (see conftest)


COEFS = (0.35, 0.8, 0.25)  # a, b, sqrt_c of a mid-chain step





def _inputs(B, m, d, dtype):
    return (3 * torch.randn(B, m)).to(dtype), torch.randn(m, d).to(dtype), torch.randn(B, d).to(dtype), ops.new_seed()


def _step(backend, logits, W, z, seed, coefs=COEFS, dtype=None, softmax=True):
    if dtype is not None:
        logits, W, z = logits.to(dtype), W.to(dtype), z.to(dtype)
    with dispatch.use_backend(backend):
        return ops.denoise_step(logits, W, z, *coefs, seed=seed, softmax=softmax)


SHAPES = [  # (B, m, d)
    (1, 10, 10),
    (7, 100, 20),
    (128, 10, 784),
    (1000, 10, 20),
]
LARGE = (1000, 100, 784)


@pytest.mark.parametrize("coefs", [COEFS, (0.35, 0.8, 0.0)], ids=["noisy", "mean"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference_fp32(shape, coefs):
    args = _inputs(*shape, torch.float32)
    assert_error_rule(_step("triton", *args, coefs=coefs), _step("eager", *args, coefs=coefs),
                 _step("eager", *args, coefs=coefs, dtype=torch.float64))


@pytest.mark.slow
def test_matches_float64_reference_fp32_large():
    args = _inputs(*LARGE, torch.float32)
    assert_error_rule(_step("triton", *args), _step("eager", *args), _step("eager", *args, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(7, 100, 20), (128, 10, 784)])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_matches_float64_reference_low_precision(shape, dtype):
    args = _inputs(*shape, dtype)
    assert_error_rule(_step("triton", *args), _step("eager", *args), _step("eager", *args, dtype=torch.float64))


EULER = (1 / 7, 1.0, 0.0)  # NoProp-FM's Euler step z + h·v, v = logits·W: a = h, b = 1, no noise


@pytest.mark.parametrize("coefs", [EULER, COEFS], ids=["euler", "noisy"])
@pytest.mark.parametrize("shape", [(1, 10, 10), (7, 100, 20), (128, 10, 784)])
def test_softmax_free_variant_matches_float64_reference_fp32(shape, coefs):
    args = _inputs(*shape, torch.float32)
    kw = dict(coefs=coefs, softmax=False)
    assert_error_rule(_step("triton", *args, **kw), _step("eager", *args, **kw),
                      _step("eager", *args, dtype=torch.float64, **kw))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_softmax_free_variant_matches_float64_reference_low_precision(dtype):
    args = _inputs(128, 10, 784, dtype)
    kw = dict(coefs=EULER, softmax=False)
    assert_error_rule(_step("triton", *args, **kw), _step("eager", *args, **kw),
                      _step("eager", *args, dtype=torch.float64, **kw))


def test_softmax_free_variant_is_an_euler_step():
    # Written out independently of the eager helpers: z + h · (logits · W).
    logits, W, z, seed = _inputs(33, 10, 20, torch.float64)
    want = z + EULER[0] * (logits @ W)
    torch.testing.assert_close(_step("eager", logits, W, z, seed, coefs=EULER, softmax=False), want,
                               rtol=1e-12, atol=1e-12)
    got = _step("triton", logits.float(), W.float(), z.float(), seed, coefs=EULER, softmax=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# d = 20: whole quads, one tile; d = 3 and 37: a tail quad per row; 37 also two tiles (BLOCK_D = 32).
@pytest.mark.parametrize("B,d", [(64, 20), (9, 3), (17, 37)])
def test_noise_is_the_eager_philox_stream_and_seeded(B, d):
    logits, W, z, seed = _inputs(B, 10, d, torch.float32)
    noisy = _step("triton", logits, W, z, seed, coefs=(0.35, 0.8, 1.0))
    mean = _step("triton", logits, W, z, seed, coefs=(0.35, 0.8, 0.0))
    # sqrt_c = 1: the difference is ε itself, ε[b, j] = lane j % 4 of counter b·⌈d/4⌉ + j // 4 (up to
    # one rounding of z).
    torch.testing.assert_close(noisy - mean, philox_randn(seed, (B, d)), rtol=0, atol=1e-5)
    again = _step("triton", logits, W, z, seed.clone(), coefs=(0.35, 0.8, 1.0))
    other = _step("triton", logits, W, z, seed + 1, coefs=(0.35, 0.8, 1.0))
    assert torch.equal(noisy, again)
    assert (noisy != other).float().mean() > 0.99


def test_noise_statistics():
    B, d = 512, 20
    logits, W, z, seed = _inputs(B, 10, d, torch.float32)
    eps = _step("triton", logits, W, z, seed, coefs=(0.0, 0.0, 1.0)).double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 4 / n ** 0.5
    assert abs(eps.var().item() - 1) < 4 * (2 / (n - 1)) ** 0.5


@pytest.mark.parametrize("softmax", [True, False])
def test_opcheck(softmax):
    logits, W, z, seed = _inputs(9, 10, 20, torch.float32)
    with dispatch.use_backend("triton"):
        torch.library.opcheck(torch.ops.noprop.denoise_step.default, (logits, W, z, *COEFS, seed, softmax))


BAD = {  # name -> (mutation of valid args, expected error, message fragment)
    "W rows != m": (lambda a: a.update(W=torch.randn(11, 20)), ValueError, "m = 10 classes"),
    "z_prev shape": (lambda a: a.update(z=torch.randn(5, 21)), ValueError, r"\[B, d\] = \[5, 20\]"),
    "logits not 2-D": (lambda a: a.update(logits=torch.randn(1, 5, 10)), ValueError, "dimensions"),
    "integer z_prev": (lambda a: a.update(z=torch.zeros(5, 20, dtype=torch.int64)), TypeError, "float16"),
    "float seed": (lambda a: a.update(seed=torch.zeros(1)), TypeError, "seed"),
    "z_prev on meta": (lambda a: a.update(z=a["z"].to("meta")), ValueError, "one device"),
    "non-contiguous W": (lambda a: a.update(W=torch.randn(20, 10).t()), ValueError, "contiguous"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_before_any_kernel(case, monkeypatch):
    def boom(*args):
        raise AssertionError("a kernel ran on invalid inputs")
    monkeypatch.setattr(T, "denoise_step", boom)
    a = dict(logits=torch.randn(5, 10), W=torch.randn(10, 20), z=torch.randn(5, 20), seed=torch.zeros(1, dtype=torch.int64))
    mutate, error, fragment = BAD[case]
    mutate(a)
    with dispatch.use_backend("triton"), pytest.raises(error, match=fragment):
        ops.denoise_step(a["logits"], a["W"], a["z"], *COEFS, seed=a["seed"])

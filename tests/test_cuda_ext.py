"""The CUDA C++ extension (kernels/cuda, torch.ops.noprop_cuda.*).

Without the built extension (CPU-only torch, pure-Python install) everything here skips with the
reason. With it but without a GPU, the registration, schema and fake-tensor checks run; the
numerical checks against the float64 eager reference need a GPU.
Build it with bench/build_cuda_ext.sh.
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch

import noprop.kernels.cuda as cuda_ext
from noprop import dispatch
from noprop.ops import eager, new_seed
from noprop.ops import noise_inject as public_noise_inject
from tests.error_rule import assert_error_rule

OPS = ("noise_inject", "noise_inject_backward", "local_loss", "local_loss_backward", "denoise_step")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_error_or_none():
    try:
        cuda_ext.require_loaded()
        return None
    except RuntimeError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def ext():
    err = _load_error_or_none()
    if err:
        pytest.skip(f"CUDA extension not loaded: {err}")
    return cuda_ext


@pytest.fixture(scope="module")
def gpu(ext):
    err = ext.load_error()
    if err:
        pytest.skip(f"CUDA extension cannot run here: {err}")
    return torch.device("cuda")


# --- without a GPU -------------------------------------------------------------------------------

def test_import_is_cheap_and_load_error_is_a_sentence():
    err = cuda_ext.load_error()
    assert err is None or (isinstance(err, str) and len(err) > 10)
    if not torch.cuda.is_available() and err is not None and cuda_ext._state["module"] is not None:
        assert err.startswith("no CUDA device")


@pytest.mark.parametrize("op", OPS)
def test_op_registered_with_cuda_kernel(ext, op):
    name = f"noprop_cuda::{op}"
    assert hasattr(torch.ops.noprop_cuda, op)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


@pytest.mark.parametrize("op", OPS)
def test_schema_argument_order_matches_eager(ext, op):
    schema = getattr(torch.ops.noprop_cuda, op).default._schema
    assert [a.name for a in schema.arguments] == list(inspect.signature(getattr(eager, op)).parameters)
    assert len(schema.returns) == (3 if op.endswith("_backward") else 1)


def test_cpu_tensors_are_refused(ext):
    W = torch.randn(4, 3)
    with pytest.raises(NotImplementedError):
        torch.ops.noprop_cuda.noise_inject(W, torch.zeros(2, dtype=torch.long), torch.ones(1), torch.ones(1),
                                          torch.zeros(1, dtype=torch.long))


def _fake_args(dtype, K=3, B=5, m=4, d=6, per_sample=False):
    dev = "cuda"
    coef = (K, B) if per_sample else (K,)
    return dict(
        W=torch.empty(m, d, device=dev, dtype=dtype), y=torch.empty(B, device=dev, dtype=torch.long),
        sa=torch.empty(coef, device=dev), s1m=torch.empty(coef, device=dev),
        seed=torch.empty(1, device=dev, dtype=torch.long), logits=torch.empty(K, B, m, device=dev, dtype=dtype),
        logits2=torch.empty(B, m, device=dev, dtype=dtype), z_prev=torch.empty(B, d, device=dev, dtype=dtype),
        gz=torch.empty(K, B, d, device=dev, dtype=dtype), gl=torch.empty(K, device=dev))


@pytest.mark.parametrize("dtype,per_sample", itertools.product(DTYPES, (False, True)))
def test_fake_tensor_shapes(ext, dtype, per_sample):
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.noprop_cuda
    with FakeTensorMode():
        a = _fake_args(dtype, per_sample=per_sample)
        z = ops.noise_inject(a["W"], a["y"], a["sa"], a["s1m"], a["seed"])
        assert z.shape == (3, 5, 6) and z.dtype == dtype and z.device.type == "cuda"
        dW, dsa, ds1m = ops.noise_inject_backward(a["gz"], a["W"], a["y"], a["sa"], a["s1m"], a["seed"])
        assert dW.shape == a["W"].shape and dsa.shape == a["sa"].shape and ds1m.shape == a["s1m"].shape
        loss = ops.local_loss(a["logits"], a["W"], a["y"], a["sa"])
        assert loss.shape == (3,) and loss.dtype == torch.float32
        dl, dW, dw = ops.local_loss_backward(a["gl"], a["logits"], a["W"], a["y"], a["sa"])
        assert dl.shape == a["logits"].shape and dl.dtype == dtype and dW.dtype == dtype
        assert dw.shape == a["sa"].shape
        zn = ops.denoise_step(a["logits2"], a["W"], a["z_prev"], 0.5, 0.4, 0.1, a["seed"])
        assert zn.shape == (5, 6) and zn.dtype == dtype


def test_meta_tensors(ext):
    W = torch.empty(4, 6, device="meta", dtype=torch.bfloat16)
    z = torch.ops.noprop_cuda.noise_inject(W, torch.empty(5, device="meta", dtype=torch.long),
                                           torch.empty(3, device="meta"), torch.empty(3, device="meta"),
                                           torch.empty(1, device="meta", dtype=torch.long))
    assert z.shape == (3, 5, 6) and z.dtype == torch.bfloat16


def test_make_fx_traces_the_op_with_fake_cuda_tensors(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(logits, W, y, weight):
        return torch.ops.noprop_cuda.local_loss(logits, W, y, weight).sum()

    with FakeTensorMode():
        a = _fake_args(torch.float16)
        gm = make_fx(step)(a["logits"], a["W"], a["y"], a["sa"])
    assert "noprop_cuda.local_loss" in gm.code


# --- on a GPU: numerics against the float64 eager reference -------------------------------------

SHAPES = [(K, B, m, d) for K in (1, 10) for B in (1, 7, 128, 1000) for m in (10, 100) for d in (10, 20, 784)]


def _case(K, B, m, d, dtype, per_sample, device):
    g = torch.Generator(device="cpu").manual_seed(K * 7919 + B * 31 + m * 7 + d)
    cpu = dict(W=torch.randn(m, d, generator=g), y=torch.randint(0, m, (B,), generator=g),
               logits=torch.randn(K, B, m, generator=g) * 3, gz=torch.randn(K, B, d, generator=g),
               gl=torch.rand(K, generator=g) + 0.5,
               sa=torch.rand((K, B) if per_sample else (K,), generator=g),
               weight=torch.rand((K, B) if per_sample else (K,), generator=g) + 0.1)
    cpu["s1m"] = (1 - cpu["sa"] ** 2).sqrt()
    low = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and k in ("W", "logits", "gz") else
               v.to(device)) for k, v in cpu.items()}
    ref = {k: (v.to(device=device, dtype=torch.float64) if v.is_floating_point() else v.to(device))
           for k, v in low.items()}
    seed = torch.tensor([1234567890123 + B], device=device, dtype=torch.long)
    return low, ref, seed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,m,d", SHAPES)
def test_noise_inject_matches_reference(gpu, dtype, K, B, m, d):
    per_sample = (B + d) % 2 == 1  # both coefficient layouts over the grid
    x, r, seed = _case(K, B, m, d, dtype, per_sample, gpu)
    args = lambda t: (t["W"], t["y"], t["sa"], t["s1m"], seed)  # noqa: E731
    assert_error_rule(cuda_ext.noise_inject(*args(x)), eager.noise_inject(*args(x)), eager.noise_inject(*args(r)),
                      "z", who="cuda")
    got = cuda_ext.noise_inject_backward(x["gz"], *args(x))
    same = eager.noise_inject_backward(x["gz"], *args(x))
    ref = eager.noise_inject_backward(r["gz"].to(torch.float64), *args(r))
    for name, g_, s_, r_ in zip(("dW", "d_sqrt_abar", "d_sqrt_one_minus_abar"), got, same, ref):
        assert g_.shape == s_.shape and g_.dtype == s_.dtype
        assert_error_rule(g_, s_, r_, name, who="cuda")


def _check_local_loss(x, r, args):
    """local_loss and its backward: the extension on the case's inputs x against eager on x (same
    dtype) and on r (float64), by the error rule. args(t) -> the op's arguments after grad_loss."""
    got = cuda_ext.local_loss(*args(x))
    assert got.dtype == torch.float32 and got.shape == (x["logits"].shape[0],)
    assert_error_rule(got, eager.local_loss(*args(x)), eager.local_loss(*args(r)), "loss", who="cuda")
    got = cuda_ext.local_loss_backward(x["gl"], *args(x))
    same = eager.local_loss_backward(x["gl"], *args(x))
    ref = eager.local_loss_backward(r["gl"], *args(r))
    for name, g_, s_, r_ in zip(("dlogits", "dW", "dweight"), got, same, ref):
        assert g_.shape == s_.shape and g_.dtype == s_.dtype
        assert_error_rule(g_, s_, r_, name, who="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,m,d", SHAPES)
def test_local_loss_matches_reference(gpu, dtype, K, B, m, d):
    per_sample = (B + m) % 2 == 1
    x, r, _ = _case(K, B, m, d, dtype, per_sample, gpu)
    _check_local_loss(x, r, lambda t: (t["logits"], t["W"], t["y"], t["weight"]))


# The forward's tiled kernel takes m <= 256 classes (in chunks of 32); more go to the per-row kernel.
# [K] and [K, B] weights, with and without the offset; (3, 41, 33, 257): a class chunk of 1, d past 2 tiles.
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("softmax", (False, True), ids=["identity", "softmax"])
@pytest.mark.parametrize("K,B,m,d,per_sample", [(2, 7, 256, 20, True), (2, 7, 257, 20, False), (1, 33, 300, 130, True),
                                                 (3, 41, 33, 257, False)])
@pytest.mark.parametrize("offset", (False, True), ids=["no-offset", "offset"])
def test_local_loss_with_many_classes_matches_reference(gpu, dtype, softmax, K, B, m, d, per_sample, offset):
    x, r, _ = _case(K, B, m, d, dtype, per_sample, gpu)
    _check_local_loss(x, r, lambda t: (t["logits"], t["W"], t["y"], t["weight"], t["gz"][0] if offset else None,
                                       softmax))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,m,d", [(B, m, d) for B in (1, 7, 128, 1000) for m in (10, 100) for d in (10, 20, 784)])
@pytest.mark.parametrize("sqrt_c", (0.0, 0.3))
def test_denoise_step_matches_reference(gpu, dtype, B, m, d, sqrt_c):
    x, r, seed = _case(1, B, m, d, dtype, False, gpu)
    z_prev = x["gz"][0]
    args = lambda t, zp: (t["logits"][0], t["W"], zp, 0.7, 0.6, sqrt_c, seed)  # noqa: E731
    got = cuda_ext.denoise_step(*args(x, z_prev))
    assert got.dtype == dtype and got.shape == (B, d)
    assert_error_rule(got, eager.denoise_step(*args(x, z_prev)), eager.denoise_step(*args(r, z_prev.double())),
                      "z_next", who="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softmax", (False, True), ids=["identity", "softmax"])
@pytest.mark.parametrize("K,B,m,d", [(1, 1, 10, 10), (1, 1000, 10, 20), (10, 7, 100, 784), (1, 128, 100, 20)])
def test_local_loss_with_offset_and_without_softmax_matches_reference(gpu, dtype, softmax, K, B, m, d):
    # NoProp-FM's loss is the identity variant with offset = z_0; here offset is the [K=0] row of gz.
    x, r, _ = _case(K, B, m, d, dtype, True, gpu)
    _check_local_loss(x, r, lambda t: (t["logits"], t["W"], t["y"], t["weight"], t["gz"][0], softmax))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,m,d", [(1, 10, 10), (7, 100, 20), (1000, 10, 784)])
def test_denoise_step_without_softmax_is_the_euler_step(gpu, dtype, B, m, d):
    x, r, seed = _case(1, B, m, d, dtype, False, gpu)
    z_prev = x["gz"][0]
    args = lambda t, zp: (t["logits"][0], t["W"], zp, 1 / 7, 1.0, 0.0, seed, False)  # noqa: E731
    got = cuda_ext.denoise_step(*args(x, z_prev))
    assert_error_rule(got, eager.denoise_step(*args(x, z_prev)), eager.denoise_step(*args(r, z_prev.double())),
                      "z_next", who="cuda")


def test_mixed_dtypes_follow_eager(gpu):
    x, r, seed = _case(3, 33, 10, 20, torch.bfloat16, True, gpu)
    weight = x["weight"].half()
    got = cuda_ext.local_loss_backward(x["gl"], x["logits"], x["W"].float(), x["y"].int(), weight)
    same = eager.local_loss_backward(x["gl"], x["logits"], x["W"].float(), x["y"].int(), weight)
    for g_, s_ in zip(got, same):
        assert g_.dtype == s_.dtype and g_.shape == s_.shape


# dW is reduced per class in a fixed order (noise_inject.cu: per-chunk bins, then the chunks in
# order), never with atomics. (11, 4096, 10, 784): the benchmark's shape, ~410 rows per class;
# (4, 2048, 1, 33): every row into one class row; (3, 300, 100, 4099): 129 column tiles and 4 class
# tiles; (2, 999, 37, 5): uneven class tiles (19 + 18) and 51 row groups that do not divide 256.
BIG_BACKWARD_SHAPES = [(11, 4096, 10, 784), (4, 2048, 1, 33), (3, 300, 100, 4099), (2, 999, 37, 5)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("K,B,m,d", BIG_BACKWARD_SHAPES)
def test_noise_inject_backward_is_bitwise_deterministic_and_meets_the_rule(gpu, dtype, K, B, m, d):
    x, r, seed = _case(K, B, m, d, dtype, (B + d) % 2 == 1, gpu)
    args = lambda t: (t["W"], t["y"], t["sa"], t["s1m"], seed)  # noqa: E731
    first = cuda_ext.noise_inject_backward(x["gz"], *args(x))
    for _ in range(4):  # float atomics would reorder the additions from one call to the next
        again = cuda_ext.noise_inject_backward(x["gz"], *args(x))
        for name, a, b in zip(("dW", "d_sqrt_abar", "d_sqrt_one_minus_abar"), first, again):
            assert torch.equal(a, b), f"{name} differs between two calls on the same inputs"
    same = eager.noise_inject_backward(x["gz"], *args(x))
    ref = eager.noise_inject_backward(r["gz"].to(torch.float64), *args(r))
    for name, g_, s_, r_ in zip(("dW", "d_sqrt_abar", "d_sqrt_one_minus_abar"), first, same, ref):
        assert_error_rule(g_, s_, r_, name, who="cuda")


@pytest.mark.parametrize("K,B,m,d", [(11, 4096, 10, 784), (3, 300, 100, 4099)])
def test_noise_inject_backward_dW_is_full_float32_whatever_the_matmul_precision(gpu, K, B, m, d):
    # "high" lets float32 matmuls run in TF32 (10-bit mantissas): dW must not change with it.
    x, _, seed = _case(K, B, m, d, torch.float32, False, gpu)
    args = (x["gz"], x["W"], x["y"], x["sa"], x["s1m"], seed)
    full, tf32_allowed = _at_matmul_precisions(lambda: cuda_ext.noise_inject_backward(*args), "highest", "high")
    for a, b in zip(full, tf32_allowed):
        assert torch.equal(a, b)


def _at_matmul_precisions(call, *precisions):
    """call()'s result under each float32 matmul precision in turn (the global setting restored)."""
    before = torch.get_float32_matmul_precision()
    out = []
    try:
        for precision in precisions:
            torch.set_float32_matmul_precision(precision)
            out.append(call())
    finally:
        torch.set_float32_matmul_precision(before)
    return out


# local_loss's dW = qᵀ · gr (ordered_sum.cu): per-chunk FMA chains over the rows in order, then the
# chunks in order, never a GEMM or atomics. (11, 4096, 10, 784): 164 chunks of 275 rows;
# (3, 300, 100, 4099): 129 column tiles, 4 class tiles; (2, 999, 37, 5): 5-column tiles with all 37
# classes in one; (2, 500, 300, 10): 5 class tiles of 60 (small d takes up to 64 classes per block).
LOCAL_LOSS_DW_SHAPES = [(11, 4096, 10, 784), (3, 300, 100, 4099), (2, 999, 37, 5), (2, 500, 300, 10)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("K,B,m,d", LOCAL_LOSS_DW_SHAPES)
def test_local_loss_backward_is_bitwise_deterministic_and_meets_the_rule(gpu, dtype, K, B, m, d):
    x, r, _ = _case(K, B, m, d, dtype, (B + m) % 2 == 1, gpu)
    args = lambda t: (t["logits"], t["W"], t["y"], t["weight"])  # noqa: E731
    first = cuda_ext.local_loss_backward(x["gl"], *args(x))
    for _ in range(4):
        again = cuda_ext.local_loss_backward(x["gl"], *args(x))
        for name, a, b in zip(("dlogits", "dW", "dweight"), first, again):
            assert torch.equal(a, b), f"{name} differs between two calls on the same inputs"
    same = eager.local_loss_backward(x["gl"], *args(x))
    ref = eager.local_loss_backward(r["gl"], *args(r))
    for name, g_, s_, r_ in zip(("dlogits", "dW", "dweight"), first, same, ref):
        assert_error_rule(g_, s_, r_, name, who="cuda")


@pytest.mark.parametrize("softmax", (False, True), ids=["identity", "softmax"])
@pytest.mark.parametrize("K,B,m,d", [(11, 4096, 10, 784), (3, 300, 100, 4099)])
def test_local_loss_backward_dW_is_full_float32_whatever_the_matmul_precision(gpu, softmax, K, B, m, d):
    # "high" lets float32 matmuls run in TF32 (10-bit mantissas): a cuBLAS dW changed with it.
    x, _, _ = _case(K, B, m, d, torch.float32, False, gpu)
    args = (x["gl"], x["logits"], x["W"], x["y"], x["weight"], x["gz"][0], softmax)
    full, tf32_allowed, tf32_again = _at_matmul_precisions(lambda: cuda_ext.local_loss_backward(*args),
                                                           "highest", "high", "high")
    for name, a, b, c in zip(("dlogits", "dW", "dweight"), full, tf32_allowed, tf32_again):
        assert torch.equal(a, b) and torch.equal(b, c), name


# d % 4 != 0 (a masked tail quad per row: 1, 5, 10, 261) and d % 4 == 0 (the 4-wide vector path).
# The forward gives each thread a run of blocks k; (10, 170, 784) has B·Q = 33,320 threads' worth of
# quads, so K = 10 is split into runs of 3, 3, 3 and 1 (noise_inject.cu, k_per_thread_for).
# (10, 170, 783) does the same with the masked tail quad, and (10, 1000, 784) keeps all K in one run.
@pytest.mark.parametrize("shape", [(1, 1, 10), (10, 7, 784), (3, 1000, 20), (3, 17, 1), (2, 9, 5), (2, 33, 261),
                                   (10, 170, 784), (10, 170, 783), (10, 1000, 784)])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "W-offset"])
def test_noise_identical_to_eager_philox(gpu, shape, aligned):
    K, B, d = shape
    # W offset by one element: not 16-byte aligned, so even d % 4 == 0 takes the scalar path.
    W = torch.zeros(10 * d + 1, device=gpu)[(0 if aligned else 1):][:10 * d].view(10, d)
    y = torch.randint(0, 10, (B,), device=gpu)
    seed = torch.tensor([2**40 + 12345], device=gpu, dtype=torch.long)
    zero, one = torch.zeros(K, device=gpu), torch.ones(K, device=gpu)
    eps_cuda = cuda_ext.noise_inject(W, y, zero, one, seed)
    eps_ref = eager.noise(seed, K, B, d, torch.float32, gpu)
    assert (eps_cuda - eps_ref).abs().max().item() <= 1e-5
    eps64 = eager.noise(seed, K, B, d, torch.float64, gpu)
    assert (eps_cuda.double() - eps64).abs().max().item() <= 1e-5
    # The backward regenerates that very ε: d_sqrt_one_minus_abar[k, b] = Σ_j g·ε.
    g = torch.randn(K, B, d, device=gpu)
    per_sample = torch.ones(K, B, device=gpu)
    _, _, d_s1m = cuda_ext.noise_inject_backward(g, W, y, per_sample, per_sample, seed)
    torch.testing.assert_close(d_s1m.double(), (g.double() * eps64).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,d", [(1, 1), (7, 3), (33, 37), (5, 784)])
def test_denoise_step_noise_identical_to_eager_philox(gpu, B, d):
    seed = torch.tensor([2**40 + 777], device=gpu, dtype=torch.long)
    logits, W = torch.randn(B, 10, device=gpu), torch.randn(10, d, device=gpu)
    eps = cuda_ext.denoise_step(logits, W, torch.zeros(B, d, device=gpu), 0.0, 0.0, 1.0, seed)
    assert (eps.double() - eager.noise(seed, 1, B, d, torch.float64, gpu)[0]).abs().max().item() <= 1e-5


def test_same_seed_same_noise_new_seed_new_noise(gpu):
    W = torch.randn(10, 20, device=gpu)
    y = torch.randint(0, 10, (64,), device=gpu)
    sa, s1m = torch.full((4,), 0.6, device=gpu), torch.full((4,), 0.8, device=gpu)
    s = torch.tensor([77], device=gpu, dtype=torch.long)
    a, b = cuda_ext.noise_inject(W, y, sa, s1m, s), cuda_ext.noise_inject(W, y, sa, s1m, s.clone())
    assert torch.equal(a, b)
    assert not torch.equal(a, cuda_ext.noise_inject(W, y, sa, s1m, s + 1))


def test_out_of_range_labels_are_clamped_not_read_out_of_bounds(gpu):
    W = torch.randn(10, 8, device=gpu)
    bad = torch.tensor([-5, 3, 1000], device=gpu)
    clamped = bad.clamp(0, 9)
    one, zero = torch.ones(2, device=gpu), torch.zeros(2, device=gpu)
    seed = torch.zeros(1, device=gpu, dtype=torch.long)
    assert torch.equal(cuda_ext.noise_inject(W, bad, one, zero, seed), cuda_ext.noise_inject(W, clamped, one, zero, seed))
    logits = torch.randn(2, 3, 10, device=gpu)
    assert torch.equal(cuda_ext.local_loss(logits, W, bad, one), cuda_ext.local_loss(logits, W, clamped, one))
    torch.cuda.synchronize()


def test_float64_is_refused_with_a_clear_message(gpu):
    W = torch.randn(4, 3, device=gpu, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.noprop_cuda.noise_inject(W, torch.zeros(2, dtype=torch.long, device=gpu), torch.ones(1, device=gpu),
                                          torch.ones(1, device=gpu), torch.zeros(1, dtype=torch.long, device=gpu))


def test_backend_cuda_routes_noprop_ops_to_the_extension(gpu):
    W = torch.randn(10, 20, device=gpu)
    y = torch.randint(0, 10, (33,), device=gpu)
    sa, s1m = torch.rand(4, device=gpu), torch.rand(4, device=gpu)
    seed = torch.tensor([5], device=gpu, dtype=torch.long)
    logits, weight = torch.randn(4, 33, 10, device=gpu), torch.rand(4, device=gpu)
    with dispatch.use_backend("cuda"):
        assert dispatch.backend_name(gpu) == "cuda"
        assert torch.equal(public_noise_inject(W, y, sa, s1m, seed),
                           torch.ops.noprop_cuda.noise_inject(W, y, sa, s1m, seed))
        assert torch.equal(torch.ops.noprop.local_loss(logits, W, y, weight),
                           torch.ops.noprop_cuda.local_loss(logits, W, y, weight))


def test_auto_backend_sends_float64_to_eager_not_to_the_extension(gpu):
    W = torch.randn(10, 20, device=gpu, dtype=torch.float64)
    y = torch.randint(0, 10, (5,), device=gpu)
    seed = torch.tensor([5], device=gpu, dtype=torch.long)
    ones = torch.ones(2, device=gpu, dtype=torch.float64)
    with dispatch.use_backend("auto"):
        z = public_noise_inject(W, y, ones, ones, seed)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, eager.noise_inject(W, y, ones, ones, seed))


def test_autograd_through_noprop_ops_on_cuda_backend(gpu):
    W = torch.randn(10, 20, device=gpu, requires_grad=True)
    logits = torch.randn(3, 17, 10, device=gpu, requires_grad=True)
    y = torch.randint(0, 10, (17,), device=gpu)
    weight = torch.rand(3, 17, device=gpu, requires_grad=True)
    grads = {}
    for backend in ("cuda", "eager"):
        with dispatch.use_backend(backend):
            loss = torch.ops.noprop.local_loss(logits, W, y, weight).sum()
            grads[backend] = torch.autograd.grad(loss, (logits, W, weight))
    for a, b in zip(grads["cuda"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck(gpu):
    W = torch.randn(10, 20, device=gpu)
    y = torch.randint(0, 10, (9,), device=gpu)
    sa, s1m = torch.rand(2, 9, device=gpu), torch.rand(2, device=gpu)
    seed = torch.tensor([3], device=gpu, dtype=torch.long)
    logits = torch.randn(2, 9, 10, device=gpu)
    ops = torch.ops.noprop_cuda
    cases = [(ops.noise_inject.default, (W, y, sa, s1m, seed)),
             (ops.noise_inject_backward.default, (torch.randn(2, 9, 20, device=gpu), W, y, sa, s1m, seed)),
             (ops.local_loss.default, (logits, W, y, sa)),
             (ops.local_loss_backward.default, (torch.rand(2, device=gpu), logits, W, y, sa)),
             (ops.local_loss.default, (logits, W, y, sa, torch.randn(9, 20, device=gpu), False)),
             (ops.local_loss_backward.default, (torch.rand(2, device=gpu), logits, W, y, sa,
                                                torch.randn(9, 20, device=gpu), False)),
             (ops.denoise_step.default, (logits[0], W, torch.randn(9, 20, device=gpu), 0.5, 0.5, 0.1, seed)),
             (ops.denoise_step.default, (logits[0], W, torch.randn(9, 20, device=gpu), 0.5, 1.0, 0.0, seed, False))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_cuda_graph_replay_draws_fresh_noise(gpu):
    W = torch.randn(10, 20, device=gpu)
    y = torch.randint(0, 10, (16,), device=gpu)
    sa, s1m = torch.full((2,), 0.6, device=gpu), torch.full((2,), 0.8, device=gpu)
    seed_out = torch.empty(1, device=gpu, dtype=torch.long)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        cuda_ext.noise_inject(W, y, sa, s1m, new_seed(gpu))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed = new_seed(gpu)
        seed_out.copy_(seed)
        z = cuda_ext.noise_inject(W, y, sa, s1m, seed)
    outs, seeds = [], []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(z.clone())
        seeds.append(seed_out.clone())
    assert not torch.equal(outs[0], outs[1])
    for out, s in zip(outs, seeds):
        torch.testing.assert_close(out, eager.noise_inject(W, y, sa, s1m, s), rtol=1e-5, atol=1e-5)

"""The noise stream (noprop/ops/philox.py) that every backend draws: the eager emulation against
Triton's own `tl.randn4x` (interpreted on CPU, compiled on a GPU), the element -> (counter, lane)
mapping, and the distribution.

Mapping: a noise tensor is rows x d; element (r, j) is lane j % 4 of randn4x(seed, r·⌈d/4⌉ + j // 4).
"""
import pytest
import torch
import triton
import triton.language as tl

from noprop import dispatch, ops
from noprop.kernels.triton._launch import on_device
from noprop.ops import eager
from noprop.ops.philox import philox_randn, philox_randn4x, philox_uint32x4, quads, uint_to_unit

SEEDS = (0, 12345, 2**40 + 12345, 2**62 - 1)  # the last ones exercise the key's high word


@pytest.fixture(autouse=True)
def _setup(one_torch_thread, triton_device):
    yield  # one torch thread; tensors on the device the kernels run on (see conftest)


@triton.jit
def _triton_philox(seed_ptr, c_ptr, x_ptr, u_ptr, n_ptr, N, BLOCK: tl.constexpr):
    # Triton's own generator on a list of counters: randint4x (bits), rand4x (uniforms), randn4x.
    i = tl.arange(0, BLOCK)
    ok = i < N
    c = tl.load(c_ptr + i, mask=ok, other=0)
    seed = tl.load(seed_ptr)
    x0, x1, x2, x3 = tl.randint4x(seed, c)
    u0, u1, u2, u3 = tl.rand4x(seed, c)
    n0, n1, n2, n3 = tl.randn4x(seed, c)
    tl.store(x_ptr + i * 4, x0.to(tl.int32, bitcast=True), mask=ok)
    tl.store(x_ptr + i * 4 + 1, x1.to(tl.int32, bitcast=True), mask=ok)
    tl.store(x_ptr + i * 4 + 2, x2.to(tl.int32, bitcast=True), mask=ok)
    tl.store(x_ptr + i * 4 + 3, x3.to(tl.int32, bitcast=True), mask=ok)
    tl.store(u_ptr + i * 4, u0, mask=ok)
    tl.store(u_ptr + i * 4 + 1, u1, mask=ok)
    tl.store(u_ptr + i * 4 + 2, u2, mask=ok)
    tl.store(u_ptr + i * 4 + 3, u3, mask=ok)
    tl.store(n_ptr + i * 4, n0, mask=ok)
    tl.store(n_ptr + i * 4 + 1, n1, mask=ok)
    tl.store(n_ptr + i * 4 + 2, n2, mask=ok)
    tl.store(n_ptr + i * 4 + 3, n3, mask=ok)


def _triton_randn4x(seed: torch.Tensor, counters: torch.Tensor):
    """(bits int64 [N, 4] in [0, 2**32), uniforms [N, 4], normals [N, 4]) from Triton itself."""
    N = counters.numel()
    x = torch.empty(N, 4, dtype=torch.int32)
    u = torch.empty(N, 4)
    n = torch.empty(N, 4)
    with on_device(seed):
        _triton_philox[(1,)](seed, counters, x, u, n, N, BLOCK=triton.next_power_of_2(max(N, 16)))
    return x.to(torch.int64) & 0xFFFFFFFF, u, n


def _counters(n: int = 200) -> torch.Tensor:
    # Small counters, counters across the 32-bit boundary (the high counter word) and a large one.
    return torch.cat([torch.arange(n // 2), 2**32 - n // 4 + torch.arange(n // 2), torch.tensor([2**50 + 7])])


@pytest.mark.parametrize("seed", SEEDS)
def test_eager_emulation_is_tritons_randn4x(seed):
    seed = torch.tensor([seed])
    c = _counters()
    bits, uni, normal = _triton_randn4x(seed, c)
    mine = torch.stack(philox_uint32x4(seed, c), dim=-1)
    assert torch.equal(mine, bits)  # the Philox rounds: bit for bit
    assert torch.equal(uint_to_unit(mine, torch.float32), uni)  # the uniforms: bit for bit
    # Box-Muller: log/sqrt/cos/sin of torch vs Triton's (numpy's in the interpreter, libdevice on a
    # GPU) may differ in the last ulp or two; any mapping or lane-order mistake is O(1) off.
    torch.testing.assert_close(philox_randn4x(seed, c), normal, rtol=1e-6, atol=1e-6)
    # The float64 reference draws the same numbers, with less rounding.
    torch.testing.assert_close(philox_randn4x(seed, c, torch.float64), normal.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 4, 5, 10, 784])
def test_element_r_j_is_lane_j_mod_4_of_counter_r_q_plus_j_div_4(d):
    seed = torch.tensor([2**40 + 99])
    rows, q = 3, quads(d)
    assert q == -(-d // 4)
    _, _, lanes = _triton_randn4x(seed, torch.arange(rows * q))  # [rows·Q, 4], from Triton itself
    r = torch.arange(rows)[:, None]
    j = torch.arange(d)[None, :]
    want = lanes[r * q + j // 4, j % 4]  # [rows, d]
    eps = philox_randn(seed, (rows, d))
    torch.testing.assert_close(eps, want, rtol=1e-6, atol=1e-6)
    # Leading dimensions are flattened into rows: [K, B, d] is (K·B) x d.
    torch.testing.assert_close(philox_randn(seed, (1, rows, d))[0], eps, rtol=0, atol=0)
    # The ops: noise_inject's ε [K, B, d] (rows k·B + b) and denoise_step's [B, d], on the Triton backend.
    K, B = 3, 1
    W, y = torch.zeros(2, d), torch.zeros(B, dtype=torch.long)
    with dispatch.use_backend("triton"):
        got = ops.noise_inject(W, y, torch.zeros(K), torch.ones(K), seed)
        step = ops.denoise_step(torch.zeros(rows, 2), W, torch.zeros(rows, d), 0.0, 0.0, 1.0, seed=seed)
    torch.testing.assert_close(got.reshape(K * B, d), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eager.noise(seed, K, B, d, torch.float32, seed.device).reshape(K * B, d), want,
                               rtol=1e-6, atol=1e-6)


def test_distribution_per_lane_and_independence_of_neighbours():
    rows, d = 512, 37  # odd d: a tail quad in every row
    eps = philox_randn(torch.tensor([2024]), (rows, d), dtype=torch.float64)
    n = eps.numel()
    assert abs(eps.mean().item()) < 4 / n ** 0.5  # standard error of the mean: 1/sqrt(n)
    assert abs(eps.var().item() - 1) < 4 * (2 / (n - 1)) ** 0.5  # of the sample variance: sqrt(2/(n-1))
    for lane in range(4):  # cos and sin lanes, of both pairs, are each standard normal
        x = eps[:, lane::4]
        k = x.numel()
        assert abs(x.mean().item()) < 4 / k ** 0.5, lane
        assert abs(x.var().item() - 1) < 4 * (2 / (k - 1)) ** 0.5, lane
    # Neighbouring columns are uncorrelated (r·cos θ and r·sin θ are; a repeated draw would not be):
    # E[x_j x_{j+1}] = 0 with variance 1 per product (also for the dependent cos/sin pair: E[r^4]/8 = 1).
    for lag in (1, 2, 3, 4):
        prod = (eps[:, :-lag] * eps[:, lag:]).flatten()
        assert abs(prod.mean().item()) < 4 / prod.numel() ** 0.5, lag
    # Rows are not copies of each other, and no value repeats (quads, lanes and rows all differ).
    assert abs((eps[:-1] * eps[1:]).mean().item()) < 4 / ((rows - 1) * d) ** 0.5
    assert torch.unique(eps).numel() == n


def test_seed_key_uses_both_words():
    shape = (4, 10)
    base = philox_randn(torch.tensor([5]), shape)
    assert (philox_randn(torch.tensor([5 + 2**32]), shape) != base).float().mean() > 0.99
    assert (philox_randn(torch.tensor([6]), shape) != base).float().mean() > 0.99


_HOST_PROGRAM = r"""
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include "philox.cuh"
// argv: seed d counters... -> per counter: the four uint32 outputs and the four normals (%a: exact).
int main(int argc, char** argv) {
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  std::printf("%lld\n", static_cast<long long>(noprop_cuda::noise_quads(std::atoll(argv[2]))));
  for (int i = 3; i < argc; ++i) {
    const uint64_t c = std::strtoull(argv[i], nullptr, 10);
    uint32_t x[4];
    noprop_cuda::philox_4x32_10(seed, c, x);
    const noprop_cuda::Normal4 n = noprop_cuda::philox_normal4(seed, c);
    std::printf("%u %u %u %u %a %a %a %a\n", x[0], x[1], x[2], x[3], n.v[0], n.v[1], n.v[2], n.v[3]);
  }
  return 0;
}
"""


def test_cuda_header_host_path_matches_eager(tmp_path):
    # kernels/cuda/philox.cuh is host-and-device: its host build (std::log/cos/sin) against the spec.
    import pathlib
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    include = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "cuda"
    src, exe = tmp_path / "philox_host.cpp", tmp_path / "philox_host"
    src.write_text(_HOST_PROGRAM)
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{include}", str(src), "-o", str(exe)], check=True)
    seed, c = 2**40 + 12345, _counters(40).cpu()
    out = subprocess.run([str(exe), str(seed), "10", *map(str, c.tolist())], check=True, capture_output=True,
                         text=True).stdout.split("\n")
    assert int(out[0]) == quads(10) == 3
    rows = [line.split() for line in out[1:1 + c.numel()]]
    bits = torch.tensor([[int(v) for v in r[:4]] for r in rows], device="cpu")
    normal = torch.tensor([[float.fromhex(v) for v in r[4:]] for r in rows], device="cpu")
    s = torch.tensor([seed], device="cpu")
    assert torch.equal(torch.stack(philox_uint32x4(s, c), dim=-1), bits)
    torch.testing.assert_close(philox_randn4x(s, c), normal, rtol=1e-6, atol=1e-6)

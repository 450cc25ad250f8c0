// noprop_cuda::noise_inject and its backward (semantics: noprop/ops/eager.py).
//
// Noise: z [K, B, d] is K·B rows of d columns, each row Q = ceil(d/4) quads; ε[k, b, j] is lane
// j % 4 of philox_normal4(seed, (k·B + b)·Q + j / 4) (philox.cuh), so no noise is stored.
// Forward: one thread per (b, quad), looping over the blocks k (one Philox call for four columns;
// 4-wide vector loads/stores when d % 4 == 0 and W is aligned, masked scalar ones otherwise).
// Backward: one warp per row (k, b) for the coefficient gradients (lanes over quads, ε regenerated
// the same way), and for dW a reduction with no atomics, so that the same inputs give the same bits:
// h[b, j] = Σ_k sa·g[k, b, j] summed per class in shared-memory bins owned by one thread each, per
// chunk of the batch, then the chunks' partial sums added in chunk order (float32 FMAs throughout:
// no GEMM, so torch's TF32 matmul setting cannot touch it).
#include "common.cuh"
#include "ops.h"
#include "ordered_sum.cuh"

#include <algorithm>

namespace noprop_cuda {
namespace {

// One thread per (b, quad) and a run of blocks k: the label, the W[y_b] quad and the index
// arithmetic (64-bit divisions, dearer than a Philox round) are done once and reused for every k,
// as the Triton kernel reuses its W[y] tile. Consecutive threads take consecutive quads of a row, so
// the stores coalesce. k_per_thread < K splits the blocks over more threads when B·Q alone would
// leave the GPU idle (small B·d). VEC4: d % 4 == 0 and W 4-element aligned (z is fresh: aligned), so
// a quad is one vector access.
template <typename T, bool VEC4>
__global__ void noise_inject_kernel(const T* __restrict__ W, const int64_t* __restrict__ y,
                                    const float* __restrict__ sa, const float* __restrict__ s1m, bool sa_per_sample,
                                    bool s1m_per_sample, const int64_t* __restrict__ seed_ptr, T* __restrict__ z,
                                    int64_t K, int64_t B, int64_t d, int64_t m, int64_t k_per_thread) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t Q = noise_quads(d);
  const int64_t n_bq = B * Q;
  const int64_t n_work = n_bq * ceil_div(K, k_per_thread);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_work; v += stride) {
    const int64_t run = v / n_bq;
    const int64_t bq = v - run * n_bq;
    const int64_t b = bq / Q;
    const int64_t q = bq - b * Q;
    const int64_t j0 = 4 * q;
    const T* w = W + safe_label(y, b, m) * d + j0;
    float u[4];
    if constexpr (VEC4) {
      const Vec<T, 4> wv = *reinterpret_cast<const Vec<T, 4>*>(w);
#pragma unroll
      for (int t = 0; t < 4; ++t) u[t] = to_f32(wv.v[t]);
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) u[t] = j0 + t < d ? to_f32(w[t]) : 0.f;
    }
    const int64_t k_end = (run + 1) * k_per_thread < K ? (run + 1) * k_per_thread : K;
    for (int64_t k = run * k_per_thread; k < k_end; ++k) {
      const int64_t row = k * B + b;
      const float a = sa[sa_per_sample ? row : k];
      const float s = s1m[s1m_per_sample ? row : k];
      const Normal4 eps = philox_normal4(seed, static_cast<uint64_t>(row * Q + q));  // the quad's counter
      T* out = z + row * d + j0;
      if constexpr (VEC4) {
        Vec<T, 4> o;
#pragma unroll
        for (int t = 0; t < 4; ++t) o.v[t] = from_f32<T>(a * u[t] + s * eps.v[t]);
        *reinterpret_cast<Vec<T, 4>*>(out) = o;
      } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (j0 + t < d) out[t] = from_f32<T>(a * u[t] + s * eps.v[t]);
        }
      }
    }
  }
}

// Blocks k per thread for the forward: all K when B·Q threads fill the GPU, fewer (more threads)
// when they do not. 2^17 threads is about half of what an H100 keeps resident (132 SMs x 2048).
int64_t k_per_thread_for(int64_t K, int64_t n_bq) {
  constexpr int64_t kTargetThreads = int64_t{1} << 17;
  const int64_t runs = std::min(K, std::max<int64_t>(1, ceil_div(kTargetThreads, n_bq)));
  return ceil_div(K, runs);
}

// d_sa_rows[k·B + b] = Σ_j g·W[y_b, j];  d_s1m_rows[k·B + b] = Σ_j g·ε  ([K, B], float64).
// Accumulated and returned in float64: these are dot products that cancel (a coefficient's gradient
// is near 0 when g is unrelated to W[y] or ε) and, for [K] coefficients, B·d-term sums; a float32
// lane-then-warp order lost to torch's float32 reductions by up to 15x on an H100 (B·d = 784,000).
// float64 FMAs cost nothing here: the kernel waits on memory and the Philox rounds.
template <typename G>
__global__ void noise_inject_coef_grad_kernel(const G* __restrict__ gz, const float* __restrict__ W,
                                              const int64_t* __restrict__ y, const int64_t* __restrict__ seed_ptr,
                                              double* __restrict__ d_sa_rows, double* __restrict__ d_s1m_rows,
                                              int64_t K, int64_t B, int64_t d, int64_t m) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t n_rows = K * B;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarp; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t b = row % B;
    const float* u = W + safe_label(y, b, m) * d;
    const G* g = gz + row * d;
    const int64_t Q = noise_quads(d);
    double acc_u = 0.0, acc_e = 0.0;
    for (int64_t q = lane; q < Q; q += kWarp) {  // the forward's quads: one Philox call per 4 columns
      const Normal4 eps = philox_normal4(seed, static_cast<uint64_t>(row * Q + q));
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t j = 4 * q + t;
        if (j < d) {
          const double gj = to_f32(g[j]);
          acc_u += gj * static_cast<double>(u[j]);
          acc_e += gj * static_cast<double>(eps.v[t]);
        }
      }
    }
    acc_u = warp_sum(acc_u);
    acc_e = warp_sum(acc_e);
    if (lane == 0) {
      d_sa_rows[row] = acc_u;
      d_s1m_rows[row] = acc_e;
    }
  }
}

constexpr int kThreads = 256;

// dW without atomics, in a fixed order. The thread block has tile_cols column lanes times
// groups = kThreads / tile_cols row groups (tile_cols = min(d, 32): a warp reads 32 neighbouring
// columns of a row, or several whole short rows). Block (column tile, class tile, chunk) walks the
// batch rows of its chunk, row group r taking rows r, r + groups, ... in increasing order; for a row
// whose label lies in its class tile a thread forms h = Σ_k sa·g[k, b, j] (k increasing) and adds
// it to its own bin [r][class][lane] in shared memory (no other thread touches that bin: no race).
// The bins are then summed over r in increasing order into partial[chunk, class, j]. Rows of other
// classes are skipped, so grad_z is read once whatever the number of class tiles.
// Shared memory: groups · class_tile · tile_cols floats <= kThreads · kMaxClassTile (32 KiB).
constexpr int kMaxClassTile = 32;
// Blocks aimed for: about four times what an H100 keeps resident (132 SMs x 6 to 8 blocks of 256
// threads), so the last wave's tail is short. Not read from the device: the summation order (and so
// every bit of dW) depends on the shapes alone.
constexpr int64_t kTargetBlocks = 4096;

// h = Σ_k s[k·s_step] · g[k·n] in increasing k (float32 FMAs). Four k at a time, their loads issued
// before their FMAs: in a plain loop the compiler puts each FMA right after its two loads, and the
// warp then waits on every pair in turn (sm_90 SASS).
template <typename G>
__device__ __forceinline__ float sum_over_k(const G* __restrict__ g, int64_t n, const float* __restrict__ s,
                                            int64_t s_step, int64_t K) {
  float h = 0.f;
  int64_t k = 0;
#pragma unroll 1
  for (; k + 4 <= K; k += 4, g += 4 * n, s += 4 * s_step) {
    float gv[4], sv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      gv[u] = to_f32(g[u * n]);
      sv[u] = s[u * s_step];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) h += sv[u] * gv[u];
  }
#pragma unroll 1
  for (; k < K; ++k, g += n, s += s_step) h += *s * to_f32(*g);
  return h;
}

template <typename G>
__global__ void __launch_bounds__(kThreads)
    noise_inject_dW_partial_kernel(const G* __restrict__ gz, const float* __restrict__ sa, bool sa_per_sample,
                                   const int64_t* __restrict__ y, float* __restrict__ partial, int64_t K, int64_t B,
                                   int64_t d, int64_t m, int tile_cols, int class_tile, int64_t chunk_rows) {
  extern __shared__ float bins[];  // [groups][class_tile][tile_cols]
  const int groups = kThreads / tile_cols;
  const int lane = threadIdx.x % tile_cols;
  const int group = threadIdx.x / tile_cols;  // == groups for the few threads left over (idle)
  const int64_t j = static_cast<int64_t>(blockIdx.x) * tile_cols + lane;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * class_tile;
  const int64_t chunk = blockIdx.z;
  const int64_t b_end = chunk * chunk_rows + chunk_rows < B ? chunk * chunk_rows + chunk_rows : B;
  const int64_t n = B * d;  // grad_z's stride over k
  const int64_t s_step = sa_per_sample ? B : 1;
  if (group < groups) {
    float* own = bins + static_cast<int64_t>(group) * class_tile * tile_cols + lane;
#pragma unroll 4
    for (int c = 0; c < class_tile; ++c) own[c * tile_cols] = 0.f;
    if (j < d) {
      for (int64_t b = chunk * chunk_rows + group; b < b_end; b += groups) {
        const int64_t c = safe_label(y, b, m) - c0;
        if (c < 0 || c >= class_tile) continue;
        own[c * tile_cols] += sum_over_k(gz + b * d + j, n, sa + (sa_per_sample ? b : 0), s_step, K);
      }
    }
  }
  __syncthreads();
  const int64_t cols = d - static_cast<int64_t>(blockIdx.x) * tile_cols < tile_cols
                           ? d - static_cast<int64_t>(blockIdx.x) * tile_cols
                           : tile_cols;
  const int64_t classes = m - c0 < class_tile ? m - c0 : class_tile;
  for (int slot = threadIdx.x; slot < class_tile * tile_cols; slot += kThreads) {
    const int c = slot / tile_cols, col = slot - c * tile_cols;
    if (c >= classes || col >= cols) continue;
    float acc = 0.f;
    for (int r = 0; r < groups; ++r) acc += bins[(r * class_tile + c) * tile_cols + col];
    partial[(chunk * m + c0 + c) * d + static_cast<int64_t>(blockIdx.x) * tile_cols + col] = acc;
  }
}

// Launch geometry of the dW reduction (noise_inject_dW_partial_kernel).
struct DWPlan {
  int tile_cols, class_tile;
  int64_t col_tiles, class_tiles, chunks, chunk_rows;
  size_t smem_bytes;
};

// Chunks of the batch: enough blocks to fill the GPU, but no more than kMaxChunks, a workspace
// [chunks, m, d] of at most a quarter of grad_z, and about 4 rows per row group (below that the
// bins' zeroing and summing outweigh the rows).
DWPlan plan_dW(int64_t K, int64_t B, int64_t d, int64_t m) {
  DWPlan p{};
  p.tile_cols = static_cast<int>(d < kWarp ? d : kWarp);
  const int64_t groups = kThreads / p.tile_cols;
  p.class_tiles = ceil_div(m, kMaxClassTile);
  p.class_tile = static_cast<int>(ceil_div(m, p.class_tiles));  // balanced tiles of <= 32 classes
  p.col_tiles = ceil_div(d, p.tile_cols);
  int64_t chunks = ceil_div(kTargetBlocks, p.col_tiles * p.class_tiles);
  chunks = std::min({chunks, kMaxChunks, std::max<int64_t>(1, K * B / (4 * m)),
                     std::max<int64_t>(1, B / (4 * groups))});
  p.chunk_rows = ceil_div(B, chunks);
  p.chunks = ceil_div(B, p.chunk_rows);  // none empty
  p.smem_bytes = static_cast<size_t>(groups) * p.class_tile * p.tile_cols * sizeof(float);
  return p;
}

}  // namespace

at::Tensor noise_inject(const at::Tensor& W_in, const at::Tensor& y_in, const at::Tensor& sqrt_abar,
                        const at::Tensor& sqrt_one_minus_abar, const at::Tensor& seed) {
  constexpr const char* op = "noprop_cuda::noise_inject";
  check_cuda_float(W_in, op, "W", 2);
  TORCH_CHECK(W_in.size(0) > 0, op, ": W has no rows (m = 0 classes)");
  const int64_t B = y_in.numel();
  TORCH_CHECK(B > 0, op, ": labels y is empty (B = 0)");
  check_labels(y_in, op, B);
  check_seed(seed, op);
  check_same_device(op, {&W_in, &y_in, &sqrt_abar, &sqrt_one_minus_abar, &seed});
  TORCH_CHECK((sqrt_abar.dim() == 1 || sqrt_abar.dim() == 2) && sqrt_abar.size(0) > 0, op,
              ": sqrt_abar must be [K] or [K, B] with K >= 1, got shape ", sqrt_abar.sizes());
  const int64_t K = sqrt_abar.size(0);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const at::Tensor sa = coefficient_f32(sqrt_abar, op, "sqrt_abar", K, B);
  const at::Tensor s1m = coefficient_f32(sqrt_one_minus_abar, op, "sqrt_one_minus_abar", K, B);
  const at::Tensor W = W_in.contiguous();
  const at::Tensor y = y_in.to(at::kLong).contiguous();
  const int64_t m = W.size(0), d = W.size(1);
  at::Tensor z = at::empty({K, B, d}, W.options());
  if (z.numel() == 0) return z;
  const auto stream = at::cuda::getCurrentCUDAStream();
  NOPROP_DISPATCH_FLOAT(W.scalar_type(), "noprop_cuda::noise_inject", [&] {
    const bool vec4 = d % 4 == 0 && aligned_to(W.data_ptr(), 4 * sizeof(scalar_t));  // z is fresh: aligned
    const int64_t n_bq = B * noise_quads(d);
    const int64_t k_per_thread = k_per_thread_for(K, n_bq);
    const unsigned grid = grid_for(n_bq * ceil_div(K, k_per_thread), kThreads);
    if (vec4) {
      noise_inject_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          W.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), sa.data_ptr<float>(), s1m.data_ptr<float>(), sa.dim() == 2,
          s1m.dim() == 2, seed.data_ptr<int64_t>(), z.data_ptr<scalar_t>(), K, B, d, m, k_per_thread);
    } else {
      noise_inject_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          W.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), sa.data_ptr<float>(), s1m.data_ptr<float>(), sa.dim() == 2,
          s1m.dim() == 2, seed.data_ptr<int64_t>(), z.data_ptr<scalar_t>(), K, B, d, m, k_per_thread);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_inject_backward(
    const at::Tensor& grad_z_in, const at::Tensor& W_in, const at::Tensor& y_in, const at::Tensor& sqrt_abar,
    const at::Tensor& sqrt_one_minus_abar, const at::Tensor& seed) {
  constexpr const char* op = "noprop_cuda::noise_inject_backward";
  check_cuda_float(grad_z_in, op, "grad_z", 3);
  check_cuda_float(W_in, op, "W", 2);
  const int64_t K = grad_z_in.size(0), B = grad_z_in.size(1), d = grad_z_in.size(2);
  const int64_t m = W_in.size(0);
  TORCH_CHECK(K > 0 && B > 0 && m > 0, op, ": empty K, B or m (grad_z ", grad_z_in.sizes(), ", W ", W_in.sizes(), ")");
  TORCH_CHECK(W_in.size(1) == d, op, ": grad_z [K, B, d] = ", grad_z_in.sizes(), " does not match W [m, d] = ",
              W_in.sizes());
  check_labels(y_in, op, B);
  check_seed(seed, op);
  check_same_device(op, {&grad_z_in, &W_in, &y_in, &sqrt_abar, &sqrt_one_minus_abar, &seed});
  const c10::cuda::CUDAGuard guard(W_in.device());
  const at::Tensor sa = coefficient_f32(sqrt_abar, op, "sqrt_abar", K, B);
  coefficient_f32(sqrt_one_minus_abar, op, "sqrt_one_minus_abar", K, B);  // checks only: ε's gradient needs no values
  const at::Tensor g = grad_z_in.contiguous();
  const at::Tensor W32 = W_in.to(at::kFloat).contiguous();
  const at::Tensor y = y_in.to(at::kLong).contiguous();
  const auto f32 = W_in.options().dtype(at::kFloat);
  at::Tensor dW = at::empty({m, d}, W_in.options());
  at::Tensor d_sa_rows = at::zeros({K, B}, f32.dtype(at::kDouble));
  at::Tensor d_s1m_rows = at::zeros({K, B}, f32.dtype(at::kDouble));
  if (d > 0) {
    const DWPlan plan = plan_dW(K, B, d, m);
    TORCH_CHECK(plan.class_tiles <= 65535, op, ": the CUDA kernel handles at most ", 65535 * kMaxClassTile,
                " classes, got m = ", m, " (use NOPROP_BACKEND=triton or eager)");
    at::Tensor partial = at::empty({plan.chunks, m, d}, f32);
    const auto stream = at::cuda::getCurrentCUDAStream();
    NOPROP_DISPATCH_FLOAT(g.scalar_type(), "noprop_cuda::noise_inject_backward", [&] {
      noise_inject_coef_grad_kernel<scalar_t><<<grid_for(K * B, kThreads / kWarp), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), W32.data_ptr<float>(), y.data_ptr<int64_t>(), seed.data_ptr<int64_t>(),
          d_sa_rows.data_ptr<double>(), d_s1m_rows.data_ptr<double>(), K, B, d, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.class_tiles),
                      static_cast<unsigned>(plan.chunks));
      noise_inject_dW_partial_kernel<scalar_t><<<grid, kThreads, plan.smem_bytes, stream>>>(
          g.data_ptr<scalar_t>(), sa.data_ptr<float>(), sa.dim() == 2, y.data_ptr<int64_t>(),
          partial.data_ptr<float>(), K, B, d, m, plan.tile_cols, plan.class_tile, plan.chunk_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    NOPROP_DISPATCH_FLOAT(dW.scalar_type(), "noprop_cuda::noise_inject_backward", [&] {
      sum_chunks_kernel<scalar_t><<<grid_for(m * d, kWarp), kSumThreads, 0, stream>>>(
          partial.data_ptr<float>(), dW.data_ptr<scalar_t>(), plan.chunks, m * d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor d_sa = sqrt_abar.dim() == 1 ? d_sa_rows.sum(1) : d_sa_rows;
  at::Tensor d_s1m = sqrt_one_minus_abar.dim() == 1 ? d_s1m_rows.sum(1) : d_s1m_rows;
  return {dW, d_sa.to(sqrt_abar.scalar_type()), d_s1m.to(sqrt_one_minus_abar.scalar_type())};
}

}  // namespace noprop_cuda

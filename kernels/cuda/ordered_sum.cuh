// Float32 sums in a fixed order, for the backward kernels' dW: a first kernel writes per-chunk
// partial sums [chunks, n_out] (chunks <= kMaxChunks), sum_chunks_kernel adds them in chunk order.
// No atomics and no GEMM: the same inputs give the same bits, and torch's float32 matmul precision
// (TF32 under set_float32_matmul_precision("high")) cannot touch them.
#pragma once

#include "common.cuh"

namespace noprop_cuda {

constexpr int kSumThreads = 256;
constexpr int64_t kMaxChunks = 256;
constexpr int kSumGroups = kSumThreads / kWarp;

// out[o] = Σ_chunk partial[chunk, o] (o < n_out) in a fixed order: warp w of a block adds chunks
// w, w + 8, ... for 32 neighbouring outputs (coalesced), then warp 0 adds the 8 sums in warp order
// and casts to T: at most kMaxChunks / kSumGroups partials per thread in sequence.
// Launch: grid_for(n_out, kWarp) blocks of kSumThreads threads.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    sum_chunks_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t chunks, int64_t n_out) {
  __shared__ float sums[kSumGroups][kWarp];
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kWarp; base < n_out;
       base += static_cast<int64_t>(gridDim.x) * kWarp) {  // the same trip count for the whole block
    const int64_t o = base + lane;
    float acc = 0.f;
    if (o < n_out) {
      for (int64_t c = w; c < chunks; c += kSumGroups) acc += partial[c * n_out + o];
    }
    sums[w][lane] = acc;
    __syncthreads();
    if (w == 0 && o < n_out) {
      float total = sums[0][lane];
#pragma unroll
      for (int r = 1; r < kSumGroups; ++r) total += sums[r][lane];
      out[o] = from_f32<T>(total);
    }
    __syncthreads();
  }
}

// out [m, d] (float32, float16 or bfloat16, contiguous) = qᵀ · g for contiguous float32 q [n, m] and
// g [n, d] on the current stream, each output summed over the rows in a fixed order that depends on
// the shapes alone (ordered_sum.cu). m up to 65535 · 32 at least.
void matmul_tn_in_fixed_order(const at::Tensor& q, const at::Tensor& g, at::Tensor& out, cudaStream_t stream);

}  // namespace noprop_cuda

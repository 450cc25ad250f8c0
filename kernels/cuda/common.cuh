// Shared helpers of the noprop_cuda kernels: input checks, fp32 conversion, warp reductions,
// aligned vector access and launch geometry. Kernels accumulate in float32 whatever the storage
// dtype (float32, float16, bfloat16); float64 is rejected (the eager backend computes it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

#include "philox.cuh"

namespace noprop_cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Per-warp shared-memory budget (floats) of the row kernels: softmax row (+ residual row).
constexpr int64_t kMaxRowFloats = 8192;

// fp32/fp16/bf16 storage dtypes, dispatched to their C++ scalar types.
#define NOPROP_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_cuda_float(const at::Tensor& t, const char* op, const char* name, int64_t ndim_a,
                             int64_t ndim_b = -1) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16 for the CUDA backend, got ", st,
              " (float64 runs on the eager backend: NOPROP_BACKEND=eager or auto)");
  TORCH_CHECK(t.dim() == ndim_a || t.dim() == ndim_b, op, ": ", name, " must have ", ndim_a,
              ndim_b >= 0 ? (" or " + std::to_string(ndim_b)) : std::string(), " dimensions, got shape ",
              t.sizes());
}

inline void check_labels(const at::Tensor& y, const char* op, int64_t B) {
  TORCH_CHECK(y.is_cuda(), op, ": labels y must be a CUDA tensor, got a tensor on ", y.device());
  TORCH_CHECK(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt, op,
              ": labels y must be int64 or int32, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B, op, ": labels y must have shape [B] = [", B, "], got ", y.sizes());
}

inline void check_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 CUDA tensor with one element (see noprop.ops.new_seed), got ",
              seed.scalar_type(), " tensor of shape ", seed.sizes(), " on ", seed.device());
}

// A coefficient [K] or [K, B]; returns it as contiguous float32 (a no-op when it already is).
inline at::Tensor coefficient_f32(const at::Tensor& c, const char* op, const char* name, int64_t K, int64_t B) {
  check_cuda_float(c, op, name, 1, 2);
  TORCH_CHECK(c.size(0) == K && (c.dim() == 1 || c.size(1) == B), op, ": ", name, " must have shape [K] = [", K,
              "] or [K, B] = [", K, ", ", B, "], got ", c.sizes());
  return c.to(at::kFloat).contiguous();
}

inline void check_same_device(const char* op, std::initializer_list<const at::Tensor*> ts) {
  const auto dev = (*ts.begin())->device();
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->device() == dev, op, ": all tensors must be on one device, got ", dev, " and ", t->device());
  }
}

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  return static_cast<T>(v);
}

// Label of sample b clamped into [0, m): the Python checks reject bad labels eagerly, but under
// CUDA-graph capture or tracing values are unknown, so the kernel must never index out of bounds.
template <typename L>
__device__ __forceinline__ int64_t safe_label(const L* y, int64_t b, int64_t m) {
  int64_t c = static_cast<int64_t>(y[b]);
  return c < 0 ? 0 : (c >= m ? m - 1 : c);
}

// Reductions over aligned groups of Width lanes (Width a power of two <= 32; xor offsets below Width
// stay inside a group), every lane of the group getting the result. All 32 lanes must call them
// (full-mask shuffles). Width = kWarp reduces the whole warp (warp_sum, warp_max).
template <int Width, typename A>  // A: float, or double for sums that must beat float32 reductions
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int s = Width / 2; s > 0; s >>= 1) v += __shfl_xor_sync(kFullMask, v, s);
  return v;
}

template <int Width>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int s = Width / 2; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, s));
  return v;
}

// (best, arg) of the group: the largest value, the smallest index on ties.
template <int Width>
__device__ __forceinline__ void group_argmax(float& best, int64_t& arg) {
#pragma unroll
  for (int s = Width / 2; s > 0; s >>= 1) {
    const float ob = __shfl_xor_sync(kFullMask, best, s);
    const int64_t oa = __shfl_xor_sync(kFullMask, arg, s);
    if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) { return group_sum<kWarp>(v); }

__device__ __forceinline__ float warp_max(float v) { return group_max<kWarp>(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

NOPROP_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `work` items with `per_block` items per block.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = ceil_div(work, per_block);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

// Softmax of one row (length m, storage L) into shared memory `p` by one warp; returns nothing,
// `p` holds probabilities in float32 after the call (the warp is synchronised).
template <typename L>
__device__ __forceinline__ void warp_softmax_to_smem(const L* row, int64_t m, float* p, int lane) {
  float mx = -INFINITY;
  for (int64_t c = lane; c < m; c += kWarp) {
    const float v = to_f32(row[c]);
    p[c] = v;
    mx = fmaxf(mx, v);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  for (int64_t c = lane; c < m; c += kWarp) {
    const float e = expf(p[c] - mx);
    p[c] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  for (int64_t c = lane; c < m; c += kWarp) p[c] *= inv;
  __syncwarp();
}

// The denoiser's activation of one row into shared memory: softmax (DT, CT) or a plain float32 copy
// of the logits (FM's velocity, softmax = false). The warp is synchronised afterwards.
template <typename L>
__device__ __forceinline__ void warp_activation_to_smem(const L* row, int64_t m, float* p, int lane, bool softmax) {
  if (softmax) {
    warp_softmax_to_smem(row, m, p, lane);
    return;
  }
  for (int64_t c = lane; c < m; c += kWarp) p[c] = to_f32(row[c]);
  __syncwarp();
}

// Index of the largest of p[0..m) (smallest index on ties), the same on every lane. p is in shared
// memory and the warp was synchronised after writing it.
__device__ __forceinline__ int64_t warp_argmax_smem(const float* p, int64_t m, int lane) {
  float best = -INFINITY;
  int64_t arg = m;
  for (int64_t c = lane; c < m; c += kWarp) {
    if (p[c] > best) { best = p[c]; arg = c; }
  }
  group_argmax<kWarp>(best, arg);
  return arg < m ? arg : 0;  // a row of NaNs has no maximum: any pivot gives the same NaNs
}

// Warps per block for the row kernels, given the per-warp shared-memory row length in floats.
inline int warps_for_row(int64_t row_floats) {
  int64_t w = (16 * 1024) / (row_floats * static_cast<int64_t>(sizeof(float)));
  return static_cast<int>(w < 1 ? 1 : (w > 8 ? 8 : w));
}

}  // namespace noprop_cuda

// noprop_cuda::noise_inject and its backward (semantics: noprop/ops/eager.py).
//
// Forward: one thread per VEC consecutive elements of z [K, B, d]; element i = (k·B + b)·d + j
// draws ε with Philox offset i, so no noise is stored. Backward: one warp per row (k, b) for the
// coefficient gradients (ε regenerated), and one thread per (b, j) summing over k for dW, added
// into row y_b with float32 atomics (then cast to W's dtype).
#include "common.cuh"
#include "ops.h"

namespace noprop_cuda {
namespace {

template <typename T, int VEC>
__global__ void noise_inject_kernel(const T* __restrict__ W, const int64_t* __restrict__ y,
                                    const float* __restrict__ sa, const float* __restrict__ s1m, bool sa_per_sample,
                                    bool s1m_per_sample, const int64_t* __restrict__ seed_ptr, T* __restrict__ z,
                                    int64_t K, int64_t B, int64_t d, int64_t m) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t n_vec = K * B * d / VEC;  // the host guarantees d % VEC == 0
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const int64_t i = v * VEC;
    const int64_t row = i / d;  // k·B + b
    const int64_t j = i - row * d;
    const int64_t k = row / B;
    const int64_t b = row - k * B;
    const float a = sa[sa_per_sample ? row : k];
    const float s = s1m[s1m_per_sample ? row : k];
    const int64_t c = safe_label(y, b, m);
    const Vec<T, VEC> w = *reinterpret_cast<const Vec<T, VEC>*>(W + c * d + j);
    Vec<T, VEC> out;
#pragma unroll
    for (int t = 0; t < VEC; ++t) {
      out.v[t] = from_f32<T>(a * to_f32(w.v[t]) + s * philox_randn(seed, static_cast<uint64_t>(i + t)));
    }
    *reinterpret_cast<Vec<T, VEC>*>(z + i) = out;
  }
}

// d_sa_rows[k·B + b] = Σ_j g·W[y_b, j];  d_s1m_rows[k·B + b] = Σ_j g·ε  (float32, [K, B]).
template <typename G>
__global__ void noise_inject_coef_grad_kernel(const G* __restrict__ gz, const float* __restrict__ W,
                                              const int64_t* __restrict__ y, const int64_t* __restrict__ seed_ptr,
                                              float* __restrict__ d_sa_rows, float* __restrict__ d_s1m_rows,
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
    float acc_u = 0.f, acc_e = 0.f;
    for (int64_t j = lane; j < d; j += kWarp) {
      const float gj = to_f32(g[j]);
      acc_u += gj * u[j];
      acc_e += gj * philox_randn(seed, static_cast<uint64_t>(row * d + j));
    }
    acc_u = warp_sum(acc_u);
    acc_e = warp_sum(acc_e);
    if (lane == 0) {
      d_sa_rows[row] = acc_u;
      d_s1m_rows[row] = acc_e;
    }
  }
}

// dW[y_b, j] += Σ_k sa[k(, b)] · g[k, b, j]   (dW float32 [m, d], zero-initialised).
template <typename G>
__global__ void noise_inject_dW_kernel(const G* __restrict__ gz, const float* __restrict__ sa, bool sa_per_sample,
                                       const int64_t* __restrict__ y, float* __restrict__ dW, int64_t K, int64_t B,
                                       int64_t d, int64_t m) {
  const int64_t n = B * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t b = i / d;
    const int64_t j = i - b * d;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      acc += sa[sa_per_sample ? k * B + b : k] * to_f32(gz[k * n + i]);
    }
    atomicAdd(dW + safe_label(y, b, m) * d + j, acc);
  }
}

constexpr int kThreads = 256;

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
    const int64_t work = K * B * d / (vec4 ? 4 : 1);
    const unsigned grid = grid_for(work, kThreads);
    if (vec4) {
      noise_inject_kernel<scalar_t, 4><<<grid, kThreads, 0, stream>>>(
          W.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), sa.data_ptr<float>(), s1m.data_ptr<float>(), sa.dim() == 2,
          s1m.dim() == 2, seed.data_ptr<int64_t>(), z.data_ptr<scalar_t>(), K, B, d, m);
    } else {
      noise_inject_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
          W.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), sa.data_ptr<float>(), s1m.data_ptr<float>(), sa.dim() == 2,
          s1m.dim() == 2, seed.data_ptr<int64_t>(), z.data_ptr<scalar_t>(), K, B, d, m);
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
  at::Tensor dW = at::zeros({m, d}, f32);
  at::Tensor d_sa_rows = at::zeros({K, B}, f32);
  at::Tensor d_s1m_rows = at::zeros({K, B}, f32);
  if (d > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    NOPROP_DISPATCH_FLOAT(g.scalar_type(), "noprop_cuda::noise_inject_backward", [&] {
      noise_inject_coef_grad_kernel<scalar_t><<<grid_for(K * B, kThreads / kWarp), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), W32.data_ptr<float>(), y.data_ptr<int64_t>(), seed.data_ptr<int64_t>(),
          d_sa_rows.data_ptr<float>(), d_s1m_rows.data_ptr<float>(), K, B, d, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      noise_inject_dW_kernel<scalar_t><<<grid_for(B * d, kThreads), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), sa.data_ptr<float>(), sa.dim() == 2, y.data_ptr<int64_t>(), dW.data_ptr<float>(), K,
          B, d, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor d_sa = sqrt_abar.dim() == 1 ? d_sa_rows.sum(1) : d_sa_rows;
  at::Tensor d_s1m = sqrt_one_minus_abar.dim() == 1 ? d_s1m_rows.sum(1) : d_s1m_rows;
  return {dW.to(W_in.scalar_type()), d_sa.to(sqrt_abar.scalar_type()), d_s1m.to(sqrt_one_minus_abar.scalar_type())};
}

}  // namespace noprop_cuda

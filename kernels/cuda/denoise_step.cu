// noprop_cuda::denoise_step (semantics: noprop/ops/eager.py): one label-free inference step
// z_next = a · act(logits) · W + b · z_prev + sqrt_c · ε, ε[b, j] = lane j % 4 of
// philox_normal4(seed, b·Q + j / 4), Q = ceil(d/4) (philox.cuh: the eager reference's draws);
// act = softmax, or the identity when softmax is off (FM's Euler step z + h·v: a = h, b = 1).
// One warp per sample: the activated row lives in shared memory, lanes run over the quads of four
// columns of d (one Philox call per quad).
#include "common.cuh"
#include "ops.h"

namespace noprop_cuda {
namespace {

template <typename L, typename Z>
__global__ void denoise_step_kernel(const L* __restrict__ logits, const float* __restrict__ W,
                                    const Z* __restrict__ z_prev, float a, float bcoef, float sqrt_c,
                                    const int64_t* __restrict__ seed_ptr, bool softmax, Z* __restrict__ z_next,
                                    int64_t B, int64_t m, int64_t d) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  float* p = smem + warp * m;
  const bool noisy = sqrt_c != 0.f;  // the mean chain (sqrt_c = 0) draws no noise, as the reference
  const uint64_t seed = noisy ? static_cast<uint64_t>(*seed_ptr) : 0u;
  const int64_t Q = noise_quads(d);
  for (int64_t row = blockIdx.x * warps_per_block + warp; row < B;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    warp_activation_to_smem(logits + row * m, m, p, lane, softmax);
    for (int64_t q = lane; q < Q; q += kWarp) {
      Normal4 eps = {{0.f, 0.f, 0.f, 0.f}};
      if (noisy) eps = philox_normal4(seed, static_cast<uint64_t>(row * Q + q));
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t j = 4 * q + t;
        if (j < d) {
          float u = 0.f;
          for (int64_t c = 0; c < m; ++c) u += p[c] * W[c * d + j];
          const int64_t i = row * d + j;
          float z = a * u + bcoef * to_f32(z_prev[i]);
          if (noisy) z += sqrt_c * eps.v[t];
          z_next[i] = from_f32<Z>(z);
        }
      }
    }
    __syncwarp();  // p is overwritten by this warp's next row
  }
}

constexpr int64_t kMaxSmemFloats = 48 * 1024 / sizeof(float);

}  // namespace

at::Tensor denoise_step(const at::Tensor& logits_in, const at::Tensor& W, const at::Tensor& z_prev_in, double a,
                        double b, double sqrt_c, const at::Tensor& seed, bool softmax) {
  constexpr const char* op = "noprop_cuda::denoise_step";
  check_cuda_float(logits_in, op, "logits", 2);
  check_cuda_float(W, op, "W", 2);
  check_cuda_float(z_prev_in, op, "z_prev", 2);
  check_seed(seed, op);
  check_same_device(op, {&logits_in, &W, &z_prev_in, &seed});
  const int64_t B = logits_in.size(0), m = logits_in.size(1), d = W.size(1);
  TORCH_CHECK(B > 0 && m > 0, op, ": logits [B, m] must be non-empty, got shape ", logits_in.sizes());
  TORCH_CHECK(W.size(0) == m, op, ": logits has m = ", m, " classes but W has ", W.size(0),
              " rows (W must be [m, d])");
  TORCH_CHECK(z_prev_in.size(0) == B && z_prev_in.size(1) == d, op, ": z_prev must have shape [B, d] = [", B, ", ",
              d, "], got ", z_prev_in.sizes());
  TORCH_CHECK(m <= kMaxSmemFloats, op, ": the CUDA kernel handles at most ", kMaxSmemFloats, " classes, got m = ", m,
              " (use NOPROP_BACKEND=triton or eager)");
  const c10::cuda::CUDAGuard guard(z_prev_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor z_prev = z_prev_in.contiguous();
  const at::Tensor W32 = W.to(at::kFloat).contiguous();
  at::Tensor z_next = at::empty_like(z_prev);
  if (d == 0) return z_next;
  const int warps = warps_for_row(m);
  const size_t smem = static_cast<size_t>(warps) * m * sizeof(float);
  const auto stream = at::cuda::getCurrentCUDAStream();
  NOPROP_DISPATCH_FLOAT(logits.scalar_type(), "noprop_cuda::denoise_step", [&] {
    using logit_t = scalar_t;
    NOPROP_DISPATCH_FLOAT(z_prev.scalar_type(), "noprop_cuda::denoise_step", [&] {
      denoise_step_kernel<logit_t, scalar_t><<<grid_for(B, warps), warps * kWarp, smem, stream>>>(
          logits.data_ptr<logit_t>(), W32.data_ptr<float>(), z_prev.data_ptr<scalar_t>(), static_cast<float>(a),
          static_cast<float>(b), static_cast<float>(sqrt_c), seed.data_ptr<int64_t>(), softmax, z_next.data_ptr<scalar_t>(),
          B, m, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return z_next;
}

}  // namespace noprop_cuda

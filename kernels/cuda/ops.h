// Host entry points of the noprop_cuda ops (one .cu per op); registered in bindings.cpp.
// Argument order follows noprop/ops/eager.py. Shapes: K blocks, B samples, m classes, d dims.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace noprop_cuda {

// z [K, B, d] (W's dtype) = sqrt_abar · W[y] + sqrt_one_minus_abar · ε.
at::Tensor noise_inject(const at::Tensor& W, const at::Tensor& y, const at::Tensor& sqrt_abar,
                        const at::Tensor& sqrt_one_minus_abar, const at::Tensor& seed);

// (dW [m, d], d_sqrt_abar like sqrt_abar, d_sqrt_one_minus_abar like sqrt_one_minus_abar).
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_inject_backward(
    const at::Tensor& grad_z, const at::Tensor& W, const at::Tensor& y, const at::Tensor& sqrt_abar,
    const at::Tensor& sqrt_one_minus_abar, const at::Tensor& seed);

// loss [K] float32 = mean_b weight · ‖act(logits) · W − W[y] + offset‖² (act = softmax or identity;
// offset [B, d] optional).
at::Tensor local_loss(const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y, const at::Tensor& weight,
                      const std::optional<at::Tensor>& offset, bool softmax);

// (dlogits like logits, dW like W, dweight like weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& W, const at::Tensor& y,
    const at::Tensor& weight, const std::optional<at::Tensor>& offset, bool softmax);

// z_next [B, d] (z_prev's dtype) = a · act(logits) · W + b · z_prev + sqrt_c · ε.
at::Tensor denoise_step(const at::Tensor& logits, const at::Tensor& W, const at::Tensor& z_prev, double a,
                        double b, double sqrt_c, const at::Tensor& seed, bool softmax);

}  // namespace noprop_cuda

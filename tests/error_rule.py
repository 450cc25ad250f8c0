"""The project's accuracy rule for kernels, shared by the op tests:
error(kernel vs float64) <= 2 x error(eager in the same dtype vs float64) + a small floor.

The floor is 1e-6 relative to the reference's magnitude, plus, for fp16/bf16 outputs, half an ulp
(eps/2 x magnitude): eager and a kernel that compute the same float32 value may still round it to
neighbouring low-precision values when it lies near a rounding midpoint.
"""
import torch

LOW = (torch.float16, torch.bfloat16)


def floor(dtype: torch.dtype, scale: float) -> float:
    return (1e-6 + (torch.finfo(dtype).eps / 2 if dtype in LOW else 0.0)) * scale


def assert_error_rule(got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, name: str = "", who: str = "triton"):
    """got: the kernel's output; same: eager's output in the same dtype; ref: the float64 reference."""
    assert got.shape == ref.shape and got.dtype == same.dtype, f"{name}: {got.shape}/{got.dtype}"
    ref = ref.double()
    err_k = (got.double() - ref).abs().max().item()
    err_e = (same.double() - ref).abs().max().item()
    fl = floor(got.dtype, ref.abs().max().item())
    assert err_k <= 2 * err_e + fl, f"{name}: {who} err {err_k:.3g} > 2 x eager err {err_e:.3g} + {fl:.3g}"

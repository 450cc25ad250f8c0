"""Triton backend of NoProp's fused ops (installed as `noprop.kernels.triton`).

Every function here has exactly the semantics of its namesake in `noprop/ops/eager.py` (shapes,
output dtypes, Philox noise counters), for float32 / float16 / bfloat16 inputs; the kernels
accumulate in float32. `noprop.dispatch` routes float64 inputs to the eager reference.
Importing this module compiles nothing and touches no GPU: kernels are built on first launch.
"""
from .denoise_step import denoise_step
from .local_loss import local_loss, local_loss_backward
from .noise_inject import _noise_inject_fwd, noise_inject, noise_inject_backward

# Triton decides at decoration time whether a kernel runs compiled or in its interpreter; CPU
# tensors need the interpreter, so dispatch reads this to explain a late TRITON_INTERPRET=1.
INTERPRETED = type(_noise_inject_fwd).__name__ == "InterpretedFunction"

__all__ = ["denoise_step", "local_loss", "local_loss_backward", "noise_inject", "noise_inject_backward"]

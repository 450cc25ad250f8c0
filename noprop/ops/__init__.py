"""NoProp's fused ops, registered as `torch.ops.noprop.*` (schema, CPU = eager reference, fake
kernels, autograd). `noprop.dispatch` decides which backend runs each call."""
from .denoise_step import denoise_step
from .local_loss import local_loss
from .noise_inject import noise_inject
from .philox import new_seed, philox_randn

OPS = ("noise_inject", "local_loss", "denoise_step")

__all__ = ["OPS", "denoise_step", "local_loss", "noise_inject", "new_seed", "philox_randn"]

"""The arithmetic of a training step and of evaluation: `TrainConfig.precision` (config.PRECISIONS).

- fp32: nothing is entered and nothing is set; the step is the step as it was, bit for bit. (torch's
  own defaults still apply: on CUDA, cuDNN may run fp32 convolutions in TF32 unless
  torch.backends.cudnn.allow_tf32 is turned off; matmuls stay IEEE fp32.)
- tf32 (CUDA only): matmuls and cuDNN convolutions may round their fp32 inputs to TensorFloat-32
  (10-bit mantissa) and accumulate in fp32. Set through torch's legacy switches,
  `torch.set_float32_matmul_precision` and `torch.backends.cudnn.allow_tf32`, and restored on exit.
  Why those: torch 2.9+ also has `fp32_precision` attributes, but once the matmul one is set, any
  read of the legacy switches raises "mix of the legacy and new APIs", and torch.compile's inductor
  still reads `torch.get_float32_matmul_precision()`; the legacy setters keep both readable.
- bf16: the forward and the losses run under `torch.autocast(device, bfloat16)`: matmuls and
  convolutions in bf16, reductions and losses (cross-entropy, softmax) in fp32 as autocast's lists
  say. Parameters (the master weights) and AdamW's state stay fp32; gradients arrive in fp32. The
  fused ops take bf16 logits and fp32 W as they are (autocast does not touch custom ops) and still
  accumulate and return in fp32 (docs/design.md §4), so `local_loss` is an fp32 reduction.

On CUDA, tf32 and bf16 also keep convolution weights and 4-D inputs channels_last (NHWC), the layout
tensor-core convolutions read without transposes. Off CUDA the layout is left alone.

`precision_context` is the one place a step or an evaluation enters the setting: `forward_backward`
(the body shared by the eager step and the CUDA-graph capture, so a captured step is captured with
it) and `evaluate`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from noprop.training.config import why_not_precision


def check(precision: str, device, method: str = "dt") -> None:
    """Raise ValueError (one line) unless `precision` can run on `device`."""
    reason = why_not_precision(precision, str(torch.device(device)), method)
    if reason:
        raise ValueError(reason)


@contextlib.contextmanager
def precision_context(precision: str, device) -> Iterator[None]:
    """Run the enclosed forward (and losses) in `precision` on `device` (see the module docstring).
    The backward may run inside or after it: autocast records each op's cast with the op."""
    device = torch.device(device)
    check(precision, device)
    if precision == "fp32":
        yield  # nothing entered: the fp32 step stays exactly the step it was
        return
    if precision == "bf16":
        # cache_enabled=False: autocast's weight-cast cache must not span a CUDA graph capture (torch's
        # CUDA-graph notes); each weight is cast once per step here anyway, so the cache saves nothing.
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
        return
    with tf32_switches():
        yield


@contextlib.contextmanager
def tf32_switches() -> Iterator[None]:
    """TF32 on for CUDA matmuls and cuDNN convolutions, and the previous settings back on exit
    (also on error). Process-wide switches: every thread sees them while this is entered."""
    try:
        matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError as exc:  # someone set the new fp32_precision API: reading the legacy one fails
        raise ValueError("--precision tf32 sets torch's TF32 switches, but they were already set with "
                         f"torch.backends.*.fp32_precision ({str(exc).splitlines()[0][:80]}...): "
                         "leave them at their defaults, or use --precision fp32") from None
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv


def channels_last(precision: str, device) -> bool:
    """Whether a step in `precision` on `device` keeps convolutions channels_last (CUDA, tf32 or bf16)."""
    return precision != "fp32" and torch.device(device).type == "cuda"


def prepare_model(model: torch.nn.Module, precision: str, device) -> torch.nn.Module:
    """The model in the layout `precision` runs in on `device` (in place; 4-D weights only). A block
    bank (noprop.models.bank) stays NCHW: its sample-major layout feeds the grouped convolution
    without copies in NCHW, and which layout it should run in awaits GPU measurements."""
    if getattr(model, "is_bank", False):
        return model
    if channels_last(precision, device):
        model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A 4-D image batch in the layout the model was prepared for (a no-op where that is NCHW)."""
    if x.ndim == 4 and channels_last(precision, x.device):
        return x.contiguous(memory_format=torch.channels_last)
    return x

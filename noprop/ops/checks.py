"""Input checks shared by the ops: each raises a ValueError/TypeError that says what and why,
before any kernel runs (a kernel given bad shapes or labels would read out of bounds)."""
from __future__ import annotations

import weakref

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def floating(name: str, t: torch.Tensor, ndim: int | tuple[int, ...]) -> None:
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def labels(y: torch.Tensor, num_classes: int) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels y must be an int64 or int32 tensor, got {getattr(y, 'dtype', type(y))}")
    if y.ndim != 1:
        raise ValueError(f"labels y must have shape [B], got {tuple(y.shape)}")
    if not y.is_contiguous():
        raise ValueError("labels y must be contiguous")
    if y.numel() == 0:
        raise ValueError("labels y is empty: the batch has no samples")
    if _is_fake(y) or (y.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # values are unknown while tracing or capturing; kernels clamp indices instead
    lo, hi = _label_range(y)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, got values in [{lo}, {hi}]")


# Range of CUDA label tensors already read back, by identity: id -> (weakref, version counter,
# min, max). Reading a GPU tensor's values stalls the host until the GPU catches up, and one
# training step hands the same labels to several ops (noise_inject, local_loss); the version counter
# changes with every in-place write, so a modified tensor is read again.
_cuda_ranges: dict = {}


def _remembers(y: torch.Tensor) -> bool:
    # CUDA only: reading CPU labels costs no stall, and CPU memory can change behind the version
    # counter's back (a NumPy array sharing it).
    return y.is_cuda


def _label_range(y: torch.Tensor) -> tuple[int, int]:
    """(min, max) of the labels, with one device-to-host read (none for CUDA labels seen before)."""
    try:
        version = y._version
    except RuntimeError:  # inference tensors have no version counter: read every time
        version = None
    key = id(y)
    cache = version is not None and _remembers(y)
    if cache:
        hit = _cuda_ranges.get(key)
        if hit is not None and hit[0]() is y and hit[1] == version:
            return hit[2], hit[3]
    lo, hi = torch.stack(torch.aminmax(y)).tolist()
    if cache:
        if len(_cuda_ranges) >= 64:  # a step's labels; older batches' entries are never hit again
            _cuda_ranges.clear()
        _cuda_ranges[key] = (weakref.ref(y), version, lo, hi)
    return lo, hi


def seed(s: torch.Tensor, device: torch.device) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.int64 or s.numel() != 1:
        raise TypeError("seed must be an int64 tensor with one element (see noprop.ops.new_seed)")
    if s.device != device:
        raise ValueError(f"seed is on {s.device} but the op's tensors are on {device}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def coefficient(name: str, t: torch.Tensor, K: int | None, B: int) -> int:
    """A per-block coefficient [K] or per-sample [K, B]; returns K."""
    floating(name, t, (1, 2))
    if K is not None and t.shape[0] != K:
        raise ValueError(f"{name} must have K = {K} rows, got shape {tuple(t.shape)}")
    if t.ndim == 2 and t.shape[1] != B:
        raise ValueError(f"{name} of shape [K, B] must have B = {B} columns, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: K must be >= 1")
    return t.shape[0]

"""`python -m noprop.info` (and `noprop info`): which backend can run each op here, and why not.

Prints the versions (torch, Triton, CUDA), whether NVML's Python binding (nvidia-ml-py, for the
memory figures of `noprop bench`) is installed, the devices, and per device a table of every op in
`noprop.ops.OPS` x every backend in `noprop.dispatch.BACKENDS`: "available" or a footnote with the
reason from `dispatch.why_unavailable`, plus what `auto` picks for float32 and float64 inputs and
how the engine's execution `auto` runs a step's blocks there and which convolution a block bank
runs (noprop.models.bank_layers).
Nothing here launches a kernel.
"""
from __future__ import annotations

import os
import platform

import torch

from noprop import dispatch
from noprop.ops import OPS


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as exc:  # not installed, or a broken driver raising at import
        return f"not importable ({type(exc).__name__})"


def _nvml_status() -> str:
    """Whether pynvml (the nvidia-ml-py package) imports: `noprop bench` reads the process's device
    memory (its nvml_mem_mb) from NVML through it, and leaves it empty without."""
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "not installed: pip install nvidia-ml-py, or noprop's bench extra (noprop bench then has no NVML memory)"
    except Exception as exc:  # noqa: BLE001 - a broken install
        return f"installed but not importable ({type(exc).__name__}: {exc})".splitlines()[0]
    return "installed (noprop bench reads the process's device memory from NVML)"


def _devices() -> list[tuple[torch.device, str]]:
    devices = [(torch.device("cpu"), platform.processor() or platform.machine() or "cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append((torch.device("cuda", i), torch.cuda.get_device_name(i)))
    return devices


def _auto_pick(device: torch.device, dtype: torch.dtype) -> str:
    with dispatch.use_backend("auto"):
        return dispatch.backend_name(device, [dtype])


def _execution_pick(device: torch.device) -> str:
    """What noprop.engine's execution 'auto' does with identical blocks in a step on `device`."""
    from noprop import engine

    why = {"threads": f"groups of blocks on {torch.get_num_threads()} CPU threads at once",
           "loop": "one block after another: 1 torch thread, nothing to share out" if device.type == "cpu"
           else "one block after another",
           "vmap": "identical blocks stacked into one batched computation",
           "bank": "identical blocks held as one bank of stacked parameters, run as one"}
    if device.type == "cuda":  # stacking pays from CUDA_VMAP_MIN_BLOCKS blocks on (noprop.engine)
        many = engine.CUDA_VMAP_MIN_BLOCKS
        stacked = engine.resolve_identical("auto", many, device)
        return (f"{stacked} ({why[stacked]}) for models of >= {many} blocks, "
                f"{engine.resolve_identical('auto', many - 1, device)} for fewer")
    pick = engine.resolve_identical("auto", 2, device)
    return f"{pick} ({why[pick]})"


def _bank_conv(device: torch.device) -> str:
    """Which T-batched convolution a block bank runs on `device` (NOPROP_BANK_CONV or the per-device default)."""
    from noprop.models import bank_layers

    try:
        impl = bank_layers.conv_impl(device)
    except ValueError as exc:
        return f"invalid ({exc})"
    chosen = "NOPROP_BANK_CONV" if os.environ.get("NOPROP_BANK_CONV", "auto").strip().lower() not in ("", "auto") \
        else "default here"
    names = [name if name != "triton" or bank_layers.why_not_triton(device) is None else "triton (not here)"
             for name in bank_layers.CONV_IMPLS]
    return f"{impl}: {bank_layers.CONV_WHY[impl]} [{chosen}; NOPROP_BANK_CONV={'|'.join(names)}]"



def _requested() -> str:
    try:
        return dispatch.requested_backend()
    except ValueError as exc:
        return f"invalid ({exc})"


def _distributed() -> str:
    """Whether block-parallel training (training/distributed.py) can run here, and on which backends."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed: not in this torch build (block-parallel training cannot run)"
    nccl = dist.is_nccl_available()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (f"torch.distributed: available | gloo (CPU): {'yes' if dist.is_gloo_available() else 'no'} | "
            f"nccl (CUDA): {'yes' if nccl and gpus else ('built, but no GPU visible' if nccl else 'no')} "
            f"| block-parallel: torchrun --nproc_per_node=W -m noprop train ...")


def report() -> str:
    cuda = torch.version.cuda or "none (CPU-only torch build)"
    lines = [
        "noprop backends",
        f"  torch {torch.__version__} | triton {_triton_version()} | CUDA {cuda} | "
        f"CUDA devices visible: {torch.cuda.device_count() if torch.cuda.is_available() else 0}",
        f"  NOPROP_BACKEND={os.environ.get('NOPROP_BACKEND', 'auto')} (requested: {_requested()}) | "
        f"TRITON_INTERPRET={'on' if dispatch.triton_interpreted() else 'off'}",
        f"  NVML (nvidia-ml-py): {_nvml_status()}",
        f"  {_distributed()}",
    ]
    notes: list[str] = []
    width = max(len(op) for op in OPS) + 2
    for device, name in _devices():
        lines += ["", f"device {device} ({name})", "  " + "op".ljust(width) + "".join(b.ljust(16) for b in dispatch.BACKENDS).rstrip()]
        cells = []
        for backend in dispatch.BACKENDS:
            reason = dispatch.why_unavailable(backend, device)
            if reason is None:
                cells.append("available")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"no [{notes.index(reason) + 1}]")
        for op in OPS:  # availability is decided per device (and dtype), the same for every op today
            lines.append("  " + op.ljust(width) + "".join(c.ljust(16) for c in cells).rstrip())
        lines.append(f"  auto picks: {_auto_pick(device, torch.float32)} for float32/float16/bfloat16, "
                     f"{_auto_pick(device, torch.float64)} for float64")
        lines.append(f"  block execution auto: {_execution_pick(device)}")
        lines.append(f"  bank convolutions: {_bank_conv(device)}")
    if not torch.cuda.is_available():
        lines += ["", "device cuda: none visible to torch (only the CPU rows apply)"]
    if notes:
        lines += ["", "why not:"] + [f"  [{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    main()

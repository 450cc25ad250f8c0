"""CUDA C++ extension backend: NoProp's fused ops as `torch.ops.noprop_cuda.*`.

The kernels (kernels/cuda/*.cu, registered by bindings.cpp with TORCH_LIBRARY(noprop_cuda)) have
exactly the semantics of `noprop.ops.eager`, noise included (philox.cuh). This module finds the
compiled library lazily, on the first `load_error()` or op call, never at import, and never
queries a GPU at import:
1. a library already registered in this process (e.g. `torch.ops.load_library` of the CMake
   build, or the path in env NOPROP_CUDA_LIBRARY);
2. the prebuilt extension module `noprop.kernels.cuda._C` (setup.py or bench/build_cuda_ext.sh),
   checked against `_build_info.py` (torch/CUDA it was built for) BEFORE it is loaded;
3. a JIT build with torch.utils.cpp_extension.load: only through `load()`, or when
   NOPROP_CUDA_JIT=1.
A present but unusable library (other torch/CUDA, failed load, failed JIT) gives ONE warning line;
a never-built extension is the normal pure-Python case and stays silent (`load_error()` says why).
float64 inputs are not taken by these kernels: `UNSUPPORTED_DTYPES` says so, for noprop.dispatch.
The compiled sources are listed once, in sources.txt (read here through toolkit.py).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_PREBUILT = __name__ + "._C"
_JIT_NAME = "noprop_cuda_jit"
_BUILD_HINT = "build it with bench/build_cuda_ext.sh, `pip install --no-build-isolation .`, or NOPROP_CUDA_JIT=1"

_lock = threading.RLock()
# Called after `load()` builds the library late in a process: noprop.dispatch adds its
# forget_choices, since ops that ran before chose their backend without this one.
LOAD_LISTENERS: list = []
_state: dict = {"tried": False, "error": None, "origin": None, "module": None, "warned": False, "fakes": False}


def _base(version: str) -> str:
    return version.split("+")[0]


def _ops_registered() -> bool:
    try:
        torch._C._get_schema("noprop_cuda::noise_inject", "")
        return True
    except RuntimeError:
        return False


def _warn_once(msg: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"noprop CUDA extension unusable: {msg}", RuntimeWarning, stacklevel=4)


def _prebuilt_info() -> dict | None:
    try:
        mod = importlib.import_module(__name__ + "._build_info")
    except ImportError:
        return None
    return {k.lower(): v for k, v in vars(mod).items() if k.isupper()}


def _check_versions(torch_built: str, cuda_built: str | None) -> str | None:
    if _base(torch_built) != _base(torch.__version__):
        return (f"it was built for torch {torch_built}, running torch {torch.__version__}: rebuild it "
                "(bench/build_cuda_ext.sh)")
    if cuda_built and torch.version.cuda and cuda_built.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"it was built for CUDA {cuda_built}, running torch for CUDA {torch.version.cuda}: rebuild it "
                "(bench/build_cuda_ext.sh)")
    return None


def _cuda_version_string(cudart: int) -> str:
    return f"{cudart // 1000}.{cudart % 1000 // 10}"


def _load_prebuilt() -> str | None:
    """Import noprop.kernels.cuda._C; None on success, else why not (warns if it exists but fails)."""
    info = _prebuilt_info()
    if info:
        mismatch = _check_versions(info.get("torch_version", "?"), info.get("cuda_version"))
        if mismatch:
            _warn_once(mismatch)
            return f"the prebuilt extension is unusable: {mismatch}"
    try:
        mod = importlib.import_module(_PREBUILT)
    except ModuleNotFoundError as exc:
        if exc.name == _PREBUILT:
            return f"extension not built: no module {_PREBUILT} ({_BUILD_HINT})"
        _warn_once(f"{type(exc).__name__}: {exc}")
        return f"the prebuilt extension failed to load ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - undefined symbols (other torch), missing libcudart, ...
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _warn_once(f"{msg} ({_BUILD_HINT})")
        return f"the prebuilt extension failed to load ({msg}); rebuild it ({_BUILD_HINT})"
    mismatch = _check_versions(getattr(mod, "torch_version", "?"),
                               _cuda_version_string(getattr(mod, "cuda_version", 0)) if hasattr(mod, "cuda_version")
                               else None)
    if mismatch:
        _warn_once(mismatch)
        return f"the prebuilt extension is unusable: {mismatch}"
    _state.update(module=mod, origin=f"prebuilt {getattr(mod, '__file__', _PREBUILT)}")
    return None


def _ensure_loaded() -> str | None:
    """Find the library once (see the module docstring); returns the reason it is missing or None."""
    with _lock:
        if _state["tried"]:
            return _state["error"]
        _state["tried"] = True
        err = None
        if torch.version.cuda is None:
            err = f"torch {torch.__version__} is a CPU-only build: the CUDA extension needs a CUDA build of torch"
        elif _ops_registered():
            _state["origin"] = "registered in this process before noprop looked for it"
        elif os.environ.get("NOPROP_CUDA_LIBRARY"):
            path = os.environ["NOPROP_CUDA_LIBRARY"]
            try:
                torch.ops.load_library(path)
                _state["origin"] = f"NOPROP_CUDA_LIBRARY={path}"
            except Exception as exc:  # noqa: BLE001
                err = f"NOPROP_CUDA_LIBRARY={path} failed to load ({type(exc).__name__}: {exc})".splitlines()[0]
                _warn_once(err)
        else:
            err = _load_prebuilt()
            if err and os.environ.get("NOPROP_CUDA_JIT", "0") == "1" and err.startswith("extension not built"):
                try:
                    _jit_build(verbose=False)
                    err = None
                except Exception as exc:  # noqa: BLE001
                    err = f"NOPROP_CUDA_JIT=1 but the JIT build failed ({type(exc).__name__}: {exc})".splitlines()[0]
                    _warn_once(err)
        if err is None:
            _register_fakes()
        _state["error"] = err
        return err


def _jit_build(verbose: bool):
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found for the JIT build (set CUDA_HOME to a directory with bin/nvcc)")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # else torch targets the visible GPUs
    os.environ.setdefault("MAX_JOBS", "2")
    from .toolkit import compile_flags, source_names
    flags = compile_flags(cpp_extension.CUDA_HOME)
    mod = cpp_extension.load(
        name=_JIT_NAME,
        sources=[str(_HERE / name) for name in source_names()],
        extra_cflags=flags,
        extra_cuda_cflags=flags + ["-lineinfo"],
        extra_include_paths=[str(_HERE)],
        is_python_module=True,
        verbose=verbose,
    )
    _state.update(module=mod, origin=f"JIT {getattr(mod, '__file__', _JIT_NAME)}")
    return mod


def load(verbose: bool = False):
    """Make the ops available now: the already-loaded or prebuilt library, else a JIT compile
    (nvcc needed; minutes). Returns the extension module (None if registered by other means)."""
    with _lock:
        err = _ensure_loaded()
        if err is None:
            return _state["module"]
        if torch.version.cuda is None:
            raise RuntimeError(err)
        _jit_build(verbose)
        _register_fakes()
        _state["error"] = None
        for listener in LOAD_LISTENERS:
            listener()
        return _state["module"]


def load_error() -> str | None:
    """None when the ops can run here (library loaded, CUDA device present); else why not."""
    err = _ensure_loaded()
    if err:
        return err
    if not torch.cuda.is_available():
        return (f"no CUDA device: torch.cuda.is_available() is False (the extension is loaded: "
                f"{_state['origin']})")
    return None


def require_loaded() -> None:
    """Raise RuntimeError saying why when the library is not loaded (a GPU is not required)."""
    err = _ensure_loaded()
    if err:
        raise RuntimeError(f"noprop CUDA extension: {err}")


def build_info() -> dict:
    """Where the loaded library came from and what it was built against."""
    info = {"origin": _state["origin"], "error": _state["error"]}
    mod = _state["module"]
    if mod is not None:
        info["torch_version"] = getattr(mod, "torch_version", None)
        if hasattr(mod, "cuda_version"):
            info["cuda_version"] = _cuda_version_string(mod.cuda_version)
    if mod is not None and mod.__name__ == _PREBUILT:
        info.update({f"built_{k}": v for k, v in (_prebuilt_info() or {}).items()})
    return info


# dtypes these kernels refuse, with the reason (for noprop.dispatch's per-backend dtype table).
UNSUPPORTED_DTYPES = {
    torch.float64: "the CUDA extension computes in float32 (fp32/fp16/bf16 storage); float64 runs on the eager reference",
}


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile, FakeTensorMode and CUDA-graph capture can trace the ops."""
    if _state["fakes"]:
        return
    _state["fakes"] = True

    def _f32(t):
        return t.new_empty((t.shape[0],), dtype=torch.float32)

    fakes = {
        "noise_inject": lambda W, y, sa, s1m, seed: W.new_empty((sa.shape[0], y.shape[0], W.shape[1])),
        "noise_inject_backward": lambda gz, W, y, sa, s1m, seed: (torch.empty_like(W), torch.empty_like(sa),
                                                                  torch.empty_like(s1m)),
        "local_loss": lambda logits, W, y, weight, offset=None, softmax=True: _f32(logits),
        "local_loss_backward": lambda gl, logits, W, y, weight, offset=None, softmax=True: (
            torch.empty_like(logits), torch.empty_like(W), torch.empty_like(weight)),
        "denoise_step": lambda logits, W, z_prev, a, b, sqrt_c, seed, softmax=True: torch.empty_like(z_prev),
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"noprop_cuda::{name}", fn)


def _call(name: str):
    if _state["error"] is not None or not _state["tried"]:
        require_loaded()
    return getattr(torch.ops.noprop_cuda, name)


def noise_inject(W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """z [K, B, d] (W's dtype); see noprop.ops.eager.noise_inject."""
    return _call("noise_inject")(W, y, sqrt_abar, sqrt_one_minus_abar, seed)


def noise_inject_backward(grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed):
    """(dW, d_sqrt_abar, d_sqrt_one_minus_abar); see noprop.ops.eager.noise_inject_backward."""
    return _call("noise_inject_backward")(grad_z, W, y, sqrt_abar, sqrt_one_minus_abar, seed)


def local_loss(logits, W, y, weight, offset=None, softmax=True):
    """loss [K] float32; see noprop.ops.eager.local_loss."""
    return _call("local_loss")(logits, W, y, weight, offset, bool(softmax))


def local_loss_backward(grad_loss, logits, W, y, weight, offset=None, softmax=True):
    """(dlogits, dW, dweight); see noprop.ops.eager.local_loss_backward."""
    return _call("local_loss_backward")(grad_loss, logits, W, y, weight, offset, bool(softmax))


def denoise_step(logits, W, z_prev, a, b, sqrt_c, seed, softmax=True):
    """z_next [B, d] (z_prev's dtype); see noprop.ops.eager.denoise_step."""
    return _call("denoise_step")(logits, W, z_prev, float(a), float(b), float(sqrt_c), seed, bool(softmax))

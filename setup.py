"""Build steps that pyproject.toml cannot state: the package layout and the CUDA extension.

Metadata, dependencies, extras and package data live in pyproject.toml.

Layout: the kernel sources live in the top-level `kernels/` folder but are installed as
`noprop.kernels` (a top-level `kernels` package would collide with an unrelated PyPI project).
pyproject's package discovery cannot rename a folder, so the packages are discovered here: every
package under noprop/ and under kernels/ (as noprop.kernels.*), so new subpackages need no edit.

The CUDA C++ extension (`noprop.kernels.cuda._C`, sources listed in kernels/cuda/sources.txt) is
built only when a CUDA-enabled torch and nvcc are present; otherwise a pure-Python install is made
and says why.
- NOPROP_BUILD_CUDA=auto (default): build when possible, else pure Python with a message;
  0: never build; 1: fail loudly when it cannot be built.
- TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0", MAX_JOBS to 2.
- pip's build isolation hides the installed torch from this script, so building the extension
  needs `pip install --no-build-isolation .` (or bench/build_cuda_ext.sh for an in-place build).
torch is imported only inside `_cuda_build()`, so a CPU-only torch or none at all still installs.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
package_dir = {"noprop": "noprop", "noprop.kernels": "kernels"}
packages = (find_packages(where=str(HERE), include=["noprop", "noprop.*"])
            + ["noprop.kernels"] + [f"noprop.kernels.{name}" for name in find_packages(where=str(HERE / "kernels"))])

CUDA_EXT_NAME = "noprop.kernels.cuda._C"


def _say(msg: str) -> None:
    print(f"noprop setup: {msg}", file=sys.stderr, flush=True)


def _toolkit():
    """kernels/cuda/toolkit.py, loaded by path (noprop is not importable while it is being built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_noprop_toolkit", HERE / "kernels" / "cuda" / "toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_build():
    """(ext_modules, cmdclass) building the CUDA extension, or ([], {}) after printing why not."""
    mode = os.environ.get("NOPROP_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"noprop setup: NOPROP_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say("NOPROP_BUILD_CUDA=0: installing pure Python, without the CUDA extension")
        return [], {}
    reason = None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means no extension
        reason = (f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); "
                  "pip's build isolation hides the installed torch: use `pip install --no-build-isolation .`")
    else:
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = Path(cuda_home or "/nonexistent") / "bin" / "nvcc"
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif cuda_home is None or not nvcc.exists():
            reason = f"no CUDA toolkit with nvcc found (CUDA_HOME={cuda_home}); set CUDA_HOME"
        elif not (Path(cuda_home) / "include" / "cuda_runtime_api.h").exists():
            reason = f"CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h; set CUDA_HOME to the toolkit"
    if reason:
        if mode == "1":
            raise SystemExit(f"noprop setup: NOPROP_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"installing pure Python, without the CUDA extension: {reason}")
        return [], {}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "2")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    toolkit = _toolkit()
    flags = toolkit.compile_flags(cuda_home)
    cuda_dir = HERE / "kernels" / "cuda"
    headers = sorted(f"kernels/cuda/{p.name}" for pattern in ("*.cuh", "*.h") for p in cuda_dir.glob(pattern))
    ext = cpp_extension.CUDAExtension(
        CUDA_EXT_NAME,
        [f"kernels/cuda/{name}" for name in toolkit.source_names()],
        include_dirs=[str(cuda_dir)],
        depends=headers,  # setuptools rebuilds only when these or the sources change
        extra_compile_args={"cxx": flags, "nvcc": flags + ["-lineinfo"]},
        py_limited_api=True,
    )
    build_info = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda,
                  "arch_list": arch_list, "cuda_home": cuda_home}

    class BuildNoprop(cpp_extension.BuildExtension):
        """Builds the extension and records what it was built against next to it (_build_info.py)."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001
                if mode == "1":
                    raise
                _say(f"building the CUDA extension failed, installing pure Python: {type(exc).__name__}: {exc}")
                return
            self._record(Path(self.get_ext_fullpath(extension.name)).parent)
            self._built = True
            _say(f"built the CUDA extension for torch {build_info['torch_version']}, CUDA "
                 f"{build_info['cuda_version']}, arch {arch_list}")

        def copy_extensions_to_source(self):
            # `build_ext --inplace`: setuptools builds under build/ (with inplace switched off while
            # build_extension runs) and then copies the .so next to the sources; so must its record go.
            super().copy_extensions_to_source()
            if getattr(self, "_built", False):
                self._record(Path(self.get_finalized_command("build_py").get_package_dir("noprop.kernels.cuda")))

        @staticmethod
        def _record(out_dir: Path) -> None:
            lines = ['"""Generated by setup.py: what noprop.kernels.cuda._C was built against."""']
            lines += [f"{k.upper()} = {v!r}" for k, v in build_info.items()]
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "_build_info.py").write_text("\n".join(lines) + "\n", encoding="utf-8")

    _say(f"building the CUDA extension (arch {arch_list}, MAX_JOBS={os.environ['MAX_JOBS']}, CUDA_HOME={cuda_home})")
    return [ext], {"build_ext": BuildNoprop.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_build()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)

"""Source list and compiler settings shared by setup.py's build and the JIT build
(`noprop.kernels.cuda.load`); CMakeLists.txt reads the same sources.txt.

Imports nothing but the standard library: setup.py loads this file by path, before noprop or
torch may be importable.
"""
from __future__ import annotations

import sys
from pathlib import Path


def pip_cuda_include_dirs(cuda_home: str | None) -> list[str]:
    """Header dirs of the pip CUDA wheels (site-packages/nvidia/*/include) when the toolkit at
    `cuda_home` lacks the cuSPARSE/cuBLAS headers that ATen's CUDA headers include."""
    if cuda_home and (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    found = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += sorted(str(p) for p in root.glob("*/include") if p.is_dir())
    return found


def compile_flags(cuda_home: str | None) -> list[str]:
    """Flags for both cxx and nvcc. -isystem dirs are searched after every -I, so the toolkit's
    own headers win over the pip copies."""
    return ["-O3", "-DNOPROP_PYTHON_MODULE"] + [a for d in pip_cuda_include_dirs(cuda_home) for a in ("-isystem", d)]


SOURCE_LIST = Path(__file__).resolve().parent / "sources.txt"


def source_names() -> list[str]:
    """The extension's compiled sources (file names in this folder), from sources.txt."""
    names = []
    for line in SOURCE_LIST.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    missing = [n for n in names if not (SOURCE_LIST.parent / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{SOURCE_LIST} lists files that do not exist: {', '.join(missing)}")
    return names

"""Packaging: pyproject's dependencies against what the package imports, the one CUDA source list,
and the wheel's contents (every subpackage, the kernel sources, the MNIST-5k assets)."""
from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from noprop.kernels.cuda import toolkit

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "kernels" / "cuda"
# Imported by the package but deliberately not required: each is optional at run time.
OPTIONAL_IMPORTS = {
    "triton": "comes with torch's Linux CUDA wheels; noprop.dispatch says why when it is missing",
    "pynvml": "NVML memory in noprop bench; the bench extra (nvidia-ml-py)",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_name(spec: str) -> str:
    for i, ch in enumerate(spec):
        if not (ch.isalnum() or ch in "-_."):
            return spec[:i].lower()
    return spec.lower()


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level names of the absolute imports under noprop/ and kernels/ that are not the standard
    library or noprop itself, with the files importing them."""
    found: dict[str, list[str]] = {}
    for folder in ("noprop", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "noprop":
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_runtime_dependencies_are_what_the_package_imports():
    project = _pyproject()["project"]
    required = {_requirement_name(d) for d in project["dependencies"]}
    assert required == {"torch", "numpy", "tqdm"}
    imported = _third_party_imports()
    undeclared = {name: files for name, files in imported.items()
                  if name not in required and name not in OPTIONAL_IMPORTS}
    assert not undeclared, f"imported but neither a dependency nor a known optional import: {undeclared}"
    assert "numpy" in imported and "tqdm" in imported  # no dependency the package does not use
    extras = {name: {_requirement_name(d) for d in deps} for name, deps in project["optional-dependencies"].items()}
    assert "nvidia-ml-py" in extras["bench"] and "pytest" in extras["test"]
    for heavy in ("mlxtend", "scikit-learn", "pandas", "scipy", "matplotlib"):
        assert heavy not in required


def test_the_cuda_sources_are_listed_once():
    listed = toolkit.source_names()
    on_disk = sorted(p.name for pattern in ("*.cu", "*.cpp") for p in CUDA_DIR.glob(pattern))
    assert sorted(listed) == on_disk
    # setup.py, CMakeLists.txt and the JIT loader read sources.txt instead of listing the files
    # (a listed file appears quoted or after a folder: "x.cu", kernels/cuda/x.cu; prose may name one).
    for reader in (ROOT / "setup.py", ROOT / "CMakeLists.txt", CUDA_DIR / "__init__.py"):
        text = reader.read_text(encoding="utf-8")
        listing = [name for name in listed if re.search(r"[\"'/]" + re.escape(name), text)]
        assert not listing, f"{reader.name} lists sources itself: {listing}"
    assert "sources.txt" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def test_a_missing_listed_source_is_named(tmp_path, monkeypatch):
    (tmp_path / "sources.txt").write_text("# comment\n\nthere.cu\n  gone.cu  \n", encoding="utf-8")
    (tmp_path / "there.cu").write_text("", encoding="utf-8")
    monkeypatch.setattr(toolkit, "SOURCE_LIST", tmp_path / "sources.txt")
    with pytest.raises(FileNotFoundError, match="do not exist: gone.cu$"):
        toolkit.source_names()
    (tmp_path / "gone.cu").write_text("", encoding="utf-8")
    assert toolkit.source_names() == ["there.cu", "gone.cu"]


def test_package_data_covers_every_kernel_source_and_the_assets():
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    patterns = data["noprop.kernels.cuda"]
    generated = {"_build_info.py"}
    for path in CUDA_DIR.iterdir():
        if path.is_file() and path.suffix not in (".py", ".so", ".pyc") and path.name not in generated:
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path.name} would not be installed"
    assert "assets/*" in data["noprop"]


def test_the_wheel_holds_every_package_the_kernels_and_the_assets(tmp_path):
    # Built from a copy, so nothing is written into the checkout; no build isolation (no network)
    # and no CUDA build (NOPROP_BUILD_CUDA=0): the pure-Python wheel.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "_build_info.py")
    for folder in ("noprop", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    packages = {str(p.parent.relative_to(src)) for folder in ("noprop", "kernels")
                for p in (src / folder).rglob("__init__.py")}
    env = dict(os.environ, NOPROP_BUILD_CUDA="0", PIP_NO_INDEX="1")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("noprop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in packages:  # kernels/x installs as noprop/kernels/x
        installed = package if package.startswith("noprop") else "noprop/" + package
        assert f"{installed}/__init__.py" in names, f"{package} is missing from the wheel"
    for name in toolkit.source_names() + ["sources.txt", "common.cuh", "philox.cuh", "ops.h"]:
        assert f"noprop/kernels/cuda/{name}" in names
    assets = [p.name for p in (src / "noprop" / "assets").glob("*")]
    assert "mnist5k.npz" in assets and "README.md" in assets
    assert {f"noprop/assets/{a}" for a in assets} <= names
    assert not [n for n in names if n.startswith("kernels/")]  # never a top-level `kernels` package
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    import noprop
    assert f"\nVersion: {noprop.__version__}\n" in metadata
    assert "Requires-Dist: mlxtend" not in metadata

"""Install noprop: the `noprop` package, its kernels under `noprop.kernels`, and the `noprop` CLI.

The kernel sources live in the top-level `kernels/` folder but are installed as `noprop.kernels`
(a top-level `kernels` package would collide with an unrelated PyPI project). The CUDA C++
extension is built here only when a CUDA-enabled torch and nvcc are present (see
`noprop_build.py`); otherwise a pure-Python install is made and says so.
"""
from setuptools import setup

packages = ["noprop", "noprop.models", "noprop.ops", "noprop.kernels", "noprop.kernels.triton",
            "noprop.kernels.cuda"]
package_dir = {"noprop": "noprop", "noprop.kernels": "kernels"}

setup(
    name="noprop",
    version="0.1.0",
    description="Kernel-accelerated NoProp training (Li, Teh, Pascanu 2025)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"noprop.kernels.cuda": ["*.cu", "*.cpp", "*.h"]},
    install_requires=["torch>=2.11", "numpy", "tqdm", "mlxtend", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["noprop=noprop.cli:main"]},
)

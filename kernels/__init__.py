"""Kernel sources, installed as `noprop.kernels` (never import this folder as top-level `kernels`).

`triton/` holds the Triton kernels, `cuda/` the CUDA C++ extension; both implement the op
functions named in `noprop.ops` with the eager reference's exact semantics.
"""

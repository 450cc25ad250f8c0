"""The noise tile shared by the Triton kernels: ε of the eager reference (`noprop/ops/philox.py`).

A noise tensor is viewed as rows x d, each row cut into Q = ⌈d/4⌉ quads; element (r, j) is lane
j % 4 of `tl.randn4x(seed, r·Q + j // 4)`. One Philox call thus gives four neighbouring columns.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def randn_tile(seed, rows, Q, q0, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """ε[rows, 4·q0 : 4·q0 + BLOCK_D] as a [BLOCK_B, BLOCK_D] float32 tile.

    rows: int64 [BLOCK_B] noise-row indices; Q: quads per row; q0: first quad of the tile (a tile
    starting at column j0 has q0 = j0 // 4, so j0 must be a multiple of 4); BLOCK_D a multiple of 4.
    Columns past d (and rows past the end) get draws of unused counters: the caller masks them.
    """
    quads = q0 + tl.arange(0, BLOCK_D // 4).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, rows[:, None] * Q + quads[None, :])  # [BLOCK_B, BLOCK_D // 4] each
    # join(join(n0, n2), join(n1, n3))[b, q, i, l] = n_{2i + l}: row-major, column 4q + 2i + l gets lane 2i + l.
    eps = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(eps, (BLOCK_B, BLOCK_D))

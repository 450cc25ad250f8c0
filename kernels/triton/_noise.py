"""The noise tile shared by the Triton kernels: ε of the eager reference (`noprop/ops/philox.py`).

A noise tensor is viewed as rows x d, each row cut into Q = ⌈d/4⌉ quads; element (r, j) is lane
j % 4 of `tl.randn4x(seed, r·Q + j // 4)`. One Philox call thus gives four neighbouring columns.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def randn_tile(seed, rows, d, j0, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """ε[rows, j0 : j0 + BLOCK_D] of a noise tensor with d columns, as a [BLOCK_B, BLOCK_D] float32 tile.

    rows: int64 [BLOCK_B] noise-row indices; j0: the tile's first column, a multiple of 4 (so the
    tile holds whole quads); BLOCK_D a multiple of 4. Columns past d (and rows past the end) get
    draws of unused counters: the caller masks them.
    """
    Q = (d + 3) // 4  # Philox counters (quads of columns) per row
    quads = j0 // 4 + tl.arange(0, BLOCK_D // 4).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, rows[:, None] * Q + quads[None, :])  # [BLOCK_B, BLOCK_D // 4] each
    # join(join(n0, n2), join(n1, n3))[b, q, i, l] = n_{2i + l}: row-major, column 4q + 2i + l gets lane 2i + l.
    eps = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(eps, (BLOCK_B, BLOCK_D))

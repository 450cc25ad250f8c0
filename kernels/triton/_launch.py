"""Launch helpers shared by the Triton op launchers: tile choice and the device guard."""
from __future__ import annotations

import threading

import torch

# CPU tensors reach these launchers only under TRITON_INTERPRET=1, whose interpreter patches
# triton.language's globals while it runs a kernel: two threads interpreting at once (the engine's
# threaded execution) break each other ("Did you forget to add @triton.jit?"). Serialize them.
_INTERPRETER_LOCK = threading.Lock()


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = 1 << max(0, int(n) - 1).bit_length()
    p = max(p, lo)
    return min(p, hi) if hi is not None else p


def on_device(t: torch.Tensor):
    """Launch on `t`'s device: Triton launches on the current stream of the *current* CUDA device,
    so a CUDA tensor on another device than the current one needs this guard. For CPU tensors
    (the interpreter) it holds the interpreter lock instead: one interpreted launch at a time."""
    return torch.cuda.device(t.device) if t.is_cuda else _INTERPRETER_LOCK


def dot_tiles(B: int, m: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_D, num_warps) for the kernels that compute softmax(logits) @ W with tl.dot.

    Every tl.dot dimension must be >= 16 on a GPU, so tiles are padded (and masked) up to 16: the
    realistic m = 10 and d = 10 / 20 are smaller than that. The whole class dimension is one tile
    (softmax needs the full row; m <= 128 in practice), the batch is cut in BLOCK_B-row blocks and
    d is walked in BLOCK_D-column tiles inside a program. The fp32 ieee dots run on FMA units and
    hold their operands in registers, so the tiles stay small: compiled for sm_90 (ptxas, Triton
    3.8), 32 x 32 tiles use <= 128 registers and no spills at m <= 16 with 4 warps; 64-wide tiles
    spilled kilobytes of stack at m = 100. At m = 100 (BLOCK_M = 128, 8 warps) some bf16
    specializations still spill 0.5-1 KB per thread (`python -m noprop.kernels.triton.compile_check`
    lists them; bench/results/compile-sm90/); 16-row tiles or 4 warps made it worse there.
    """
    block_m = pow2(m, lo=16)
    block_b = pow2(B, lo=16, hi=32 if block_m <= 128 else 16)
    block_d = pow2(d, lo=16, hi=32)
    return block_b, block_m, block_d, 4 if block_m <= 32 else 8

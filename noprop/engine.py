"""How the blocks of a NoProp-DT model execute: one by one (`loop`), stacked (`vmap`), on several
CPU threads at once (`threads`), or held as one bank of stacked parameters (`bank`).

A bank (noprop.models.bank) keeps the parameters and buffers of identical blocks stacked, [T, ...],
as their source of truth, so a step stacks and copies back nothing; this module decides where one
is used (`resolve` says 'bank': asked for, or `auto` on CUDA where `vmap` was chosen before) and
owns the vmapped call (`run_vmapped`) that both a bank of blocks it cannot fold and `run_stacked` use.

Stacked execution runs T structurally identical blocks as one batched computation with
`torch.func.functional_call` under `vmap`: convolutions become grouped convolutions and the fully
connected layers batched matmuls. Per-block parameters stay the source of truth (they are stacked
on the fly, differentiably), so per-block optimizers, checkpoints and the locality guarantee are
unchanged; BatchNorm running statistics updated inside the stacked call are written back.

Which is faster depends on the device and on how many blocks run together. Measured on the 2-core
CPU this project develops on (`noprop bench`, bench/results/): stacking loses there (grouped convs
are ~2-3x slower than separate ones, docs/design.md §12), so `auto` never picks `vmap` on a
CPU. On an H100 (bench/results/nvidia-h100-80gb-hbm3*/, T = 10 DT blocks) stacking wins for the
whole step (10 blocks: 1.16-1.58x faster than loop at batch 128 and 1024) and for chunks of 5
(1.13x at batch 128) but loses for chunks of 2 (loop 1.27-1.46x faster), so on CUDA `auto` stacks
chunks of at least CUDA_VMAP_MIN_BLOCKS blocks (4: between the measured 2 and 5), and now does so
as a bank for models of that many blocks (the bank itself is not yet measured on a GPU).

Threaded execution is block parallelism on CPU cores, the one kind backprop cannot have: the blocks
of a training step are split into contiguous groups, and each group's forward, local loss and
backward run on a thread of its own (separate autograd graphs, so the backwards run concurrently
too; torch's ops release the GIL). The step's intra-op threads are shared out between the groups,
so it uses the same cores as a loop step. Measured on the 2-core development CPU (batch 128,
T = 10 DT blocks, `noprop bench`, bench/results/cpu-amd-epyc-2threads/): a whole parallel step is
1.16-1.17x faster than the loop step with 2 intra-op threads, because these small convolutions
scale poorly across cores. `auto` picks it on CPU when torch has >= 2 intra-op threads and a step
trains >= 2 blocks. Inference computes every block's image features
(most of its arithmetic) the same way; `run_blocks` itself always runs its blocks one by one.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

EXECUTIONS = ("auto", "loop", "vmap", "threads", "bank")
CUDA_VMAP_MIN_BLOCKS = 4  # auto on CUDA: stack chunks this large or larger (see the module docstring)


def structure(block: nn.Module):
    """(type, parameter names and shapes, buffer names and shapes) of a block."""
    return (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in block.named_buffers()))


def why_not_stackable(blocks: Sequence[nn.Module]) -> str | None:
    """None if the blocks can run stacked, else the reason."""
    if len(blocks) < 2:
        return "a single block has nothing to stack with"
    first = structure(blocks[0])
    for t, block in enumerate(blocks[1:], 2):
        if structure(block) != first:
            return f"block {t} differs in structure from block 1 (type, parameter or buffer shapes)"
    return None


def resolve(execution: str, blocks: Sequence[nn.Module], device: torch.device) -> str:
    """The execution to use for `blocks` on `device`: 'loop', 'vmap', 'threads' or 'bank'.

    'bank' means the blocks belong in a bank (noprop.models.bank: stacked parameters as the source
    of truth); a model whose blocks are separate modules runs that as 'vmap' (stacked per step).
    An explicit 'vmap' or 'bank' on unstackable blocks, or 'threads' on a non-CPU device, raises
    with the reason; 'threads' with one block or one intra-op thread has nothing to share out, and
    one block nothing to stack: 'loop'.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    kind = torch.device(device).type
    if execution == "threads":
        check_threads_device(device)
        return "threads" if len(blocks) > 1 and _threads_can_run() else "loop"
    if execution == "loop":
        return "loop"
    if execution == "auto" and kind != "cuda":  # no stacking off CUDA: skip the structure walk (every step)
        return resolve("threads", blocks, device) if kind == "cpu" else "loop"
    reason = why_not_stackable(blocks)
    if execution in ("vmap", "bank"):
        if reason and len(blocks) > 1:
            raise ValueError(f"cannot stack these blocks: {reason}")
        return "loop" if reason else execution
    return "bank" if reason is None and len(blocks) >= CUDA_VMAP_MIN_BLOCKS else "loop"  # auto on CUDA


def check_threads_device(device) -> None:
    """Raise ValueError unless `device` (a torch.device or a string such as "cuda:0") is a CPU: the
    execution 'threads' runs blocks on CPU threads. Checked from the config's string, before a
    device is built, as well as at each step."""
    if str(device).split(":")[0] != "cpu":
        raise ValueError(f"execution 'threads' runs blocks on CPU threads, but the device is {str(device)!r}: "
                         "on CUDA use 'vmap' (stacked) or 'auto', and --cuda-graph for the parallel step")


def resolve_identical(execution: str, num_blocks: int, device) -> str:
    """`resolve` for `num_blocks` structurally identical blocks (the DT blocks): what a step of that
    many blocks would run as, asked before any model exists (the CLI's header, `noprop info`)."""
    return resolve(execution, [nn.Identity() for _ in range(num_blocks)], device)


def _threads_can_run() -> bool:
    """Whether block threads may run here: >= 2 intra-op threads to share out, and none of the
    per-thread state that cannot follow a step into its workers: a torch function or dispatch mode
    (FlopCounterMode, set_default_device, a tracer) would silently not see the workers' ops, and a
    worker thread itself runs nested work inline. torch.compile cannot trace get_num_threads, and a
    traced forward never spawns threads anyway (train_step does, outside any graph)."""
    if torch.compiler.is_compiling() or getattr(_worker, "active", False):
        return False
    if any(getattr(torch._C, name, lambda: 0)() for name in ("_len_torch_function_stack", "_len_torch_dispatch_stack")):
        return False
    return torch.get_num_threads() > 1


def threads_for_inference(execution: str, num_blocks: int, device) -> bool:
    """Whether inference computes its blocks' features on threads: like resolve, but never raises
    (a model trained with 'threads' or 'vmap' still predicts wherever it is moved)."""
    return (torch.device(device).type == "cpu" and execution in ("auto", "threads") and num_blocks > 1
            and _threads_can_run())


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """`items` cut into min(parts, len(items)) contiguous groups whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (i < r)
        out.append(list(items[start:start + size]))
        start += size
    return out


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_worker = threading.local()  # .active: this thread is one of run_threaded's workers


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads, made once per size (threads outlive a step: starting
    them costs more than a small step's work)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="noprop-blocks")
        return _pools[workers]


def _saved_tensor_hooks():
    """The innermost (pack, unpack) saved-tensor hooks of this thread, or None (a private torch API:
    if it is gone, workers run without the caller's hooks)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return top(False) if top is not None else None
    except (RuntimeError, TypeError):
        return None


def run_threaded(groups: Sequence[Sequence[int]], work: Callable[[int, list[int]], Any]) -> list[Any]:
    """work(i, groups[i]) for every group at once, one thread each; returns their results in order.

    The caller's n intra-op threads are shared out between the groups (group i gets n // groups,
    plus one of the remainder for the first n % groups; at least one) and restored afterwards.
    Grad and inference mode, CPU autocast, saved-tensor hooks (e.g. save_on_cpu) and the noprop
    backend request are per-thread state in torch and noprop: they are carried into the workers.
    Every group runs to its end, even when the caller is interrupted (the workers write .grad);
    then the first group's exception, in group order, is raised. Called from a worker, it runs the
    groups inline, one after another (a worker waiting on its own pool would deadlock).
    """
    from noprop import dispatch

    if getattr(_worker, "active", False):
        return [work(i, list(g)) for i, g in enumerate(groups)]
    n = torch.get_num_threads()
    shares = [max(1, n // len(groups) + (i < n % len(groups))) for i in range(len(groups))]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    backend = dispatch.requested_backend()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    hooks = _saved_tensor_hooks()

    def run(i: int, group: list[int]) -> Any:
        torch.set_num_threads(shares[i])  # this worker's OpenMP team (and MKL's, restored below)
        _worker.active = True
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.set_grad_enabled(grad))
            stack.enter_context(dispatch.use_backend(backend))
            stack.enter_context(torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]))
            if hooks is not None:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(*hooks))
            return work(i, group)

    futures = []
    try:
        futures = [_pool(len(groups)).submit(run, i, list(g)) for i, g in enumerate(groups)]
        try:
            errors = [f.exception() for f in futures]  # waits for every group
        except KeyboardInterrupt:  # let the workers finish writing gradients before the caller goes on
            wait(futures)
            raise
    finally:
        torch.set_num_threads(n)  # MKL's thread count is process-wide: give the caller its own back
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


def run_vmapped(template: nn.Module, params: dict, buffers: dict, x: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """K blocks of `template`'s structure as one vmapped call: their parameters and buffers stacked,
    {name: [K, ...]}; x [B, ...] shared, zs [K, B, d] -> [K, B, m]. BatchNorm updates the running
    statistics in `buffers` in place (so views of a bank's rows are updated in the bank)."""
    def one(p, b, z):
        return functional_call(template, (p, b), (x, z))

    return vmap(one, in_dims=(0, 0, 0), randomness="different")(params, buffers, zs)


def run_stacked(blocks: Sequence[nn.Module], x: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Blocks k = 0..K-1 on (x, zs[k]) as one vmapped call: x [B, ...], zs [K, B, d] -> [K, B, m].
    Their parameters are stacked for the call (differentiably) and the updated BatchNorm statistics
    copied back: the per-step cost that a bank (noprop.models.bank) does not pay."""
    names = [n for n, _ in blocks[0].named_parameters()]
    per_block = [dict(b.named_parameters()) for b in blocks]
    params = {n: torch.stack([p[n] for p in per_block]) for n in names}
    buffer_lists = [dict(b.named_buffers()) for b in blocks]
    buffers = {n: torch.stack([bl[n] for bl in buffer_lists]) for n in buffer_lists[0]}
    out = run_vmapped(blocks[0], params, buffers, x, zs)
    if blocks[0].training and buffers:
        with torch.no_grad():  # BatchNorm running statistics were updated on the stacked copies
            for k, bl in enumerate(buffer_lists):
                for n, buf in bl.items():
                    buf.copy_(buffers[n][k])
    return out

"""Measuring one bench case: its step, timing, peak memory and the bytes saved for backward."""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from noprop.bench.plan import STACKED, Case
from noprop.stages import sync
from noprop.data import load
from noprop.models import NoPropDT
from noprop.training import CapturedStep, Optimizers, TrainConfig, build_model, ready_for_training, train_step
from noprop.training.compiling import compile_mode
from noprop.training.config import blocks_per_step

ROOT = Path(__file__).resolve().parent.parent.parent


class SavedTensorMeter:
    """Peak bytes of autograd-saved tensors alive at once (saved_tensors_hooks). Storages are counted
    once however often they are saved; parameters (alive anyway) are excluded."""

    def __init__(self, params=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict = {}
        self.current = self.peak = 0
        self.lock = threading.RLock()  # threaded execution saves from several threads at once

    def _add(self, key, nbytes):
        with self.lock:
            n, _ = self.refs.get(key, (0, nbytes))
            if n == 0:
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self.refs[key] = (n + 1, nbytes)

    def _drop(self, key):
        with self.lock:
            n, nbytes = self.refs[key]
            if n == 1:
                del self.refs[key]
                self.current -= nbytes
            else:
                self.refs[key] = (n - 1, nbytes)

    def pack(self, t):
        try:
            st = t.untyped_storage()
            key, nbytes = (st.data_ptr(), st.device), st.nbytes()
        except (RuntimeError, NotImplementedError):  # a wrapper without storage: count its elements
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key[0] in self.exclude:
            return t
        return _Saved(self, key, nbytes, t)

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, _Saved) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter, key, nbytes, tensor):
        self.meter, self.key, self.tensor = meter, key, tensor
        meter._add(key, nbytes)

    def __del__(self):  # the graph released this saved tensor (after its backward)
        self.meter._drop(self.key)


def _minibatches(data: str, batch: int, device, count: int = 4):
    split = load(data)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        idx = torch.randint(0, len(split.train), (batch,), generator=g)
        out.append((split.train.images[idx].to(device), split.train.labels[idx].to(device)))
    return split, out


def _nvml_process_mb(device) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        # By UUID: CUDA's ordinals follow CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER, NVML's do not.
        handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                  if uuid else pynvml.nvmlDeviceGetHandleByIndex(index))
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20
    except Exception:  # no permission, MIG, driver mismatch: NVML is a bonus, not a requirement
        return None
    return None


def step_factory(case: Case, data: str, batch: int, T: int, chunk_size: int, device):
    """(model, config, step): `step()` runs one benchmark step of `case` on cycling minibatches.

    One step is equal work (see the module docstring): T block updates on one minibatch in the
    parallel/chunked/lean modes, one end-to-end update for backprop, and for Algorithm 1
    (sequential) T iterations that each update one block on its own minibatch. A graph case
    captures its step here (warm-up and capture happen before any timed step) and replays it.
    """
    torch.manual_seed(0)
    split, mbs = _minibatches(data, batch, device)
    cfg = TrainConfig(method=case.method, mode=case.mode if case.method == "dt" else "parallel",
                      T=T, batch_size=batch, chunk_size=chunk_size,
                      execution="auto" if case.execution == "-" else case.execution, device=str(device),
                      cuda_graph=case.graph, precision=case.precision, compile=case.compile)
    model = ready_for_training(build_model(cfg, split.image_shape, split.num_classes, split.train), cfg, device)
    optimizers = Optimizers(model, cfg)
    model.train()
    if case.graph:
        captured = CapturedStep(model, optimizers, *mbs[0], precision=cfg.precision)
        cursor = [0]

        def replay():
            x, y = mbs[cursor[0] % len(mbs)]
            cursor[0] += 1
            captured(x, y)  # reads the loss like train_step does: one host sync per step in both

        return model, cfg, replay
    plan = cfg.passes
    chunk = cfg.chunk if case.method == "dt" else None
    cursor = [0]

    def step():
        for blocks in plan:
            x, y = mbs[cursor[0] % len(mbs)]
            cursor[0] += 1
            train_step(model, optimizers, x, y, blocks, None if blocks else chunk, cfg.precision)

    return model, cfg, step


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, *args, **kwargs) -> int:
    """Operations of aten.convolution_backward: the input gradient and the weight gradient each take
    the forward's multiply-adds, numel(out) x C/groups x kh x kw (transposed: numel(in) x ...).
    torch's own formula leaves out `groups`, so it counts a grouped convolution's backward (the bank's
    grouped layers, vmap's batched ones) several times over."""
    macs = math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return 2 * macs * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _bank_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Operations of a noprop::bank_conv2d call (or of one of its gradients, which take as many):
    numel(out) x C x kh x kw multiply-adds, weight [T, O, C, kh, kw]."""
    B_T = (x_shape[0] if not args[2] else x_shape[0] * w_shape[0])  # args: bias, T, shared, padding
    Ho, Wo = (n + 2 * p - k + 1 for n, p, k in zip(x_shape[-2:], args[3], w_shape[-2:]))
    return 2 * B_T * w_shape[1] * Ho * Wo * math.prod(w_shape[2:])


def _flop_formulas() -> dict:
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    try:
        noprop_ops = torch.ops.noprop
        mapping[noprop_ops.bank_conv2d] = _bank_conv_flop
        mapping[noprop_ops.bank_conv2d_input_grad] = lambda dy, x, w, *a, **k: _bank_conv_flop(x, w, None, *a)
        mapping[noprop_ops.bank_conv2d_weight_grad] = lambda dy, x, w, *a, **k: _bank_conv_flop(x, w, None, *a)
    except (AttributeError, RuntimeError):  # the Triton bank convolution is not registered here
        pass
    return mapping


def flop_per_step(step) -> int:
    """Floating-point operations of one `step()` (forward, backward, optimizer) as torch's
    FlopCounterMode counts them, with a convolution backward that respects `groups` and the Triton bank
    convolution counted: matmuls and convolutions, 2 per multiply-add; elementwise work and the fused
    NoProp ops count 0. The same arithmetic for every execution, precision and capture of a method and
    mode (block threads see the mode and run the step's blocks in a loop)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        step()
    return int(counter.get_total_flops())


def execution_used(model, cfg: TrainConfig, device) -> tuple[str, bool]:
    """(how a step of `model` under `cfg` runs its blocks: loop, vmap, threads, bank, or '-' for the cnn;
    whether that stacks them: vmap or a bank with >= 2 blocks per call; backprop's bank stacks its
    image branches)."""
    if isinstance(model, NoPropDT):
        k = max(1, min(blocks_per_step(cfg.mode, model.T, cfg.chunk_size), model.T))
        used = model.resolve_execution(range(1, k + 1), device)
        return used, used in STACKED and k >= 2  # a bank run one block a call stacks nothing
    if not hasattr(model, "is_bank"):
        return "-", False
    return ("bank", True) if model.is_bank else ("loop", False)


def measure(case: Case, opts: dict, saved: bool = True) -> dict:
    """Warmup + `steps` timed steps of `case`: ms per step, peak memory, and (saved=True: the
    first round; both are the same in every round) the peak saved-for-backward bytes of one more
    step and the operations of another (`flop_per_step`)."""
    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        gc.collect()  # the previous in-process case's model may sit in reference cycles: free it first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, cfg, step = step_factory(case, opts["data"], opts["batch"], opts["T"], opts["chunk_size"], device)

    for _ in range(opts["warmup"]):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(opts["steps"]):
        step()
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3 / opts["steps"]
    out = {"ms_per_step": ms, "rss_base_mb": rss_base}
    if saved and not case.graph:  # a replay runs no autograd hooks: nothing to meter (the same step as parallel)
        meter = SavedTensorMeter(model.parameters())
        with meter.hooks():
            step()
        out["saved_mb"] = meter.peak / 2**20
    if case.compile:
        out["compile_mode"] = compile_mode(device) or "default"
    if saved and not case.graph and not case.compile:  # a replay or a compiled graph hides its ops from the counter
        out["flop_per_step"] = flop_per_step(step)
    out["execution_used"], out["stacked"] = execution_used(model, cfg, device)
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        out["reserved_mem_mb"] = torch.cuda.max_memory_reserved(device) / 2**20  # + the caching allocator's slack
        out["nvml_mem_mb"] = _nvml_process_mb(device)
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_mem_kind"] = "ru_maxrss of this config's own process" if opts["isolated"] else \
            "ru_maxrss of the shared process (not isolated: includes earlier configs)"
    return out


def run_isolated(case: Case, opts: dict, saved: bool, timeout: float | None) -> dict:
    payload = json.dumps({"case": asdict(case), "opts": opts, "saved": saved})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run([sys.executable, "-m", "noprop.bench", "--worker", payload], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def worker(payload: str) -> int:
    job = json.loads(payload)
    res = measure(Case(**job["case"]), job["opts"], job["saved"])
    print(json.dumps(res), flush=True)
    return 0

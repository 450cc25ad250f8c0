"""What `noprop bench` measures: the cases (method, mode, execution, graph, precision, compile) and the
plan of them."""
from __future__ import annotations

from dataclasses import dataclass

from noprop import engine
from noprop.training.config import MODES, blocks_per_step, why_not_compile

DT_MODES = MODES
EXECUTIONS = tuple(e for e in engine.EXECUTIONS if e != "auto")  # measurable ones; "auto" picks one of them
BASELINES = ("backprop", "cnn")
# What a DT case and the backprop case it is divided by must share (report.add_ratios): the same
# arithmetic, the same compiler and the same capture, or the ratio measures those instead of NoProp;
# and the same stacking (LIKE): a stacked DT step (vmap, bank) against backprop with its image
# branches stacked in a bank, an unstacked one (loop, threads) against backprop's loop.
TREATMENT = ("precision", "compile", "graph")
LIKE = TREATMENT + ("stacked",)
STACKED = ("vmap", "bank")  # executions (as resolved) that run blocks as one stacked computation


def stacks(execution: str, blocks_per_call: int, device) -> bool:
    """Whether `blocks_per_call` identical blocks run as one stacked computation with `execution` on
    `device` (one block per call, as in lean and sequential steps, stacks nothing, bank or not)."""
    return blocks_per_call >= 2 and engine.resolve_identical(execution, blocks_per_call, device) in STACKED


def backprop_executions(methods, modes, executions, T: int, chunk_size: int, device) -> list[str]:
    """The backprop baseline's executions that give each DT case a like-for-like partner: 'bank' for
    one that stacks on `device`, 'loop' for one that does not (without dt: what 'auto' is here)."""
    if "dt" not in methods:
        return ["bank" if stacks("auto", T, device) else "loop"]
    return list(dict.fromkeys("bank" if stacks(ex, blocks_per_step(mode, T, chunk_size), device) else "loop"
                              for mode in modes for ex in executions))


@dataclass
class Case:
    """One benchmarked configuration: method dt with a mode and execution, or a baseline; each in a
    precision (fp32, tf32, bf16), compiled or not, captured as a CUDA graph or not."""

    method: str
    mode: str  # dt: a training mode; baselines: "end-to-end"
    execution: str  # dt: loop | vmap | threads | bank | auto; backprop: loop | bank; cnn: "-"
    graph: bool = False  # dt parallel and backprop only: the step captured as a CUDA graph and replayed
    precision: str = "fp32"
    compile: bool = False  # the step's blocks through torch.compile (noprop.training.compiling)

    @property
    def treatment(self) -> tuple:
        return tuple(getattr(self, name) for name in TREATMENT)

    @property
    def label(self) -> str:
        tags = [t for t in (self.precision if self.precision != "fp32" else "", "compile" if self.compile else "") if t]
        tail = f" [{', '.join(tags)}]" if tags else ""
        if self.method != "dt":
            bank = " (bank)" if self.method == "backprop" and self.execution == "bank" else ""
            return self.method + ("+graph" if self.graph else "") + bank + tail
        return f"dt {self.mode}" + ("+graph" if self.graph else "") + \
            ("" if self.execution in ("auto", "-") else f" ({self.execution})") + tail


def plan(methods, modes, executions, T: int, chunk_size: int, cuda_graph: bool = False,
         precisions=("fp32",), compile: bool = False, device="cpu") -> tuple[list[Case], list[str]]:
    """Cases to run and notes on the ones skipped. vmap and threads are only run where they differ
    from loop: a lean chunk or a sequential step holds one block (nothing to stack or share out), as
    does a chunk of 1.
    precisions: every case is run in each (fp32, bf16, ...), the baselines included, so each DT case
    has a backprop case of the same precision to be divided by.
    compile: every case is repeated compiled (dt in the modes and executions compile takes; backprop
    and cnn), after the eager ones.
    cuda_graph: each dt parallel case, and backprop, is repeated captured as a CUDA graph (eager
    bodies), after all the other cases (in-process on CUDA, a failed capture could leave the context
    unusable for what follows). A dt graph case is then compared with backprop+graph: replay against replay.
    backprop runs in each of `backprop_executions` (its bank where a DT execution stacks on `device`)."""
    eager, notes, compiled, graphs = [], [], [], []
    baseline_executions = {"backprop": backprop_executions(methods, modes, executions, T, chunk_size, device),
                           "cnn": ["-"]}
    for precision in precisions:
        for method in methods:
            if method in BASELINES:
                for ex in baseline_executions[method]:
                    eager.append(Case(method, "end-to-end", ex, precision=precision))
                    if compile:
                        compiled.append(Case(method, "end-to-end", ex, precision=precision, compile=True))
                    if cuda_graph and method == "backprop":
                        graphs.append(Case(method, "end-to-end", ex, graph=True, precision=precision))
                continue
            for mode in modes:
                for ex in executions:
                    k = blocks_per_step(mode, T, chunk_size)
                    if ex in ("vmap", "threads") and k < 2:
                        what = "nothing to stack" if ex == "vmap" else "nothing to share out between threads"
                        if precision == precisions[0]:
                            notes.append(f"dt {mode} ({ex}) skipped: {k} block per chunk, {what} (runs as loop)")
                        continue
                    eager.append(Case(method, mode, ex, precision=precision))
                    reason = why_not_compile(method, ex) if compile else None
                    if compile and reason:
                        if precision == precisions[0]:
                            notes.append(f"dt {mode} ({ex}) [compile] skipped: {reason}")
                    elif compile:
                        compiled.append(Case(method, mode, ex, precision=precision, compile=True))
                    if cuda_graph and mode == "parallel":
                        graphs.append(Case(method, mode, ex, graph=True, precision=precision))
    return eager + compiled + graphs, notes

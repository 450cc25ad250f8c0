"""What `noprop bench` measures: the cases (method, mode, execution, graph) and the plan of them."""
from __future__ import annotations

from dataclasses import dataclass

from noprop import engine
from noprop.training.config import MODES, blocks_per_step

DT_MODES = MODES
EXECUTIONS = tuple(e for e in engine.EXECUTIONS if e != "auto")  # measurable ones; "auto" picks one of them
BASELINES = ("backprop", "cnn")


@dataclass
class Case:
    """One benchmarked configuration: method dt with a mode and execution, or a baseline."""

    method: str
    mode: str  # dt: a training mode; baselines: "end-to-end"
    execution: str  # loop | vmap | threads | auto ("-" for baselines: they run end to end)
    graph: bool = False  # dt parallel and backprop only: the step captured as a CUDA graph and replayed

    @property
    def label(self) -> str:
        if self.method != "dt":
            return self.method + ("+graph" if self.graph else "")
        return f"dt {self.mode}" + ("+graph" if self.graph else "") + \
            ("" if self.execution in ("auto", "-") else f" ({self.execution})")


def plan(methods, modes, executions, T: int, chunk_size: int, cuda_graph: bool = False) -> tuple[list[Case], list[str]]:
    """Cases to run and notes on the ones skipped. vmap and threads are only run where they differ
    from loop: a lean chunk or a sequential step holds one block (nothing to stack or share out), as
    does a chunk of 1.
    cuda_graph: each dt parallel case, and backprop, is repeated captured as a CUDA graph, after all
    the other cases (in-process on CUDA, a failed capture could leave the context unusable for what
    follows). A dt graph case is then compared with backprop+graph: replay against replay."""
    cases, notes, graphs = [], [], []
    for method in methods:
        if method in BASELINES:
            cases.append(Case(method, "end-to-end", "-"))
            if cuda_graph and method == "backprop":
                graphs.append(Case(method, "end-to-end", "-", graph=True))
            continue
        for mode in modes:
            for ex in executions:
                k = blocks_per_step(mode, T, chunk_size)
                if ex in ("vmap", "threads") and k < 2:
                    what = "nothing to stack" if ex == "vmap" else "nothing to share out between threads"
                    notes.append(f"dt {mode} ({ex}) skipped: {k} block per chunk, {what} (runs as loop)")
                    continue
                cases.append(Case(method, mode, ex))
                if cuda_graph and mode == "parallel":
                    graphs.append(Case(method, mode, ex, graph=True))
    return cases + graphs, notes

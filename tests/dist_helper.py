"""Launch W local processes the way torchrun does, for the distributed tests (CPU, gloo).

This process hosts the rendezvous store (as torchrun's agent does: TORCHELASTIC_USE_AGENT_STORE),
so any rank, rank 0 included, may die without taking the store with it. Every process gets one
torch thread, its own stdout/stderr file, and is killed (by its pid) in `finally` if it outlives
the hard timeout.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Rank:
    rank: int
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float  # from launch until this process exited


def launch(world: int, argv, timeout: float, extra_env: dict | None = None, per_rank_argv=None) -> list[Rank]:
    """Run `python <argv>` (per_rank_argv(rank) if given) as ranks 0..world-1 of one group; wait at
    most `timeout` seconds for all of them; returns each rank's exit code and output."""
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    procs, files = [], []
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as logs:
            for rank in range(world):
                env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": str(world), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                       **(extra_env or {})}
                out = open(Path(logs) / f"{rank}.out", "w+")
                err = open(Path(logs) / f"{rank}.err", "w+")
                files.append((out, err))
                args = per_rank_argv(rank) if per_rank_argv else argv
                procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=err))
            ended = [None] * world
            while any(e is None for e in ended) and time.monotonic() - start < timeout:
                for i, p in enumerate(procs):
                    if ended[i] is None and p.poll() is not None:
                        ended[i] = time.monotonic() - start
                time.sleep(0.05)
            results = []
            for i, (p, (out, err)) in enumerate(zip(procs, files)):
                code = p.poll()
                out.seek(0)
                err.seek(0)
                results.append(Rank(i, code, out.read(), err.read(), ended[i] if ended[i] is not None else timeout))
            return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in files:
            out.close()
            err.close()
        del store


def describe(results: list[Rank]) -> str:
    """Every rank's exit code and the tail of its stderr, for assertion messages."""
    return "\n".join(f"--- rank {r.rank}: exit {r.returncode} after {r.seconds:.1f}s\n{r.stderr[-3000:]}{r.stdout[-1500:]}"
                     for r in results)

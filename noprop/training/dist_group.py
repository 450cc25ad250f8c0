"""The process group of a block-parallel run: joining it from torchrun's environment with a bounded
timeout, leaving it, its collectives, and what a surviving rank says when a peer dies.

Faults: every collective waits at most the group's timeout, so no rank hangs forever. While the
group is up, each rank beats a heartbeat on the rendezvous store (a counter, every half second, on a
daemon thread). When a collective fails, the rank holds a roll call: the ranks whose counters stop
moving for a couple of seconds are dead (or frozen); they are named in the one-line error the rank
stops with. A rank that merely computes slowly keeps beating, so it is not named.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from noprop.messages import first_line

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0
BEAT_S = 0.5  # heartbeat period
STALE_BEATS = 4  # a counter that does not move for this many periods belongs to a dead rank


class DistributedError(RuntimeError):
    """A distributed run cannot start or cannot go on; the message says why (and names a dead rank)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or the like): the env names a rank and a world."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether a default process group is initialised here (training then runs block-parallel)."""
    return dist.is_available() and dist.is_initialized()


def choose_backend(device, requested: str = "auto") -> str:
    """gloo for CPU tensors, NCCL for CUDA ones (auto); an explicit choice that cannot run raises."""
    if requested not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {BACKENDS}, got {requested!r}")
    kind = torch.device(device).type
    backend = requested if requested != "auto" else ("nccl" if kind == "cuda" else "gloo")
    if backend == "nccl":
        if not (dist.is_available() and dist.is_nccl_available()):
            raise ValueError("distributed backend nccl: this torch build has no NCCL (use gloo)")
        if not torch.cuda.is_available():
            raise ValueError("distributed backend nccl needs CUDA GPUs, but none is visible to torch "
                             "(on CPU use gloo, the default there)")
        if kind != "cuda":
            raise ValueError(f"distributed backend nccl moves CUDA tensors only, but the device is {str(device)!r} "
                             "(train with --device cuda, or use gloo)")
    elif not (dist.is_available() and dist.is_gloo_available()):
        raise ValueError("distributed backend gloo: this torch build has no gloo")
    return backend


def rank_device(device: str) -> str:
    """The device of this rank: a bare 'cuda' becomes cuda:LOCAL_RANK (one GPU per process)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def init_from_env(device, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise the default process group from torchrun's env (env://) with a bounded timeout:
    a collective that waits longer than timeout_s for a peer fails instead of hanging."""
    if active():
        return
    chosen = choose_backend(device, backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=timeout_s)
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts: a restarted worker reading the keys its
            # dead predecessor wrote would dial a gone address, so every attempt gets keys of its own
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
            dist.init_process_group(chosen, store=dist.PrefixStore(f"noprop/attempt-{attempt}/", store),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                    timeout=timeout)
        else:
            dist.init_process_group(chosen, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the process group ({first_line(exc)}): is every rank launched "
                               f"with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE?") from None


def leave() -> None:
    """End of a run: wait for every rank (rank 0 may host the store the others still use), then
    destroy the process group."""
    if not active():
        return
    try:
        dist.barrier()
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {dist.get_rank()}: the run finished here but not on every rank "
                               f"({first_line(exc)})") from None
    abandon()


def abandon() -> None:
    """Drop the process group without waiting for the others (after an error every rank raised)."""
    _heart.stop()
    if active():
        dist.destroy_process_group()


def _key(what: str, rank: int) -> str:
    return f"noprop/{what}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


class _Heartbeat:
    """One daemon thread per process group, adding 1 to this rank's counter every BEAT_S."""

    def __init__(self):
        self.group, self.halt, self.thread = None, threading.Event(), None

    def start(self) -> None:
        group = dist.group.WORLD
        if self.group is group and self.thread is not None and self.thread.is_alive():
            return
        self.stop()
        store, key, halt = dist.distributed_c10d._get_default_store(), _key("beat", dist.get_rank()), threading.Event()

        def beat():
            while not halt.wait(BEAT_S):
                try:
                    store.add(key, 1)
                except Exception:  # the store is gone: the run is ending one way or another
                    return

        self.group, self.halt = group, halt
        self.thread = threading.Thread(target=beat, name="noprop-heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop beating and wait for the thread: one still inside a store call when the interpreter
        exits makes the C++ runtime abort the process (exit -6) after a clean run."""
        self.halt.set()
        self.group = None
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * BEAT_S + 5)


_heart = _Heartbeat()
atexit.register(_heart.stop)


def roll_call(rank: int, world: int) -> list | None:
    """The ranks (sorted) whose heartbeats stood still for STALE_BEATS periods, or None if the store
    itself is gone (its host died)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        others = [r for r in range(world) if r != rank]
        first = {r: store.add(_key("beat", r), 0) for r in others}
        still = set(others)
        deadline = time.monotonic() + STALE_BEATS * BEAT_S
        while still and time.monotonic() < deadline:
            time.sleep(BEAT_S / 5)
            still = {r for r in still if store.add(_key("beat", r), 0) == first[r]}
        return sorted(still)
    except Exception:
        return None


class Comm:
    """The collectives of a run, each wrapped so that a failure (a peer died, hung, or raised) stops
    this rank with a DistributedError that names the ranks whose heartbeats stopped."""

    def __init__(self, layout):
        self.layout = layout
        self.where = "start-up"  # set by the loop: which step of which epoch
        self.bytes = 0  # bytes this rank put into collectives (for bench)
        self.seconds = 0.0  # wall time this rank spent in them, waiting for its peers included
        if active():
            _heart.start()

    def run(self, what: str, fn):
        if not active():
            return fn()
        start = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ValueError) as exc:  # DistBackendError, gloo's connection errors, timeouts
            raise self.failure(what, exc) from None
        finally:
            self.seconds += time.perf_counter() - start

    def failure(self, what: str, exc: BaseException) -> DistributedError:
        lay = self.layout
        missing = roll_call(lay.rank, lay.world)
        if missing is None:
            who = "rank 0 (or the rendezvous store it hosts) is unreachable"
        elif missing:
            who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped: no heartbeat "
                   f"for {STALE_BEATS * BEAT_S:.0f} s (it died, stopped on an error of its own, or froze)")
        else:
            who = ("every rank is alive, so none died: a collective failed or timed out (a rank that raised an "
                   "error of its own, or one stuck longer than --dist-timeout)")
        said = first_line(exc)
        said = said if len(said) <= 160 else said[:157] + "..."
        return DistributedError(f"rank {lay.rank} stops: {who}, during {what} ({self.where}); "
                                f"the collective said: {said}")

    def broadcast(self, tensor, src: int = 0, group=None, what: str = "broadcast"):
        self.bytes += tensor.numel() * tensor.element_size()
        self.run(what, lambda: dist.broadcast(tensor, src=src, group=group) if group is None else
                 dist.broadcast(tensor, group=group, group_src=src))

    def all_reduce(self, tensor, group=None, what: str = "all-reduce"):
        self.bytes += tensor.numel() * tensor.element_size()
        self.run(what, lambda: dist.all_reduce(tensor, group=group))

    def barrier(self, what: str = "barrier"):
        if active():
            self.run(what, lambda: dist.barrier())

"""One rank of a distributed test (launched by tests/dist_helper.py): `python -m tests.dist_worker
SCENARIO OUT_DIR [ARG]`. Each scenario writes what the test compares to OUT_DIR/<scenario>.<rank>.pt
(tensors by name, losses, error messages), or exits non-zero with the error on stderr."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from noprop.data import synthetic  # noqa: E402
from noprop.training import Optimizers, TrainConfig, build_model, fit_distributed  # noqa: E402
from noprop.training.distributed import (BlockParallelStep, Comm, DistributedError, init_from_env, leave,  # noqa: E402
                                         make_layout)

T = 4
TIMEOUT_S = 30.0


def config(**kw) -> TrainConfig:
    base = dict(method="dt", T=T, epochs=1, batch_size=16, seed=3, execution="loop", data="synthetic",
                eval_runs=1, weight_decay=1e-2)
    return TrainConfig(**{**base, **kw})


def data(train_size: int = 48):
    return synthetic(image_shape=(1, 14, 14), num_classes=5, train_size=train_size, test_size=32, seed=1)


def fixed_batches(n: int = 3, batch: int = 16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(batch, 1, 14, 14, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def owned_state(model, opts, layout) -> dict:
    """This rank's blocks and the shared parameters, their AdamW state, all by name."""
    names = {p: n for n, p in model.named_parameters()}
    owned = {f"blocks.{t - 1}." for t in layout.owned}
    keep = lambda n: not n.startswith("blocks.") or any(n.startswith(o) for o in owned)  # noqa: E731
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if keep(n)}
    out.update({f"buffer.{n}": b.clone() for n, b in model.named_buffers() if keep(n)})
    for opt in opts.all():
        for p, st in opt.state.items():
            out.update({f"optim.{names[p]}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def steps(out: Path, tag: str, dp: int, dtype=torch.float32, **kw) -> None:
    """A few block-parallel steps on fixed minibatches, straight through BlockParallelStep."""
    cfg = config(**kw)
    split = data()
    layout = make_layout(cfg.T, dp, "cpu", TIMEOUT_S)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, split.image_shape, split.num_classes, split.train).to(dtype)
    opts = Optimizers(model, cfg, blocks=layout.owned)
    step = BlockParallelStep(model, opts, layout, Comm(layout), torch.device("cpu"), cfg.chunk)
    losses = [step(x.to(dtype), y) for x, y in fixed_batches()]
    torch.save({"losses": losses, "state": owned_state(model, opts, layout), "owned": layout.owned,
                "dp_rank": layout.dp_rank, "bytes": step.bytes_per_step()}, out / f"{tag}.{layout.rank}.pt")


def catch(out: Path, tag: str, fn) -> None:
    try:
        fn()
        message = None
    except (ValueError, DistributedError) as exc:
        message = str(exc)
    torch.save({"error": message}, out / f"{tag}.{dist.get_rank()}.pt")


def killer(model, rank: int, at_call: int) -> None:
    """Block 2's training forward SIGKILLs this process at its at_call-th call (on its owner only)."""
    calls = [0]

    def hook(module, args):
        if module.training:
            calls[0] += 1
            if calls[0] == at_call and dist.get_rank() == rank:
                os.kill(os.getpid(), signal.SIGKILL)

    model.blocks[1].register_forward_pre_hook(hook)


def main(scenario: str, out: str, arg: str = "") -> int:
    out = Path(out)
    init_from_env("cpu", "gloo", TIMEOUT_S)
    rank = dist.get_rank()
    quiet = lambda *a, **k: None  # noqa: E731
    if scenario == "world2":
        steps(out, "steps_onehot", 1)
        steps(out, "steps_learned", 1, torch.float64, embedding="learned", embed_dim=6, mode="chunked", chunk_size=1)
        fit_distributed(config(epochs=1, augment_shift=1), data(), out / "ckpt_w2", progress=False, log=quiet)
        catch(out, "too_many_ranks", lambda: make_layout(1, 1, "cpu"))
        catch(out, "bad_dp", lambda: make_layout(T, 3, "cpu"))
        catch(out, "mismatch", lambda: fit_distributed(config(lr=1e-3 * (1 + rank)), data(), None, progress=False,
                                                        log=quiet))
        catch(out, "sequential", lambda: fit_distributed(config(mode="sequential"), data(), progress=False, log=quiet))
    elif scenario == "world4":
        fit_distributed(config(epochs=2, augment_shift=1), data(), out / "ckpt_w4", resume=True, progress=False,
                        log=quiet)
        steps(out, "steps_2x2", 2)
        fit_distributed(config(), data(), out / "ckpt_2x2", progress=False, log=quiet, dp=2)
    elif scenario == "kill":
        cfg = config(T=3)
        torch.manual_seed(cfg.seed)
        split = data(train_size=96)
        model = build_model(cfg, split.image_shape, split.num_classes, split.train)
        killer(model, rank=1, at_call=int(arg or 3))
        try:
            fit_distributed(cfg, split, None, progress=False, log=quiet, model=model, timeout_s=TIMEOUT_S)
        except DistributedError as exc:
            print(f"noprop train: error: {exc}", file=sys.stderr)
            return 2
    leave()  # every rank reaches the end, then the heartbeat stops and the group goes
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

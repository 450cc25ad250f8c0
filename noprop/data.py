"""Datasets as in-memory tensors: the embedded MNIST-5k, torchvision-layout directories, synthetic.

Every source yields a `Split` (train, test) of images [N, C, H, W] float32 normalised with the
training set's per-channel mean and std, and labels [N] int64. Inputs are validated when loaded:
NaN/inf, wrong rank, non-integer labels, labels out of range, train and test images of different
shapes and empty sets raise `DataError` saying what is wrong. CIFAR pickles are read by an
unpickler that builds nothing but containers, strings, numbers and numpy arrays.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noprop.array_pickle import RefusedGlobal, load_array_pickle
from noprop.messages import first_line


class DataError(ValueError):
    """A dataset could not be loaded or is unusable; the message says which file and why."""


@dataclass
class Dataset:
    images: torch.Tensor  # [N, C, H, W] float32
    labels: torch.Tensor  # [N] int64

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class Split:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def _check_label_range(lo, hi, num_classes: int, what: str) -> None:
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{what}: labels must lie in [0, {num_classes - 1}], got values in [{lo:g}, {hi:g}]")


def validate(images: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str = "dataset") -> None:
    """Raise DataError unless images [N, C, H, W] are finite and labels [N] are integers in [0, m)."""
    if images.ndim != 4:
        raise DataError(f"{what}: images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what} is empty: it has no images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{what}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{what}: labels must be integer class indices, got a {labels.dtype} tensor")
    if not torch.isfinite(images).all():
        raise DataError(f"{what}: images contain NaN or inf values")
    _check_label_range(int(labels.min()), int(labels.max()), num_classes, what)


def _as_labels(labels, num_classes: int, what: str) -> torch.Tensor:
    """labels (a tensor, array or list) as int64. A cast would turn strings into errors deep in numpy
    and truncate fractions silently (1.5 -> 1), so only integers and whole-valued floats (3.0) pass."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
        labels = (labels.double() if labels.is_floating_point() else labels).numpy()
    try:
        arr = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{what}: labels are not a flat sequence of numbers ({first_line(exc)})") from None
    if arr.dtype.kind == "f" and arr.size:
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            raise DataError(f"{what}: labels must be whole numbers (class indices), got {arr[bad].flat[0].item()!r} "
                            f"at position {int(np.flatnonzero(bad.ravel())[0])}")
    elif arr.dtype.kind not in "iu":
        example = f" such as {arr.flat[0].item()!r}" if arr.size else ""
        raise DataError(f"{what}: labels must be integer class indices, got {arr.dtype} values{example}")
    if arr.size:  # before the cast: a value past int64 would wrap and the error would quote garbage
        _check_label_range(arr.min().item(), arr.max().item(), num_classes, what)
    return torch.from_numpy(arr.astype(np.int64))


def _as_images(images, what: str) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.detach().to(torch.float32)
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{what}: images are not an array of numbers ({first_line(exc)})") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what}: images must be numbers, got {arr.dtype} values")
    return torch.from_numpy(arr.astype(np.float32, copy=False))


def _shape(images: torch.Tensor) -> str:
    return " x ".join(map(str, images.shape[1:]))


def _normalise(train: torch.Tensor, test: torch.Tensor):
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _make_split(x_tr, y_tr, x_te, y_te, num_classes, name) -> Split:
    what_tr, what_te = f"{name} training set", f"{name} test set"
    x_tr, x_te = _as_images(x_tr, what_tr), _as_images(x_te, what_te)
    y_tr, y_te = _as_labels(y_tr, num_classes, what_tr), _as_labels(y_te, num_classes, what_te)
    validate(x_tr, y_tr, num_classes, what_tr)
    validate(x_te, y_te, num_classes, what_te)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{name}: training images are {_shape(x_tr)} but test images are {_shape(x_te)}: "
                        "a model takes one image shape")
    x_tr, x_te = _normalise(x_tr, x_te)
    return Split(Dataset(x_tr.contiguous(), y_tr), Dataset(x_te.contiguous(), y_te), num_classes, name)


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def mnist5k_path() -> Path:
    """The embedded MNIST-5k file (noprop/assets/mnist5k.npz; its README says where it comes from)."""
    return Path(__file__).parent / "assets" / "mnist5k.npz"


def load_mnist5k(seed: int = 0) -> Split:
    """5,000 MNIST digits (500 per class) shipped with noprop: 4,000 train / 1,000 test, stratified
    by a fixed seed."""
    path = mnist5k_path()
    if not path.exists():
        raise DataError(f"embedded MNIST-5k file not found at {path}: the noprop installation is incomplete")
    try:
        with np.load(path, allow_pickle=False) as f:
            pixels, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read the embedded MNIST-5k file {path}: {first_line(exc)}") from None
    if pixels.shape != (5000, 1, 28, 28) or labels.shape != (5000,):
        raise DataError(f"embedded MNIST-5k file {path} is damaged: images {pixels.shape}, labels {labels.shape}")
    images, labels = pixels.astype(np.float32) / 255.0, labels.astype(np.int64)
    tr, te = _stratified_split(labels, test_per_class=100, seed=seed)
    return _make_split(images[tr], labels[tr], images[te], labels[te], 10, "mnist5k")


# --- torchvision-layout directories -------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(shape)):
            raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
        return arr.reshape(shape)
    except (OSError, struct.error, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


def _find(root: Path, names) -> Path | None:
    for sub in ("", "MNIST/raw", "raw"):
        for name in names:
            for suffix in ("", ".gz"):
                p = root / sub / (name + suffix)
                if p.exists():
                    return p
    return None


def _load_mnist_dir(root: Path) -> Split | None:
    names = {"xtr": "train-images-idx3-ubyte", "ytr": "train-labels-idx1-ubyte",
             "xte": "t10k-images-idx3-ubyte", "yte": "t10k-labels-idx1-ubyte"}
    found = {k: _find(root, [v]) for k, v in names.items()}
    if not any(found.values()):
        return None
    missing = [names[k] for k, v in found.items() if v is None]
    if missing:
        raise DataError(f"MNIST directory {root} is incomplete: missing {', '.join(missing)}")
    x_tr, y_tr = _read_idx(found["xtr"]), _read_idx(found["ytr"])
    x_te, y_te = _read_idx(found["xte"]), _read_idx(found["yte"])
    return _make_split(x_tr[:, None] / 255.0, y_tr.astype(np.int64), x_te[:, None] / 255.0,
                       y_te.astype(np.int64), 10, "mnist")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = load_array_pickle(f)
    except RefusedGlobal as exc:
        raise DataError(f"CIFAR batch {path}: refusing to load a pickle that asks for {exc.name} (a CIFAR batch "
                        "holds only lists, dicts, bytes and numpy arrays)") from None
    except Exception as exc:  # a damaged pickle can fail in many ways; each is one line for the user
        raise DataError(f"cannot read CIFAR batch {path}: {first_line(exc)}") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR batch {path} holds a {type(batch).__name__}, not a dict: not a CIFAR python batch")
    # Python 2 pickles read as latin-1 give str keys; batches re-pickled from bytes-keyed dicts give b'data'.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    if "data" not in batch:
        raise DataError(f"{path} has no 'data' entry: not a CIFAR python batch")
    try:
        data = np.asarray(batch["data"])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: 'data' is not an array of pixel values ({first_line(exc)})") from None
    if data.dtype.kind not in "iuf":
        raise DataError(f"{path}: 'data' must hold pixel values (numbers), got {data.dtype} values")
    if data.ndim < 1 or data.shape[0] == 0 or data.size != data.shape[0] * 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape}; a CIFAR batch holds one row of 3072 values "
                        "(3 x 32 x 32) per image")
    return data.astype(np.float32).reshape(-1, 3, 32, 32) / 255.0


def _cifar_batch(path: Path, label_key: str, num_classes: int):
    """(images [n, 3, 32, 32] float32 in [0, 1], labels [n] int64) from one CIFAR python batch."""
    batch = _unpickle(path)
    images = _cifar_images(batch, path)
    if label_key not in batch:
        raise DataError(f"{path} has no '{label_key}' entry: not a CIFAR python batch "
                        f"(its entries: {', '.join(map(str, batch))})")
    labels = _as_labels(batch[label_key], num_classes, f"CIFAR batch {path}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: '{label_key}' must hold one label per row of 'data' ({images.shape[0]}), "
                        f"got shape {tuple(labels.shape)}")
    return images, labels


def _load_cifar_dir(root: Path) -> Split | None:
    for base in (root, root / "cifar-10-batches-py"):
        if (base / "data_batch_1").exists() or (base / "test_batch").exists():
            files = [base / f"data_batch_{i}" for i in range(1, 6)]
            missing = [p.name for p in files + [base / "test_batch"] if not p.exists()]
            if missing:
                raise DataError(f"CIFAR-10 directory {base} is incomplete: missing {', '.join(missing)}")
            x_tr, y_tr = zip(*(_cifar_batch(p, "labels", 10) for p in files))
            x_te, y_te = _cifar_batch(base / "test_batch", "labels", 10)
            return _make_split(np.concatenate(x_tr), torch.cat(y_tr), x_te, y_te, 10, "cifar10")
    for base in (root, root / "cifar-100-python"):
        if (base / "train").exists() and (base / "test").exists():
            x_tr, y_tr = _cifar_batch(base / "train", "fine_labels", 100)
            x_te, y_te = _cifar_batch(base / "test", "fine_labels", 100)
            return _make_split(x_tr, y_tr, x_te, y_te, 100, "cifar100")
    return None


def load_directory(path: str | os.PathLike) -> Split:
    """MNIST (IDX files, plain or .gz) or CIFAR-10/100 (python pickles) in torchvision's layout."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    for loader in (_load_mnist_dir, _load_cifar_dir):
        split = loader(root)
        if split is not None:
            return split
    raise DataError(f"{root} holds no MNIST IDX files (train-images-idx3-ubyte[.gz], ...) and no CIFAR "
                    "python batches (cifar-10-batches-py/ or cifar-100-python/)")


# --- synthetic ----------------------------------------------------------------------------------

def synthetic(image_shape=(1, 28, 28), num_classes: int = 10, train_size: int = 1024, test_size: int = 256,
              seed: int = 0, noise: float = 1.0) -> Split:
    """Learnable synthetic images: a fixed random pattern per class plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, *image_shape, generator=g)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return patterns[y] + noise * torch.randn(n, *image_shape, generator=g), y

    (x_tr, y_tr), (x_te, y_te) = draw(train_size), draw(test_size)
    return _make_split(x_tr, y_tr, x_te, y_te, num_classes, "synthetic")


def parse_synthetic(spec: str) -> Split:
    """'synthetic' or 'synthetic:C,H,W[,classes[,train_size]]'."""
    if spec == "synthetic":
        return synthetic()
    try:
        nums = [int(v) for v in spec.split(":", 1)[1].split(",")]
        if len(nums) < 3 or any(v < 1 for v in nums):
            raise ValueError
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}: use synthetic:C,H,W[,classes[,train_size]]") from None
    kwargs = {"image_shape": tuple(nums[:3])}
    if len(nums) > 3:
        kwargs["num_classes"] = nums[3]
    if len(nums) > 4:
        kwargs["train_size"] = nums[4]
    return synthetic(**kwargs)


def load(source: str = "mnist5k", data_dir: str | None = None, seed: int = 0) -> Split:
    """Load by name: 'mnist5k' (default, embedded), 'synthetic[:C,H,W,...]', or a directory."""
    if data_dir is not None:
        return load_directory(data_dir)
    if source == "mnist5k":
        return load_mnist5k(seed)
    if source.startswith("synthetic"):
        return parse_synthetic(source)
    raise DataError(f"unknown data source {source!r}: use mnist5k, synthetic[:C,H,W,...] or --data-dir DIR")


def batch_bounds(n: int, batch_size: int, min_last: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of each minibatch over n samples; a last batch smaller than min_last is folded into
    the one before it (training: BatchNorm cannot normalise a batch of one sample)."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def batches(ds: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            min_last: int = 1):
    """Yield (x [b, C, H, W], y [b]) minibatches (see `batch_bounds` for min_last)."""
    order = torch.randperm(len(ds), generator=generator) if shuffle else torch.arange(len(ds))
    for start, stop in batch_bounds(len(ds), batch_size, min_last):
        idx = order[start:stop]
        yield ds.images[idx], ds.labels[idx]


def fingerprint(split: Split) -> str:
    """A short hash of a split's images and labels: a resumed run checks it trains on the same data."""
    h = hashlib.sha256()
    for t in (split.train.images, split.train.labels, split.test.images, split.test.labels):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image [B, C, H, W] by up to ±max_shift pixels in x and y; uncovered pixels take
    the batch's smallest value (the background of normalised digit images)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=float(x.min()))
    dy = torch.randint(0, 2 * s + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(W)[None]).to(x.device)  # [B, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()

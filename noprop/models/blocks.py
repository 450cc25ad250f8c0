"""The paper's DT block (docs/method.md §7, paper Fig. 6) and its parts.

A block maps (x [B, C, H, W], z [B, d]) -> logits [B, m]; NoProp turns the logits into
û = softmax(logits) · W. All convs are 3×3 with no padding: that reproduces the paper's
parameter counts (0.92 M per block on MNIST one-hot, 1.22 M on CIFAR-10).
"""
from __future__ import annotations

import torch
from torch import nn

from noprop.models.dropout import Dropout
from noprop.models.inputs import check_images, check_runs


def smallest_input(layers: nn.Sequential) -> tuple[int, int]:
    """The smallest (H, W) for which every conv and pool in `layers` leaves at least one pixel.

    Walks the stack backwards from a 1 x 1 output: a layer with kernel k, stride s, padding p and
    dilation d gives floor((n + 2p - d(k - 1) - 1) / s) + 1 >= m pixels iff n >= (m - 1)s + d(k - 1) + 1 - 2p.
    """
    need = [1, 1]
    for layer in reversed(layers):
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            for axis in (0, 1):
                k, s, p = (_pair(getattr(layer, name))[axis] for name in ("kernel_size", "stride", "padding"))
                d = _pair(getattr(layer, "dilation", 1))[axis]
                need[axis] = max(1, (need[axis] - 1) * s + d * (k - 1) + 1 - 2 * p)
    return need[0], need[1]


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class ConvBranch(nn.Module):
    """conv32 → ReLU → pool → drop → conv64 → ReLU → drop → conv128 → ReLU → pool → drop →
    flatten → FC256 → BN.  [B, C, H, W] -> [B, 256]."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 256, dropout: float = 0.2):
        super().__init__()
        c = image_shape[0]
        self.convs = nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2), Dropout(dropout),
            nn.Conv2d(32, 64, 3), nn.ReLU(), Dropout(dropout),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), Dropout(dropout),
            nn.Flatten(),
        )
        need = smallest_input(self.convs)
        if image_shape[1] < need[0] or image_shape[2] < need[1]:
            raise ValueError(f"images of {image_shape[1]} x {image_shape[2]} are too small for the DT block's "
                             f"convolutions (needs at least {need[0]} x {need[1]})")
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, *image_shape)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, width), nn.BatchNorm1d(width))

    def forward(self, x):
        return self.fc(self.convs(x))


class LabelBranch(nn.Module):
    """z → FC256 → BN → ReLU = h;  h → FC256 → BN → ReLU → FC256 → BN, + h.  [B, d] -> [B, 256].

    For prototype embeddings (z is an image) the first FC is replaced by a conv branch of its own.
    """

    def __init__(self, dim: int, width: int = 256, z_image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.z_image_shape = z_image_shape
        if z_image_shape is not None:
            self.inp = nn.Sequential(ConvBranch(z_image_shape, width), nn.ReLU())
        else:
            self.inp = nn.Sequential(nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, width), nn.BatchNorm1d(width))

    def forward(self, z):
        if self.z_image_shape is not None:
            z = z.reshape(z.shape[0], *self.z_image_shape)
        h = self.inp(z)
        return self.res(h) + h


class DTBlock(nn.Module):
    """One NoProp-DT block: image branch, label branch, fusion MLP -> m logits.

    forward(x [B, C, H, W], z [B, d]) -> logits [B, m]. `features(x)` and `from_features(f, z)`
    split the work so inference can run the image branch of every block once per image.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, embed_dim: int,
                 z_image_shape: tuple[int, int, int] | None = None, width: int = 256):
        super().__init__()
        self.image = ConvBranch(image_shape, width)
        self.label = LabelBranch(embed_dim, width, z_image_shape)
        self.fuse = nn.Sequential(
            nn.Linear(2 * width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def features(self, x):
        """Image branch only: x [B, C, H, W] -> features [B, width] (no z: shared by a whole chain)."""
        return self.image(x)

    def from_features(self, feats, z):
        """feats [B, width] (from `features`) and z [B, d] -> logits [B, m]."""
        return self.fuse(torch.cat([feats, self.label(z)], dim=1))

    def forward(self, x, z):
        """x [B, C, H, W], z [B, d] -> logits [B, m]."""
        return self.from_features(self.features(x), z)


def dt_block_factory(image_shape, num_classes: int, embedding):
    """A factory t -> DTBlock for `embedding` (prototype embeddings get a conv z-branch)."""
    z_shape = embedding.image_shape if embedding.kind == "prototype" else None

    def make(t: int) -> DTBlock:
        return DTBlock(tuple(image_shape), num_classes, embedding.dim, z_shape)

    return make


class CNNClassifier(nn.Module):
    """The strongest fair backprop reference (docs/method.md §9): one block's image branch + ReLU +
    a linear classifier, trained end to end. x [B, C, H, W] -> logits [B, m]."""

    def __init__(self, image_shape, num_classes: int, width: int = 256):
        super().__init__()
        self.input_shape = tuple(image_shape)
        self.image = ConvBranch(tuple(image_shape), width)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        """x [B, C, H, W] -> logits [B, m]."""
        check_images(x, self.input_shape)
        return self.out(self.image(x))

    def loss(self, x, y):
        """Mean cross-entropy of forward(x) [B, m] against labels y [B] (class indices): a scalar."""
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def predict_proba(self, x, runs: int = 1, **_):
        """Class probabilities [B, m] = softmax(forward(x)). Deterministic, so `runs` (checked, >= 1)
        and other inference keywords are accepted and ignored."""
        check_runs(runs)
        return torch.softmax(self(x), -1)

    def predict(self, x, **kwargs):
        """Predicted classes [B] (int64): the argmax of `predict_proba` [B, m]."""
        return self.predict_proba(x, **kwargs).argmax(-1)

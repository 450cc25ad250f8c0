"""Class embeddings W_Embed [m, d]: one-hot (fixed), learned (d-dim) and prototype (image-sized).

`u_y = W[y]` is the clean target every block denoises towards; a block's prediction is the convex
mix softmax(logits) · W.
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("onehot", "learned", "prototype")


class ClassEmbedding(nn.Module):
    """Holds W [m, d]. `kind` is 'onehot' (fixed identity, d = m), 'learned' or 'prototype'.

    `image_shape` is set for prototype embeddings: each row is then an image (d = C·H·W) and
    blocks route z through a conv branch of its own.
    """

    def __init__(self, kind: str, num_classes: int, dim: int | None = None, init: torch.Tensor | None = None,
                 image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"embedding kind must be one of {KINDS}, got {kind!r}")
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.kind, self.num_classes, self.image_shape = kind, num_classes, image_shape
        if kind == "onehot":
            self.register_buffer("_fixed", torch.eye(num_classes))
            self.dim = num_classes
            return
        if init is None:
            if dim is None or dim < 1:
                raise ValueError(f"a {kind} embedding needs dim >= 1, got {dim}")
            init = self._default_init(num_classes, dim)
        if init.shape[0] != num_classes:
            raise ValueError(f"embedding init must have {num_classes} rows, got shape {tuple(init.shape)}")
        self.dim = init.shape[1]
        self._learned = nn.Parameter(init.clone().float())

    @staticmethod
    def _default_init(m: int, d: int) -> torch.Tensor:
        if m <= d:  # orthonormal rows: classes start equidistant and maximally separated
            q, _ = torch.linalg.qr(torch.randn(d, m))
            return q.T.contiguous()
        return torch.randn(m, d) / d**0.5

    @property
    def weight(self) -> torch.Tensor:
        """W: [m, d]."""
        return self._fixed if self.kind == "onehot" else self._learned

    @property
    def trainable(self) -> bool:
        return self.kind != "onehot"

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_classes={self.num_classes}, dim={self.dim}"


def medoid_prototypes(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      max_per_class: int = 1000) -> torch.Tensor:
    """Per class, the training image whose median distance to the other images of its class is
    smallest (paper's prototype init). images: [N, C, H, W] -> [m, C·H·W]."""
    flat = images.reshape(images.shape[0], -1).float()
    rows = []
    for c in range(num_classes):
        members = flat[labels == c][:max_per_class]
        if members.shape[0] == 0:
            raise ValueError(f"class {c} has no training images: cannot build its prototype")
        if members.shape[0] == 1:
            rows.append(members[0])
            continue
        dist = torch.cdist(members, members).fill_diagonal_(float("nan"))  # distances to the OTHER images
        rows.append(members[dist.nanmedian(dim=1).values.argmin()])
    return torch.stack(rows)


def make_embedding(kind: str, num_classes: int, dim: int = 20, train_images: torch.Tensor | None = None,
                   train_labels: torch.Tensor | None = None) -> ClassEmbedding:
    """Build an embedding by name; prototype needs the training images [N, C, H, W] and labels."""
    if kind == "prototype":
        if train_images is None or train_labels is None:
            raise ValueError("a prototype embedding needs the training images and labels")
        init = medoid_prototypes(train_images, train_labels, num_classes)
        return ClassEmbedding("prototype", num_classes, init=init, image_shape=tuple(train_images.shape[1:]))
    return ClassEmbedding(kind, num_classes, dim=dim)

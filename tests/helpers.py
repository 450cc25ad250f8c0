"""Small models and data shared by the tests (fast enough for a 2-core CPU)."""
import torch
from torch import nn

from noprop.embeddings import make_embedding
from noprop.models import NoPropDT
from noprop.schedule import DTSchedule


class TinyBlock(nn.Module):
    """(x [B, C, H, W], z [B, d]) -> logits [B, m] with BatchNorm and dropout, like the DT block."""

    def __init__(self, in_features, d, m, width=32):
        super().__init__()
        self.x_net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(),
                                   nn.Dropout(0.1))
        self.z_net = nn.Sequential(nn.Linear(d, width), nn.ReLU())
        self.out = nn.Linear(2 * width, m)

    def forward(self, x, z):
        return self.out(torch.cat([self.x_net(x), self.z_net(z)], 1))


def tiny_dt(T=4, m=5, d=None, image_shape=(1, 4, 4), embedding="onehot"):
    emb = make_embedding(embedding, m, dim=d or 8)
    n_in = image_shape[0] * image_shape[1] * image_shape[2]
    return NoPropDT(lambda t: TinyBlock(n_in, emb.dim, m), emb, DTSchedule.cosine(T))


def batch(B=16, m=5, image_shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *image_shape, generator=g), torch.randint(0, m, (B,), generator=g)


def assert_grads_close_per_block(got: dict, ref: dict, rtol: float = 1e-4):
    """Compare parameter gradients {name: grad} relative to the largest gradient of the same block
    (or shared parameter): float32 sums in another order differ by rounding, and a gradient that is
    exactly zero in exact arithmetic (a bias feeding BatchNorm) is pure rounding noise."""
    assert got.keys() == ref.keys()

    def owner(name):
        return name.split(".")[1] if name.startswith("blocks.") else name

    scale = {}
    for n, g in ref.items():
        scale[owner(n)] = max(scale.get(owner(n), 0.0), g.abs().max().item())
    for n in ref:
        assert (got[n] - ref[n]).abs().max().item() <= rtol * scale[owner(n)] + 1e-8, n

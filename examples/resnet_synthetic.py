"""Bring your own block: a small residual CNN block on synthetic CIFAR-shaped data (3×32×32,
10 classes), NoProp-DT against backprop on the same blocks.

    python examples/resnet_synthetic.py            # a few minutes on 2 CPU cores
    python examples/resnet_synthetic.py --quick    # smoke test
"""
import argparse

import torch
from torch import nn

import noprop
from noprop.data import synthetic
from noprop.training import TrainConfig, evaluate, fit


class ResidualStage(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU. [B, c, H, W] -> [B, c, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(self.body(x) + x)


class ResNetBlock(nn.Module):
    """(x [B, 3, 32, 32], z [B, d]) -> logits [B, m]: a stem, two residual stages, a pooled 4×4
    feature map fused with an embedding of z."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 16):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                   ResidualStage(channels), nn.MaxPool2d(2), ResidualStage(channels),
                                   nn.AdaptiveAvgPool2d(4), nn.Flatten())  # keep a 4×4 map: where matters
        self.label = nn.Sequential(nn.Linear(embed_dim, 64), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(16 * channels + 64, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x, z):
        return self.out(torch.cat([self.image(x), self.label(z)], dim=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training data")
    parser.add_argument("--blocks", type=int, default=5, help="number of NoProp blocks T")
    parser.add_argument("--quick", action="store_true", help="tiny run (CI smoke test)")
    args = parser.parse_args(argv)
    n_train = 128 if args.quick else 2000
    split = synthetic((3, 32, 32), 10, train_size=n_train, test_size=n_train // 4, noise=1.5)
    epochs, T = (1, 2) if args.quick else (args.epochs, args.blocks)

    results = {}
    for method in ("dt", "backprop"):
        torch.manual_seed(0)
        emb = noprop.make_embedding("onehot", split.num_classes)
        make_block = lambda t: ResNetBlock(emb.dim, split.num_classes)  # noqa: E731
        cls = noprop.NoPropDT if method == "dt" else noprop.BackpropDT
        model = cls(make_block, emb, num_blocks=T, input_shape=split.image_shape)
        cfg = TrainConfig(method=method, epochs=epochs, T=T, batch_size=64)
        model, history = fit(cfg, split, model=model, progress=False,
                             log=lambda line, method=method: print(f"[{method}] {line}"))
        results[method] = {"test_acc": evaluate(model, split.test), "elapsed_s": history[-1]["elapsed_s"]}
    for method, r in results.items():
        print(f"{method:9s} test accuracy {r['test_acc']:.4f}  training time {r['elapsed_s']:.0f}s")
    return results


if __name__ == "__main__":
    main()

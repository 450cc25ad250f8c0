"""Images smaller than the DT conv stack can take are refused where a block is built, in one line."""
import pytest
import torch
from torch import nn

from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import CNNClassifier, ConvBranch, DTBlock, dt_block_factory
from noprop.models.blocks import smallest_input
from noprop.models.ct_block import CTBlock


def _smallest_size_torch_accepts(layers: nn.Sequential) -> int:
    """Independent of smallest_input: the smallest square side torch itself runs `layers` on."""
    for side in range(1, 64):
        try:
            with torch.no_grad():
                out = layers(torch.zeros(1, 1, side, side))
        except RuntimeError:
            continue
        if out.numel() > 0:
            return side
    raise AssertionError("no size up to 63 works")


def test_smallest_input_of_the_dt_stack_is_what_torch_accepts():
    branch = ConvBranch((1, 28, 28))
    side = _smallest_size_torch_accepts(branch.convs)
    assert smallest_input(branch.convs) == (side, side) == (14, 14)


def test_smallest_input_follows_stride_padding_and_dilation():
    layers = nn.Sequential(nn.Conv2d(1, 2, (5, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.ReLU(),
                           nn.MaxPool2d(3, stride=2), nn.Conv2d(2, 2, 3))
    # rows: conv 3 <- pool 7 <- (7-1)*2 + 4 + 1 - 2 = 15;  cols: conv 3 <- pool 7 <- 7 + 2*2 = 11
    assert smallest_input(layers) == (15, 11)
    with torch.no_grad():
        assert layers(torch.zeros(1, 1, 15, 11)).shape[-2:] == (1, 1)
        for h, w in ((14, 11), (15, 10)):
            with pytest.raises(RuntimeError):
                layers(torch.zeros(1, 1, h, w))


@pytest.mark.parametrize("build", [
    lambda shape: DTBlock(shape, 10, 10),
    lambda shape: CNNClassifier(shape, 10),
    lambda shape: CTBlock(shape, 10, 10),
    lambda shape: dt_block_factory(shape, 10, make_embedding("onehot", 10))(1),
], ids=["dt", "cnn", "ct", "factory"])
def test_too_small_images_are_one_line_and_the_smallest_size_runs(build):
    for h, w in ((13, 14), (14, 13), (8, 8)):
        with pytest.raises(ValueError, match=rf"^images of {h} x {w} are too small for the DT block's "
                                             r"convolutions \(needs at least 14 x 14\)$"):
            build((1, h, w))
    model = build((3, 14, 15)).eval()
    x = torch.randn(2, 3, 14, 15)
    with torch.no_grad():
        if isinstance(model, CNNClassifier):
            out = model(x)
        elif isinstance(model, CTBlock):
            out = model(x, torch.randn(2, 10), torch.tensor([0.25, 0.75]))
        else:
            out = model(x, torch.randn(2, 10))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_prototype_embedding_images_are_checked_too():
    emb = ClassEmbedding("prototype", 3, init=torch.randn(3, 13 * 13), image_shape=(1, 13, 13))
    with pytest.raises(ValueError, match=r"images of 13 x 13 are too small .*needs at least 14 x 14"):
        dt_block_factory((1, 20, 20), 3, emb)(1)


def test_too_small_synthetic_images_fail_before_training():
    from noprop.data import parse_synthetic
    from noprop.training import TrainConfig, build_model
    split = parse_synthetic("synthetic:1,8,8,3,16")
    with pytest.raises(ValueError, match=r"images of 8 x 8 are too small for the DT block's convolutions"):
        build_model(TrainConfig(T=2), split.image_shape, split.num_classes)

import pytest
import torch
from torch import nn

from noprop.embeddings import ClassEmbedding, make_embedding, medoid_prototypes
from noprop.models import BackpropDT, CNNClassifier, DTBlock, NoPropDT, dt_block_factory
from noprop.schedule import DTSchedule


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("image_shape, expected", [((1, 28, 28), 0.92e6), ((3, 32, 32), 1.22e6)])
def test_dt_block_parameter_count_matches_paper(image_shape, expected):
    block = DTBlock(image_shape, num_classes=10, embed_dim=10)
    assert abs(n_params(block) - expected) / expected < 0.01


def test_dt_block_shapes_and_valid_convs():
    block = DTBlock((1, 28, 28), 10, 10)
    assert all(conv.padding == (0, 0) and conv.kernel_size == (3, 3)
               for conv in block.modules() if isinstance(conv, nn.Conv2d))
    out = block(torch.randn(5, 1, 28, 28), torch.randn(5, 10))
    assert out.shape == (5, 10)


def test_prototype_block_routes_z_through_its_own_conv_branch():
    emb = ClassEmbedding("prototype", 3, init=torch.randn(3, 256), image_shape=(1, 16, 16))
    block = dt_block_factory((1, 16, 16), 3, emb)(1)
    assert block.label.z_image_shape == (1, 16, 16)
    assert block(torch.randn(4, 1, 16, 16), torch.randn(4, 256)).shape == (4, 3)


def test_embeddings():
    onehot = make_embedding("onehot", 10)
    assert torch.equal(onehot.weight, torch.eye(10)) and not onehot.trainable
    assert list(onehot.parameters()) == []
    learned = make_embedding("learned", 10, dim=20)
    W = learned.weight.detach()
    torch.testing.assert_close(W @ W.T, torch.eye(10), atol=1e-5, rtol=0)  # orthonormal rows when m <= d
    wide = make_embedding("learned", 30, dim=20)
    assert wide.weight.shape == (30, 20) and learned.trainable
    with pytest.raises(ValueError, match="kind"):
        make_embedding("sinusoidal", 10)


def test_prototype_is_the_class_medoid():
    values = [0.0, 1.0, 10.0, 2.0, 5.0, 6.0, 7.0, 20.0]
    images = torch.tensor(values).reshape(8, 1, 1, 1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    protos = medoid_prototypes(images, labels, 2)
    # median distance to the other images of the class: class 0 -> 0:2, 1:1, 10:9, 2:2 -> 1.0;
    # class 1 -> 5:2, 6:1, 7:2, 20:14 -> 6.0
    assert protos[:, 0].tolist() == [1.0, 6.0]


def test_backprop_baseline_starts_with_connected_blocks():
    emb = make_embedding("onehot", 10)
    model = BackpropDT(dt_block_factory((1, 28, 28), 10, emb), emb, num_blocks=3)
    assert torch.allclose(torch.tanh(model.w), torch.full((3,), 0.5))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    model.loss(x, y).backward()
    assert model.w.grad is not None and all(p.grad is not None for p in model.blocks[0].parameters())


def test_cnn_reference_shapes():
    assert CNNClassifier((3, 32, 32), 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_baselines_check_runs_and_the_message_names_the_cli_flag():
    emb = make_embedding("onehot", 10)
    x = torch.randn(2, 1, 28, 28)
    backprop = BackpropDT(dt_block_factory((1, 28, 28), 10, emb), emb, num_blocks=2).eval()
    assert backprop.predict_proba(x, runs=2).shape == (2, 10) and backprop.predict(x).shape == (2,)
    for model in (backprop, CNNClassifier((1, 28, 28), 10).eval()):
        with pytest.raises(ValueError, match=r"runs must be >= 1, got 0 .*--eval-runs"):
            model.predict(x, runs=0)


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.lin(x.flatten(1))  # 3 logits, but there are 10 classes


class NoParams(nn.Module):
    def forward(self, x, z):
        return z


def test_user_block_errors_name_the_block():
    emb = make_embedding("onehot", 10)
    model = NoPropDT([WrongShape(), WrongShape()], emb)
    with pytest.raises(ValueError, match=r"block 1 \(WrongShape\) must return logits of shape \[B, m\] = \[2, 10\]"):
        model.losses(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"block 2 \(NoParams\) has no parameters"):
        NoPropDT([WrongShape(), NoParams()], emb)
    with pytest.raises(ValueError, match="schedule has T = 10 steps but 2 blocks"):
        NoPropDT([WrongShape(), WrongShape()], emb, DTSchedule.cosine(10))


class Leaky(nn.Module):
    """A block that (wrongly) reads another block's output."""

    def __init__(self, other=None):
        super().__init__()
        self.lin = nn.Linear(4 + 10, 10)
        self.other = [other]  # hidden from .parameters(): only the gradient check can see it

    def forward(self, x, z):
        if self.other[0] is not None:
            z = z + torch.softmax(self.other[0](x, z), -1)
        return self.lin(torch.cat([x.flatten(1), z], 1))


def test_blocks_that_share_parameters_or_read_each_other_are_rejected():
    emb = make_embedding("onehot", 10)
    shared = WrongShape()
    with pytest.raises(ValueError, match=r"block 2 \(WrongShape\) shares parameters with block 1"):
        NoPropDT([shared, shared], emb)
    first = Leaky()
    model = NoPropDT([first, Leaky(first)], emb)
    with pytest.raises(ValueError, match=r"block 2 \(Leaky\)'s loss reaches the parameters of block\(s\) \[1\]"):
        model.check_locality(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    NoPropDT([Leaky(), Leaky()], emb).check_locality(torch.randn(3, 4), torch.tensor([0, 1, 2]))

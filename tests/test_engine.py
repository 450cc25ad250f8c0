import pytest
import torch
from torch import nn

from noprop import engine
from noprop.embeddings import make_embedding
from noprop.models import NoPropDT, dt_block_factory
from noprop.schedule import DTSchedule
from tests.helpers import TinyBlock, assert_grads_close_per_block, batch


def no_dropout(model):
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def dt_model(execution, factory="dt"):
    torch.manual_seed(0)
    emb = make_embedding("learned", 5, dim=8)
    if factory == "dt":
        blocks = dt_block_factory((1, 16, 16), 5, emb)
    else:
        blocks = lambda t: TinyBlock(256, 8, 5)  # noqa: E731  a user block
    return no_dropout(NoPropDT(blocks, emb, DTSchedule.cosine(3), execution=execution))


@pytest.mark.parametrize("factory", ["dt", "user"])
@pytest.mark.parametrize("train", [True, False])
def test_stacked_losses_and_gradients_equal_per_block(factory, train):
    x, y = batch(B=12, m=5, image_shape=(1, 16, 16))
    outs = []
    for execution in ("loop", "vmap"):
        model = dt_model(execution, factory).train(train)
        torch.manual_seed(3)
        out = model.losses(x, y)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((out.local.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}))
    (l1, g1, b1), (l2, g2, b2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-6)
    assert_grads_close_per_block(g2, g1)
    for n in b1:  # BatchNorm running statistics are written back from the stacked call
        torch.testing.assert_close(b1[n], b2[n], rtol=1e-4, atol=1e-6)


def test_auto_execution_is_per_device_and_explicit_vmap_checks_structure(torch_threads):
    blocks = [TinyBlock(16, 4, 3), TinyBlock(16, 4, 3)]
    torch_threads(1)
    assert engine.resolve("auto", blocks, torch.device("cpu")) == "loop"
    assert engine.resolve("threads", blocks, torch.device("cpu")) == "loop"  # one thread: nothing to share out
    torch_threads(2)
    assert engine.resolve("auto", blocks, torch.device("cpu")) == "threads"
    assert engine.resolve("auto", blocks[:1], torch.device("cpu")) == "loop"
    # CUDA: a bank (stacked parameters, noprop.models.bank) from CUDA_VMAP_MIN_BLOCKS blocks on
    # (stacking measured on an H100: 2 loses, 5 and 10 win)
    many = [TinyBlock(16, 4, 3) for _ in range(engine.CUDA_VMAP_MIN_BLOCKS)]
    assert engine.resolve("auto", many, torch.device("cuda")) == "bank"
    assert engine.resolve("bank", many, torch.device("cpu")) == "bank"
    assert engine.resolve("auto", many[:-1], torch.device("cuda")) == "loop"
    assert engine.resolve("auto", blocks, torch.device("cuda")) == "loop"
    with pytest.raises(ValueError, match="runs blocks on CPU threads"):
        engine.resolve("threads", blocks, torch.device("cuda"))
    mixed = [TinyBlock(16, 4, 3), TinyBlock(16, 4, 3, width=8)]
    assert "block 2 differs" in engine.why_not_stackable(mixed)
    for explicit in ("vmap", "bank"):
        with pytest.raises(ValueError, match="cannot stack"):
            engine.resolve(explicit, mixed, torch.device("cpu"))
    with pytest.raises(ValueError, match="execution must be one of"):
        engine.resolve("fast", blocks, torch.device("cpu"))

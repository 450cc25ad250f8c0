"""A whole NoProp-DT training step through the fused ops: under torch.compile, and through the
Triton backend (interpreted on CPU), against the eager step."""

import pytest
import torch

from noprop.dispatch import use_backend, why_unavailable
from noprop.training import Optimizers, TrainConfig, train_step
from tests.helpers import assert_grads_close_per_block, batch, tiny_dt


def make_model():
    torch.manual_seed(0)
    model = tiny_dt(embedding="learned")
    for mod in model.modules():  # dropout draws from torch's RNG in a backend-independent way, but
        if isinstance(mod, torch.nn.Dropout):  # compiled graphs may draw differently: switch it off
            mod.p = 0.0
    return model


def test_compiled_step_matches_eager():
    model = make_model()
    x, y = batch()
    seed = torch.tensor([123])

    def step_loss(x, y, seed):
        return model.losses(x, y, seed=seed).total

    eager = step_loss(x, y, seed)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    # aot_eager traces the full graph (dynamo + AOTAutograd through the ops' fake kernels and
    # autograd formulas) without the minutes inductor's C++ codegen takes on a 2-core CPU.
    compiled = torch.compile(step_loss, fullgraph=True, backend="aot_eager")
    out = compiled(x, y, seed)
    g_comp = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(why_unavailable("triton", torch.device("cpu")) is not None,
                    reason=str(why_unavailable("triton", torch.device("cpu"))))
def test_triton_training_step_matches_eager_step():
    """Loss and every parameter gradient of a full DT step (noise_inject, block forward, local_loss,
    CE, KL, backward) agree between backends; one optimizer step is then the same arithmetic.
    (Post-step parameters are not compared: Adam's first step is lr·g/|g|, which turns rounding
    noise in an exactly-zero gradient, e.g. a bias feeding BatchNorm, into a full-size update.)"""
    x, y = batch()
    results = []
    for backend in ("eager", "triton"):
        model = make_model()
        torch.manual_seed(5)  # the same seed tensor -> the same Philox noise in both backends
        with use_backend(backend):
            out = model.losses(x, y)
            out.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.local.detach(), out.total.item(), grads))
    (loc_e, tot_e, g_e), (loc_t, tot_t, g_t) = results
    torch.testing.assert_close(loc_t, loc_e, rtol=1e-4, atol=1e-6)
    assert tot_t == pytest.approx(tot_e, rel=1e-5)
    assert_grads_close_per_block(g_t, g_e)
    # and a full train_step (optimizer included) runs through the Triton backend
    model = make_model()
    opts = Optimizers(model, TrainConfig(T=model.T))
    torch.manual_seed(5)
    with use_backend("triton"):
        loss = train_step(model, opts, x, y)
    assert loss == pytest.approx(tot_e, rel=1e-5)

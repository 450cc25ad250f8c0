import copy

import pytest
import torch

from noprop.data import synthetic
from noprop.training import Optimizers, TrainConfig, evaluate, fit, train_step
from tests.helpers import assert_grads_close_per_block, batch, tiny_dt


def block_grads(model, t):
    return [p.grad.clone() for p in model.blocks[t - 1].parameters()]


@pytest.mark.parametrize("embedding", ["onehot", "learned"])
def test_locality_block_gradient_is_its_own_local_loss_gradient(embedding):
    """In one training forward (train mode: BatchNorm batch statistics, dropout), the gradient of the
    whole objective w.r.t. block t's parameters equals the gradient of block t's local term alone."""
    model = tiny_dt(embedding=embedding)
    x, y = batch()
    out = model.losses(x, y)
    for t in range(1, model.T + 1):
        params = list(model.blocks[t - 1].parameters())
        g_total = torch.autograd.grad(out.total, params, retain_graph=True)
        g_own = torch.autograd.grad(out.local[t - 1], params, retain_graph=True)
        for a, b in zip(g_total, g_own):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        others = [p for k, blk in enumerate(model.blocks) if k != t - 1 for p in blk.parameters()]
        g_cross = torch.autograd.grad(out.local[t - 1], others, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in g_cross), f"block {t}'s loss reaches another block"


def test_block_gradient_does_not_depend_on_other_blocks():
    model = tiny_dt()
    x, y = batch()
    torch.manual_seed(2)
    model.losses(x, y).total.backward()
    before = block_grads(model, 2)
    with torch.no_grad():
        for t in (1, 3, 4):
            for p in model.blocks[t - 1].parameters():
                p.add_(torch.randn_like(p))
    model.zero_grad()
    torch.manual_seed(2)
    model.losses(x, y).total.backward()
    for a, b in zip(before, block_grads(model, 2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_local_loss_is_weighted_sum_over_dims():
    model = tiny_dt(embedding="learned")
    model.eval()
    x, y = batch()
    torch.manual_seed(3)
    out = model.losses(x, y)
    torch.manual_seed(3)
    from noprop.ops import new_seed, noise_inject
    W = model.embedding.weight
    z = noise_inject(W, y, model.sqrt_alpha_bar, model.sqrt_one_minus_alpha_bar, new_seed())
    for t in range(1, model.T + 1):
        u_hat = torch.softmax(model.blocks[t - 1](x, z[t - 1]), -1) @ W
        expected = model.block_weight[t - 1] * (u_hat - W[y]).pow(2).sum(1).mean()  # SUM over d
        torch.testing.assert_close(out.local[t - 1], expected, rtol=1e-5, atol=1e-7)
    ce = torch.nn.functional.cross_entropy(model.head(z[model.T]), y)  # CE on head(z_T ~ q), not a block
    torch.testing.assert_close(out.ce, ce)


def test_sequential_schedule_leaves_idle_blocks_untouched():
    model = tiny_dt()
    cfg = TrainConfig(mode="sequential", T=model.T, weight_decay=0.1)
    opts = Optimizers(model, cfg)
    x, y = batch()
    train_step(model, opts, x, y)  # every block gets momentum once
    idle = copy.deepcopy(model.blocks[2].state_dict())
    idle_state = copy.deepcopy(opts.blocks[2].state_dict())
    for _ in range(3):
        train_step(model, opts, x, y, blocks=[2])
    for k, v in model.blocks[2].state_dict().items():
        assert torch.equal(v, idle[k]), f"idle block parameter {k} changed (weight decay or stale momentum)"
    assert str(opts.blocks[2].state_dict()) == str(idle_state)
    assert opts.blocks[1].state_dict()["state"][0]["step"].item() == 4


def test_all_blocks_shared_lr_is_scaled_by_T():
    model = tiny_dt()
    opts = Optimizers(model, TrainConfig(T=model.T))
    blocks_group, shared_group = opts.shared.param_groups
    assert shared_group["lr"] == pytest.approx(1e-3 * model.T) and blocks_group["lr"] == pytest.approx(1e-3)
    assert len(blocks_group["params"]) == len(list(model.blocks.parameters()))
    seq = Optimizers(model, TrainConfig(T=model.T, mode="sequential"))
    assert seq.shared.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert seq.blocks[0].param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule", ["chunked", "lean"])
def test_chunked_and_lean_steps_equal_the_parallel_step(schedule):
    """Running the blocks k at a time (backward per chunk) gives the same loss, gradients and
    BatchNorm statistics. (Gradients, not post-step parameters: Adam's first step is lr·g/|g|, so
    rounding noise in an exactly-zero gradient, a bias feeding BatchNorm, becomes a full-size step;
    and the parallel step may run its blocks on threads, summing in another order.)"""
    x, y = batch()
    results = []
    for mode in ("parallel", schedule):
        torch.manual_seed(0)
        model = tiny_dt(embedding="learned")
        for mod in model.modules():  # identical dropout masks need identical RNG use: switch dropout off
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        cfg = TrainConfig(T=model.T, mode=mode, chunk_size=3)
        opts = Optimizers(model, cfg)
        torch.manual_seed(7)
        loss = train_step(model, opts, x, y, chunk_size=cfg.chunk)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss, grads, {n: b.clone() for n, b in model.named_buffers()}))
    (l1, g1, b1), (l2, g2, b2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert_grads_close_per_block(g2, g1, rtol=1e-4)
    for n in b1:
        torch.testing.assert_close(b2[n], b1[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,schedule", [("dt", "all-blocks"), ("dt", "sequential"), ("cnn", "all-blocks")])
def test_short_training_learns_synthetic_data(method, schedule):
    split = synthetic(image_shape=(1, 16, 16), num_classes=4, train_size=512, test_size=128, noise=0.5)
    # 64 minibatches; the linear readout of z_T is what learns last, so give it a larger step here
    cfg = TrainConfig(method=method, mode=schedule, T=3, epochs=4, batch_size=32, shared_lr_scale=10)
    model, history = fit(cfg, split, progress=False, log=lambda *_: None)
    assert len(history) == 4
    assert history[-1]["test_acc"] > 0.6  # chance is 0.25
    for key in ("epoch", "train_loss", "test_acc", "samples_per_s", "peak_mem_mb", "elapsed_s"):
        assert key in history[-1]


def test_backprop_baseline_training_reduces_its_loss():
    # The same-architecture baseline optimises slowly (docs/method.md §9): check it learns, not how fast.
    split = synthetic(image_shape=(1, 16, 16), num_classes=4, train_size=256, test_size=64, noise=0.5)
    cfg = TrainConfig(method="backprop", T=3, epochs=3, batch_size=32)
    _, history = fit(cfg, split, progress=False, log=lambda *_: None)
    assert history[-1]["train_loss"] < history[0]["train_loss"] < 1.5


def test_resume_continues_where_the_run_stopped(tmp_path):
    split = synthetic(image_shape=(1, 16, 16), num_classes=3, train_size=64, test_size=32)
    ck = tmp_path / "run.pt"
    full_cfg = TrainConfig(T=2, epochs=2, batch_size=32)
    _, full = fit(full_cfg, split, tmp_path / "full.pt", progress=False, log=lambda *_: None)
    fit(TrainConfig(T=2, epochs=1, batch_size=32), split, ck, progress=False, log=lambda *_: None)
    _, resumed = fit(full_cfg, split, ck, resume=True, progress=False, log=lambda *_: None)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-5)
    assert resumed[-1]["test_acc"] == full[-1]["test_acc"]


def test_inference_is_seedable_and_has_mean_chain_and_averaging():
    model = tiny_dt(T=3, m=4, image_shape=(1, 16, 16)).eval()
    x = torch.randn(10, 1, 16, 16)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(model.predict_proba(x, generator=g(0)), model.predict_proba(x, generator=g(0)))
    assert not torch.equal(model.predict_proba(x, generator=g(0)), model.predict_proba(x, generator=g(1)))
    avg = model.predict_proba(x, runs=3, generator=g(0))
    torch.testing.assert_close(avg.sum(-1), torch.ones(10))
    # the mean chain still starts from a random z_0, but adds no noise along the way
    m1 = model.predict_proba(x, mean_chain=True, generator=g(5))
    s1 = model.predict_proba(x, generator=g(5))
    assert not torch.equal(m1, s1)


def test_evaluate_returns_fraction():
    split = synthetic(image_shape=(1, 16, 16), num_classes=4, train_size=32, test_size=40)
    model = tiny_dt(T=2, m=4, image_shape=(1, 16, 16))
    acc = evaluate(model, split.test)
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("brought,asked,threaded", [("auto", "loop", False), ("loop", "threads", True)])
def test_fit_applies_cfg_execution_to_a_model_the_user_brings(monkeypatch, brought, asked, threaded):
    """The config owns the execution of a run: a model built with another one runs as cfg says."""
    from noprop import engine

    calls = []
    real = engine.run_threaded
    monkeypatch.setattr(engine, "run_threaded", lambda *a, **k: calls.append(1) or real(*a, **k))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # auto on a CPU with two threads would run block threads
    try:
        model = tiny_dt()
        model.execution = brought
        split = synthetic((1, 4, 4), num_classes=5, train_size=32, test_size=8)
        cfg = TrainConfig(T=model.T, epochs=1, batch_size=16, execution=asked)
        fit(cfg, split, model=model, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(previous)
    assert model.execution == asked
    assert bool(calls) == threaded


def test_fit_rejects_vmap_for_blocks_that_cannot_stack():
    from noprop.embeddings import make_embedding
    from noprop.models import NoPropDT
    from noprop.schedule import DTSchedule
    from tests.helpers import TinyBlock

    emb = make_embedding("onehot", 5)
    model = NoPropDT(lambda t: TinyBlock(16, emb.dim, 5, width=8 * t), emb, DTSchedule.cosine(3))
    split = synthetic((1, 4, 4), num_classes=5, train_size=32, test_size=8)
    with pytest.raises(ValueError, match="execution 'vmap': cannot stack these blocks: block 2 differs"):
        fit(TrainConfig(T=3, epochs=1, execution="vmap"), split, model=model, progress=False, log=lambda s: None)

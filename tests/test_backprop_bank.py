"""The backprop baseline with its blocks in a bank (equal treatment, docs/design.md §11): the same
model as its per-block loop, its image branches run as one stacked call.

Both models are built from one set of blocks in float64 with dropout off (the bank draws its masks
as one tensor, the loop block by block: the same law, other numbers), so they must agree to float64
rounding: losses, every gradient, BatchNorm running statistics, and parameters and AdamW state
after several steps."""
import copy

import pytest
import torch

from noprop.bench import add_ratios, plan
from noprop.cli import main
from noprop.embeddings import make_embedding
from noprop.models import BackpropDT, dt_block_factory
from noprop.models.bank import BlockBank
from noprop.training import TrainConfig, build_model

IMAGE = (1, 14, 14)  # the smallest image the DT block's convolutions take: fast on 2 cores


def _pair(T=4, m=10, embedding="onehot"):
    torch.manual_seed(0)
    emb = make_embedding(embedding, m, 6)
    loop = BackpropDT(dt_block_factory(IMAGE, m, emb), emb, num_blocks=T, input_shape=IMAGE, execution="loop")
    for module in loop.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loop = loop.double()
    bank = copy.deepcopy(loop)
    bank.set_execution("bank")
    return loop, bank


def _data(B, m=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *IMAGE, generator=g, dtype=torch.float64), torch.randint(0, m, (B,), generator=g)


def _stacked(named) -> dict:
    """(name, tensor) pairs with per-block names `blocks.<t>.<rest>` -> name -> tensor, the blocks'
    tensors stacked [T, ...] under `blocks.<rest>` (the bank's layout); other names as they are."""
    out = {}
    for key, value in named:
        if key.startswith("blocks."):
            t, rest = key.split(".", 2)[1:]
            out.setdefault("blocks." + rest, {})[int(t)] = value
        else:
            out[key] = value
    return {k: torch.stack([v[t] for t in sorted(v)]) if isinstance(v, dict) else v for k, v in out.items()}


def _per_block(model) -> dict:
    """The model's state in the bank's layout, for either model (the bank's state_dict hook writes
    per-block keys too)."""
    return _stacked(model.state_dict().items())


def _grads(model) -> dict:
    named = ((n, p.grad) for n, p in model.named_parameters())
    return dict(named) if model.is_bank else _stacked(named)


@pytest.mark.parametrize("B", [1, 7])
def test_bank_loss_gradients_and_running_stats_match_the_loop(B):
    loop, bank = _pair()
    assert bank.is_bank and not loop.is_bank
    if B == 1:  # BatchNorm cannot train on one sample: compare in eval mode
        loop.eval(), bank.eval()
    x, y = _data(B)
    losses = []
    for model in (loop, bank):
        torch.manual_seed(5)  # z_0
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    ref, got = _grads(loop), _grads(bank)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    a, b = _per_block(loop), _per_block(bank)
    assert a.keys() == b.keys()
    for name in a:  # running means and variances included
        torch.testing.assert_close(b[name], a[name], rtol=1e-12, atol=1e-12, msg=name)


def test_bank_after_adamw_steps_matches_the_loop():
    loop, bank = _pair(T=3)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-3) for m in (loop, bank)]
    for step in range(3):
        x, y = _data(9, seed=step)
        for model, opt in zip((loop, bank), opts):
            opt.zero_grad()
            torch.manual_seed(step)
            model.loss(x, y).backward()
            opt.step()
    a, b = _per_block(loop), _per_block(bank)
    # AdamW divides each gradient by its own running RMS, so float64 rounding in elements whose
    # gradient is nearly zero (biases feeding BatchNorm) reaches the parameters at ~1e-11 of their
    # size after three steps of lr 1e-2; a wrong gradient moves them by ~lr
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-9, msg=name)
    # AdamW state: the bank's [T, ...] moments are the per-block moments stacked
    loop_state = {n: opts[0].state[p] for n, p in loop.named_parameters()}
    for n, p in bank.named_parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            if n.startswith("blocks."):
                rest = n[len("blocks."):]
                ref = torch.stack([loop_state[f"blocks.{t}.{rest}"][moment] for t in range(3)])
            else:
                ref = loop_state[n][moment]
            torch.testing.assert_close(opts[1].state[p][moment], ref, rtol=1e-9, atol=1e-14, msg=f"{n} {moment}")


def test_bank_predictions_match_the_loop():
    loop, bank = _pair()
    loop.eval(), bank.eval()
    x, _ = _data(5)
    p = [m.predict_proba(x, runs=2, generator=torch.Generator().manual_seed(3)) for m in (loop, bank)]
    torch.testing.assert_close(p[1], p[0], rtol=1e-12, atol=1e-12)


def test_each_bank_parameter_gets_its_gradient_from_one_place():
    # The chain calls the blocks one by one: reading each block's rows by slicing would give every
    # label/fusion parameter T gradient contributions of [T, ...] (mostly zeros); one unbind per
    # parameter gives one.
    _, bank = _pair()
    x, y = _data(6)
    loss = bank.loss(x, y)
    params = {p: n for n, p in bank.blocks.named_parameters()}
    fan_in, seen, todo = {}, set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and type(nxt).__name__ == "AccumulateGrad" and nxt.variable in params:
                name = params[nxt.variable]
                fan_in[name] = fan_in.get(name, 0) + 1
            todo.append(nxt)
    assert set(fan_in) == set(params.values())
    assert {n: k for n, k in fan_in.items() if k != 1} == {}


def test_the_chain_unbinds_each_parameter_once_per_forward(monkeypatch):
    from noprop.profile import operator_calls

    monkeypatch.setenv("NOPROP_BANK_CONV", "grouped")  # CPU's per-block convolutions unbind their weights too
    _, bank = _pair(T=4)
    x, y = _data(6)
    calls = operator_calls(lambda: bank.loss(x, y))
    chained = [n for n, p in bank.blocks.named_parameters() if not n.startswith("image.")]  # the z-path's
    # one unbind per z-path parameter, one of the image features [B, T, width] into blocks
    assert calls["aten::unbind"] == len(chained) + 1


def test_checkpoints_cross_between_loop_and_bank():
    loop, bank = _pair()
    assert set(bank.state_dict()) == set(loop.state_dict())  # per-block keys either way
    fresh_bank = copy.deepcopy(bank)
    for p in fresh_bank.parameters():
        p.data.zero_()
    fresh_bank.load_state_dict(loop.state_dict())
    fresh_loop = copy.deepcopy(loop)
    fresh_loop.load_state_dict(bank.state_dict())
    for name, value in _per_block(loop).items():
        torch.testing.assert_close(_per_block(fresh_bank)[name], value, rtol=0, atol=0)
        torch.testing.assert_close(_per_block(fresh_loop)[name], value, rtol=0, atol=0)
    back = copy.deepcopy(bank)
    back.set_execution("loop")
    assert not back.is_bank and isinstance(bank.blocks, BlockBank)
    for name, value in _per_block(bank).items():
        torch.testing.assert_close(_per_block(back)[name], value, rtol=0, atol=0)


def test_execution_of_the_baseline_from_the_config():
    cfg = TrainConfig(method="backprop", T=4, execution="bank")
    model = build_model(cfg, IMAGE, 10)
    assert model.is_bank and model.execution == "bank"
    assert not build_model(TrainConfig(method="backprop", T=4), IMAGE, 10).is_bank  # auto on CPU: loop
    for bad in ("vmap", "threads"):
        with pytest.raises(ValueError, match=f"execution '{bad}': backprop's blocks run one after another"):
            TrainConfig(method="backprop", execution=bad)
        # a checkpoint's config that said so (the baseline ignored it and looped) still loads
        assert TrainConfig.from_dict({"method": "backprop", "execution": bad}).execution == "loop"


def test_cli_refuses_a_stacking_the_chain_cannot_take(capsys, tmp_path):
    assert main(["train", "--method", "backprop", "--execution", "vmap", "--epochs", "1",
                 "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only their image branches stack, in a bank" in err[0]


def test_bench_pairs_stacked_dt_with_the_banked_baseline():
    cases, _ = plan(["dt", "backprop"], ["parallel"], ["threads", "bank"], T=4, chunk_size=2)
    assert [c.label for c in cases] == ["dt parallel (threads)", "dt parallel (bank)", "backprop", "backprop (bank)"]
    used = {"dt parallel (threads)": "threads", "dt parallel (bank)": "bank", "backprop": "loop",
            "backprop (bank)": "bank"}
    ms = {"dt parallel (threads)": 10.0, "dt parallel (bank)": 8.0, "backprop": 20.0, "backprop (bank)": 12.0}
    recs = [dict(label=c.label, method=c.method, precision="fp32", execution=c.execution, device="cpu",
                 execution_used=used[c.label], ms_per_step=ms[c.label], peak_mem_mb=1.0) for c in cases]
    add_ratios(recs, {r["label"]: [{"ms_per_step": r["ms_per_step"]}] for r in recs})
    by = {r["label"]: r for r in recs}
    assert by["dt parallel (bank)"]["ratio_base"] == "backprop (bank)"
    assert by["dt parallel (bank)"]["ratio_to_backprop"] == pytest.approx(1.5) and not by["dt parallel (bank)"]["ratio_unlike"]
    assert by["dt parallel (threads)"]["ratio_base"] == "backprop" and not by["dt parallel (threads)"]["ratio_unlike"]
    # what the bank does for backprop itself: against its plain loop, labelled as unlike
    assert by["backprop (bank)"]["ratio_unlike"] == "stacked vs unstacked"
    # without a banked baseline, a stacked DT row is divided by the loop and says so
    alone = [r for r in recs if r["label"] != "backprop (bank)"]
    add_ratios(alone, {r["label"]: [{"ms_per_step": r["ms_per_step"]}] for r in alone})
    assert next(r for r in alone if r["label"] == "dt parallel (bank)")["ratio_unlike"] == "stacked vs unstacked"


def test_banked_baseline_compiles_to_one_graph():
    """--compile compiles backprop's `loss`: through a bank (image branches, then the chain) one graph,
    no breaks, with the eager loss."""
    import torch._dynamo

    _, bank = _pair(T=3)
    bank = bank.float()
    x, y = _data(6)
    x = x.float()
    explained = torch._dynamo.explain(bank.loss)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(bank.loss, backend="aot_eager")
    torch.manual_seed(2)
    got = compiled(x, y)
    torch.manual_seed(2)
    torch.testing.assert_close(got, bank.loss(x, y))


def test_banked_baseline_step_makes_no_host_syncs(monkeypatch, one_torch_thread):
    """What --cuda-graph captures for the banked baseline, seen at the aten level on the CPU."""
    from noprop.ops import checks
    from noprop.training import Optimizers
    from noprop.training.step import captured_body
    from tests import test_graphs as graphs_tests

    _, bank = _pair(T=3)
    bank = bank.float()
    opts = graphs_tests._fused_cpu(bank, Optimizers(bank, TrainConfig(method="backprop", T=3)))
    x, y = _data(6)
    x = x.float()
    monkeypatch.setattr(checks, "labels", lambda y, m: None)
    opts.zero_grad()
    captured_body(bank, opts, x, y)
    opts.zero_grad()
    with graphs_tests._OpCounter() as body:
        captured_body(bank, opts, x, y)
    assert {op: n for op, n in body.ops.items() if op in graphs_tests.HOST_OPS} == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_banked_baseline_replays_equal_its_eager_steps_cuda():
    """The like-for-like baseline of `noprop bench --cuda-graph` on a bank: replayed is eager."""
    from tests import test_graphs as graphs_tests

    torch.manual_seed(0)
    emb = make_embedding("onehot", 10)
    model = BackpropDT(dt_block_factory(IMAGE, 10, emb), emb, num_blocks=4, input_shape=IMAGE).cuda()
    model.set_execution("bank")
    data = [tuple(t.cuda() for t in _data(16, seed=i)) for i in range(4)]
    graphs_tests._assert_replays_equal_eager_steps(
        model, TrainConfig(method="backprop", T=4, cuda_graph=True, device="cuda"), seed=11,
        data=[(x.float(), y) for x, y in data])


def test_a_bank_run_one_block_a_call_is_paired_with_the_unstacked_baseline():
    cases, _ = plan(["dt", "backprop"], ["parallel", "lean"], ["bank"], T=4, chunk_size=2)
    assert [c.label for c in cases] == ["dt parallel (bank)", "dt lean (bank)", "backprop (bank)", "backprop"]
    stacked = {"dt parallel (bank)": True, "dt lean (bank)": False, "backprop (bank)": True, "backprop": False}
    recs = [dict(label=c.label, method=c.method, precision="fp32", execution=c.execution, device="cpu",
                 execution_used="bank" if c.execution == "bank" else "loop", stacked=stacked[c.label],
                 ms_per_step=10.0, peak_mem_mb=1.0) for c in cases]
    add_ratios(recs, {r["label"]: [{"ms_per_step": r["ms_per_step"]}] for r in recs})
    by = {r["label"]: r for r in recs}
    assert by["dt lean (bank)"]["ratio_base"] == "backprop" and not by["dt lean (bank)"]["ratio_unlike"]
    assert by["dt parallel (bank)"]["ratio_base"] == "backprop (bank)"


@pytest.mark.parametrize("saved_as,resumed_as", [("loop", "bank"), ("bank", "loop")])
def test_training_resumes_across_executions(saved_as, resumed_as):
    """A checkpoint (model and optimizer state, per-block layout) written by one execution resumes in
    the other and continues as the run that saved it would have."""
    from noprop.training import Optimizers, train_step

    loop, bank = _pair(T=3)
    models = {"loop": loop, "bank": bank}
    cfg = TrainConfig(method="backprop", T=3, lr=1e-2)
    saver = models[saved_as]
    opts = Optimizers(saver, cfg)
    for step in range(2):
        torch.manual_seed(step)
        train_step(saver, opts, *_data(8, seed=step))
    model_state, opt_state = copy.deepcopy(saver.state_dict()), copy.deepcopy(opts.state_dict())
    resumer = copy.deepcopy(models[resumed_as])
    resumer.load_state_dict(model_state)
    resumed_opts = Optimizers(resumer, cfg)
    resumed_opts.load_state_dict(opt_state)
    for model, o in ((saver, opts), (resumer, resumed_opts)):
        torch.manual_seed(9)
        train_step(model, o, *_data(8, seed=9))
    a, b = _per_block(saver), _per_block(resumer)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-9, msg=name)
    assert len(opts.state_dict()[-1]["state"]) == len(resumed_opts.state_dict()[-1]["state"])

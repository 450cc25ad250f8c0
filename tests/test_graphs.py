"""noprop.training.graphs: the parallel NoProp-DT step captured as a CUDA graph (--cuda-graph).

Without a GPU: the clear errors (CPU, unsupported modes, CLI flags), the captured body equals the
eager train_step, a non-finite loss skips a fused optimizer's update, and the warm-up's snapshot /
restore leaves training exactly where it was. With a GPU (skipped otherwise; bench/gpu_check.sh
runs them): replays equal eager steps, every replay draws fresh noise, static shapes are enforced,
and fit() with the graph equals fit() without it.
"""
import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from noprop import bench, dispatch
from noprop.training import graphs
from noprop.training.config import GRAPH_MODES
from noprop.training.step import captured_body, skips_nonfinite
from noprop.cli import main
from noprop.data import synthetic
from noprop.models import BackpropDT
from noprop.models.dt import _rows
from noprop.ops import checks
from noprop.training import Optimizers, TrainConfig, fit, train_step
from tests.helpers import batch, tiny_dt

TINY = ["--data", "synthetic:1,16,16,3,64", "-T", "2", "--epochs", "1", "--batch-size", "32", "--no-progress"]
NO_CUDA = not torch.cuda.is_available()


def state_of(model, opts):
    """Parameters, buffers and optimizer state as plain tensors, for comparison."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, opt in enumerate(opts.all()):
        for j, (p, st) in enumerate(opt.state.items()):
            for k, v in st.items():
                out[f"opt{i}.{j}.{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def assert_same_state(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert a[k] == b[k], k


# --- without a GPU: configuration and errors ------------------------------------------------------

@pytest.mark.parametrize("method,mode", [("dt", "sequential"), ("dt", "chunked"), ("dt", "lean"),
                                         ("cnn", "parallel"), ("ct", "parallel"), ("fm", "parallel")])
def test_config_rejects_cuda_graph_outside_dt_parallel(method, mode):
    with pytest.raises(ValueError, match="parallel step only") as info:
        TrainConfig(method=method, mode=mode, cuda_graph=True, device="cuda")
    assert "sequential" in str(info.value).lower() and repr(mode) in str(info.value)


def test_config_needs_a_cuda_device_and_defaults_off():
    assert TrainConfig().cuda_graph is False
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got device 'cpu'"):
        TrainConfig(cuda_graph=True)
    for mode in GRAPH_MODES + ("all-blocks",):  # a valid combination needs no GPU to describe
        assert TrainConfig(mode=mode, cuda_graph=True, device="cuda:0").cuda_graph
    assert TrainConfig(method="backprop", cuda_graph=True, device="cuda").cuda_graph  # the like-for-like baseline


def test_captured_step_refuses_cpu_models_with_a_clear_error():
    model = tiny_dt()
    opts = Optimizers(model, TrainConfig(T=model.T))
    x, y = batch()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        graphs.CapturedStep(model, opts, x, y)


def test_captured_step_refuses_other_modes_and_models_saying_which_are_supported():
    model = tiny_dt()
    x, y = batch()
    seq = Optimizers(model, TrainConfig(T=model.T, mode="sequential"))
    with pytest.raises(ValueError, match="parallel step only.*per block"):
        graphs.CapturedStep(model, seq, x, y)
    from noprop.models import CNNClassifier
    cnn = CNNClassifier((1, 28, 28), 5)
    with pytest.raises(ValueError, match="parallel step only.*backprop baseline.*CNNClassifier"):
        graphs.CapturedStep(cnn, Optimizers(cnn, TrainConfig(method="cnn", T=2)), x, y)
    # the backprop baseline is capturable: on this CPU model only the device is wrong
    bp = _tiny_backprop()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        graphs.CapturedStep(bp, Optimizers(bp, TrainConfig(method="backprop", T=2)), x, y)


def _tiny_backprop(T=2, m=5):
    from noprop.embeddings import make_embedding
    from tests.helpers import TinyBlock
    emb = make_embedding("onehot", m)
    return BackpropDT(lambda t: TinyBlock(16, emb.dim, m), emb, num_blocks=T)


def test_capturable_optimizers_need_cuda_and_survive_a_checkpoint_round_trip():
    model = tiny_dt()
    with pytest.raises(ValueError, match="capturable optimizers .* need the model on a CUDA device"):
        Optimizers(model, TrainConfig(T=model.T), capturable=True)
    opts = Optimizers(model, TrainConfig(T=model.T))
    assert opts.capturable is False
    state = opts.state_dict()
    state[0]["param_groups"][0]["capturable"] = True  # as saved by a --cuda-graph run
    opts.load_state_dict(state)
    assert not any(g["capturable"] for g in opts.shared.param_groups)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_fit_with_cuda_graph_and_no_cuda_raises_before_training():
    split = synthetic(image_shape=(1, 8, 8), num_classes=3, train_size=32, test_size=16)
    with pytest.raises(ValueError, match="no CUDA device visible to torch"):
        fit(TrainConfig(T=2, epochs=1, cuda_graph=True, device="cuda"), split, progress=False, log=lambda *_: None)


def test_cli_cuda_graph_flags_parse_and_fail_cleanly_without_a_gpu(tmp_path, capsys):
    ck = ["--checkpoint", str(tmp_path / "g.pt")]
    assert main(["train", *TINY, *ck, "--cuda-graph"]) == 2
    assert "CUDA graphs need a CUDA device, got device 'cpu'" in capsys.readouterr().err
    assert main(["train", *TINY, *ck, "--cuda-graph", "--device", "cuda", "--mode", "lean"]) == 2
    assert "parallel step only" in capsys.readouterr().err
    if NO_CUDA:
        assert main(["train", *TINY, *ck, "--cuda-graph", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "--quick", "--cuda-graph"]) == 2
    assert "--cuda-graph: CUDA graphs need a CUDA device" in capsys.readouterr().err
    if not NO_CUDA:
        assert main(["bench", "--quick", "--device", "cuda", "--cuda-graph", "--modes", "lean"]) == 2
        assert "--modes parallel" in capsys.readouterr().err


def test_bench_plan_adds_the_graph_cases_after_all_others():
    # last: in-process on CUDA, a failed capture could leave the context unusable for later cases
    cases, _ = bench.plan(["dt", "backprop"], ["parallel", "lean"], ["loop", "vmap"], T=3, chunk_size=2,
                          cuda_graph=True)
    labels = [c.label for c in cases]
    # vmap stacks: backprop is planned with its image branches in a bank too (its like-for-like partner)
    assert labels == ["dt parallel (loop)", "dt parallel (vmap)", "dt lean (loop)", "backprop", "backprop (bank)",
                      "dt parallel+graph (loop)", "dt parallel+graph (vmap)", "backprop+graph",
                      "backprop+graph (bank)"]
    assert len(set(labels)) == len(labels)
    plain, _ = bench.plan(["dt"], ["parallel"], ["auto"], T=3, chunk_size=2)
    assert [c.label for c in plain] == ["dt parallel"] and not plain[0].graph


# --- without a GPU: the pieces of the capture ---------------------------------------------------

def test_block_rows_are_slices_for_consecutive_blocks():
    assert _rows([1, 2, 3, 4]) == slice(0, 4) and _rows([3]) == slice(2, 3) and _rows([2, 3]) == slice(1, 3)
    assert _rows([1, 3]) == [0, 2] and _rows([3, 2]) == [2, 1]


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_subset_losses_match_the_full_step_for_sliced_and_listed_blocks(execution):
    model = tiny_dt()
    model.execution = execution
    model.eval()  # BatchNorm running statistics, no dropout: the block outputs are deterministic
    x, y = batch()
    seed = torch.tensor([11])
    full = model.losses(x, y, seed=seed).local
    for ts in ([2, 3], [1, 3], [4]):
        part = model.losses(x, y, ts, seed=seed).local
        torch.testing.assert_close(part, full[[t - 1 for t in ts]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_step_body_is_the_eager_train_step(one_torch_thread, method):
    """What CapturedStep captures is train_step's update (DT: all blocks; the backprop baseline: end
    to end), random draws included; only DT draws a Philox seed."""
    torch.manual_seed(0)
    a = tiny_dt(embedding="learned") if method == "dt" else _tiny_backprop()
    b = copy.deepcopy(a)
    cfg = TrainConfig(method=method, T=a.T if method == "dt" else 2)
    oa, ob = Optimizers(a, cfg), Optimizers(b, cfg)
    for i in range(3):
        x, y = batch(seed=i)
        torch.manual_seed(100 + i)
        eager = train_step(a, oa, x, y)
        torch.manual_seed(100 + i)
        ob.zero_grad()
        loss, seed = captured_body(b, ob, x, y)
        assert loss.item() == eager
        assert (seed.shape == (1,)) if method == "dt" else seed is None
    assert_same_state(state_of(a, oa), state_of(b, ob))


def test_dt_graph_rows_are_divided_by_backprop_graph_when_it_was_measured():
    def rec(label, method, ms, graph):
        return {"label": label, "method": method, "ms_per_step": ms, "cuda_graph": graph, "peak_mem_mb": 1.0,
                "device": "cuda"}
    recs = [rec("backprop", "backprop", 40.0, False), rec("dt parallel", "dt", 20.0, False),
            rec("backprop+graph", "backprop", 10.0, True), rec("dt parallel+graph", "dt", 5.0, True)]
    per_round = {r["label"]: [{"ms_per_step": r["ms_per_step"]}] for r in recs}
    bench.add_ratios(recs, per_round)
    by = {r["label"]: r for r in recs}
    assert by["dt parallel"]["ratio_to_backprop"] == pytest.approx(2.0) and by["dt parallel"]["ratio_base"] == "backprop"
    assert by["dt parallel+graph"]["ratio_to_backprop"] == pytest.approx(2.0)  # 10 / 5, not 40 / 5
    assert by["dt parallel+graph"]["ratio_base"] == "backprop+graph"
    assert by["backprop+graph"]["ratio_to_backprop"] == pytest.approx(4.0)  # what graphs do for backprop
    assert "against backprop+graph" in bench.table([dict(r, samples_per_s=1.0, ms_min=1.0, ms_max=1.0) for r in recs])
    without = [r for r in recs if r["label"] != "backprop+graph"]
    bench.add_ratios(without, per_round)
    assert without[-1]["ratio_to_backprop"] == pytest.approx(8.0) and without[-1]["ratio_base"] == "backprop"


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# aten ops that read a tensor's value on the host (a device sync, illegal while capturing) or that
# make a tensor from Python data (on CUDA: a host-to-device copy, also a sync)
HOST_OPS = ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "masked_select", "unique_dim",
            "_unique2", "repeat_interleave")


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_captured_body_makes_no_host_syncs(monkeypatch, one_torch_thread, execution):
    """The captured region at the aten level, seen on the CPU: no value read on the host, no tensor made
    from Python data (the op kernels themselves run on CUDA only in a GPU session). The label check is
    switched off as it is while a CUDA stream captures (noprop.ops.checks.labels)."""
    model = tiny_dt(embedding="learned")
    model.execution = execution
    opts = _fused_cpu(model, Optimizers(model, TrainConfig(T=model.T)))
    x, y = batch()
    monkeypatch.setattr(checks, "labels", lambda y, m: None)
    opts.zero_grad()
    captured_body(model, opts, x, y)  # optimizer state exists from here on, as after the warm-up
    opts.zero_grad()
    with _OpCounter() as body:
        captured_body(model, opts, x, y)
    assert {op: n for op, n in body.ops.items() if op in HOST_OPS} == {}
    with _OpCounter() as eager:  # the probe does see host reads: the eager step has some
        train_step(model, opts, x, y)
    assert eager.ops["_local_scalar_dense"] > 0


def _fused_cpu(model, opts):
    """The same optimizer fused (as Optimizers builds it on CUDA); torch's CPU fused AdamW takes found_inf too."""
    groups = [{"params": g["params"], "lr": g["lr"]} for g in opts.shared.param_groups]
    opts.shared = torch.optim.AdamW(groups, weight_decay=opts.shared.defaults["weight_decay"], fused=True)
    return opts


def test_step_body_skips_a_non_finite_update_of_fused_optimizers(one_torch_thread):
    model = tiny_dt()
    opts = _fused_cpu(model, Optimizers(model, TrainConfig(T=model.T)))
    assert skips_nonfinite(opts) and not skips_nonfinite(Optimizers(model, TrainConfig(T=model.T)))
    x, y = batch()
    opts.zero_grad()
    captured_body(model, opts, x, y)  # one finite step: state exists, step = 1
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = state_of(model, opts)
    opts.zero_grad()
    loss, _ = captured_body(model, opts, torch.full_like(x, float("nan")), y)
    assert not torch.isfinite(loss)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), f"{k} moved on a non-finite loss"
    after = state_of(model, opts)
    for k in before:
        if k.startswith("opt"):
            assert torch.equal(after[k], before[k]), f"optimizer state {k} moved on a non-finite loss"
    assert not hasattr(opts.shared, "found_inf")
    opts.zero_grad()
    captured_body(model, opts, x, y)
    assert not torch.equal(next(model.parameters()), next(iter(params.values())))
    assert next(iter(opts.shared.state.values()))["step"].item() == 2


@pytest.mark.parametrize("resumed", [False, True])
def test_training_state_restore_undoes_warm_up_steps(one_torch_thread, resumed):
    """Warm-up steps then restore == no warm-up: the next step is the one an untouched run takes."""
    torch.manual_seed(0)
    a = tiny_dt(embedding="learned")
    b = copy.deepcopy(a)
    oa, ob = Optimizers(a, TrainConfig(T=a.T)), Optimizers(b, TrainConfig(T=b.T))
    x, y = batch()
    if resumed:  # optimizer state exists before the snapshot (a resumed run)
        torch.manual_seed(1)
        train_step(a, oa, x, y)
        torch.manual_seed(1)
        train_step(b, ob, x, y)
    torch.manual_seed(2)
    saved = graphs.TrainingState(a, oa, torch.device("cpu"))
    for _ in range(2):
        oa.zero_grad()
        captured_body(a, oa, x, y)
    tensors = [v for st in oa.shared.state.values() for v in st.values()]
    saved.restore()
    assert all(v is w for v, w in zip(tensors, [v for st in oa.shared.state.values() for v in st.values()]))
    train_step(a, oa, x, y)  # the RNG was restored too: these are the draws right after manual_seed(2)
    torch.manual_seed(2)
    train_step(b, ob, x, y)
    assert_same_state(state_of(a, oa), state_of(b, ob))


# --- with a GPU -----------------------------------------------------------------------------------

class PlainBlock(nn.Module):
    """A block with no BatchNorm: every parameter gets a real gradient. (A bias feeding BatchNorm has an
    exactly-zero gradient, whose rounding noise Adam's first step turns into a full lr-sized update,
    so comparing its parameters after a few steps says nothing about the capture.)"""

    def __init__(self, in_features, d, m, width=32):
        super().__init__()
        self.x_net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(0.1))
        self.z_net = nn.Sequential(nn.Linear(d, width), nn.ReLU())
        self.out = nn.Linear(2 * width, m)

    def forward(self, x, z):
        return self.out(torch.cat([self.x_net(x), self.z_net(z)], 1))


def _backends():
    out = []
    for name in ("triton", "cuda", "eager"):
        reason = None if NO_CUDA else dispatch.why_unavailable(name, torch.device("cuda"))
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


# Interpreted Triton (conftest's default for the CPU tests) copies to the host: nothing to capture.
gpu = pytest.mark.skipif(NO_CUDA or dispatch.triton_interpreted(),
                         reason="CUDA graphs need a CUDA device and compiled Triton kernels (run with "
                                "TRITON_INTERPRET=0, as bench/gpu_check.sh does)")


def _plain_dt(T=3, m=5, execution="auto"):
    from noprop.embeddings import make_embedding
    from noprop.models import NoPropDT
    from noprop.schedule import DTSchedule
    emb = make_embedding("onehot", m)
    return NoPropDT(lambda t: PlainBlock(16, emb.dim, m), emb, DTSchedule.cosine(T), execution=execution)


def _cuda_batches(n, B=16, m=5):
    return [tuple(t.cuda() for t in batch(B=B, m=m, seed=i)) for i in range(n)]


@gpu
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_replays_equal_eager_steps_with_the_same_generator(monkeypatch, backend, execution):
    """Same initial parameters, batches and CUDA generator state: N replays give the losses, parameters
    and optimizer state of N eager train_steps. The captured step draws its seed and dropout masks
    from the CUDA generator in the same order as the eager step, and CapturedStep restores the
    generator after its warm-up, so the draws are the same ones. (The backend is chosen through the
    environment, not use_backend: CUDA backward ops run on autograd's device thread, which does not
    see a thread-local choice.)"""
    monkeypatch.setenv("NOPROP_BACKEND", backend)
    torch.manual_seed(0)
    step = _assert_replays_equal_eager_steps(_plain_dt(execution=execution).cuda(),
                                             TrainConfig(T=3, cuda_graph=True, device="cuda"), seed=123)
    assert step.seed.shape == (1,)


@gpu
def test_backprop_replays_equal_its_eager_steps():
    """The like-for-like baseline of `noprop bench --cuda-graph`: replayed backprop is backprop."""
    torch.manual_seed(0)
    step = _assert_replays_equal_eager_steps(_tiny_backprop(T=3).cuda(),
                                             TrainConfig(method="backprop", T=3, cuda_graph=True, device="cuda"), seed=7)
    assert step.seed is None


def _assert_replays_equal_eager_steps(model, cfg, seed, n=4, data=None):
    """N replays of a CapturedStep of `model` and N eager train_steps of its twin, from the same CUDA
    generator state: the same losses (all different), parameters and optimizer state. Returns the step.
    data: the N (x, y) CUDA batches (default: tiny ones for the tests' small blocks)."""
    twin = copy.deepcopy(model)
    opts, twin_opts = Optimizers(model, cfg), Optimizers(twin, cfg)
    data = _cuda_batches(n) if data is None else data
    torch.cuda.manual_seed(seed)
    step = graphs.CapturedStep(model, opts, *data[0])
    captured = [step(x, y) for x, y in data]
    torch.cuda.manual_seed(seed)
    eager = [train_step(twin, twin_opts, x, y) for x, y in data]
    assert len(set(captured)) == len(captured)
    assert captured == pytest.approx(eager, rel=1e-5)
    assert_same_state(state_of(model, opts), state_of(twin, twin_opts), rtol=1e-5, atol=1e-6)
    return step


@gpu
def test_every_replay_draws_fresh_noise_and_its_loss_is_that_noise_s_loss():
    torch.manual_seed(0)
    model = tiny_dt().cuda()
    for mod in model.modules():  # no dropout: the eager recomputation below is then exact
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    opts = Optimizers(model, TrainConfig(T=model.T, cuda_graph=True, device="cuda"))
    x, y = _cuda_batches(1)[0]
    step = graphs.CapturedStep(model, opts, x, y)
    seeds, losses = [], []
    for _ in range(3):  # the same batch every time
        before = copy.deepcopy(model)
        losses.append(step(x, y))
        seeds.append(step.seed.clone())
        # the replay's loss is the pre-step model's loss on the replay's own seed
        expected = before.losses(x, y, seed=seeds[-1]).total.item()
        assert losses[-1] == pytest.approx(expected, rel=1e-5)
    assert len({int(s) for s in seeds}) == 3, "replays reused a seed"
    assert len(set(losses)) == 3
    from noprop.ops import noise_inject
    W = model.embedding.weight
    z = [noise_inject(W, y, model.sqrt_alpha_bar, model.sqrt_one_minus_alpha_bar, s) for s in seeds[:2]]
    assert not torch.allclose(z[0], z[1])


@gpu
def test_static_shapes_hyper_parameters_mode_and_non_finite_losses_are_enforced():
    torch.manual_seed(0)
    model = tiny_dt().cuda()
    opts = Optimizers(model, TrainConfig(T=model.T, cuda_graph=True, device="cuda"))
    x, y = _cuda_batches(1)[0]
    step = graphs.CapturedStep(model, opts, x, y)
    params = state_of(model, opts)
    for bad_x, bad_y in ((x[:8], y[:8]), (x, y[:8]), (x.double(), y), (x, y.int()), (x[:, :, :2], y)):
        assert not step.accepts(bad_x, bad_y)
        with pytest.raises(ValueError, match="static shapes"):
            step(bad_x, bad_y)
    with pytest.raises(ValueError, match="labels must lie in"):
        step(x, torch.full_like(y, 7))
    assert_same_state(state_of(model, opts), params)  # nothing ran
    assert step.accepts(x.cpu(), y.cpu())
    step(x.cpu(), y.cpu())  # a CPU batch is copied into the static buffers
    model.eval()
    with pytest.raises(ValueError, match="captured in train mode"):
        step(x, y)
    model.train()
    opts.shared.param_groups[0]["lr"] *= 2
    with pytest.raises(ValueError, match="hyper-parameters"):
        step(x, y)
    opts.shared.param_groups[0]["lr"] /= 2
    params = state_of(model, opts)
    with pytest.raises(FloatingPointError, match="skipped this update"):
        step(torch.full_like(x, float("nan")), y)
    after = state_of(model, opts)
    for k in params:
        bn_statistic = k.startswith("model.") and ("running" in k or "num_batches" in k)  # the forward moves these
        if not bn_statistic:
            torch.testing.assert_close(after[k], params[k], rtol=0, atol=0, msg=k)


@gpu
def test_fit_with_cuda_graph_equals_fit_without_including_a_partial_last_batch():
    split = synthetic(image_shape=(1, 16, 16), num_classes=3, train_size=80, test_size=32)  # 32 + 32 + 16
    runs = []
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for cuda_graph in (False, True):
            cfg = TrainConfig(T=2, epochs=2, batch_size=32, device="cuda", cuda_graph=cuda_graph)
            _, history = fit(cfg, split, progress=False, log=lambda *_: None)
            runs.append([h["train_loss"] for h in history])
    eager, captured = runs
    assert captured == pytest.approx(eager, rel=1e-4)

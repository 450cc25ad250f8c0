"""--precision (fp32 / tf32 / bf16), --compile, the like-for-like bench ratios and the operator count.

On the CPU: the fp32 step is the step as it was (bit for bit, and no autocast or TF32 switch is
entered); a bf16 step keeps fp32 master weights, gradients and AdamW state, its fused losses are fp32
reductions, and a short bf16 run learns; tf32 is refused off CUDA in one line, and its switches are
restored; a compiled step gives the eager step's losses and gradients; bench divides each DT row by
the backprop row of the same precision, compile and capture, and labels any other pair; `noprop
profile` counts a step's operator calls. Speed is measured by `noprop bench`, not here.
"""
import copy

import pytest
import torch

from noprop import bench
from noprop.cli import build_parser, main
from noprop.data import synthetic
from noprop.embeddings import make_embedding
from noprop.models import BackpropDT
from noprop.ops import local_loss, new_seed
from noprop.profile import operator_calls
from noprop.training import Optimizers, TrainConfig, fit, precision_context, train_step
from noprop.training.compiling import apply_compile, is_compiled
from noprop.training.precision import channels_last, tf32_switches
from tests.helpers import TinyBlock, assert_grads_close_per_block, batch, tiny_dt


def _tiny_backprop(T=2, m=5):
    emb = make_embedding("onehot", m)
    return BackpropDT(lambda t: TinyBlock(16, emb.dim, m), emb, num_blocks=T)


def _dt(T=3):
    model = tiny_dt(T=T)
    model.execution = "loop"  # one thread of work: the reference below runs the same blocks in order
    return model


def _state(model, opts):
    params = [p.detach().clone() for p in model.parameters()]
    moments = [v.detach().clone() for opt in opts.all() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v)]
    return params, moments


# --- fp32: the step as it was -----------------------------------------------------------------------

def _step_before_precision(model, opts, x, y) -> float:
    """train_step as it was before precisions existed, from the internals it called: one noise seed
    whose value also keys the CPU dropout masks, the whole loss, its backward, one optimizer step."""
    opts.zero_grad()
    if isinstance(model, BackpropDT):
        loss = model.loss(x, y)
    else:
        seed = new_seed(x.device)
        loss = model.losses(x, y, seed=seed, dropout_seed=int(seed)).total
    loss.backward()
    value = 0.0 + loss.item()
    opts.step()
    return value


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_fp32_step_is_bit_for_bit_the_step_before_precision(method):
    torch.manual_seed(0)
    a = _dt() if method == "dt" else _tiny_backprop()
    b = copy.deepcopy(a)
    cfg = TrainConfig(method=method, T=len(a.blocks))
    oa, ob = Optimizers(a, cfg), Optimizers(b, cfg)
    for i in range(3):
        x, y = batch(seed=i)
        torch.manual_seed(10 + i)
        got = train_step(a, oa, x, y, precision="fp32")
        torch.manual_seed(10 + i)
        assert got == _step_before_precision(b, ob, x, y)
    (pa, ma), (pb, mb) = _state(a, oa), _state(b, ob)
    assert len(pa) == len(pb) and len(ma) == len(mb) > 0
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))
    assert all(torch.equal(p, q) for p, q in zip(ma, mb))


def test_fp32_enters_no_autocast_and_sets_no_switch(monkeypatch):
    entered = []

    class Spy:  # any torch.autocast(...) the step builds would land here
        def __init__(self, *args, **kwargs):
            entered.append((args, kwargs))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Spy)
    seen = []
    model = _dt(T=2)
    model.blocks[0].register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_float32_matmul_precision(),
                                torch.backends.cudnn.allow_tf32)))
    outside = (False, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    train_step(model, Optimizers(model, TrainConfig(T=2)), *batch(), precision="fp32")
    assert entered == [] and seen == [outside]


# --- bf16 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_bf16_step_keeps_fp32_weights_gradients_and_adamw_state(method):
    model = _dt() if method == "dt" else _tiny_backprop()
    outputs = []
    model.blocks[0].register_forward_hook(lambda m, inp, out: outputs.append(out.dtype))
    opts = Optimizers(model, TrainConfig(method=method, T=len(model.blocks)))
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, opts, *batch(), precision="bf16")
    assert outputs == [torch.bfloat16]  # the block ran under bf16 autocast
    assert loss == loss and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    state = [v for opt in opts.all() for st in opt.state.values() for v in st.values() if v.is_floating_point()]
    assert state and all(v.dtype == torch.float32 for v in state)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_bf16_local_losses_are_fp32_reductions_of_bf16_logits():
    model = _dt()
    x, y = batch()
    with precision_context("bf16", "cpu"):
        out = model.losses(x, y, seed=torch.tensor([3]))
    assert out.local.dtype == out.total.dtype == out.ce.dtype == torch.float32
    # The fused op computes in fp32 whatever autocast says: bf16 logits inside an autocast region give
    # the same loss and gradients as outside one (the eager kernel's matmuls would otherwise run in bf16).
    logits = torch.randn(3, 16, 5).to(torch.bfloat16).requires_grad_()
    W = torch.randn(5, 8, requires_grad=True)
    weight = torch.rand(3)
    plain = local_loss(logits, W, y, weight)
    (gl_plain, gw_plain) = torch.autograd.grad(plain.sum(), (logits, W))
    with precision_context("bf16", "cpu"):
        inside = local_loss(logits, W, y, weight)
        (gl_inside, gw_inside) = torch.autograd.grad(inside.sum(), (logits, W))
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert gl_inside.dtype == torch.bfloat16 and torch.equal(gl_inside, gl_plain) and torch.equal(gw_inside, gw_plain)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fused_ops_take_a_bf16_steps_mixed_dtypes_and_keep_the_error_rule(backend, one_torch_thread):
    """Under bf16 autocast the blocks hand the fused ops bf16 logits while W stays fp32. Each backend
    must take that mix (Triton runs interpreted on CPU tensors here, the kernels a GPU would run) and
    stay within the error rule against float64, forward and backward, inside an autocast region."""
    from noprop import dispatch
    from noprop.ops import denoise_step
    from tests.error_rule import assert_error_rule

    if backend == "triton" and not dispatch.triton_interpreted():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (conftest sets it)")
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 7, 10, generator=g)).to(torch.bfloat16)
    W, weight, y = torch.randn(10, 20, generator=g), torch.rand(3, generator=g), torch.randint(0, 10, (7,), generator=g)
    grad = torch.randn(3, generator=g)

    def run(which, dtype=None):
        cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
        lg, w = (cast(t).detach().requires_grad_() for t in (logits, W))
        with dispatch.use_backend(which), precision_context("bf16", "cpu"):
            loss = local_loss(lg, w, y, cast(weight))
            loss.backward(grad.to(loss.dtype))
            z = denoise_step(lg[0].detach(), w.detach(), cast(W[:7]), 0.3, 0.9, 0.1, torch.tensor([5]))
        return loss.detach(), lg.grad, w.grad, z

    ref, same, got = run("eager", torch.float64), run("eager"), run(backend)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, b, r in zip(("loss", "dlogits", "dW", "z"), got, same, ref):
        assert_error_rule(a, b, r, name, who=backend)


def test_bf16_training_learns_on_the_cpu():
    split = synthetic(image_shape=(1, 4, 4), num_classes=5, train_size=320, test_size=160, noise=0.5)
    cfg = TrainConfig(T=3, epochs=3, batch_size=32, precision="bf16", shared_lr_scale=10, lr=3e-3, execution="loop")
    _, history = fit(cfg, split, progress=False, log=lambda *_: None, model=tiny_dt(T=3))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # chance is 0.2; evaluation ran under bf16 autocast too
    assert history[-1]["precision"] == "bf16"


# --- tf32 and layout ----------------------------------------------------------------------------------

def test_tf32_off_cuda_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="tf32") as info:
        TrainConfig(precision="tf32")
    assert "\n" not in str(info.value) and "cpu" in str(info.value)
    with pytest.raises(ValueError, match="tf32"):
        with precision_context("tf32", "cpu"):
            pass
    assert main(["train", "--data", "synthetic:1,16,16,3,64", "-T", "2", "--epochs", "1", "--precision", "tf32",
                 "--checkpoint", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tf32" in err
    assert main(["bench", "--quick", "--precision", "fp32,tf32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tf32" in err
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="tested"):
        TrainConfig(method="ct", precision="bf16")


def test_tf32_switches_are_set_inside_and_restored_after_even_on_error():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with pytest.raises(KeyError):
            with tf32_switches():
                assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
                raise KeyError("boom")
        assert torch.get_float32_matmul_precision() == before[0] and torch.backends.cudnn.allow_tf32 is False
        # one API: reading the newer fp32_precision attributes does not raise the "mix of APIs" error
        assert torch.backends.cuda.matmul.fp32_precision in ("ieee", "tf32", "none")
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 (a read that raises after mixed use)
    finally:
        torch.backends.cudnn.allow_tf32 = before[1]


def test_channels_last_only_for_reduced_precision_on_cuda():
    assert channels_last("bf16", "cuda") and channels_last("tf32", "cuda:0")
    assert not channels_last("fp32", "cuda") and not channels_last("bf16", "cpu")


# --- compile ------------------------------------------------------------------------------------------

def test_compile_settings_that_cannot_work_are_one_line():
    for kwargs, says in (({"execution": "threads"}, "threads"), ({"method": "ct"}, "--compile compiles")):
        with pytest.raises(ValueError, match=says) as info:
            TrainConfig(compile=True, **kwargs)
        assert "\n" not in str(info.value)
    assert TrainConfig(compile=True).effective_execution == "loop"  # CPU 'auto' would spawn block threads
    assert TrainConfig().effective_execution == "auto"


def test_each_set_of_blocks_may_compile_its_own_graph(monkeypatch):
    """Lean runs T one-block sets: T graphs (and T more for a last batch of another size), past dynamo's
    default limit of 8 recompiles, after which it would run eagerly without a word. The compiled
    function is called with the limit raised, and the limit is back afterwards."""
    seen = []

    def fake_compile(fn, mode=None):
        def run(*args, **kwargs):
            seen.append(torch._dynamo.config.recompile_limit)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _dt(T=10)
    cfg = TrainConfig(T=10, mode="lean", execution="loop", compile=True)
    default = torch._dynamo.config.recompile_limit
    apply_compile(model, cfg, "cpu")
    train_step(model, Optimizers(model, cfg), *batch(), chunk_size=cfg.chunk)
    assert len(seen) == 10 and min(seen) >= 2 * 10 > default
    assert torch._dynamo.config.recompile_limit == default


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_compiled_step_matches_the_eager_step(method, one_torch_thread, monkeypatch):
    # backprop draws z_0 inside its compiled forward: inductor's own generator would draw other numbers
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch.manual_seed(0)
    a = _dt(T=2) if method == "dt" else _tiny_backprop()
    for block in a.blocks:
        block.x_net[4].p = 0.0  # compiled dropout draws other masks than eager dropout: compare without
    b = copy.deepcopy(a)
    cfg = TrainConfig(method=method, T=2, execution="loop", compile=True)
    apply_compile(b, cfg, "cpu")
    assert is_compiled(b) and not is_compiled(a)
    assert b.state_dict().keys() == a.state_dict().keys()  # checkpoints keep their keys
    oa, ob = Optimizers(a, cfg), Optimizers(b, cfg)
    for i in range(3):
        x, y = batch(seed=i)
        torch.manual_seed(i)
        want = train_step(a, oa, x, y)
        torch.manual_seed(i)
        got = train_step(b, ob, x, y)
        assert got == pytest.approx(want, rel=1e-5)
        if i == 0:  # after the first step the updates drift apart by AdamW's normalised rounding noise
            assert_grads_close_per_block({n: p.grad for n, p in b.named_parameters()},
                                         {n: p.grad for n, p in a.named_parameters()}, rtol=1e-4)


# --- bench: like for like -----------------------------------------------------------------------------

def _rec(label, method, ms, precision="fp32", compile=False, graph=False):
    return {"label": label, "method": method, "ms_per_step": ms, "precision": precision, "compile": compile,
            "cuda_graph": graph, "peak_mem_mb": 1.0, "device": "cuda", "samples_per_s": 1.0, "ms_min": ms,
            "ms_max": ms}


def test_bench_divides_each_row_by_the_backprop_row_of_the_same_treatment():
    recs = [_rec("backprop", "backprop", 40.0), _rec("dt parallel", "dt", 20.0),
            _rec("backprop [bf16]", "backprop", 16.0, "bf16"), _rec("dt parallel [bf16]", "dt", 4.0, "bf16"),
            _rec("cnn [bf16]", "cnn", 2.0, "bf16"), _rec("dt parallel [compile]", "dt", 10.0, compile=True),
            _rec("dt parallel+graph [bf16]", "dt", 2.0, "bf16", graph=True)]
    per_round = {r["label"]: [{"ms_per_step": r["ms_per_step"]}] for r in recs}
    bench.add_ratios(recs, per_round)
    by = {r["label"]: r for r in recs}
    assert by["dt parallel"]["ratio_to_backprop"] == pytest.approx(2.0) and by["dt parallel"]["ratio_unlike"] is None
    assert by["dt parallel [bf16]"]["ratio_base"] == "backprop [bf16]"
    assert by["dt parallel [bf16]"]["ratio_to_backprop"] == pytest.approx(4.0)  # 16 / 4, not 40 / 4
    assert by["dt parallel [bf16]"]["ratio_unlike"] is None and by["cnn [bf16]"]["ratio_base"] == "backprop [bf16]"
    # no compiled backprop measured: divided by the closest (eager fp32) and labelled, never silently
    assert by["dt parallel [compile]"]["ratio_base"] == "backprop"
    assert by["dt parallel [compile]"]["ratio_unlike"] == "compiled vs eager"
    assert by["dt parallel+graph [bf16]"]["ratio_base"] == "backprop [bf16]"
    assert by["dt parallel+graph [bf16]"]["ratio_unlike"] == "graph vs eager"
    # a backprop row in another precision shows what that precision does for backprop, labelled so
    assert by["backprop [bf16]"]["ratio_to_backprop"] == pytest.approx(2.5)
    assert by["backprop [bf16]"]["ratio_unlike"] == "bf16 vs fp32"
    text = bench.table(recs)
    assert "(unlike: compiled vs eager, against backprop)" in text
    assert "(unlike: graph vs eager, against backprop [bf16])" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("dt parallel [bf16] "))
    assert "unlike" not in line


def test_bench_plan_runs_every_precision_for_dt_and_backprop_and_compiles_what_compile_takes():
    cases, notes = bench.plan(["dt", "backprop"], ["parallel", "lean"], ["loop", "threads"], T=3, chunk_size=2,
                              precisions=("fp32", "bf16"), compile=True)
    labels = [c.label for c in cases]
    assert len(set(labels)) == len(labels)
    for precision in ("fp32", "bf16"):
        for compiled in (False, True):
            mine = [c for c in cases if c.precision == precision and c.compile == compiled]
            assert {c.method for c in mine} == {"dt", "backprop"}
    compiled = [c for c in cases if c.compile]
    assert all(c.execution != "threads" for c in compiled) and any(c.mode == "lean" for c in compiled)
    assert any("[compile] skipped" in n and "threads" in n for n in notes)
    assert "dt parallel (loop) [bf16, compile]" in labels and "backprop [bf16, compile]" in labels


def test_quick_bench_in_two_precisions_records_them(tmp_path, capsys):
    csv_path = tmp_path / "b.csv"
    assert main(["bench", "--quick", "--methods", "dt,backprop", "--modes", "parallel", "--execution", "loop",
                 "--precision", "fp32,bf16", "--csv", str(csv_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    dt_rows = [ln for ln in out.splitlines() if ln.startswith("dt parallel (loop)")]
    assert len(dt_rows) == 2 and "backprop [bf16]" in out
    assert not any("unlike" in ln for ln in dt_rows)  # each divided by the backprop row of its own precision
    header, *rows = csv_path.read_text().splitlines()
    assert "precision" in header.split(",") and "ratio_unlike" in header.split(",")
    assert sorted(r.split(",")[header.split(",").index("precision")] for r in rows) == ["bf16", "bf16", "fp32", "fp32"]


# --- flags --------------------------------------------------------------------------------------------

def test_flags_parse():
    parse = build_parser().parse_args
    args = parse(["train", "--precision", "bf16", "--compile"])
    assert args.precision == "bf16" and args.compile is True
    assert parse(["train"]).precision == "fp32" and parse(["train"]).compile is False
    args = parse(["bench", "--precision", "fp32,bf16", "--compile"])
    opts, *_ = bench.options(args)
    assert opts["precisions"] == ["fp32", "bf16"] and opts["compile"] is True
    args = parse(["profile", "--precision", "bf16", "--compile"])
    assert args.precision == "bf16" and args.compile is True
    with pytest.raises(SystemExit):
        parse(["train", "--precision", "fp16"])


# --- operator calls per step --------------------------------------------------------------------------

def _op_count(T: int) -> tuple[int, int]:
    model = _dt(T=T)
    opts = Optimizers(model, TrainConfig(T=T))
    x, y = batch()

    def step():
        train_step(model, opts, x, y)

    step()  # AdamW creates its state on the first step: count steady steps
    first, second = operator_calls(step), operator_calls(step)
    assert first == second
    assert first["noprop::local_loss"] == first["noprop::local_loss_backward"] == 1
    assert first["aten::threshold_backward"] > 0  # autograd's backward is seen, not just the forward
    return sum(first.values()), sum(second.values())


def test_operator_calls_per_step_are_positive_stable_and_grow_with_blocks():
    two, again = _op_count(2)
    four, _ = _op_count(4)
    assert two == again > 0
    assert four > two


def test_profile_reports_operator_calls(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--steps", "1", "--warmup", "0", "-T", "2", "--batch", "8", "--out", str(out),
                 "--execution", "loop"]) == 0
    printed = capsys.readouterr().out
    assert "operator calls per training step:" in printed
    table = (out / "table.txt").read_text()
    line = next(ln for ln in table.splitlines() if ln.startswith("operator calls per training step:"))
    assert int(line.split(":")[1].split()[0]) > 0 and "aten" in line


def test_compile_mode_follows_the_device_and_noprop_compile_mode(monkeypatch):
    from noprop.training.compiling import compile_mode

    monkeypatch.delenv("NOPROP_COMPILE_MODE", raising=False)
    assert compile_mode("cuda") == "max-autotune-no-cudagraphs" and compile_mode("cpu") is None
    monkeypatch.setenv("NOPROP_COMPILE_MODE", "default")
    assert compile_mode("cuda") is None
    monkeypatch.setenv("NOPROP_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert compile_mode("cpu") == "max-autotune-no-cudagraphs"
    for bad in ("fastest", "reduce-overhead"):  # inductor's CUDA graphs would capture inside --cuda-graph's
        monkeypatch.setenv("NOPROP_COMPILE_MODE", bad)
        with pytest.raises(ValueError, match="NOPROP_COMPILE_MODE must be one of default, max-autotune-no-cudagraphs"):
            TrainConfig(compile=True)  # said before any data or model is built

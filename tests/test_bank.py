"""A block bank (noprop.models.bank) against T separate blocks with the same parameters and batch:
losses, gradients, BatchNorm statistics, optimizer steps in every training mode, checkpoints both
ways, locality and label-free inference. Tolerances are float32 rounding relative to each block's
largest value (tests.helpers.assert_grads_close_per_block)."""
import copy
import io

import pytest
import torch
from torch import nn

from noprop import engine
from noprop.data import synthetic
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import NoPropDT, dt_block_factory
from noprop.models.bank import BankLinear, BlockBank
from noprop.schedule import DTSchedule
from noprop.training import Optimizers, TrainConfig, build_model, fit, train_step
from noprop.training.loop import load_model
from tests.helpers import TinyBlock, assert_grads_close_per_block, batch

IMAGE = (1, 16, 16)


def embedding(kind):
    if kind == "prototype":  # z is an image: the label branch has a conv branch of its own (per-block input)
        return ClassEmbedding("prototype", 5, init=torch.randn(5, 256), image_shape=IMAGE)
    return make_embedding(kind, 5, dim=8)


def separate_and_bank(T=3, kind="learned"):
    """(a model of T separate DT blocks run one by one, a bank model with the same parameters)."""
    torch.manual_seed(0)
    emb = embedding(kind)
    model = NoPropDT(dt_block_factory(IMAGE, 5, emb), emb, DTSchedule.cosine(T), execution="loop")
    bank = copy.deepcopy(model)
    bank.set_execution("bank")
    assert bank.is_bank and not model.is_bank
    return model, bank


def grads_per_block(model):
    """{per-block parameter name: gradient}; a bank's rows under the names separate blocks have."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if model.is_bank and name.startswith("blocks."):
            out.update({f"blocks.{t}.{name[7:]}": p.grad[t] for t in range(model.T)})
        else:
            out[name] = p.grad
    return out


def assert_states_close(got: dict, ref: dict, rtol=1e-4):
    """Compare two per-block state dicts, each tensor relative to the largest value of its block."""
    assert got.keys() == ref.keys()
    floats = {k: v for k, v in ref.items() if v.is_floating_point()}
    assert_grads_close_per_block({k: got[k] for k in floats}, floats, rtol)
    for k in ref.keys() - floats.keys():
        assert torch.equal(got[k], ref[k]), k


def smooth_adam(opts):
    """Adam with eps = 1e-3 (see test_bank_training_steps_equal_separate_blocks for why)."""
    for group in (g for opt in opts.all() for g in opt.param_groups):
        group["eps"] = 1e-3
    return opts


def optimizer_state(opts):
    """Optimizers.state_dict() (per-block layout for both) flattened to {name: tensor}."""
    out = {}
    for i, sd in enumerate(opts.state_dict()):
        for j, st in sd["state"].items():
            for k, v in st.items():
                out[f"blocks.{i}.{j}.{k}"] = v  # 'blocks.<i>.' groups each optimizer's values for the scale
    return out


def test_bank_holds_stacked_rows_under_the_block_s_names_and_saves_per_block_keys():
    model, bank = separate_and_bank()
    assert isinstance(bank.blocks, BlockBank) and bank.blocks.folded and len(bank.blocks) == 3
    w = bank.blocks.get_parameter("image.convs.0.weight")
    assert w.shape == (3, 32, 1, 3, 3) and torch.equal(w[1], model.blocks[1].image.convs[0].weight)
    assert isinstance(bank.blocks.label.inp[0], BankLinear)
    ours, theirs = bank.state_dict(), model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    view = bank.blocks[2].eval()  # a per-block view: an ordinary DTBlock over row 2
    assert type(view) is type(model.blocks[2])
    assert torch.equal(view(*_one_input()), model.blocks[2].eval()(*_one_input()))
    with torch.no_grad():
        view.fuse[-1].bias.add_(1.0)  # writes through to the bank
    assert torch.equal(bank.blocks.fuse[-1].bias[2], model.blocks[2].fuse[-1].bias + 1.0)


def _one_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, *IMAGE, generator=g), torch.randn(4, 8, generator=g)


@pytest.mark.parametrize("impl", ["loop", "grouped", "gemm"])
@pytest.mark.parametrize("kind", ["learned", "prototype"])
@pytest.mark.parametrize("train", [True, False])
def test_bank_losses_gradients_and_statistics_equal_separate_blocks(monkeypatch, impl, kind, train):
    monkeypatch.setenv("NOPROP_BANK_CONV", impl)
    model, bank = separate_and_bank(kind=kind)
    x, y = batch(B=12, m=5, image_shape=IMAGE)
    outs = []
    for m in (model, bank):
        m.train(train)
        out = m.losses(x, y, seed=torch.tensor(1234), dropout_seed=99)  # dropout on, keyed alike in both
        out.total.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].local, outs[0].local, rtol=1e-5, atol=1e-7)
    assert_grads_close_per_block(grads_per_block(bank), grads_per_block(model))
    assert_states_close(bank.state_dict(), model.state_dict(), rtol=1e-5)  # running statistics


MODES = ["parallel", "chunked", "lean", "sequential"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [True, False])
def test_bank_training_steps_equal_separate_blocks(mode, train):
    """Several train_steps: losses, parameters, BatchNorm statistics and optimizer state agree.

    In training mode Adam runs with eps = 1e-3 here: many gradients are then exactly zero in exact
    arithmetic (a bias feeding BatchNorm, sums that cancel), and Adam's early steps are lr·sign(g),
    so with the default eps (1e-8) their float32 rounding noise becomes full steps of +-lr that
    differ between any two summation orders (threads against loop too). A larger eps keeps the step
    a smooth function of the gradient, so rounding stays rounding. In eval mode (BatchNorm on its
    running statistics) the default eps is kept."""
    model, bank = separate_and_bank(T=3)
    cfg = TrainConfig(T=3, mode=mode, chunk_size=2, weight_decay=0.1)
    plan = [[1], [3], [1], [2]] if mode == "sequential" else [None] * 3
    results = []
    for m in (model, bank):
        m.train(train)
        opts = smooth_adam(Optimizers(m, cfg)) if train else Optimizers(m, cfg)
        torch.manual_seed(5)
        losses = [train_step(m, opts, *batch(B=10, m=5, image_shape=IMAGE, seed=i), blocks, cfg.chunk)
                  for i, blocks in enumerate(plan)]
        results.append((losses, m.state_dict(), optimizer_state(opts)))
    (l_ref, s_ref, o_ref), (l_bank, s_bank, o_bank) = results
    assert l_bank == pytest.approx(l_ref, rel=1e-5)
    assert_states_close(s_bank, s_ref)
    assert_states_close(o_bank, o_ref)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_adamw_over_the_bank_is_per_block_adamw_given_the_same_gradients(mode):
    """The optimizer alone: the same gradients fed to both for several steps (weight decay on, the
    sequential plan skipping blocks) leave parameters and state equal to float32 rounding."""
    model, bank = separate_and_bank(T=3)
    cfg = TrainConfig(T=3, mode=mode, weight_decay=0.1)
    opts = [Optimizers(m, cfg) for m in (model, bank)]
    g = torch.Generator().manual_seed(0)
    for step, blocks in enumerate([[1], [3], [1], [2], [1]] if mode == "sequential" else [None] * 5):
        for o in opts:
            o.zero_grad()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * (step + 1)
        if blocks:  # only the trained block has gradients
            for t, block in enumerate(model.blocks, 1):
                if t not in blocks:
                    block.zero_grad(set_to_none=True)
        for name, p in bank.named_parameters():
            ref = model.get_parameter(name) if not name.startswith("blocks.") else None
            if ref is not None:
                p.grad = ref.grad.clone()
            else:
                rows = [model.blocks[t].get_parameter(name[7:]).grad for t in range(3)]
                p.grad = torch.stack([r if r is not None else torch.zeros_like(p[0]) for r in rows])
        for o in opts:
            o.step(blocks)
    assert_states_close(bank.state_dict(), model.state_dict(), rtol=1e-6)
    assert_states_close(optimizer_state(opts[1]), optimizer_state(opts[0]), rtol=1e-6)
    if mode == "sequential":  # block 2 trained once, block 3 once, block 1 three times: step counts per block
        steps = [sd["state"][0]["step"].item() for sd in opts[1].state_dict()[:3]]
        assert steps == [3, 1, 1]


def saved(state):
    """`state` written to a file and read back (optimizer state_dicts hold the live tensors)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoints_move_between_separate_blocks_and_a_bank_with_optimizer_state():
    model, bank = separate_and_bank()
    cfg = TrainConfig(T=3)
    opts_ref, opts_bank = smooth_adam(Optimizers(model, cfg)), smooth_adam(Optimizers(bank, cfg))
    x, y = batch(B=10, m=5, image_shape=IMAGE)
    train_step(model, opts_ref, x, y)
    # separate -> bank: model state and optimizer state
    bank.load_state_dict(model.state_dict())
    opts_bank.load_state_dict(saved(opts_ref.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(bank.state_dict().values(), model.state_dict().values()))
    assert_states_close(optimizer_state(opts_bank), optimizer_state(opts_ref), rtol=0)
    # both continue alike, and bank -> separate loads into a fresh model
    torch.manual_seed(3)
    train_step(model, opts_ref, x, y)
    torch.manual_seed(3)
    train_step(bank, opts_bank, x, y)
    fresh, _ = separate_and_bank()
    fresh_opts = Optimizers(fresh, cfg)
    fresh.load_state_dict(bank.state_dict())
    fresh_opts.load_state_dict(saved(opts_bank.state_dict()))
    assert_states_close(fresh.state_dict(), model.state_dict())
    assert_states_close(optimizer_state(fresh_opts), optimizer_state(opts_ref))


def test_a_checkpoint_of_other_blocks_is_refused_by_a_bank():
    _, bank = separate_and_bank(T=3)
    other, _ = separate_and_bank(T=2)
    with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
        bank.load_state_dict(other.state_dict())


def test_a_run_saved_with_separate_blocks_resumes_as_a_bank_and_back(tmp_path):
    """fit writes per-block checkpoints; resuming with execution 'bank' continues the same run."""
    split = synthetic(image_shape=IMAGE, num_classes=3, train_size=64, test_size=32)
    quiet = dict(progress=False, log=lambda *_: None)
    full = TrainConfig(T=2, epochs=2, batch_size=32, execution="loop")
    _, ref = fit(full, split, tmp_path / "full.pt", **quiet)
    fit(TrainConfig(T=2, epochs=1, batch_size=32, execution="loop"), split, tmp_path / "run.pt", **quiet)
    resumed_model, resumed = fit(TrainConfig(T=2, epochs=2, batch_size=32, execution="bank"), split,
                                 tmp_path / "run.pt", resume=True, **quiet)
    assert resumed_model.is_bank
    assert resumed[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-4)
    loaded, cfg, _ = load_model(tmp_path / "run.pt")  # the bank's checkpoint, rebuilt as saved (execution bank)
    assert loaded.is_bank and cfg.execution == "bank"
    separate = build_model(TrainConfig(T=2, execution="loop"), IMAGE, 3)
    separate.load_state_dict(loaded.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(separate.state_dict().values(), loaded.state_dict().values()))


def test_locality_check_passes_for_a_bank_and_catches_a_block_reading_another():
    _, bank = separate_and_bank()
    x, y = batch(B=8, m=5, image_shape=IMAGE)
    bank.check_locality(x, y)
    run = bank.blocks.forward

    def leaky(x, z, rows=slice(None), dropout_seed=None):
        out = run(x, z, rows, dropout_seed)
        return out + 0.1 * out.roll(1, dims=0)  # block t reads block t-1's output (block 1 reads block 3's)

    bank.blocks.forward = leaky
    with pytest.raises(ValueError, match="block 1's loss reaches the parameters of block\\(s\\) \\[3\\]"):
        bank.check_locality(x, y)


def test_label_free_inference_of_a_bank_is_that_of_separate_blocks():
    model, bank = separate_and_bank()
    x = torch.randn(9, *IMAGE)
    for m in (model, bank):
        m.eval()
    for kw in ({}, {"mean_chain": True}, {"runs": 2}):
        a = model.predict_proba(x, generator=torch.Generator().manual_seed(4), **kw)
        b = bank.predict_proba(x, generator=torch.Generator().manual_seed(4), **kw)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_user_blocks_that_stack_run_vmapped_from_the_bank():
    """Blocks the bank cannot fold (a user's own forward) run vmapped over the bank's rows."""
    torch.manual_seed(0)
    emb = make_embedding("learned", 5, dim=8)
    model = NoPropDT(lambda t: TinyBlock(256, 8, 5), emb, DTSchedule.cosine(3), execution="loop")
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0  # torch's own dropout: masks would differ between the two
    bank = copy.deepcopy(model)
    bank.set_execution("bank")
    assert bank.is_bank and not bank.blocks.folded
    x, y = batch(B=12, m=5, image_shape=IMAGE)
    for m in (model, bank):
        m.losses(x, y, seed=torch.tensor(7)).total.backward()
        m.losses(x, y, blocks=[2, 3], seed=torch.tensor(8)).total.backward()  # a chunk: a slice of the rows
    assert_grads_close_per_block(grads_per_block(bank), grads_per_block(model))
    assert_states_close(bank.state_dict(), model.state_dict(), rtol=1e-5)
    bank.eval(), model.eval()
    torch.testing.assert_close(bank.predict_proba(x, generator=torch.Generator().manual_seed(1)),
                               model.predict_proba(x, generator=torch.Generator().manual_seed(1)))
    bank.check_locality(x, y)


def test_execution_decides_the_storage(torch_threads):
    torch_threads(2)
    cpu = build_model(TrainConfig(T=4), IMAGE, 5)  # the default on CPU: separate blocks on threads
    assert not cpu.is_bank and cpu.resolve_execution([1, 2, 3, 4], "cpu") == "threads"
    cuda = build_model(TrainConfig(T=4, device="cuda"), IMAGE, 5)  # built for CUDA: a bank (no GPU needed)
    assert cuda.is_bank and cuda.resolve_execution([1], "cuda") == "bank"
    few = build_model(TrainConfig(T=engine.CUDA_VMAP_MIN_BLOCKS - 1, device="cuda"), IMAGE, 5)
    assert not few.is_bank
    before = cuda.state_dict()
    cuda.set_execution("loop")  # back to separate blocks, same values
    assert not cuda.is_bank and all(torch.equal(before[k], v) for k, v in cuda.state_dict().items())
    cuda.execution = "bank"
    assert cuda.is_bank
    mixed = NoPropDT([TinyBlock(256, 8, 5), TinyBlock(256, 8, 5, width=16)], make_embedding("learned", 5, dim=8))
    with pytest.raises(ValueError, match="cannot stack these blocks: block 2 differs"):
        mixed.set_execution("bank")


def test_the_default_cpu_step_is_the_separate_blocks_step_bit_for_bit(torch_threads):
    """TrainConfig()'s execution (auto) on a 2-thread CPU keeps separate blocks on threads: two
    steps give exactly the bits of the same steps asked for as 'threads'."""
    torch_threads(2)
    states = []
    for execution in ("auto", "threads"):
        torch.manual_seed(0)
        cfg = TrainConfig(T=4, execution=execution)
        model = build_model(cfg, IMAGE, 5)
        assert not model.is_bank
        opts = Optimizers(model, cfg)
        torch.manual_seed(1)
        for i in range(2):
            train_step(model, opts, *batch(B=12, m=5, image_shape=IMAGE, seed=i))
        states.append((model.state_dict(), optimizer_state(opts)))
    for got, ref in zip(*states):
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_bank_step_reads_nothing_on_the_host_so_a_cuda_graph_can_capture_it(monkeypatch, one_torch_thread):
    """The captured body (no keyed dropout) of a folded bank at the aten level: no host read, no tensor
    made from Python data (tests/test_graphs.py's probe)."""
    from noprop.ops import checks
    from noprop.training.step import captured_body
    from tests.test_graphs import HOST_OPS, _fused_cpu, _OpCounter

    _, bank = separate_and_bank()
    opts = _fused_cpu(bank, Optimizers(bank, TrainConfig(T=3)))
    x, y = batch(B=8, m=5, image_shape=IMAGE)
    monkeypatch.setattr(checks, "labels", lambda y, m: None)
    opts.zero_grad()
    captured_body(bank, opts, x, y)
    opts.zero_grad()
    with _OpCounter() as body:
        captured_body(bank, opts, x, y)
    assert {op: n for op, n in body.ops.items() if op in HOST_OPS} == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bank_on_cuda_replays_its_eager_steps():
    """On a GPU (bench/gpu_check.sh): the folded bank's parallel step captured as a CUDA graph gives
    the eager steps' parameters, BatchNorm statistics and optimizer state."""
    from noprop import dispatch
    from noprop.training import CapturedStep

    if dispatch.triton_interpreted():
        pytest.skip("interpreted Triton cannot be captured (run with TRITON_INTERPRET=0)")
    results = []
    for graph in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(T=4, device="cuda", cuda_graph=graph)
        model = build_model(cfg, IMAGE, 5).cuda().eval()  # eval: see test_bank_training_steps_equal_separate_blocks
        assert model.is_bank
        opts = Optimizers(model, cfg)
        batches = [tuple(t.cuda() for t in batch(B=16, m=5, image_shape=IMAGE, seed=i)) for i in range(3)]
        step = CapturedStep(model, opts, *batches[0]) if graph else None
        torch.cuda.manual_seed(5)
        for x, y in batches:
            step(x, y) if graph else train_step(model, opts, x, y)
        results.append((model.state_dict(), optimizer_state(opts)))
    for got, ref in zip(results[1], results[0]):
        assert_states_close(got, ref)


def test_a_bank_step_in_bf16_keeps_to_the_error_rule():
    """--precision bf16 (CPU autocast): per block, the bank's local losses and gradients are no further
    from the float64 step than 2 x those of separate blocks in bf16, plus the rule's floor."""
    from noprop.training.precision import precision_context
    from tests.error_rule import assert_error_rule

    model, bank = separate_and_bank(kind="learned")
    ref = copy.deepcopy(model).double()
    x, y = batch(B=12, m=5, image_shape=IMAGE)
    outs = {}
    for name, m, inputs, precision in (("ref", ref, x.double(), "fp32"), ("same", model, x, "bf16"),
                                       ("got", bank, x, "bf16")):
        with precision_context(precision, "cpu"):
            out = m.losses(inputs, y, seed=torch.tensor(1234), dropout_seed=99)
        out.total.backward()
        grads = grads_per_block(m)
        per_block = {}
        for k, g in grads.items():  # one vector per block (and per shared parameter)
            per_block.setdefault(k.split(".")[1] if k.startswith("blocks.") else k, []).append(g.flatten())
        outs[name] = (out.local.detach(), {k: torch.cat(v) for k, v in per_block.items()})
    (l_ref, g_ref), (l_same, g_same), (l_got, g_got) = outs["ref"], outs["same"], outs["got"]
    assert_error_rule(l_got, l_same, l_ref, "local losses", "bank")
    for k in g_ref:
        assert_error_rule(g_got[k], g_same[k], g_ref[k], f"gradients of {k}", "bank")


def test_a_bank_s_blocks_compile_to_one_graph():
    """--compile (training/compiling.py) compiles run_blocks: through a bank it is one graph, no breaks,
    and gives the eager logits."""
    import torch._dynamo

    _, bank = separate_and_bank()
    bank.eval()
    x, z = torch.randn(8, *IMAGE), torch.randn(4, 8, 8)
    explained = torch._dynamo.explain(bank.run_blocks)([1, 2, 3], x, z)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(bank.run_blocks, backend="aot_eager")
    torch.testing.assert_close(compiled([2, 3], x, z), bank.run_blocks([2, 3], x, z))


def test_block_parallel_training_keeps_separate_blocks():
    """Block ranks own some blocks each (training/distributed.py): no bank there, said in one line."""
    from noprop.training.build import apply_execution
    from noprop.training.dist_loop import check_distributable

    with pytest.raises(ValueError, match="execution 'bank' holds every block in one"):
        check_distributable(TrainConfig(T=4, execution="bank"))
    cfg = TrainConfig(T=4, device="cuda")  # auto on CUDA would hold a single process's blocks in a bank
    model = build_model(TrainConfig(T=4), IMAGE, 5)
    apply_execution(model, cfg, separate=True)
    assert not model.is_bank and model.resolve_execution([1, 2, 3, 4], "cuda") == "vmap"
    _, bank = separate_and_bank()
    with pytest.raises(ValueError, match="this model holds them in one bank"):
        Optimizers(bank, TrainConfig(T=3), blocks=[1])

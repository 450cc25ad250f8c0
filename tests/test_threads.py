"""Threaded execution (noprop.engine, CPU block parallelism) and the keyed dropout that keeps it
reproducible (noprop.models.dropout)."""
import importlib
import threading
import warnings

import pytest
import torch
from torch import nn

from noprop import dispatch, engine
from noprop.embeddings import make_embedding
from noprop.models import NoPropDT, dt_block_factory
from noprop.models.dropout import Dropout, block_key, keyed_masks
from noprop.schedule import DTSchedule
from noprop.training import Optimizers, TrainConfig, train_step
from tests.helpers import assert_grads_close_per_block, batch, tiny_dt


# ---- keyed dropout ------------------------------------------------------------------------------

def test_keyed_dropout_masks_follow_the_key_and_keep_torch_scaling():
    drop = Dropout(0.25).train()
    x = torch.ones(4000)
    with keyed_masks(7):
        a = drop(x)
    torch.rand(5)  # the global generator moving on does not touch keyed masks
    with keyed_masks(7):
        b = drop(x)
    with keyed_masks(8):
        c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().tolist() == pytest.approx([0.0, 1 / 0.75])  # kept elements scaled by 1 / (1 - p)
    kept = (a > 0).float().mean().item()
    assert abs(kept - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5  # within 4 standard errors
    torch.manual_seed(3)
    ref = nn.Dropout(0.25).train()(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), ref)  # outside a key it is nn.Dropout, draw for draw
    assert torch.equal(drop.eval()(x), x)


def test_keyed_dropout_is_per_thread_and_gradients_flow():
    drop = Dropout(0.5).train()
    seen = {}

    def other_thread():  # a key set on the main thread does not reach another thread
        torch.manual_seed(11)
        seen["other"] = drop(torch.ones(64))

    with keyed_masks(1):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    torch.manual_seed(11)
    assert torch.equal(seen["other"], nn.Dropout(0.5).train()(torch.ones(64)))
    x = torch.randn(64, requires_grad=True)
    with keyed_masks(2):
        out = drop(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out.detach() != 0).float() * 2.0)


def test_block_keys_differ_between_blocks_and_steps():
    keys = {block_key(seed, t) for seed in range(50) for t in range(1, 11)}
    assert len(keys) == 500 and all(0 <= k < 2**63 for k in keys)


# ---- the threaded step --------------------------------------------------------------------------

def dt_model(execution, embedding="onehot", T=4):
    """Real DT blocks (with dropout) on 16x16 images."""
    torch.manual_seed(0)
    emb = make_embedding(embedding, 5, dim=8)
    return NoPropDT(dt_block_factory((1, 16, 16), 5, emb), emb, DTSchedule.cosine(T), execution=execution)


def one_step(model, schedule="all-blocks", chunk_size=2, x=None, y=None):
    cfg = TrainConfig(lr=1e-3, mode=schedule, chunk_size=chunk_size, T=model.T)
    opts = Optimizers(model, cfg)
    x, y = (x, y) if x is not None else batch(B=24, image_shape=(1, 16, 16))
    torch.manual_seed(42)
    loss = train_step(model, opts, x, y, None, cfg.chunk)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("embedding", ["onehot", "learned"])
@pytest.mark.parametrize("schedule", ["all-blocks", "chunked"])
def test_threaded_step_is_the_loop_step(torch_threads, embedding, schedule):
    """Same loss and gradients as one thread running the blocks in turn; dropout is on, so this
    also checks each block draws the same masks whichever thread runs it."""
    torch_threads(2)
    threaded, where = dt_model("threads", embedding), set()
    for block in threaded.blocks:
        block.register_forward_hook(lambda *_: where.add(threading.current_thread().name.split("_")[0]))
    loss_t, g_t = one_step(threaded, schedule, chunk_size=3)
    # the blocks really ran on the worker threads (chunked: T = 4 in chunks of 3, the last chunk's
    # single block on the calling thread)
    assert where == ({"noprop-blocks"} if schedule == "all-blocks" else {"noprop-blocks", "MainThread"})
    loss_l, g_l = one_step(dt_model("loop", embedding), schedule, chunk_size=3)
    assert loss_t == pytest.approx(loss_l, rel=1e-5)
    assert_grads_close_per_block(g_t, g_l, rtol=1e-4)


def test_shared_gradients_repeat_bit_for_bit_on_three_threads(torch_threads):
    """Three groups all add into the learned embedding's gradient (and the first into the head's):
    summed in group order, not in thread-timing order, every run gives the same bits."""
    torch_threads(3)
    x, y = batch()
    grads = []
    for _ in range(10):
        torch.manual_seed(0)
        model = tiny_dt(T=6, embedding="learned")
        for mod in model.modules():  # TinyBlock's nn.Dropout would draw in thread order
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        model.execution = "threads"
        grads.append(one_step(model, x=x, y=y)[1])
    for g in grads[1:]:
        assert all(torch.equal(g[n], grads[0][n]) for n in grads[0])


def test_threaded_step_is_reproducible_for_any_thread_count(torch_threads):
    torch_threads(2)
    loss_a, g_a = one_step(dt_model("threads"))
    loss_b, g_b = one_step(dt_model("threads"))
    assert loss_a == loss_b and all(torch.equal(g_a[n], g_b[n]) for n in g_a)  # bitwise
    torch_threads(3)  # 4 blocks in 3 groups (2 + 1 + 1) instead of 2 + 2
    loss_c, g_c = one_step(dt_model("threads"))
    assert loss_c == pytest.approx(loss_a, rel=1e-5)
    assert_grads_close_per_block(g_c, g_a, rtol=1e-4)


def test_each_block_draws_its_own_masks_in_a_threaded_step(torch_threads):
    torch_threads(2)
    model = dt_model("threads")
    dropped = {}
    for t, block in enumerate(model.blocks, 1):  # the first dropout of each block's image branch
        first = next(m for m in block.image.convs if isinstance(m, Dropout))
        first.register_forward_hook(lambda mod, inp, out, t=t: dropped.__setitem__(t, (out == 0, inp[0] != 0)))
    one_step(model)
    assert sorted(dropped) == [1, 2, 3, 4]
    for t, (zero, nonzero_in) in dropped.items():  # dropout really ran (p = 0.2 in the DT block)
        rate = (zero & nonzero_in).sum().item() / nonzero_in.sum().item()
        assert abs(rate - 0.2) < 0.02, (t, rate)
    masks = {t: zero & nonzero_in for t, (zero, nonzero_in) in dropped.items()}
    assert not torch.equal(masks[1], masks[2]) and not torch.equal(masks[3], masks[4])  # a mask of its own


def test_threaded_step_restores_threads_and_carries_thread_state(torch_threads):
    torch_threads(2)
    model = dt_model("threads")
    seen = []

    class Probe(nn.Module):  # records what the worker thread sees, then passes through
        def forward(self, z):
            seen.append((threading.current_thread().name, dispatch.requested_backend(), torch.is_grad_enabled(),
                         torch.get_num_threads()))
            return z

    for block in model.blocks:
        block.label.inp.insert(0, Probe())
    with dispatch.use_backend("eager"):
        one_step(model)
    assert torch.get_num_threads() == 2
    assert len(seen) == 4 and all(name.startswith("noprop-blocks") for name, *_ in seen)
    assert all(backend == "eager" and grad and threads == 1 for _, backend, grad, threads in seen)


def test_saved_tensor_hooks_reach_the_worker_threads(torch_threads):
    torch_threads(2)
    model = dt_model("threads")
    packed = {"main": 0, "workers": 0}

    def pack(t):
        packed["main" if threading.current_thread() is threading.main_thread() else "workers"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        one_step(model)
    assert packed["workers"] > 0


def test_a_failing_block_raises_after_every_thread_finished(torch_threads):
    torch_threads(2)
    model = dt_model("threads")
    finished = []

    class Boom(nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, z):
            if self.t == 3:
                raise RuntimeError("block 3 exploded")
            finished.append(self.t)
            return z

    for t, block in enumerate(model.blocks, 1):
        block.label.inp.insert(0, Boom(t))
    with pytest.raises(RuntimeError, match="block 3 exploded"):
        one_step(model)
    assert sorted(finished) == [1, 2]  # the other group ran to its end
    assert torch.get_num_threads() == 2


def test_nan_loss_in_a_worker_is_a_clear_error(torch_threads):
    torch_threads(2)
    model = dt_model("threads")
    x, y = batch(B=24, image_shape=(1, 16, 16))
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss became"):
        one_step(model, x=x, y=y)


def test_inference_features_on_threads_give_the_loop_prediction(torch_threads):
    torch_threads(2)
    model = dt_model("threads").eval()
    where = []
    for block in model.blocks:
        block.image.register_forward_hook(
            lambda mod, inp, out: where.append((threading.current_thread().name, out.requires_grad)))
    x, _ = batch(B=24, image_shape=(1, 16, 16))
    threaded = model.predict_proba(x, generator=torch.Generator().manual_seed(3))
    assert len(where) == 4 and all(name.startswith("noprop-blocks") for name, _ in where)
    assert not any(grad for _, grad in where)  # predict_proba runs under no_grad, and so do its workers
    model.execution = "loop"
    looped = model.predict_proba(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(threaded, looped, rtol=1e-5, atol=1e-6)


def test_prediction_never_depends_on_whether_the_blocks_could_train_stacked(torch_threads):
    """Inference reads `execution` only to decide on threads: blocks of different structure with
    execution 'vmap' (which training would refuse to stack) still predict."""
    torch_threads(2)
    emb = make_embedding("onehot", 5)
    widths = iter([32, 16, 32])
    from tests.helpers import TinyBlock
    model = NoPropDT(lambda t: TinyBlock(256, emb.dim, 5, width=next(widths)), emb, DTSchedule.cosine(3),
                     execution="vmap").eval()
    assert model.predict(torch.randn(4, 1, 16, 16)).shape == (4,)
    assert not engine.threads_for_inference("threads", 3, torch.device("cuda"))  # never raises either


def test_torch_modes_keep_the_blocks_on_the_calling_thread(torch_threads):
    """A torch function or dispatch mode (here FlopCounterMode) is per thread: it would not see the
    workers' ops, so the step runs its blocks as a loop and the count is complete."""
    from torch.utils.flop_counter import FlopCounterMode

    torch_threads(2)
    counts = []
    for execution in ("threads", "loop"):
        model = dt_model(execution)
        with FlopCounterMode(display=False) as counter:
            one_step(model)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_nested_run_threaded_runs_inline_instead_of_deadlocking(torch_threads):
    torch_threads(2)
    done = []

    def outer():
        inner = lambda i, g: (i, g)  # noqa: E731
        done.append(engine.run_threaded([[1], [2]], lambda i, g: engine.run_threaded([[i], [i + 10]], inner)))

    t = threading.Thread(target=outer, daemon=True)  # a deadlock would hang the test: watch it from here
    t.start()
    t.join(timeout=60)
    assert done == [[[(0, [0]), (1, [10])], [(0, [1]), (1, [11])]]]


def test_run_threaded_shares_out_every_intra_op_thread(torch_threads):
    torch_threads(5)
    seen = engine.run_threaded([[1, 2], [3, 4]], lambda i, group: (torch.get_num_threads(), group))
    assert seen == [(3, [1, 2]), (2, [3, 4])]  # 5 threads: 3 + 2, results in group order
    assert torch.get_num_threads() == 5
    torch_threads(2)
    assert [n for n, _ in engine.run_threaded([[1], [2], [3]], lambda i, g: (torch.get_num_threads(), g))] == [1, 1, 1]


def test_blocks_with_torch_dropout_warn_once_under_threads(torch_threads):
    torch_threads(2)
    user = tiny_dt()  # TinyBlock: torch.nn.Dropout
    user.execution = "threads"
    with pytest.warns(UserWarning, match="block 1 \\(TinyBlock\\) uses torch.nn.Dropout"):
        one_step(user, x=batch()[0], y=batch()[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(user, x=batch()[0], y=batch()[1])  # once per model
        one_step(dt_model("threads"))  # the DT block's noprop Dropout: keyed, nothing to warn about
        loop = tiny_dt()
        loop.execution = "loop"
        one_step(loop, x=batch()[0], y=batch()[1])


def test_split_evenly():
    assert engine.split_evenly([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert engine.split_evenly([1, 2], 8) == [[1], [2]]
    assert engine.split_evenly([1, 2, 3, 4], 1) == [[1, 2, 3, 4]]


def test_threads_on_a_cuda_device_is_refused_at_configuration():
    with pytest.raises(ValueError, match="runs blocks on CPU threads"):
        TrainConfig(execution="threads", device="cuda")
    TrainConfig(execution="threads", device="cpu")  # fine; with one torch thread it runs as loop


needs_interpreter = pytest.mark.skipif(not dispatch.triton_interpreted(),
                                       reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")


@needs_interpreter
def test_interpreted_triton_launches_from_several_threads_at_once():
    """The Triton interpreter patches module globals while it runs a kernel: the launchers hold a
    lock for CPU tensors, or threads interpreting at once crash each other."""
    from noprop.ops import eager

    launcher = importlib.import_module("noprop.kernels.triton.local_loss")
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(3, 64, 10, generator=g), torch.randn(10, 20, generator=g),
              torch.randint(0, 10, (64,), generator=g), torch.rand(3, generator=g)) for _ in range(6)]
    expected = [eager.local_loss(*args) for args in cases]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(5):  # back-to-back launches, so the threads' interpretations overlap
                got[i] = launcher.local_loss(*cases[i])
        except Exception as exc:  # noqa: BLE001  collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, want in enumerate(expected):
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_threaded_step_through_interpreted_triton_matches_eager(torch_threads):
    torch_threads(2)
    results = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        model = tiny_dt(embedding="learned")
        for mod in model.modules():  # TinyBlock's nn.Dropout draws in thread order: switch it off
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        model.execution = "threads"
        with dispatch.use_backend(backend):
            results.append(one_step(model, x=batch()[0], y=batch()[1]))
    (loss_e, g_e), (loss_t, g_t) = results
    assert loss_t == pytest.approx(loss_e, rel=1e-5)
    assert_grads_close_per_block(g_t, g_e, rtol=1e-4)

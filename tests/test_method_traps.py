"""The method's traps (docs/method.md §13), checked against the paper's formulas written out here in
float64, never against the model's own buffers or schedule object:

- DT training noise: the z that block t receives is z_{t-1} ~ q(z_{t-1} | y) = N(√ᾱ_{t-1}·u_y,
  (1 − ᾱ_{t-1})·I), and the head sees z_T ~ q(z_T | y) (index direction, √ᾱ vs ᾱ, swapped
  coefficients, off-by-one block index, CE on a block output).
- DT inference with a perfect denoiser: the Eq. 3 chain reproduces q(z_t | y) at every t, each
  mean-chain step is a_t·u_y + b_t·z_{t-1}, and the labels are predicted (a/b/c indexing).
- Inference of DT, CT and FM never hands a label to an op, a block or any tensor operation.

ᾱ_t is the project's DT cosine schedule (noprop/schedule.py): f(t) = cos²(π/2·(1 − t/T + s)/(1 + s))
/ cos²(π/2·s/(1 + s)), s = 0.008, ᾱ_t = ᾱ_max·f(t), ᾱ_max = 0.999; recomputed by hand below.
"""
import inspect
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import noprop.models.continuous as continuous_module
import noprop.models.dt as dt_module
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import NoPropCT, NoPropDT, NoPropFM, ct_block
from noprop.schedule import DTSchedule
from tests.helpers import tiny_dt

T = 10
M, D = 4, 6  # classes, embedding dims
N_STAT = 20_000  # samples for the distribution checks: 6 standard errors are ~0.1 of the noise std per class


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def paper_alpha_bar(T, max_alpha_bar=0.999, s=0.008):
    """ᾱ_0..ᾱ_T of the cosine schedule, from the closed form, as Python floats (float64)."""
    top = math.cos(math.pi / 2 * s / (1 + s)) ** 2
    return [max_alpha_bar * math.cos(math.pi / 2 * (1 - t / T + s) / (1 + s)) ** 2 / top for t in range(T + 1)]


def paper_eq3(ab):
    """(a_t, b_t, c_t) for t = 1..T (list index t − 1) from paper Eq. 3, α_{t−1} = ᾱ_{t−1}/ᾱ_t."""
    out = []
    for t in range(1, len(ab)):
        alpha = ab[t - 1] / ab[t]
        out.append((math.sqrt(ab[t]) * (1 - alpha) / (1 - ab[t - 1]),
                    math.sqrt(alpha) * (1 - ab[t]) / (1 - ab[t - 1]),
                    (1 - ab[t]) * (1 - alpha) / (1 - ab[t - 1])))
    return out


def embedding_matrix(seed=1):
    """A learned embedding with distinct, well separated random rows (so a wrong class shows)."""
    W = torch.randn(M, D, generator=torch.Generator().manual_seed(seed))
    return ClassEmbedding("learned", M, init=W)


def assert_marginal(z, W, y, ab, what):
    """z [n, d] ~ N(√ab·W[y], (1 − ab)·I): the mean of every class (each dim) and the variance of every
    dim around it lie within 6 standard errors of the closed form."""
    z, W = z.double(), W.detach().double()
    var = 1 - ab
    for c in range(W.shape[0]):
        zc = z[y == c]
        err = (zc.mean(0) - math.sqrt(ab) * W[c]).abs().max().item()
        tol = 6 * math.sqrt(var / zc.shape[0])
        assert err < tol, f"{what}: mean of class {c} is {err:.3g} from √ᾱ·u_c (ᾱ = {ab:.4g}), allowed {tol:.3g}"
    n = z.shape[0]
    v = (z - math.sqrt(ab) * W[y]).var(0)
    err = (v - var).abs().max().item()
    tol = 6 * var * math.sqrt(2 / (n - 1))
    assert err < tol, f"{what}: variance {v.tolist()} is {err:.3g} from 1 − ᾱ = {var:.4g}, allowed {tol:.3g}"


def signal_coefficient(z, W, y):
    """Least-squares k in z ≈ k·u_y: an estimate of √ᾱ for z ~ q(·|y)."""
    u = W.detach().double()[y]
    return ((z.double() * u).sum() / (u * u).sum()).item()


class Recorder(nn.Module):
    """A DT block for tests: records every z it is given; logits from `logits(x, z)` (zeros if None)."""

    def __init__(self, logits=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.logits, self.seen = logits, []

    def forward(self, x, z):
        self.seen.append(z.detach().clone())
        out = self.logits(x, z) if self.logits is not None else z.new_zeros(z.shape[0], M)
        return out + 0 * self.weight


def record_head(model):
    """Record every input of model.head (DT: z_T); returns the list the records go to."""
    seen = []
    model.head.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


# --- DT training noise ---------------------------------------------------------------------------

def test_dt_block_t_trains_on_z_t_minus_1_from_q_and_the_head_on_z_T():
    """Block t's input in the training loss follows N(√ᾱ_{t−1}·u_y, (1 − ᾱ_{t−1})·I), ᾱ from the
    closed form; the head's input follows q(z_T | y). Fails for a block fed z_t (off by one), √ᾱ and
    √(1 − ᾱ) swapped, ᾱ in place of √ᾱ, a reversed schedule, or CE on a block's output."""
    emb = embedding_matrix()
    blocks = [Recorder() for _ in range(T)]
    model = NoPropDT(blocks, emb, DTSchedule.cosine(T), execution="loop")
    head_in = record_head(model)
    y = torch.arange(N_STAT) % M
    x = torch.zeros(N_STAT, 1)
    model.losses(x, y)
    ab = paper_alpha_bar(T)
    W = emb.weight
    for t, block in enumerate(blocks, 1):
        assert len(block.seen) == 1 and block.seen[0].shape == (N_STAT, D)
        assert_marginal(block.seen[0], W, y, ab[t - 1], f"block {t}'s training input z_{t - 1}")
    assert len(head_in) == 1
    assert_marginal(head_in[0], W, y, ab[T], "the head's input z_T")

    # Direction: block 1 gets (nearly) pure noise, the signal grows with t, the head's z_T is nearly clean.
    k = [signal_coefficient(b.seen[0], W, y) for b in blocks] + [signal_coefficient(head_in[0], W, y)]
    assert abs(k[0]) < 0.02, f"block 1 must see z_0 ≈ pure noise, signal coefficient {k[0]:.3g}"
    assert all(b > a for a, b in zip(k, k[1:])), f"signal must grow with t (t = 0 noise, t = T clean): {k}"
    assert k[-1] > 0.99, f"the head must see z_T close to u_y, signal coefficient {k[-1]:.3g}"


# --- DT inference with a perfect denoiser --------------------------------------------------------

def perfect_dt(emb):
    """A DT model whose blocks are perfect denoisers: the image is the label (x [B, 1] = y), the
    logits make softmax one-hot, so û_t = u_y exactly; the head classifies by the nearest embedding."""
    def oracle(x, z):
        return 1e4 * nn.functional.one_hot(x[:, 0].round().long(), M).to(z.dtype)

    blocks = [Recorder(oracle) for _ in range(T)]
    model = NoPropDT(blocks, emb, DTSchedule.cosine(T), execution="loop").eval()
    W = emb.weight.detach()
    with torch.no_grad():  # logits_c = 10·(u_c·z − ½‖u_c‖²): argmax = the nearest class embedding
        model.head.weight.copy_(10 * W)
        model.head.bias.copy_(-5 * W.pow(2).sum(1))
    return model, blocks


def test_dt_perfect_denoiser_chain_reproduces_q_at_every_step():
    """Stochastic Eq. 3 chain through predict_proba with û = u_y: z_t (what block t + 1, or the head,
    receives) follows q(z_t | y) at every t. Fails for a/b/c taken at the wrong t or c without √."""
    emb = embedding_matrix()
    model, blocks = perfect_dt(emb)
    head_in = record_head(model)
    y = torch.arange(N_STAT) % M
    p = model.predict_proba(y.float()[:, None], generator=torch.Generator().manual_seed(0))
    ab = paper_alpha_bar(T)
    zs = [b.seen[0] for b in blocks] + head_in  # z_0 .. z_T
    assert len(zs) == T + 1
    for t, z in enumerate(zs):
        assert_marginal(z, emb.weight, y, ab[t], f"z_{t} of the perfect-denoiser chain")
    assert torch.equal(p.argmax(1), y)


def test_dt_perfect_denoiser_mean_chain_follows_eq3_and_predicts_the_labels():
    emb = embedding_matrix()
    model, blocks = perfect_dt(emb)
    head_in = record_head(model)
    B = 512
    y = torch.arange(B) % M
    x = y.float()[:, None]
    p = model.predict_proba(x, mean_chain=True, generator=torch.Generator().manual_seed(0))
    ab, coef = paper_alpha_bar(T), paper_eq3(paper_alpha_bar(T))
    u = emb.weight.detach().double()[y]
    zs = [b.seen[0].double() for b in blocks] + [head_in[0].double()]
    for t in range(1, T + 1):  # every step: z_t = a_t·û_t + b_t·z_{t-1} (no noise), û_t = u_y
        a, b, _ = coef[t - 1]
        expected = a * u + b * zs[t - 1]
        scale = (abs(a) * u.abs() + abs(b) * zs[t - 1].abs()).max().item()
        err = (zs[t] - expected).abs().max().item()
        assert err <= 1e-6 * scale, f"step {t}: z_t is {err:.3g} from a_t·u_y + b_t·z_(t-1) (scale {scale:.3g})"
    # End state in closed form: the mean chain forgets z_0 (∏ b_t ≈ 1e-16) and lands on √ᾱ_T·u_y.
    err = (zs[T] - math.sqrt(ab[T]) * u).abs().max().item()
    assert err < 1e-5, f"mean chain ends {err:.3g} from √ᾱ_T·u_y"
    assert torch.equal(p.argmax(1), y)

    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    for kwargs in ({}, {"mean_chain": True}, {"runs": 3}, {"runs": 2, "mean_chain": True}):
        acc = (model.predict(x, generator=g(1), **kwargs) == y).double().mean().item()
        assert acc == 1.0, f"perfect denoiser with {kwargs} gives accuracy {acc}"


# --- label-free inference ------------------------------------------------------------------------

class LabelSpy(TorchFunctionMode):
    """Records every torch function that receives an integer tensor of more than one element (a
    label vector; seeds are int64 [1]). Sees operators, indexing and custom ops alike."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in tree_leaves((args, kwargs)):
            if (isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool
                    and not a.is_complex() and a.numel() > 1):
                self.hits.append(f"{getattr(func, '__name__', func)} got an integer tensor of shape {tuple(a.shape)}")
        return func(*args, **kwargs)


def _ct():
    emb = make_embedding("onehot", 4)
    return NoPropCT(ct_block((1, 16, 16), 4, emb), emb, input_shape=(1, 16, 16), inference_steps=4), continuous_module


def _fm():
    emb = make_embedding("learned", 4, dim=6)
    return NoPropFM(ct_block((1, 16, 16), 4, emb), emb, input_shape=(1, 16, 16), inference_steps=4), continuous_module


def _dt():
    return tiny_dt(T=3, m=4, image_shape=(1, 16, 16)), dt_module


@pytest.mark.parametrize("build", [_dt, _ct, _fm], ids=["dt", "ct", "fm"])
def test_inference_hands_no_label_to_any_op_block_or_tensor_operation(build, monkeypatch):
    """After a training step (so a model that kept its labels would have some), predict_proba and
    predict call no label-consuming op (noise_inject, local_loss raise), give denoise_step only float
    tensors and a one-element seed, and no torch operation inside (blocks included) sees an integer
    tensor that could be a label vector."""
    model, module = build()
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 4, (6,))
    model.losses(x, y).total.backward()
    model.eval()
    for fn in (model.predict_proba, model.predict):
        assert not {"y", "labels", "targets"} & set(inspect.signature(fn).parameters)

    def label_op(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"inference called {name}, which samples or scores from a label")
        return refuse

    monkeypatch.setattr(module, "noise_inject", label_op("noise_inject"))
    monkeypatch.setattr(module, "local_loss", label_op("local_loss"))
    real_step, steps = module.denoise_step, []

    def step(*args, **kwargs):
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        steps.append([(t.dtype, tuple(t.shape)) for t in tensors if not t.is_floating_point()])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(module, "denoise_step", step)
    x_test = torch.randn(6, 1, 16, 16)  # the training batch's size: a kept label vector would fit it
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    with LabelSpy() as spy:
        p = model.predict_proba(x_test, generator=g(0), runs=2)
        pred = model.predict(x_test, generator=g(0), mean_chain=True)
    assert spy.hits == [], spy.hits
    assert steps, "inference must run the denoise_step chain"
    assert all(ints == [(torch.int64, (1,))] for ints in steps), steps  # the seed and nothing else
    assert p.shape == (6, 4) and pred.shape == (6,)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    assert torch.equal(p, model.predict_proba(x_test, generator=g(0), runs=2))  # seedable

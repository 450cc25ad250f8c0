"""NoProp-CT / NoProp-FM: learnable schedule, losses, label-free chains, training and CLI."""
import inspect
import json
import math

import pytest
import torch
from torch import nn

from noprop.cli import main
from noprop.data import synthetic
from noprop.dispatch import use_backend, why_unavailable
from noprop.embeddings import ClassEmbedding, make_embedding
from noprop.models import CTBlock, NoPropCT, NoPropFM, ct_block
from noprop.ops import new_seed, noise_inject
from noprop.ops.philox import philox_randn
from noprop.schedule import CTSchedule
from noprop.training import METHOD_DEFAULTS, TrainConfig, fit, load_model


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    # small networks / many small eager ops: one torch thread on the shared 2-core machine
    yield


def perturbed_schedule(seed=0, scale=1.0):
    """A CTSchedule whose raw parameters are randomly moved, as training might move them."""
    s = CTSchedule()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return s


class LabelFromImage(nn.Module):
    """A 'perfect' network for tests: the class is written in the image (x [B, 1, 1, 1] = y), so it
    knows u_y without ever being given a label. mode 'ct': logits that make softmax one-hot;
    mode 'fm': the exact Euler field (u_y − z_t)/(1 − t) for one-hot W (v = logits · I)."""

    def __init__(self, m, mode):
        super().__init__()
        self.m, self.mode = m, mode
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, z, t):
        onehot = nn.functional.one_hot(x.reshape(-1).round().long(), self.m).to(z.dtype)
        if self.mode == "ct":
            return 1e4 * onehot
        return (onehot - z) / (1 - t.to(z.dtype))[:, None]


def tiny_net(image_shape, emb):
    return ct_block(image_shape, emb.num_classes, emb)


# --- schedule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,scale", [(None, 0.0), (0, 1.0), (1, 3.0)])
def test_ct_schedule_is_strictly_monotone_with_positive_snr_derivative(seed, scale):
    s = CTSchedule() if seed is None else perturbed_schedule(seed, scale)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    with torch.no_grad():
        ab, snr, dsnr, gbar = s.alpha_bar(t), s.snr(t), s.snr_derivative(t), s.gamma_bar(t)
    assert bool((ab > 0).all() and (ab < 1).all())
    assert bool((ab[1:] > ab[:-1]).all()), "ᾱ must increase strictly with t (t = 1 is clean)"
    assert bool((snr[1:] > snr[:-1]).all())
    assert bool((dsnr > 0).all())
    assert gbar[0].item() == pytest.approx(0.0, abs=1e-12) and gbar[-1].item() == pytest.approx(1.0)
    assert s.gamma(t)[0].item() == pytest.approx(s.gamma_1.item()) and s.gamma(t)[-1].item() == pytest.approx(
        s.gamma_0.item())
    torch.testing.assert_close(snr, ab / (1 - ab))
    # closed-form SNR′ equals autograd's derivative of SNR
    tt = t[1:-1:50].clone().requires_grad_(True)
    auto = torch.autograd.grad(s.snr(tt).sum(), tt)[0]
    torch.testing.assert_close(s.snr_derivative(tt.detach()).detach(), auto, rtol=1e-8, atol=1e-10)
    # the inference grid is a valid DT schedule (strictly increasing ᾱ in [0, 1))
    grid = s.grid(1000)
    torch.testing.assert_close(grid.alpha_bar, ab[::2].detach())


def test_ct_schedule_default_endpoints():
    s = CTSchedule()
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ab = s.alpha_bar(ends).detach()
    assert ab[0].item() == pytest.approx(1 / (1 + math.exp(3)), rel=1e-6)
    assert ab[1].item() == pytest.approx(1 / (1 + math.exp(-3)), rel=1e-6)


def test_ct_schedule_rejects_bad_inputs():
    s = CTSchedule()
    for bad in (torch.tensor([1.5]), torch.tensor([-0.1, 0.5]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            s.alpha_bar(bad)
    with pytest.raises(TypeError, match="floating-point"):
        s.snr(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="gamma_1 > gamma_0"):
        CTSchedule(gamma_0=2.0, gamma_1=1.0)
    with pytest.raises(ValueError, match="inference steps"):
        s.grid(0)


# --- NoProp-CT -----------------------------------------------------------------------------------

def test_ct_loss_follows_the_formula_and_reaches_the_schedule():
    """local = mean_b (η/2)·SNR′(t_b)·‖softmax(logits)·W − u_y‖² (SUM over d); CE on head(z_1 ~ q);
    every schedule parameter gets a gradient, γ_0 through the noising of z_1 alone."""
    emb = make_embedding("learned", 4, dim=6)
    model = NoPropCT(tiny_net((1, 16, 16), emb), emb, perturbed_schedule(2, 0.5), input_shape=(1, 16, 16)).eval()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    torch.manual_seed(5)
    out = model.losses(x, y)
    torch.manual_seed(5)
    t = torch.rand(8)
    seed = new_seed()
    s, W = model.schedule, emb.weight
    sa, s1m, dsnr = s.coefficients(torch.cat([t, torch.ones(1)]))
    z = noise_inject(W, y, torch.stack([sa[:8], sa[8:].expand(8)]).contiguous(),
                     torch.stack([s1m[:8], s1m[8:].expand(8)]).contiguous(), seed)
    torch.testing.assert_close(sa[:8] ** 2, s.alpha_bar(t))
    u_hat = torch.softmax(model.net(x, z[0], t), -1) @ W
    expected = (0.5 * 1.0 * dsnr[:8] * (u_hat - W[y]).pow(2).sum(1)).mean()
    torch.testing.assert_close(out.local, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, nn.functional.cross_entropy(model.head(z[1]), y))
    # KL(N(√ᾱ_0·u_y, (1 − ᾱ_0)·I) ‖ N(0, I)), ᾱ_0 = ᾱ(t = 0): closed form per sample, batch mean
    ab0 = s.alpha_bar(torch.zeros(1, dtype=torch.float64)).item()
    u, d = W[y].detach().double(), W.shape[1]
    kl = 0.5 * (ab0 * u.pow(2).sum(1) + d * (1 - ab0) - d - d * math.log(1 - ab0)).mean().item()
    assert out.kl.item() == pytest.approx(kl, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out.total, out.local + out.ce + out.kl)

    out.total.backward()
    for name, p in model.schedule.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches schedule parameter {name}"
    model.zero_grad()
    torch.manual_seed(5)
    model.losses(x, y).ce.backward()  # z_1 ~ q(z_1|y) depends on γ_0 only through noise_inject
    assert model.schedule.gamma_0.grad.abs() > 0


def test_ct_perfect_denoiser_chain_reproduces_the_marginals():
    """With û = u_y the grid chain started from q(z_0|y) gives z_{t_i} ~ N(√ᾱ(t_i)·u_y, (1 − ᾱ(t_i))·I)
    at every grid point (catches direction, √ᾱ vs ᾱ and off-by-one grid indexing)."""
    m, d, n, N = 4, 3, 20_000, 20
    emb = ClassEmbedding("learned", m, init=torch.randn(m, d, generator=torch.Generator().manual_seed(1)))
    model = NoPropCT(LabelFromImage(m, "ct"), emb, perturbed_schedule(3, 0.5))
    y = torch.arange(n) % m
    x = y.float().reshape(n, 1, 1, 1)
    ab = model.schedule.grid(N).alpha_bar
    W = emb.weight.detach()
    z0 = math.sqrt(ab[0]) * W[y] + math.sqrt(1 - ab[0]) * torch.randn(n, d)
    keep = (1, 5, 13, N)
    z1, kept = model.chain(x, steps=N, z0=z0, keep=keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z1, kept[N])
    for i in keep:
        a = ab[i].item()
        resid = kept[i] - math.sqrt(a) * W[y]
        var = 1 - a
        assert resid.mean(0).abs().max().item() < 5 * math.sqrt(var / n), f"mean off at grid point {i}"
        assert (resid.var(0) - var).abs().max().item() < 5 * var * math.sqrt(2 / (n - 1)), f"variance off at {i}"


def test_ct_inference_never_reads_labels_and_is_seedable(monkeypatch):
    emb = make_embedding("onehot", 4)
    model = NoPropCT(tiny_net((1, 16, 16), emb), emb, input_shape=(1, 16, 16), inference_steps=10).eval()
    assert "y" not in inspect.signature(model.predict_proba).parameters
    assert "y" not in inspect.signature(model.chain).parameters

    def no_labels(*_, **__):
        raise AssertionError("inference sampled from the label distribution")

    monkeypatch.setattr("noprop.models.continuous.noise_inject", no_labels)
    x = torch.randn(6, 1, 16, 16)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    p = model.predict_proba(x, generator=g(0))
    assert p.shape == (6, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    assert torch.equal(p, model.predict_proba(x, generator=g(0)))
    assert not torch.equal(p, model.predict_proba(x, generator=g(1)))
    assert not torch.equal(model.predict_proba(x, generator=g(0), mean_chain=True), p)
    assert model.predict_proba(x, steps=3, runs=2, generator=g(0)).shape == (6, 4)
    assert model.predict(x, generator=g(0)).shape == (6,)


# --- NoProp-FM -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_fm_perfect_velocity_field_lands_on_the_class_embedding(steps):
    m, n = 5, 64
    emb = make_embedding("onehot", m)
    model = NoPropFM(LabelFromImage(m, "fm"), emb)
    y = torch.arange(n) % m
    x = y.float().reshape(n, 1, 1, 1)
    z1 = model.chain(x, steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z1, emb.weight[y], atol=1e-4, rtol=0)
    assert torch.equal(model.predict(x, steps=steps), y)


def test_fm_loss_is_summed_over_dims_and_adds_ce_only_for_learned_embeddings():
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    for kind in ("onehot", "learned"):
        emb = make_embedding(kind, 4, dim=6)
        model = NoPropFM(tiny_net((1, 16, 16), emb), emb, sigma=0.0).eval()
        torch.manual_seed(4)
        out = model.losses(x, y)
        torch.manual_seed(4)
        t = torch.rand(8)
        W = emb.weight
        # z_0 is the noise of the path's noise_inject: the Philox stream of the seed drawn next.
        z0 = philox_randn(new_seed(), (1, 8, W.shape[1]))[0]
        zt = t[:, None] * W[y] + (1 - t[:, None]) * z0
        v = model.net(x, zt, t) @ W
        torch.testing.assert_close(out.local, (v - (W[y] - z0)).pow(2).sum(1).mean(), rtol=1e-5, atol=1e-6)
        if kind == "onehot":
            assert out.ce.item() == 0.0
        else:
            logits = -torch.cdist(zt + (1 - t[:, None]) * v, W) ** 2
            torch.testing.assert_close(out.ce, nn.functional.cross_entropy(logits, y), rtol=1e-4, atol=1e-5)
            out.total.backward()
            assert emb.weight.grad.abs().sum() > 0


@pytest.mark.skipif(why_unavailable("triton", torch.device("cpu")) is not None,
                    reason=str(why_unavailable("triton", torch.device("cpu"))))
@pytest.mark.parametrize("method", ["ct", "fm"])
def test_triton_backend_gives_the_eager_losses_gradients_and_chain(method):
    """CT and FM run their noising, loss and inference step through the fused ops: the interpreted
    Triton kernels give the eager step's losses and gradients, and the same label-free chain."""
    x, y = torch.randn(9, 1, 16, 16), torch.randint(0, 4, (9,))
    results = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        emb = make_embedding("learned", 4, dim=6)
        net = tiny_net((1, 16, 16), emb)
        model = (NoPropCT(net, emb) if method == "ct" else NoPropFM(net, emb)).eval()
        torch.manual_seed(3)
        with use_backend(backend):
            out = model.losses(x, y)
            out.total.backward()
            z1 = model.chain(x, steps=4, generator=torch.Generator().manual_seed(1))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.local.detach(), out.total.detach(), grads, z1))
    (loc_e, tot_e, g_e, z_e), (loc_t, tot_t, g_t, z_t) = results
    torch.testing.assert_close(loc_t, loc_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tot_t, tot_e, rtol=1e-5, atol=1e-6)
    assert g_t.keys() == g_e.keys() and "embedding._learned" in g_e
    for name in g_e:
        torch.testing.assert_close(g_t[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(z_t, z_e, rtol=1e-4, atol=1e-5)


# --- network and input errors --------------------------------------------------------------------

def test_ct_block_architecture():
    emb = make_embedding("onehot", 10)
    net = ct_block((1, 28, 28), 10, emb)
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in net.modules()), "no BatchNorm"
    assert all(c.padding == (0, 0) and c.kernel_size == (3, 3) for c in net.modules() if isinstance(c, nn.Conv2d))
    assert net.fuse[0].in_features == 768 and net.time[0].in_features == 64
    assert net(torch.randn(3, 1, 28, 28), torch.randn(3, 10), torch.rand(3)).shape == (3, 10)
    assert net(torch.randn(3, 1, 28, 28), torch.randn(3, 10), 0.5).shape == (3, 10)  # a scalar t broadcasts
    proto = ClassEmbedding("prototype", 3, init=torch.randn(3, 256), image_shape=(1, 16, 16))
    pnet = ct_block((1, 16, 16), 3, proto)
    assert isinstance(pnet.label[0] if isinstance(pnet.label, nn.Sequential) else pnet.label, nn.Module)
    assert any(isinstance(mod, nn.Conv2d) for mod in pnet.label.modules()), "prototype z needs a conv branch"
    assert pnet(torch.randn(2, 1, 16, 16), torch.randn(2, 256), torch.rand(2)).shape == (2, 3)


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, z, t):
        return z[:, :2]


def test_bad_inputs_get_clear_errors():
    emb = make_embedding("onehot", 4)
    net = tiny_net((1, 16, 16), emb)
    x, z = torch.randn(2, 1, 16, 16), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        net(x, z, torch.rand(3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        net(x, z, torch.tensor([0.2, 1.2]))
    with pytest.raises(ValueError, match=r"z must have shape \[B, d\] = \[2, 4\]"):
        net(x, torch.randn(2, 5), torch.rand(2))
    for cls in (NoPropCT, NoPropFM):
        model = cls(tiny_net((1, 16, 16), emb), emb, input_shape=(1, 16, 16))
        with pytest.raises(ValueError, match=r"expects images of shape \[B, 1, 16, 16\]"):
            model.losses(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"labels y must have shape \[B\] = \[2\]"):
            model.losses(x, torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="inference steps must be an int >= 1"):
            model.predict_proba(x, steps=0)
        with pytest.raises(ValueError, match="runs must be >= 1"):
            model.predict_proba(x, runs=0)
        with pytest.raises(ValueError, match=r"z0 must have shape"):
            model.chain(x, steps=2, z0=torch.zeros(2, 3))
        bad = cls(WrongShape(), emb)
        with pytest.raises(ValueError, match=r"network \(WrongShape\) must return logits of shape \[B, m\] = \[2, 4\]"):
            bad.losses(x, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="must be an nn.Module with parameters"):
            cls(lambda x, z, t: z, emb)


# --- training, config, CLI -----------------------------------------------------------------------

def test_per_method_defaults():
    assert (TrainConfig().epochs, TrainConfig().eta) == (METHOD_DEFAULTS["dt"]["epochs"], 0.1)
    ct = TrainConfig(method="ct")
    assert ct.eta == 1.0 and ct.epochs == METHOD_DEFAULTS["ct"]["epochs"] and ct.inference_steps == 1000
    assert TrainConfig(method="fm", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="inference_steps must be >= 1"):
        TrainConfig(method="ct", inference_steps=0)


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_short_training_learns_synthetic_data(method):
    split = synthetic(image_shape=(1, 16, 16), num_classes=4, train_size=512, test_size=128, noise=0.5)
    cfg = TrainConfig(method=method, epochs=4, batch_size=32, inference_steps=20, eval_steps=5)
    model, history = fit(cfg, split, progress=False, log=lambda *_: None)
    assert [r["eval_steps"] for r in history] == [5, 5, 5, 20]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.6  # chance is 0.25


def test_cli_trains_and_evaluates_ct_and_fm(tmp_path, capsys):
    tiny = ["--data", "synthetic:1,16,16,3,64", "--epochs", "1", "--batch-size", "32", "--no-progress",
            "--inference-steps", "4", "--eval-steps", "2"]
    for method in ("ct", "fm"):
        ck, metrics = tmp_path / f"{method}.pt", tmp_path / f"{method}.jsonl"
        assert main(["train", *tiny, "--method", method, "--checkpoint", str(ck), "--metrics", str(metrics)]) == 0
        row = json.loads(metrics.read_text().splitlines()[-1])
        assert main(["eval", str(ck)]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["method"] == method and out["test_acc"] == pytest.approx(row["test_acc"])
        assert main(["eval", str(ck), "--inference-steps", "3"]) == 0
        model, cfg, _ = load_model(ck)
        assert isinstance(model, NoPropCT if method == "ct" else NoPropFM) and model.inference_steps == 4
    assert main(["eval", str(tmp_path / "ct.pt"), "--inference-steps", "0"]) == 2
    assert "--inference-steps must be a number >= 1" in capsys.readouterr().err


def test_ct_checkpoint_restores_the_learned_schedule(tmp_path):
    split = synthetic(image_shape=(1, 16, 16), num_classes=3, train_size=64, test_size=32)
    cfg = TrainConfig(method="ct", epochs=1, batch_size=32, inference_steps=3)
    model, _ = fit(cfg, split, tmp_path / "c.pt", progress=False, log=lambda *_: None)
    assert model.schedule.gamma_0.item() != pytest.approx(CTSchedule().gamma_0.item(), abs=1e-7)
    loaded, _, _ = load_model(tmp_path / "c.pt")
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert isinstance(loaded.net, CTBlock)

import math

import pytest
import torch

from noprop.ops import denoise_step
from noprop.schedule import DTSchedule, cosine_alpha_bar


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_alpha_bar_strictly_increasing_and_snr_differences_positive(T):
    s = DTSchedule.cosine(T)
    assert s.alpha_bar.shape == (T + 1,)
    assert bool((s.alpha_bar[1:] > s.alpha_bar[:-1]).all())
    assert bool((s.snr[1:] - s.snr[:-1] > 0).all())
    assert bool((s.block_loss_weights(0.1) > 0).all())
    assert s.alpha_bar[-1].item() == pytest.approx(0.999)  # clipping rule: scaled to ᾱ_max
    assert s.alpha_bar[0].item() < 1e-6  # z_0 is (essentially) pure noise


def test_loss_weights_follow_the_formula():
    s = DTSchedule.cosine(10)
    ab = s.alpha_bar
    snr = ab / (1 - ab)
    expected = 10 / 2 * 0.1 * (snr[1:] - snr[:-1])
    torch.testing.assert_close(s.block_loss_weights(0.1), expected)


def test_inference_coefficients_match_paper_eq3():
    s = DTSchedule.cosine(5)
    ab = s.alpha_bar
    a, b, c = s.inference_coefficients()
    t = 3  # step t uses ᾱ_t, ᾱ_{t-1} and α_{t-1} = ᾱ_{t-1} / ᾱ_t
    alpha = ab[t - 1] / ab[t]
    assert a[t - 1].item() == pytest.approx((ab[t].sqrt() * (1 - alpha) / (1 - ab[t - 1])).item())
    assert b[t - 1].item() == pytest.approx((alpha.sqrt() * (1 - ab[t]) / (1 - ab[t - 1])).item())
    assert c[t - 1].item() == pytest.approx(((1 - ab[t]) * (1 - alpha) / (1 - ab[t - 1])).item())


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="T must be >= 1"):
        cosine_alpha_bar(0)
    with pytest.raises(ValueError, match="max_alpha_bar"):
        cosine_alpha_bar(10, max_alpha_bar=1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        DTSchedule(torch.tensor([0.5, 0.4, 0.9], dtype=torch.float64))


@pytest.mark.parametrize("T", [3, 10])
def test_perfect_denoiser_chain_reproduces_marginals(T):
    """With û = u_y the Eq. 3 chain must give z_t ~ N(√ᾱ_t·u_y, (1 − ᾱ_t)·I) at every t (catches
    schedule direction, √ᾱ vs ᾱ, and off-by-one indexing of a/b/c)."""
    s = DTSchedule.cosine(T)
    a, b, c = s.inference_coefficients()
    m, n = 4, 40_000
    W = torch.randn(m, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % m
    perfect_logits = 1e4 * torch.nn.functional.one_hot(y, m).double()  # softmax = one-hot -> û = u_y
    z = torch.randn(n, 3, dtype=torch.float64)
    for t in range(1, T + 1):
        z = denoise_step(perfect_logits, W, z, a[t - 1].item(), b[t - 1].item(), math.sqrt(c[t - 1].item()))
        ab = s.alpha_bar[t].item()
        resid = z - math.sqrt(ab) * W[y]  # should be N(0, 1 − ᾱ_t) in every dim
        var = 1 - ab
        se_mean = math.sqrt(var / n)
        se_var = var * math.sqrt(2 / (n - 1))
        assert resid.mean(0).abs().max().item() < 5 * se_mean, f"mean off at t={t}"
        assert (resid.var(0) - var).abs().max().item() < 5 * se_var, f"variance off at t={t}"


def test_kl_prior_closed_form():
    s = DTSchedule(torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64))
    u = torch.randn(5, 4)
    ab0, d = 0.3, 4
    # KL(N(√ᾱ u, (1-ᾱ) I) || N(0, I)) per sample, averaged over the batch
    expected = 0.5 * (ab0 * u.pow(2).sum(1) + d * (1 - ab0) - d - d * math.log(1 - ab0)).mean()
    assert s.kl_prior(u).item() == pytest.approx(expected.item(), rel=1e-5)

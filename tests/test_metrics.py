"""metrics: the Fréchet distance against closed forms, near copies on constructed data."""
import pytest
import torch

from fastunlearn.metrics import NEAR_COPY_MSE, frechet_distance, frechet_from_stats, near_copy_rate, nearest_mse


# ------------------------------------------------------------------------------------------ Fréchet distance
def _random_spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_diagonal_gaussians_closed_form():
    # Commuting (diagonal) covariances: FD = ‖μ1 − μ2‖² + Σ_i (σ1_i − σ2_i)².
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).pow(2).sum() + (var1.sqrt() - var2.sqrt()).pow(2).sum())
    got = frechet_from_stats(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_against_identity_closed_form():
    # Σ1 = I: tr (Σ1 Σ2)^{1/2} = tr Σ2^{1/2} = Σ sqrt(eigenvalues of Σ2), independent of the rotation of Σ2.
    gen = torch.Generator().manual_seed(1)
    s2 = _random_spd(5, gen)
    mu = torch.randn(5, generator=gen, dtype=torch.float64)
    expected = float(mu.pow(2).sum() + 5 + s2.trace() - 2 * torch.linalg.eigvalsh(s2).sqrt().sum())
    assert frechet_from_stats(torch.zeros(5), torch.eye(5, dtype=torch.float64), mu, s2) == pytest.approx(
        expected, rel=1e-9)


def test_frechet_is_symmetric_and_zero_on_itself():
    gen = torch.Generator().manual_seed(2)
    s1, s2 = _random_spd(4, gen), _random_spd(4, gen)
    m1, m2 = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    assert frechet_from_stats(m1, s1, m2, s2) == pytest.approx(frechet_from_stats(m2, s2, m1, s1), rel=1e-9)
    assert frechet_from_stats(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    # Non-commuting: the trace term differs from the (wrong) elementwise sqrt of the product's diagonal.
    assert frechet_from_stats(m1, s1, m2, s2) > 0


def test_frechet_of_samples_converges_to_the_gaussians_distance():
    gen = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    l1 = torch.tensor([[1.0, 0.0], [0.5, 0.8]])  # Σ = L Lᵀ, not diagonal
    l2 = torch.tensor([[2.0, 0.0], [-0.3, 0.5]])
    n = 200_000
    x = mu1 + torch.randn(n, 2, generator=gen) @ l1.T
    y = mu2 + torch.randn(n, 2, generator=gen) @ l2.T
    exact = frechet_from_stats(mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.randn(5, 3))


# ------------------------------------------------------------------------------------------ near copies
def test_near_copy_rate_on_constructed_data():
    gen = torch.Generator().manual_seed(0)
    forgotten = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    exact = forgotten[[0, 2]]                                       # copies: distance 0
    close = forgotten[[1]] + 0.2                                    # MSE 0.04 < 0.1: a near copy
    far = -forgotten[[0]]                                           # MSE = mean (2a)² ≈ 4/3 for uniform a
    border = forgotten[[2]] + (NEAR_COPY_MSE * 1.2) ** 0.5          # MSE 0.12: just outside
    samples = torch.cat([exact, close, far, border])
    d = nearest_mse(samples, forgotten)
    assert d[0] == 0 and d[1] == 0 and d[2] == pytest.approx(0.04, rel=1e-4) and d[4] == pytest.approx(0.12, rel=1e-4)
    assert d[3] > 0.5
    assert near_copy_rate(samples, forgotten) == pytest.approx(3 / 5)
    assert near_copy_rate(samples, forgotten, threshold=0.2) == pytest.approx(4 / 5)

"""Plain PyTorch reference of every loss in fastunlearn.

This module is the oracle: the Triton kernels (``fastunlearn.kernels``) are tested against these
functions, the benchmarks import them, and on CPU the methods run them (see ``fastunlearn.ops``).
Each function names the spec section (``shared/spec/methods.md``) it implements.

Reductions follow the spec's convention, which the hyperparameters depend on:
SUM over the per-sample dimensions D and mean over the batch for SISS and its baselines (§1, §2),
MEAN over B·D for EraseDiff and ESD (§4, §6).
"""
from __future__ import annotations

import math

import torch

# Exponents are clamped here before exp(): fp32 overflows at 88.7 (§2.7).
_EXP_CLAMP = 80.0


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [B] broadcast against [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def sum_dims(x: torch.Tensor) -> torch.Tensor:
    """Sum over every non-batch dimension, accumulated in fp32."""
    return x.float().flatten(1).sum(1)


# --------------------------------------------------------------------------------------------- SISS
def siss_delta(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor, gamma: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    """Δ = d_x − d_a = log q(m|a) − log q(m|x) without catastrophic cancellation (§2.7):

        Δ = (γ / (2σ²)) · Σ_d (x_d − a_d)(γ (x_d + a_d) − 2 m_d)

    d_x and d_a are each ~D/2; their difference is computed as one fp32 reduction."""
    x, a, m = x.float(), a.float(), m.float()
    g = _bview(gamma.float(), x)
    s = sum_dims((x - a) * (g * (x + a) - 2.0 * m))
    return gamma.float() * s / (2.0 * sigma.float() ** 2)


def siss_weights(delta: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights in the overflow-free sigmoid form (§2.7), with z = Δ + log λ − log(1−λ):

        w_x = sigmoid(−z)/(1−λ),   w_a = sigmoid(z)/λ,   (1−λ) w_x + λ w_a = 1.

    λ = 0 gives w_x ≡ 1, w_a = e^Δ; λ = 1 gives w_x = e^{−Δ}, w_a ≡ 1 (exponents clamped to ±80)."""
    delta = delta.float()
    if lambd <= 0.0:
        return torch.ones_like(delta), torch.exp(delta.clamp(-_EXP_CLAMP, _EXP_CLAMP))
    if lambd >= 1.0:
        return torch.exp((-delta).clamp(-_EXP_CLAMP, _EXP_CLAMP)), torch.ones_like(delta)
    z = delta + (math.log(lambd) - math.log1p(-lambd))
    return torch.sigmoid(-z) / (1.0 - lambd), torch.sigmoid(z) / lambd


def siss_mixture(x: torch.Tensor, a: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                 gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """m = γ·(mask ? x : a) + σ ε: the keep component where ``mask`` is True (§2.2). Computed in fp32 and
    rounded once to the input dtype (the network's input)."""
    clean = torch.where(_bview(mask, x), x, a).float()
    m = _bview(gamma.float(), x) * clean + _bview(sigma.float(), x) * noise.float()
    return m.to(x.dtype)


def siss_loss(pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor, noise: torch.Tensor,
              mask: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, lambd: float):
    """The two importance-weighted SISS losses from one forward on the mixture batch (§2.2):

        ε_x = (m − γx)/σ,  ε_a = (m − γa)/σ
        ℓ_x = (1/B) Σ_b w_x[b] Σ_d (ε̂ − ε_x)²,   ℓ_a = (1/B) Σ_b w_a[b] Σ_d (ε̂ − ε_a)²

    The weights are computed without gradient. Returns ``(loss_x, loss_a, w_x, w_a)``.

    This is the oracle, so it is the most accurate path: every quantity is fp32 whatever the input dtype
    (γ, σ and the mixture are never rounded to bf16/fp16), and m is substituted so that nothing of size
    O(γ/σ) is subtracted (§2.7): with d = x − a,

        ε_x = ε + [¬mask](γ/σ)(a − x),   ε_a = ε + [mask](γ/σ)(x − a),
        Δ = (γ/(2σ²)) Σ_d d (∓γ d − 2σε)     (− when the row was drawn from x, + from a).

    ``siss_loss_float64_direct`` is the independent float64 check of these identities."""
    B = pred.shape[0]
    with torch.no_grad():
        x32, a32, e32 = x.float(), a.float(), noise.float()
        g, s = _bview(gamma.float(), x32), _bview(sigma.float(), x32)
        from_x = _bview(mask, x32)
        d = x32 - a32
        delta = gamma.float() * sum_dims(d * (torch.where(from_x, -g, g) * d - 2.0 * s * e32)) / (
            2.0 * sigma.float() ** 2)
        w_x, w_a = siss_weights(delta, lambd)
        r = g / s
        eps_x = e32 - torch.where(from_x, torch.zeros_like(r), r) * d
        eps_a = e32 + torch.where(from_x, r, torch.zeros_like(r)) * d
    p = pred.float()
    loss_x = (w_x * sum_dims((p - eps_x) ** 2)).sum() / B
    loss_a = (w_a * sum_dims((p - eps_a) ** 2)).sum() / B
    return loss_x, loss_a, w_x, w_a


def siss_loss_float64_direct(pred, x, a, noise, mask, gamma, sigma, lambd):
    """The official formula (§2.2: raw exp of the two distances) in float64, for tests on small D."""
    pred, x, a, noise = (t.double() for t in (pred, x, a, noise))
    gamma, sigma = gamma.double(), sigma.double()
    g, s = _bview(gamma, x), _bview(sigma, x)
    m = torch.where(_bview(mask, x), g * x + s * noise, g * a + s * noise)
    d_x = ((m - g * x) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
    d_a = ((m - g * a) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
    w_x = 1.0 / ((1 - lambd) + lambd * torch.exp(d_x - d_a))
    w_a = 1.0 / ((1 - lambd) * torch.exp(d_a - d_x) + lambd)
    eps_x, eps_a = (m - g * x) / s, (m - g * a) / s
    B = pred.shape[0]
    loss_x = (w_x * ((pred - eps_x) ** 2).flatten(1).sum(1)).sum() / B
    loss_a = (w_a * ((pred - eps_a) ** 2).flatten(1).sum(1)).sum() / B
    return loss_x, loss_a, w_x, w_a


# -------------------------------------------------------------------------------- gradient surgery
def pair_stats(g1, g2) -> tuple[float, float, float]:
    """(‖g_1‖², ‖g_2‖², ⟨g_1, g_2⟩) over two lists of tensors (§2.8 parameter side, §4.8): per-tensor fp32
    dot products summed in fp64, read back with one device→host sync."""
    n1 = n2 = dot = torch.zeros((), dtype=torch.float64, device=g1[0].device if g1 else "cpu")
    for u, v in zip(g1, g2):
        u32, v32 = u.float().flatten(), v.float().flatten()
        n1 = n1 + torch.dot(u32, u32).double()
        n2 = n2 + torch.dot(v32, v32).double()
        dot = dot + torch.dot(u32, v32).double()
    out = torch.stack([n1, n2, dot]).tolist()
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------ plain DSM
def dsm_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/B) Σ_b w_b Σ_d (ε̂ − ε)²: the SUM-convention denoising loss of naive deletion, NegGrad and
    SISS (No IS) (§3), with optional per-row weights."""
    per = sum_dims((pred.float() - target.float()) ** 2)
    if weights is not None:
        per = per * weights.float()
    return per.sum() / pred.shape[0]


def mse_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MEAN-convention loss of EraseDiff and ESD (§4, §6): Σ_b w_b mean_d (ε̂ − target)² / B."""
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per = per * weights.float()
    return per.sum() / pred.shape[0]


# ---------------------------------------------------------------------------------------------- ESD
def esd_target(eps_from: torch.Tensor, eps_c: torch.Tensor, eps_null: torch.Tensor, eta: float) -> torch.Tensor:
    """The ESD regression target (§6.1), detached: ε_from − η (ε_c − ε_null), computed in fp32."""
    with torch.no_grad():
        return eps_from.float() - eta * (eps_c.float() - eps_null.float())


def esd_loss(pred: torch.Tensor, eps_from: torch.Tensor, eps_c: torch.Tensor, eps_null: torch.Tensor,
             eta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """ESD (§6.1): MEAN-convention MSE of ε̂ against the detached negative-guidance target,
    Σ_b w_b mean_d (ε̂ − (ε_from − η(ε_c − ε_null)))² / B. EraseDiff's forget term is the same reduction
    with a plain target (``mse_loss``)."""
    return mse_loss(pred, esd_target(eps_from, eps_c, eps_null, eta), weights)


# ------------------------------------------------------------------------------------- SFD (SiD)
_OMEGA_MIN = 1e-5


def sid_generator_loss(eps_phi: torch.Tensor, eps_psi: torch.Tensor, e: torch.Tensor, s_t: torch.Tensor,
                       alpha: float, coef: float = 1.0) -> torch.Tensor:
    """SiD/SFD generator loss in ε space (§5.6), u = ε_ψ − ε_φ, r = e − ε_φ, s_t = σ_t/γ_t:

        ω_b = sg(s_t · mean_d |r|).clamp_min(1e-5)
        ℓ_b = s_t² Σ_d u (r − α u) / ω_b          (= s_t Σ u(r − αu)/mean|r| when ω is not clamped)
        loss = coef · Σ_{finite b} ℓ_b / B

    Rows whose ℓ_b or ω_b is not finite are dropped (they add 0 and receive a zero gradient) but B stays the
    full batch size, as the official NaN masks (§5.9). Accumulated in fp32 (float64 inputs stay float64, so
    this also serves as the float64 oracle of the kernel tests). Cotangents (ω constant):
    ∂/∂ε_ψ = C(r − 2αu), ∂/∂ε_φ = C(−r + (2α−1)u), C = coef·s_t²/(B ω_b)."""
    B = eps_phi.shape[0]
    acc = torch.float64 if eps_phi.dtype == torch.float64 else torch.float32
    phi, psi, e32 = eps_phi.to(acc), eps_psi.to(acc), e.to(acc)
    s = s_t.detach().to(acc).reshape(-1)
    with torch.no_grad():
        r0, u0 = e32 - phi, psi - phi
        omega = (s * r0.abs().flatten(1).mean(1)).clamp_min(_OMEGA_MIN)
        finite = torch.isfinite(omega) & torch.isfinite((u0 * (r0 - alpha * u0)).flatten(1).sum(1))
    keep = _bview(finite, phi)
    # where() (not multiplication by a mask) so that a NaN row's cotangent is exactly zero
    phi, psi, e32 = (torch.where(keep, t, torch.zeros_like(t)) for t in (phi, psi, e32))
    omega = torch.where(finite, omega, torch.ones_like(omega))
    r, u = e32 - phi, psi - phi
    per = s * s * (u * (r - alpha * u)).flatten(1).sum(1) / omega
    return coef * per.sum() / B

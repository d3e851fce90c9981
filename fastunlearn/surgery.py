"""Gradient surgery in parameter space (spec §2.8, §4.8, §8).

One pass over the parameters yields ‖g_1‖², ‖g_2‖² and ⟨g_1, g_2⟩; every coefficient that SISS's
norm fixing, EraseDiff's adaptive λ and the global clip need follows in closed form, and one more
pass writes ``p.grad = c_1 g_1 + c_2 g_2``. No parameter-sized clone is made.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import ops


def dense_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd's gradients with None (a parameter the loss does not reach) replaced by zeros, so that the
    passes below see one tensor per parameter."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def pair_stats(g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(‖g_1‖², ‖g_2‖², ⟨g_1, g_2⟩) over all tensors, accumulated in fp32 (fp64 for the final sum)."""
    return ops.pair_stats(list(g1), list(g2))


def write_combination(params: Sequence[torch.Tensor], g1: Sequence[torch.Tensor], c1: float,
                      g2: Sequence[torch.Tensor] | None = None, c2: float = 0.0) -> None:
    """p.grad ← c_1 g_1 + c_2 g_2, reusing g_1's storage (the gradients are ours, not autograd's)."""
    g1 = list(g1)
    if c1 != 1.0:
        torch._foreach_mul_(g1, c1)
    if g2 is not None and c2 != 0.0:
        torch._foreach_add_(g1, list(g2), alpha=c2)
    for p, g in zip(params, g1):
        p.grad = g.to(p.dtype) if g.dtype != p.dtype else g


def clip_factor(norm_sq: float, max_norm: float | None) -> float:
    """min(1, max_norm/‖g‖) as in ``clip_grad_norm_`` (1e-6 guard), 1 when clipping is off."""
    if max_norm is None:
        return 1.0
    norm = math.sqrt(max(norm_sq, 0.0))
    return min(1.0, max_norm / (norm + 1e-6))


def negation_scale(norm_a: float, scaling_norm: float, eps_norm: float = 1e-12) -> float:
    """SISS's c = S/max(‖g_a‖, ε) (§2.2, §2.7 guard); 0 when ‖g_a‖ is 0 (there is no forget direction to
    scale, and the reported loss ℓ_x − c·ℓ_a stays ℓ_x) or not finite."""
    if not (math.isfinite(norm_a) and norm_a > 0.0):
        return 0.0
    c = scaling_norm / max(norm_a, eps_norm)
    return c if math.isfinite(c) else 0.0


def norm_fixed_negation(g_x, g_a, params, scaling_norm: float, max_grad_norm: float | None,
                        eps_norm: float = 1e-12) -> dict:
    """SISS's update direction (§2.2, §2.7): g = g_x − c·g_a with c = ``negation_scale(‖g_a‖)``, then the
    global clip, written into ``p.grad`` in one pass."""
    nx2, na2, dot = pair_stats(g_x, g_a)
    na = math.sqrt(max(na2, 0.0))
    c = negation_scale(na, scaling_norm, eps_norm)
    norm_sq = nx2 - 2.0 * c * dot + c * c * na2
    clip = clip_factor(norm_sq, max_grad_norm)
    write_combination(params, g_x, clip, g_a, -c * clip)
    return {"grad_norm_x": math.sqrt(max(nx2, 0.0)), "grad_norm_a": na, "neggrad_scale": c,
            "grad_norm": math.sqrt(max(norm_sq, 0.0)), "clip": clip}


def clip_single(g, params, max_grad_norm: float | None, scale: float = 1.0) -> dict:
    """p.grad = clip · scale · g with the global-norm clip computed from one fp32 reduction."""
    n2 = ops.sq_norm(list(g)) * scale * scale
    clip = clip_factor(n2, max_grad_norm)
    write_combination(params, g, scale * clip)
    return {"grad_norm": math.sqrt(max(n2, 0.0)), "clip": clip}

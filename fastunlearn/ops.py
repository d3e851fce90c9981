"""Loss dispatch: one function per fused operation; methods call these and never know which path ran.

``FASTUNLEARN_KERNELS=triton|torch|auto`` (default ``auto``: Triton on CUDA tensors, the PyTorch
reference in ``fastunlearn.losses`` elsewhere). With ``TRITON_INTERPRET=1`` the Triton path also runs on
CPU tensors (the kernel tests use this).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import losses
from .errors import bad_value

_CHOICES = ("triton", "torch", "auto")


def backend() -> str:
    choice = os.environ.get("FASTUNLEARN_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise bad_value("FASTUNLEARN_KERNELS", " | ".join(_CHOICES), choice)
    return choice


def use_triton(t: torch.Tensor) -> bool:
    choice = backend()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return t.is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - platform without triton
        return False


def siss_loss(pred, x, a, noise, mask, gamma, sigma, lambd):
    """(loss_x, loss_a, w_x, w_a) of §2.2; see ``losses.siss_loss``."""
    if use_triton(pred):
        from .kernels import siss as k
        return k.siss_loss(pred, x, a, noise, mask, gamma, sigma, lambd)
    return losses.siss_loss(pred, x, a, noise, mask, gamma, sigma, lambd)


def pair_stats(g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(‖g_1‖², ‖g_2‖², ⟨g_1, g_2⟩) over lists of tensors."""
    if g1 and use_triton(g1[0]):
        from .kernels import surgery as k
        return k.pair_stats(g1, g2)
    n1 = n2 = dot = torch.zeros((), dtype=torch.float64, device=g1[0].device if g1 else "cpu")
    for u, v in zip(g1, g2):
        u32, v32 = u.float().flatten(), v.float().flatten()
        n1 = n1 + torch.dot(u32, u32).double()
        n2 = n2 + torch.dot(v32, v32).double()
        dot = dot + torch.dot(u32, v32).double()
    out = torch.stack([n1, n2, dot]).tolist()  # one device→host sync
    return out[0], out[1], out[2]


def sq_norm(g: Sequence[torch.Tensor]) -> float:
    if not g:
        return 0.0
    norms = torch._foreach_norm([t.float() for t in g])
    return float(torch.stack(norms).double().pow(2).sum())

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
        if not _triton_available():
            raise RuntimeError("FASTUNLEARN_KERNELS=triton but triton is not installed; "
                               "use FASTUNLEARN_KERNELS=torch or auto")
        if not t.is_cuda and not _interpreting():
            raise RuntimeError(f"FASTUNLEARN_KERNELS=triton needs CUDA tensors (got a {t.device.type} "
                               "tensor); on CPU set TRITON_INTERPRET=1 (slow, for tests) or use "
                               "FASTUNLEARN_KERNELS=torch or auto")
        return True
    return t.is_cuda and _triton_available()


def _interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels with numpy on CPU tensors (how the kernel tests run)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


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
    return losses.pair_stats(g1, g2)


def sq_norm(g: Sequence[torch.Tensor]) -> float:
    if not g:
        return 0.0
    norms = torch._foreach_norm([t.float() for t in g])
    return float(torch.stack(norms).double().pow(2).sum())


def sid_generator_loss(eps_phi, eps_psi, e, s_t, alpha: float, coef: float = 1.0) -> torch.Tensor:
    """SiD/SFD generator loss in ε space (§5.6); see ``losses.sid_generator_loss``."""
    if use_triton(eps_phi):
        from .kernels import sfd as k
        return k.sid_generator_loss(eps_phi, eps_psi, e, s_t, alpha, coef)
    return losses.sid_generator_loss(eps_phi, eps_psi, e, s_t, alpha, coef)


def esd_loss(pred, eps_from, eps_c, eps_null, eta: float, weights=None) -> torch.Tensor:
    """ESD (§6.1): MEAN-convention MSE against ε_from − η(ε_c − ε_null); see ``losses.esd_loss``."""
    if use_triton(pred):
        from .kernels import mse as k
        return k.esd_loss(pred, eps_from, eps_c, eps_null, eta, weights)
    return losses.esd_loss(pred, eps_from, eps_c, eps_null, eta, weights)


def mse_loss(pred, target, weights=None) -> torch.Tensor:
    """MEAN-convention MSE of EraseDiff and ESD (§4, §6); see ``losses.mse_loss``."""
    if use_triton(pred):
        from .kernels import mse as k
        return k.mse_loss(pred, target, weights)
    return losses.mse_loss(pred, target, weights)

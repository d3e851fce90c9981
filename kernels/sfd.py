"""Fused SiD/SFD generator loss in ε space (methods.md §5.6, §5.9, §5.10).

Reference: ``fastunlearn.losses.sid_generator_loss`` (same signature). Per sample b, with u = ε_ψ − ε_φ,
r = e − ε_φ and s = s_t[b] = σ_t/γ_t:

    pass 1 (over D):  A_b = Σ |r|,   S_b = Σ u (r − α u)
    ω_b = sg(s · A_b / D).clamp_min(1e-5)          ℓ_b = s² S_b / ω_b
    loss = coef · Σ_{finite b} ℓ_b / B             C_b = coef · s² / (B ω_b)   (0 for a dropped row)
    ∂/∂ε_ψ = ḡ C_b (r − 2αu),   ∂/∂ε_φ = ḡ C_b (−r + (2α−1) u),   ∂/∂e = ḡ C_b u

A row whose A_b or S_b is not finite (a NaN or inf anywhere in it makes its fp32 sum non-finite) is dropped:
it adds 0 to the loss and gets an exactly zero cotangent, while B stays the full batch size, as the official
NaN masks do (§5.9). Pass 1 (grid B x SPLIT) writes partial sums, a one-program finalize computes ω, C and
the loss, the backward (grid B x SPLIT) writes the cotangents the caller needs (ε_ψ, ε_φ, and e if it
requires grad); s_t is treated as a constant, as in the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import load_f32

_OMEGA_MIN = 1e-5  # as losses._OMEGA_MIN
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX: false for NaN and ±inf


@triton.jit
def _sid_partials(phi_ptr, psi_ptr, e_ptr, part_ptr, alpha, D, SPLIT, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        phi = load_f32(phi_ptr, base + offs, ok)
        psi = load_f32(psi_ptr, base + offs, ok)
        e = load_f32(e_ptr, base + offs, ok)
        r = e - phi
        u = psi - phi
        acc_r += tl.abs(r)
        acc_s += u * (r - alpha * u)
    out = part_ptr + (b.to(tl.int64) * SPLIT + j) * 2
    tl.store(out, tl.sum(acc_r, 0))
    tl.store(out + 1, tl.sum(acc_s, 0))


@triton.jit
def _sid_finalize(part_ptr, s_ptr, c_ptr, loss_ptr, B, SPLIT, inv_D, coef_inv_B, omega_min,
                  BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    cols = tl.arange(0, BLOCK_S)
    tot = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rok = rows < B
        ok = rok[:, None] & (cols[None, :] < SPLIT)
        idx = (rows.to(tl.int64)[:, None] * SPLIT + cols[None, :]) * 2
        a_sum = tl.sum(tl.load(part_ptr + idx, mask=ok, other=0.0), 1)
        s_sum = tl.sum(tl.load(part_ptr + idx + 1, mask=ok, other=0.0), 1)
        s = tl.load(s_ptr + rows, mask=rok, other=0.0)
        w = s * a_sum * inv_D
        # finiteness is tested before the clamp (max(NaN, 1e-5) may return 1e-5 on GPU), by comparison alone:
        # `w - w == 0` is false for ordinary w on a GPU, where the compiler contracts s·A·(1/D) − w into an fma
        # that returns the product's rounding error (every row was dropped; the interpreter did not show it)
        keep = rok & (tl.abs(w) <= _FLT_MAX) & (tl.abs(s_sum) <= _FLT_MAX)
        omega = tl.maximum(tl.where(keep, w, 1.0), omega_min)
        s2 = s * s
        tot += tl.where(keep, s2 * s_sum / omega, 0.0)
        tl.store(c_ptr + rows, tl.where(keep, s2 * coef_inv_B / omega, 0.0), mask=rok)
    tl.store(loss_ptr, tl.sum(tot, 0) * coef_inv_B)


@triton.jit
def _sid_backward(phi_ptr, psi_ptr, e_ptr, c_ptr, gout_ptr, dphi_ptr, dpsi_ptr, de_ptr, alpha, D, SPLIT,
                  NEED_PHI: tl.constexpr, NEED_PSI: tl.constexpr, NEED_E: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    k = tl.load(c_ptr + b) * tl.load(gout_ptr)
    live = k != 0.0  # dropped rows: exactly zero, never 0·NaN
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        phi = load_f32(phi_ptr, base + offs, ok)
        psi = load_f32(psi_ptr, base + offs, ok)
        e = load_f32(e_ptr, base + offs, ok)
        r = e - phi
        u = psi - phi
        if NEED_PSI:
            g = tl.where(live, k * (r - 2.0 * alpha * u), 0.0)
            tl.store(dpsi_ptr + base + offs, g.to(dpsi_ptr.dtype.element_ty), mask=ok)
        if NEED_PHI:
            g = tl.where(live, k * ((2.0 * alpha - 1.0) * u - r), 0.0)
            tl.store(dphi_ptr + base + offs, g.to(dphi_ptr.dtype.element_ty), mask=ok)
        if NEED_E:
            g = tl.where(live, k * u, 0.0)
            tl.store(de_ptr + base + offs, g.to(de_ptr.dtype.element_ty), mask=ok)


class _SiDGeneratorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eps_phi, eps_psi, e, s_t, alpha, coef):
        B, shape, dev = eps_phi.shape[0], eps_phi.shape, eps_phi.device
        phi, psi, e2 = (C.rows(t, B) for t in (eps_phi, eps_psi, e))
        D = phi.shape[1]
        s32 = C.per_row(s_t, B, dev)
        block = C.block_size(D, dev)
        nsplit = C.split(B, D, block, dev)
        part = C.empty((B, nsplit, 2), torch.float32, dev)
        _sid_partials[(B, nsplit)](phi, psi, e2, part, float(alpha), D, nsplit, BLOCK=block)
        C.count("sid_partials")
        c_row = C.empty(B, torch.float32, dev)
        loss = C.empty(1, torch.float32, dev)
        block_b, block_s = C.finalize_blocks(B, nsplit)
        _sid_finalize[(1,)](part, s32, c_row, loss, B, nsplit, 1.0 / D, float(coef) / B, _OMEGA_MIN,
                            BLOCK_B=block_b, BLOCK_S=block_s)
        C.count("sid_finalize")
        ctx.save_for_backward(phi, psi, e2, c_row)
        ctx.shape, ctx.alpha, ctx.block, ctx.nsplit = shape, float(alpha), block, nsplit
        return loss[0]

    @staticmethod
    def backward(ctx, g_loss):
        need_phi, need_psi, need_e = ctx.needs_input_grad[:3]
        if not (need_phi or need_psi or need_e):
            return (None,) * 6
        phi, psi, e2, c_row = ctx.saved_tensors
        B, D = phi.shape
        g = g_loss.detach().to(torch.float32).reshape(())
        dphi = C.empty_like(phi) if need_phi else None
        dpsi = C.empty_like(psi) if need_psi else None
        de = C.empty_like(e2) if need_e else None
        dummy = c_row  # never written: the NEED_* flags compile the unused stores away
        _sid_backward[(B, ctx.nsplit)](phi, psi, e2, c_row, g, dphi if need_phi else dummy,
                                       dpsi if need_psi else dummy, de if need_e else dummy, ctx.alpha, D,
                                       ctx.nsplit, NEED_PHI=need_phi, NEED_PSI=need_psi, NEED_E=need_e,
                                       BLOCK=ctx.block)
        C.count("sid_backward")
        shape = ctx.shape
        return (dphi.reshape(shape) if need_phi else None, dpsi.reshape(shape) if need_psi else None,
                de.reshape(shape) if need_e else None, None, None, None)


def sid_generator_loss(eps_phi: torch.Tensor, eps_psi: torch.Tensor, e: torch.Tensor, s_t, alpha: float,
                       coef: float = 1.0) -> torch.Tensor:
    """Fused ``losses.sid_generator_loss``: an fp32 scalar; gradients flow to ε_φ, ε_ψ and e."""
    C.check_launchable(eps_phi)
    for name, t in (("eps_phi", eps_phi), ("eps_psi", eps_psi), ("e", e)):
        C.check_float(name, t)
        if t.shape != eps_phi.shape:
            raise ValueError(f"sid_generator_loss: {name} has shape {tuple(t.shape)}, "
                             f"eps_phi {tuple(eps_phi.shape)}")
    if eps_phi.ndim < 1 or eps_phi.shape[0] == 0 or eps_phi[0].numel() == 0:
        raise ValueError(f"sid_generator_loss needs a non-empty batch, got shape {tuple(eps_phi.shape)}")
    return _SiDGeneratorLoss.apply(eps_phi, eps_psi, e, s_t, alpha, coef)

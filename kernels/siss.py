"""Fused SISS loss (methods.md §2.2, §2.7, §2.8): two importance-weighted denoising losses from one forward.

Reference: ``fastunlearn.losses.siss_loss`` (same signature, same outputs). Per sample b, over its D elements,
with m = γ·(mask ? x : a) + σε the mixture the network saw:

    S_Δ = Σ (x−a)(γ(x+a) − 2m)      S_x = Σ (ε̂ − ε_x)²      S_a = Σ (ε̂ − ε_a)²
    Δ = γ S_Δ / (2σ²);  w_x, w_a in the sigmoid form of §2.7 (λ ∈ {0, 1}: one weight ≡ 1, exponent clamped ±80)
    ℓ_x = Σ_b w_x S_x / B,   ℓ_a = Σ_b w_a S_a / B
    dℓ/dε̂ = (2/B)(w_x ḡ_x (ε̂ − ε_x) + w_a ḡ_a (ε̂ − ε_a))      (ḡ: the incoming grads of ℓ_x and ℓ_a)

m is never materialised: substituting it gives the cancellation-free forms the kernel evaluates,

    ε_x = ε + [¬mask] (γ/σ)(a − x),   ε_a = ε + [mask] (γ/σ)(x − a),
    S_Δ = Σ d (∓γ d − 2σε),  d = x − a  (−γ when the sample came from x, +γ from a),

so no O(γ/σ) quantities are subtracted (the reference computes (m − γx)/σ in fp32). All sums are fp32.
Launches: pass 1 (grid B x SPLIT) writes per-row partial sums, a one-program finalize computes Δ, the weights
and both losses, and the backward (grid B x SPLIT) recomputes ε_x, ε_a and writes the cotangent. The two
losses share one ``autograd.Function``: ``autograd.grad(ℓ_x)`` and ``autograd.grad(ℓ_a)`` each run the same
backward with the other incoming grad zero, and ``backward(ℓ_x − c ℓ_a)`` combines them linearly in one launch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import load_f32

_MODE_SIGMOID, _MODE_LAMBDA0, _MODE_LAMBDA1 = 0, 1, 2


@triton.jit
def _siss_partials(pred_ptr, x_ptr, a_ptr, noise_ptr, mask_ptr, gamma_ptr, sigma_ptr, part_ptr,
                   D, SPLIT, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    g = tl.load(gamma_ptr + b)
    s = tl.load(sigma_ptr + b)
    from_x = tl.load(mask_ptr + b) != 0
    r = g / s
    c_x = tl.where(from_x, 0.0, r)     # ε_x = ε + c_x (a − x)
    c_a = tl.where(from_x, r, 0.0)     # ε_a = ε + c_a (x − a)
    sg = tl.where(from_x, -g, g)       # S_Δ = Σ d (sg·d − 2σε)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        p = load_f32(pred_ptr, base + offs, ok)
        x = load_f32(x_ptr, base + offs, ok)
        a = load_f32(a_ptr, base + offs, ok)
        e = load_f32(noise_ptr, base + offs, ok)
        d = x - a
        acc_d += d * (sg * d - 2.0 * s * e)
        rx = p - (e - c_x * d)
        ra = p - (e + c_a * d)
        acc_x += rx * rx
        acc_a += ra * ra
    out = part_ptr + (b.to(tl.int64) * SPLIT + j) * 3
    tl.store(out, tl.sum(acc_d, 0))
    tl.store(out + 1, tl.sum(acc_x, 0))
    tl.store(out + 2, tl.sum(acc_a, 0))


@triton.jit
def _siss_finalize(part_ptr, gamma_ptr, sigma_ptr, wx_ptr, wa_ptr, loss_ptr, B, SPLIT, inv_B, logit,
                   inv_one_minus_l, inv_l, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    cols = tl.arange(0, BLOCK_S)
    tot_x = tl.zeros([BLOCK_B], dtype=tl.float32)
    tot_a = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rok = rows < B
        ok = rok[:, None] & (cols[None, :] < SPLIT)
        idx = (rows.to(tl.int64)[:, None] * SPLIT + cols[None, :]) * 3
        s_d = tl.sum(tl.load(part_ptr + idx, mask=ok, other=0.0), 1)
        s_x = tl.sum(tl.load(part_ptr + idx + 1, mask=ok, other=0.0), 1)
        s_a = tl.sum(tl.load(part_ptr + idx + 2, mask=ok, other=0.0), 1)
        g = tl.load(gamma_ptr + rows, mask=rok, other=1.0)
        s = tl.load(sigma_ptr + rows, mask=rok, other=1.0)
        delta = g * s_d / (2.0 * s * s)
        if MODE == 0:
            # sigmoid(±z) from e^{−|z|}: never overflows, and rounds to exactly 0 or 1 like torch.sigmoid
            z = delta + logit
            q = tl.exp(-tl.abs(z))
            lo = q / (1.0 + q)
            hi = 1.0 / (1.0 + q)
            w_x = tl.where(z >= 0.0, lo, hi) * inv_one_minus_l
            w_a = tl.where(z >= 0.0, hi, lo) * inv_l
        elif MODE == 1:   # λ = 0: w_x ≡ 1, w_a = e^Δ (exponents clamped at ±80 as losses._EXP_CLAMP)
            w_x = tl.full([BLOCK_B], 1.0, tl.float32)
            w_a = tl.exp(tl.minimum(tl.maximum(delta, -80.0), 80.0))
        else:             # λ = 1: w_x = e^−Δ, w_a ≡ 1
            w_x = tl.exp(tl.minimum(tl.maximum(-delta, -80.0), 80.0))
            w_a = tl.full([BLOCK_B], 1.0, tl.float32)
        tl.store(wx_ptr + rows, w_x, mask=rok)
        tl.store(wa_ptr + rows, w_a, mask=rok)
        tot_x += tl.where(rok, w_x * s_x, 0.0)
        tot_a += tl.where(rok, w_a * s_a, 0.0)
    tl.store(loss_ptr, tl.sum(tot_x, 0) * inv_B)
    tl.store(loss_ptr + 1, tl.sum(tot_a, 0) * inv_B)


@triton.jit
def _siss_backward(pred_ptr, x_ptr, a_ptr, noise_ptr, mask_ptr, gamma_ptr, sigma_ptr, wx_ptr, wa_ptr,
                   gx_ptr, ga_ptr, out_ptr, D, SPLIT, two_inv_B, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    g = tl.load(gamma_ptr + b)
    s = tl.load(sigma_ptr + b)
    from_x = tl.load(mask_ptr + b) != 0
    r = g / s
    c_x = tl.where(from_x, 0.0, r)
    c_a = tl.where(from_x, r, 0.0)
    k_x = two_inv_B * tl.load(wx_ptr + b) * tl.load(gx_ptr)
    k_a = two_inv_B * tl.load(wa_ptr + b) * tl.load(ga_ptr)
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        p = load_f32(pred_ptr, base + offs, ok)
        x = load_f32(x_ptr, base + offs, ok)
        a = load_f32(a_ptr, base + offs, ok)
        e = load_f32(noise_ptr, base + offs, ok)
        d = x - a
        grad = k_x * (p - (e - c_x * d)) + k_a * (p - (e + c_a * d))
        tl.store(out_ptr + base + offs, grad.to(out_ptr.dtype.element_ty), mask=ok)


def _lambda_args(lambd: float):
    """(MODE, logit λ, 1/(1−λ), 1/λ) with the λ ∈ {0, 1} limits of ``losses.siss_weights``."""
    lambd = float(lambd)
    if lambd <= 0.0:
        return _MODE_LAMBDA0, 0.0, 1.0, 1.0
    if lambd >= 1.0:
        return _MODE_LAMBDA1, 0.0, 1.0, 1.0
    return _MODE_SIGMOID, math.log(lambd) - math.log1p(-lambd), 1.0 / (1.0 - lambd), 1.0 / lambd


class _SISSLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x, a, noise, mask, gamma, sigma, lambd):
        B, shape, dev = pred.shape[0], pred.shape, pred.device
        p2, x2, a2, n2 = (C.rows(t, B) for t in (pred, x, a, noise))
        D = p2.shape[1]
        m8 = mask.reshape(-1).to(device=dev, dtype=torch.int8).contiguous()
        g32, s32 = C.per_row(gamma, B, dev), C.per_row(sigma, B, dev)
        block = C.block_size(D, dev)
        nsplit = C.split(B, D, block, dev)
        part = C.empty((B, nsplit, 3), torch.float32, dev)
        _siss_partials[(B, nsplit)](p2, x2, a2, n2, m8, g32, s32, part, D, nsplit, BLOCK=block)
        C.count("siss_partials")
        w_x = C.empty(B, torch.float32, dev)
        w_a = C.empty(B, torch.float32, dev)
        loss = C.empty(2, torch.float32, dev)
        mode, logit, inv_1ml, inv_l = _lambda_args(lambd)
        block_b, block_s = C.finalize_blocks(B, nsplit)
        _siss_finalize[(1,)](part, g32, s32, w_x, w_a, loss, B, nsplit, 1.0 / B, logit, inv_1ml, inv_l,
                             MODE=mode, BLOCK_B=block_b, BLOCK_S=block_s)
        C.count("siss_finalize")
        ctx.save_for_backward(p2, x2, a2, n2, m8, g32, s32, w_x, w_a)
        ctx.shape, ctx.block, ctx.nsplit = shape, block, nsplit
        ctx.mark_non_differentiable(w_x, w_a)
        return loss[0], loss[1], w_x, w_a

    @staticmethod
    def backward(ctx, g_lx, g_la, _g_wx, _g_wa):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        p2, x2, a2, n2, m8, g32, s32, w_x, w_a = ctx.saved_tensors
        B, D = p2.shape
        zero = torch.zeros((), dtype=torch.float32, device=p2.device)
        g_lx = zero if g_lx is None else g_lx.detach().to(torch.float32).reshape(())
        g_la = zero if g_la is None else g_la.detach().to(torch.float32).reshape(())
        grad = C.empty_like(p2)
        _siss_backward[(B, ctx.nsplit)](p2, x2, a2, n2, m8, g32, s32, w_x, w_a, g_lx, g_la, grad, D,
                                        ctx.nsplit, 2.0 / B, BLOCK=ctx.block)
        C.count("siss_backward")
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None


def siss_loss(pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
              gamma: torch.Tensor, sigma: torch.Tensor, lambd: float):
    """Fused ``losses.siss_loss``: returns ``(loss_x, loss_a, w_x, w_a)``, fp32; gradients flow to ``pred``
    only (the weights and targets are constants, as in the reference)."""
    C.check_launchable(pred)
    for name, t in (("pred", pred), ("x", x), ("a", a), ("noise", noise)):
        C.check_float(name, t)
        if t.shape != pred.shape:
            raise ValueError(f"siss_loss: {name} has shape {tuple(t.shape)}, pred {tuple(pred.shape)}")
    if pred.ndim < 1 or pred.shape[0] == 0 or pred[0].numel() == 0:
        raise ValueError(f"siss_loss needs a non-empty batch, got pred of shape {tuple(pred.shape)}")
    if mask.numel() != pred.shape[0]:
        raise ValueError(f"siss_loss: mask needs {pred.shape[0]} entries, got {mask.numel()}")
    return _SISSLoss.apply(pred, x, a, noise, mask, gamma, sigma, lambd)

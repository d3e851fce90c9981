"""Fused target arithmetic + MEAN-convention MSE for ESD and EraseDiff (methods.md §4.8, §6.5, §8).

References: ``fastunlearn.losses.esd_loss`` and ``fastunlearn.losses.mse_loss`` (same signatures). Per row b
of D elements, with optional per-row weights w (1 when absent):

    target = ε_from − η (ε_c − ε_null)   (ESD, detached)      or   target   (plain MSE)
    S_b = Σ_d (ε̂ − target)²,   loss = Σ_b w_b S_b / (B D)
    ∂/∂ε̂ = ḡ (2 w_b / (B D)) (ε̂ − target),   ∂/∂target = −∂/∂ε̂ (plain MSE only),   ∂/∂w_b = ḡ S_b / (B D)

The ESD target is computed in registers from the three teacher outputs and never stored. Pass 1 (grid
B x SPLIT) writes partial sums, a one-program finalize sums the rows, the backward (grid B x SPLIT) writes
the cotangents. All arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import load_f32


@triton.jit
def _target(t_ptr, c_ptr, n_ptr, offs, ok, eta, ESD: tl.constexpr):
    t = load_f32(t_ptr, offs, ok)
    if ESD:
        c = load_f32(c_ptr, offs, ok)
        n = load_f32(n_ptr, offs, ok)
        t = t - eta * (c - n)
    return t


@triton.jit
def _mse_partials(pred_ptr, t_ptr, c_ptr, n_ptr, part_ptr, eta, D, SPLIT, ESD: tl.constexpr,
                  BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        p = load_f32(pred_ptr, base + offs, ok)
        r = p - _target(t_ptr + base, c_ptr + base, n_ptr + base, offs, ok, eta, ESD)
        acc += r * r
    tl.store(part_ptr + b.to(tl.int64) * SPLIT + j, tl.sum(acc, 0))


@triton.jit
def _mse_finalize(part_ptr, w_ptr, rows_ptr, loss_ptr, B, SPLIT, inv_BD, HAS_W: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    cols = tl.arange(0, BLOCK_S)
    tot = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rok = rows < B
        ok = rok[:, None] & (cols[None, :] < SPLIT)
        s = tl.sum(tl.load(part_ptr + rows.to(tl.int64)[:, None] * SPLIT + cols[None, :], mask=ok, other=0.0), 1)
        tl.store(rows_ptr + rows, s, mask=rok)
        if HAS_W:
            s = s * tl.load(w_ptr + rows, mask=rok, other=0.0)
        tot += tl.where(rok, s, 0.0)
    tl.store(loss_ptr, tl.sum(tot, 0) * inv_BD)


@triton.jit
def _mse_backward(pred_ptr, t_ptr, c_ptr, n_ptr, w_ptr, gout_ptr, dpred_ptr, dt_ptr, eta, two_inv_BD, D, SPLIT,
                  ESD: tl.constexpr, HAS_W: tl.constexpr, NEED_PRED: tl.constexpr, NEED_T: tl.constexpr,
                  BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    base = b.to(tl.int64) * D
    k = two_inv_BD * tl.load(gout_ptr)
    if HAS_W:
        k = k * tl.load(w_ptr + b)
    for start in range(j * BLOCK, D, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < D
        p = load_f32(pred_ptr, base + offs, ok)
        g = k * (p - _target(t_ptr + base, c_ptr + base, n_ptr + base, offs, ok, eta, ESD))
        if NEED_PRED:
            tl.store(dpred_ptr + base + offs, g.to(dpred_ptr.dtype.element_ty), mask=ok)
        if NEED_T:
            tl.store(dt_ptr + base + offs, (-g).to(dt_ptr.dtype.element_ty), mask=ok)


def _run_forward(ctx, pred, t, c, n, eta, weights, esd):
    B, dev = pred.shape[0], pred.device
    p2, t2 = C.rows(pred, B), C.rows(t, B)
    c2 = C.rows(c, B) if esd else t2
    n2 = C.rows(n, B) if esd else t2
    D = p2.shape[1]
    w32 = C.per_row(weights, B, dev) if weights is not None else None
    block = C.block_size(D, dev)
    nsplit = C.split(B, D, block, dev)
    part = C.empty((B, nsplit), torch.float32, dev)
    _mse_partials[(B, nsplit)](p2, t2, c2, n2, part, float(eta), D, nsplit, ESD=esd, BLOCK=block)
    C.count("mse_partials")
    row_sums = C.empty(B, torch.float32, dev)
    loss = C.empty(1, torch.float32, dev)
    block_b, block_s = C.finalize_blocks(B, nsplit)
    _mse_finalize[(1,)](part, w32 if w32 is not None else row_sums, row_sums, loss, B, nsplit, 1.0 / (B * D),
                        HAS_W=w32 is not None, BLOCK_B=block_b, BLOCK_S=block_s)
    C.count("mse_finalize")
    ctx.save_for_backward(p2, t2, c2, n2, w32 if w32 is not None else row_sums, row_sums)
    ctx.shape, ctx.eta, ctx.esd, ctx.has_w = pred.shape, float(eta), esd, w32 is not None
    ctx.w_shape = weights.shape if weights is not None else None
    ctx.block, ctx.nsplit = block, nsplit
    return loss[0]


def _run_backward(ctx, g_loss, need_pred, need_t, need_w):
    p2, t2, c2, n2, w32, row_sums = ctx.saved_tensors
    B, D = p2.shape
    g = g_loss.detach().to(torch.float32).reshape(())
    dpred = dt = dw = None
    if need_pred or need_t:
        dpred = C.empty_like(p2) if need_pred else None
        dt = C.empty_like(t2) if need_t else None
        _mse_backward[(B, ctx.nsplit)](p2, t2, c2, n2, w32, g, dpred if need_pred else row_sums,
                                       dt if need_t else row_sums, ctx.eta, 2.0 / (B * D), D, ctx.nsplit,
                                       ESD=ctx.esd, HAS_W=ctx.has_w, NEED_PRED=need_pred, NEED_T=need_t,
                                       BLOCK=ctx.block)
        C.count("mse_backward")
    if need_w:
        dw = (g * row_sums / (B * D)).reshape(ctx.w_shape)
    shape = ctx.shape
    return (dpred.reshape(shape) if dpred is not None else None, dt.reshape(shape) if dt is not None else None,
            dw)


class _MSELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, weights):
        return _run_forward(ctx, pred, target, None, None, 0.0, weights, esd=False)

    @staticmethod
    def backward(ctx, g_loss):
        need_pred, need_t, need_w = ctx.needs_input_grad[:3]
        dpred, dt, dw = _run_backward(ctx, g_loss, need_pred, need_t, need_w and ctx.has_w)
        return dpred, dt, dw


class _ESDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, eps_from, eps_c, eps_null, eta, weights):
        return _run_forward(ctx, pred, eps_from, eps_c, eps_null, eta, weights, esd=True)

    @staticmethod
    def backward(ctx, g_loss):
        need_pred, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        dpred, _, dw = _run_backward(ctx, g_loss, need_pred, False, need_w and ctx.has_w)
        return dpred, None, None, None, None, dw  # the ESD target is detached (§6.1)


def _check(fn: str, pred: torch.Tensor, others: dict, weights) -> None:
    C.check_launchable(pred)
    C.check_float("pred", pred)
    for name, t in others.items():
        C.check_float(name, t)
        if t.shape != pred.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, pred {tuple(pred.shape)}")
    if pred.ndim < 1 or pred.shape[0] == 0 or pred[0].numel() == 0:
        raise ValueError(f"{fn} needs a non-empty batch, got pred of shape {tuple(pred.shape)}")
    if weights is not None and (not torch.is_tensor(weights) or weights.numel() != pred.shape[0]):
        raise ValueError(f"{fn}: weights must be a tensor of {pred.shape[0]} per-row values")


def mse_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``losses.mse_loss``: Σ_b w_b mean_d (ε̂ − target)² / B, an fp32 scalar."""
    _check("mse_loss", pred, {"target": target}, weights)
    return _MSELoss.apply(pred, target, weights)


def esd_loss(pred: torch.Tensor, eps_from: torch.Tensor, eps_c: torch.Tensor, eps_null: torch.Tensor, eta: float,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``losses.esd_loss``: the target ε_from − η(ε_c − ε_null) and the MEAN-convention MSE in one pass."""
    _check("esd_loss", pred, {"eps_from": eps_from, "eps_c": eps_c, "eps_null": eps_null}, weights)
    return _ESDLoss.apply(pred, eps_from, eps_c, eps_null, eta, weights)

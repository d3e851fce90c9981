"""The training recipe of the bundled digits UNets, shipped with the package so that the benchmark's
retrain-from-scratch reference (``fastunlearn bench --retrain-steps``) runs from an installed wheel with the
same code that trained the committed references (``scripts/train_digits.py`` calls it)."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import DIGITS_NULL_CLASS, build_digits_unet, digits_scheduler

# The reference models retrained from scratch without the forgotten data (package data: the bench needs them).
RETRAINED = Path(__file__).resolve().parent / "retrained"


def retrained_name(kind: str, forget_class: int = 3) -> str:
    """Folder name of a retrained-from-scratch reference model (``fastunlearn.bench`` uses the same)."""
    return f"digits_without_{forget_class}" if kind == "class" else "digits_outlier_without_outlier"


def noised_batch(images, ac, batch):
    """One denoising-loss batch: (indices, t, ε, x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε), drawn in this order."""
    idx = torch.randint(0, images.shape[0], (batch,))
    x0 = images[idx]
    t = torch.randint(0, 1000, (batch,))
    eps = torch.randn_like(x0)
    x_t = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * eps
    return idx, t, eps, x_t


def train_unet(images, labels, class_conditional, steps, batch, seed, log):
    torch.manual_seed(seed)
    unet = build_digits_unet(class_conditional)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = digits_scheduler()
    ac = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(steps):
        idx, t, eps, x_t = noised_batch(images, ac, batch)
        if class_conditional:
            y = labels[idx].clone()
            y[torch.rand(batch) < 0.1] = DIGITS_NULL_CLASS
            pred = unet(x_t, t, class_labels=y).sample
        else:
            pred = unet(x_t, t).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log(f"  step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return ema



"""The training loop shared by every method: short enough to read in one sitting.

Each step: draw the step's generator (so a resumed run replays the same randomness), let the method
write gradients into ``p.grad``, skip the step if anything is non-finite (counted, and fatal after
``max_nonfinite`` in a row), take the optimizer step, log, and checkpoint every ``checkpoint_every``.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteError, bad_value
from .run import step_generator

OPTIMIZERS = ("adamw", "adam", "adamw8bit")


def make_optimizer(name: str, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise bad_value("optimizer", "'adamw' (bitsandbytes is not installed for 'adamw8bit')", name) from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise bad_value("optimizer", " | ".join(OPTIMIZERS), name)


def _finite(stats: dict, params) -> bool:
    if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float)):
        return False
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.float().abs().max() for g in grads])).all())


def train(method, optimizer, steps: int, seed: int, *, start_step: int = 0, history=None, progress: bool = True,
          max_nonfinite: int = 10, on_step_end=None, desc: str | None = None):
    """Run ``steps`` optimizer steps of ``method``; returns the history (one dict per step)."""
    params = method.trainable_parameters()
    history = [] if history is None else history
    bad_in_row = 0
    for h in reversed(history):  # a resumed run continues the streak of skipped steps it was in
        if not h.get("skipped"):
            break
        bad_in_row += 1
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not progress,
               desc=desc or method.name, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 5.0)  # logs and CI get a line every 5 s, not every step
    for step in bar:
        t0 = time.perf_counter()
        for p in params:
            p.grad = None
        stats = method.step(step, step_generator(seed, step))
        ok = _finite(stats, params)
        if ok:
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
            if bad_in_row >= max_nonfinite:
                raise NonFiniteError(f"{bad_in_row} steps in a row had a non-finite loss or gradient "
                                     f"(last at step {step}); lower lr or check the inputs")
        stats = {**stats, "step": step, "skipped": not ok, "seconds": time.perf_counter() - t0}
        history.append(stats)
        if progress and "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.4g}", refresh=False)  # printed at the bar's own pace
        if on_step_end is not None:
            on_step_end(step + 1, history)
    for p in params:
        p.grad = None
    return history

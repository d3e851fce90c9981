"""Sampling with the model's own scheduler turned into DDIM (deterministic, η = 0, seeded)."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .conditioning import slice_cond
from .models import Denoiser


@torch.no_grad()
def ddim_sample(model: torch.nn.Module, scheduler, n: int, cond=None, num_inference_steps: int = 50,
                seed: int = 0, guidance_scale: Optional[float] = None, null_cond=None, batch_size: int = 512,
                progress: bool = False) -> torch.Tensor:
    """Draw ``n`` samples in [-1, 1]. ``cond`` is per-sample conditioning (class ids [n], an embeddings
    dict, or None). With ``guidance_scale`` w and ``null_cond``: ε = ε(∅) + w (ε(c) − ε(∅))."""
    den = Denoiser(model)
    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=True)
    ddim.set_timesteps(num_inference_steps)
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *den.sample_shape, generator=gen).to(p.device, p.dtype)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            xb = x[start:start + batch_size]
            cb = slice_cond(cond, start, start + batch_size)
            nb = slice_cond(null_cond, start, start + batch_size)
            for t in tqdm(ddim.timesteps, disable=not progress, desc="sampling", leave=False):
                tt = torch.full((xb.shape[0],), int(t), device=xb.device, dtype=torch.long)
                eps = den(xb, tt, cb)
                if guidance_scale is not None and null_cond is not None:
                    eps_null = den(xb, tt, nb)
                    eps = eps_null + guidance_scale * (eps - eps_null)
                xb = ddim.step(eps, t, xb).prev_sample
            out.append(xb.clamp(-1, 1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)

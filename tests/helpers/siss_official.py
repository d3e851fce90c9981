"""SISS's losses computed the way the official code does (a transcription for the tests and benchmarks that
compare the fused step and its memory with the official gradient handling; not part of the library)."""
import torch

from fastunlearn.losses import siss_loss, siss_mixture
from fastunlearn.run import step_generator


def official_losses(run, step: int, lambd: float, model=None):
    """ℓ_x and ℓ_a (§2.2) of SISS.step's draws at ``step`` through ``model`` (default ``run.model``), computed
    the official way: plain PyTorch reference loss, class labels, no dispatch, no device moves. Tests and
    benchmarks build the official gradient handling on it and compare the fused step with it."""
    model = run.model if model is None else model
    gen, B = step_generator(run.seed, step), run.batch_size
    keep, forget = run.retain_batch(gen, B), run.forget_batch(gen, B)
    t = torch.randint(0, 1000, (B,), generator=gen)
    noise = torch.randn(keep.x0.shape, generator=gen)
    mask = torch.rand(B, generator=gen) > lambd
    gamma, sigma = run.gamma_sigma(t)
    m = siss_mixture(keep.x0, forget.x0, noise, mask, gamma, sigma)
    pred = model(m, t, class_labels=torch.where(mask, keep.cond, forget.cond)).sample
    lx, la, _, _ = siss_loss(pred, keep.x0, forget.x0, noise, mask, gamma, sigma, lambd)
    return lx, la

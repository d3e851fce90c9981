"""The trainer's own cost (issue 13): on one UNet and one batch size, side by side,

* a bare step: one forward and one backward of the plain denoising loss and an AdamW step, written directly
  in torch (the floor any training framework pays);
* one naive-deletion step through the real training loop (the method's step, the non-finite guard, the
  optimizer, the history): naive deletion is a bare step plus the global clip, so the difference is framework
  work (draws, guards, host syncs);
* one SISS step through the same loop (one forward on the mixture batch, two VJPs, the surgery).

Each round runs ``STEPS`` steps so that per-call set-up (the progress bar) is amortised as in a real run.
Bundled ``digits_outlier`` UNet, batch 64 (naive deletion's and SISS's default), PyTorch loss path
(``benchmarks/conftest.py``):

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_trainer.py -p no:cacheprovider --benchmark-only
"""
import copy
import math

import pytest
import torch

import fastunlearn as fu
from fastunlearn.methods import get_method
from fastunlearn.run import Run
from fastunlearn.trainer import loop, make_optimizer

B = 64
STEPS = 5
ROUNDS = 12


@pytest.fixture(scope="module")
def setup():
    unet, sched = fu.zoo.digits_outlier()
    forget = fu.zoo.outlier_image().repeat(4, 1, 1, 1)
    retain = fu.datasets.digits().images[:256]
    return unet, sched, forget, retain


def _method(setup, name):
    unet, sched, forget, retain = setup
    cls = get_method(name)
    run = Run(unet, sched, forget=(forget, None), retain=(retain, None), forget_target=fu.DataPoints(forget),
              retain_target=fu.DataPoints(retain), batch_size=B, seed=0)
    m = cls(run)
    m.setup()
    d = cls.defaults
    opt = make_optimizer("adamw", m.trainable_parameters(), d["lr"], betas=d["betas"], weight_decay=d["weight_decay"])
    return m, opt


def _through_the_loop(benchmark, m, opt):
    history = []

    def steps():
        start = len(history)
        loop(m, opt, start + STEPS, seed=0, start_step=start, history=history, progress=False)

    benchmark.pedantic(steps, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert history and [h["step"] for h in history] == list(range(len(history)))  # --benchmark-disable: one round
    assert all(math.isfinite(h["loss"]) and not h["skipped"] for h in history)


@pytest.mark.benchmark(group="trainer-step")
def test_bare_step(benchmark, setup):
    """Forward, backward, AdamW: no guard, no clip, no history; the same draws as a deletion step."""
    unet, sched, _, retain = setup
    model = copy.deepcopy(unet).train()
    d = get_method("naive").defaults
    opt = torch.optim.AdamW(model.parameters(), lr=d["lr"], betas=d["betas"], weight_decay=d["weight_decay"])
    ac = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    losses = []

    def steps():
        for _ in range(STEPS):
            x0 = retain[torch.randint(0, retain.shape[0], (B,), generator=gen)]
            t = torch.randint(0, 1000, (B,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = ac[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

    benchmark.pedantic(steps, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert all(math.isfinite(float(v)) for v in losses)


@pytest.mark.benchmark(group="trainer-step")
def test_naive_deletion_step_through_the_loop(benchmark, setup):
    _through_the_loop(benchmark, *_method(setup, "naive"))


@pytest.mark.benchmark(group="trainer-step")
def test_siss_step_through_the_loop(benchmark, setup):
    _through_the_loop(benchmark, *_method(setup, "siss"))

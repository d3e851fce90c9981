"""SFD's payoff and its cost on the bundled digits model, side by side:

* sampling: the SFD one-step generator (one network evaluation) against the original model's 50-step
  DDIM sampling, same number of images (``test_one_step_is_20x_faster`` asserts the ratio);
* training: one SFD step (ψ step + θ step, §5.3: about 26 forward-equivalents per row pair) against one
  plain DSM fine-tuning step of the same batch.

    pytest benchmarks/test_bench_sfd.py --benchmark-group-by=group
"""
import statistics
import time

import pytest
import torch

import fastunlearn as fu
from fastunlearn.methods import get_method
from fastunlearn.run import Run, step_generator
from fastunlearn.sampling import ddim_sample

N = 100       # images per sampling call
B = 32        # SFD remain rows per step (and as many forget rows)


@pytest.fixture(scope="module")
def digits():
    return fu.zoo.digits()


@pytest.fixture(scope="module")
def result(digits):
    """A (briefly trained) SFD result: sampling cost does not depend on how long it trained."""
    unet, sched = digits
    return fu.erase(unet, forget=fu.Classes([3], override=8), method="sfd", scheduler=sched, steps=2,
                    batch_size=8, progress=False)


def _labels():
    return torch.arange(N) % 10


def _one_step(result):
    return result.sample(N, class_labels=_labels(), seed=0)


def _fifty_steps(digits):
    unet, sched = digits
    return ddim_sample(unet, sched, N, _labels(), 50, seed=0)


@pytest.mark.benchmark(group="sfd-sampling")
def test_one_step_generator_sampling(benchmark, result):
    x = benchmark.pedantic(lambda: _one_step(result), rounds=10, warmup_rounds=1, iterations=1)
    assert x.shape == (N, 1, 8, 8)


@pytest.mark.benchmark(group="sfd-sampling")
def test_original_50_step_ddim_sampling(benchmark, digits):
    x = benchmark.pedantic(lambda: _fifty_steps(digits), rounds=2, warmup_rounds=0, iterations=1)
    assert x.shape == (N, 1, 8, 8)


def _median_seconds(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_one_step_is_20x_faster(result, digits):
    """The contract of issue 4: one-step sampling at least 20x faster than the original 50-step sampling
    (runs also under ``--benchmark-disable``)."""
    one = _median_seconds(lambda: _one_step(result), 7)
    fifty = _median_seconds(lambda: _fifty_steps(digits), 2)
    print(f"one-step {one * 1e3:.1f} ms, 50-step DDIM {fifty * 1e3:.1f} ms, speed-up {fifty / one:.1f}x ({N} images)")
    assert fifty / one >= 20, (one, fifty)


@pytest.fixture(scope="module")
def sfd_method(digits):
    unet, sched = digits
    run = Run(unet, sched, forget=None, retain=None, forget_target=fu.Classes([3], override=8), retain_target=None,
              batch_size=B, seed=0)
    m = get_method("sfd")(run)
    m.setup()
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-4, betas=(0.0, 0.999))
    return m, opt


def _bench(benchmark, fn, rounds=8):
    counter = iter(range(10**9))
    benchmark.pedantic(lambda: fn(next(counter)), rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.benchmark(group="sfd-step")
def test_sfd_step(benchmark, sfd_method):
    m, opt = sfd_method

    def step(s):
        for p in m.trainable_parameters():
            p.grad = None
        m.step(s, step_generator(0, s))
        opt.step()
    _bench(benchmark, step)


@pytest.mark.benchmark(group="sfd-step")
def test_plain_dsm_step_same_rows(benchmark, digits):
    """Reference: one denoising fine-tuning step on 2B rows (what SFD's rows would cost as plain DSM)."""
    unet, sched = digits
    run = Run(unet, sched, forget=None, retain=None, forget_target=None, retain_target=None, batch_size=2 * B,
              seed=0)
    opt = torch.optim.Adam(run.trainable_parameters(), lr=1e-4)

    def step(s):
        gen = step_generator(0, s)
        x0 = torch.randn(2 * B, 1, 8, 8, generator=gen).clamp(-1, 1)
        c = torch.randint(0, 10, (2 * B,), generator=gen)
        t = torch.randint(0, 1000, (2 * B,), generator=gen)
        e = torch.randn(x0.shape, generator=gen)
        g, s_ = run.gamma_sigma(t)
        x_t = run.bview(g, x0) * x0 + run.bview(s_, x0) * e
        opt.zero_grad()
        ((run.denoiser(x_t, t, c) - e) ** 2).flatten(1).sum(1).mean().backward()
        opt.step()
    _bench(benchmark, step)

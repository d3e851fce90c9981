"""One whole unlearning step (the method's forward passes, losses, VJPs, gradient surgery and the optimizer
step) for the methods whose step has no benchmark elsewhere: EraseDiff (fixed λ: one VJP of ℓ_r + λℓ_f;
adaptive λ: two VJPs and the pair_stats reduction, §4.8) and ESD (the two frozen evaluations, one trained
forward/backward, x_t from the trajectory pool refreshed every 25 steps, §6). SISS's step is in
test_bench_siss.py (B = 64) and SFD's in test_bench_sfd.py (32 + 32 rows). Bundled 8x8 digits model (652 k
parameters), forget class 3, the PyTorch loss path (benchmarks/conftest.py):

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_steps.py benchmarks/test_bench_siss.py \
        benchmarks/test_bench_sfd.py -k step --benchmark-only --benchmark-group-by=group
"""
import math

import pytest
import torch

import fastunlearn as fu
from fastunlearn.methods import get_method
from fastunlearn.run import Run, step_generator
from fastunlearn.trainer import make_optimizer

B = 64       # EraseDiff: retain and forget rows each, as the SISS step benchmark
B_ESD = 16   # ESD's own default batch (its trajectory pool holds 2·B rows sampled with 50 DDIM steps)


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    unet, sched = fu.zoo.digits()
    data = fu.datasets.digits()
    three = data.labels == 3
    return unet, sched, (data.images[three], data.labels[three]), (data.images[~three], data.labels[~three])


def _method(digits, name, batch_size, **options):
    unet, sched, forget, retain = digits
    cls = get_method(name)
    opts = cls.resolve_options(options)
    if name == "erasediff":  # the images of class 3 to forget: no generation of forget images at setup
        kw = dict(forget=forget, retain=retain, forget_target=fu.DataPoints(forget[0], labels=forget[1]),
                  retain_target=fu.DataPoints(retain[0], labels=retain[1]))
    else:
        kw = dict(forget=None, retain=None, forget_target=fu.Classes([3]), retain_target=None)
    run = Run(unet, sched, batch_size=batch_size, seed=0,
              trainable=getattr(cls, "trainable_filter", lambda o: None)(opts), **kw)
    m = cls(run, **options)
    m.setup()
    d = cls.defaults
    opt = make_optimizer(d.get("optimizer", "adamw"), m.trainable_parameters(), 1e-5,
                         betas=d.get("betas", (0.9, 0.999)))
    return m, opt


def _bench(benchmark, m, opt, rounds=15):
    counter = iter(range(10**9))
    history = []

    def step():
        s = next(counter)
        for p in m.trainable_parameters():
            p.grad = None
        history.append(m.step(s, step_generator(0, s)))
        opt.step()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert history and all(math.isfinite(h["loss"]) for h in history)
    return history


@pytest.mark.benchmark(group="method-step")
def test_erasediff_step_fixed_lambda(benchmark, digits):
    m, opt = _method(digits, "erasediff", B)
    _bench(benchmark, m, opt)


@pytest.mark.benchmark(group="method-step")
def test_erasediff_step_adaptive_lambda(benchmark, digits):
    m, opt = _method(digits, "erasediff", B, lambda_rule="adaptive")
    _bench(benchmark, m, opt)


@pytest.mark.benchmark(group="method-step")
def test_esd_step(benchmark, digits):
    """The first (warm-up) step samples the pool; 15 timed steps include no refresh (every 25 steps)."""
    m, opt = _method(digits, "esd", B_ESD)
    _bench(benchmark, m, opt)

"""One SISS step against a reference-style SISS step (the official code's second backward with
``retain_graph`` plus ``.grad`` snapshots), one naive-deletion step and a bare forward+backward of the same
UNet and batch, side by side in one run:

    pytest benchmarks/test_bench_siss.py --benchmark-group-by=group
"""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn.methods import get_method
from helpers.siss_official import official_losses
from fastunlearn.models import build_digits_unet, digits_scheduler
from fastunlearn.run import Run, step_generator

B = 64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = fu.datasets.digits()
    three = data.labels == 3
    unet = build_digits_unet()
    sched = digits_scheduler()
    forget = (data.images[three], data.labels[three])
    retain = (data.images[~three], data.labels[~three])
    return unet, sched, forget, retain


def _run(setup):
    unet, sched, forget, retain = setup
    return Run(unet, sched, forget=forget, retain=retain, forget_target=None, retain_target=None, batch_size=B, seed=0)


def _opt(run):
    return torch.optim.AdamW(run.trainable_parameters(), lr=1e-5, betas=(0.95, 0.999), weight_decay=1e-6)


def reference_siss_step(run, opt, step, lambd=0.5, S=0.5):
    """The official gradient handling (§2.2): backward(ℓ_x, retain_graph) → snapshot .grad → backward(ℓ_a) →
    difference → rescale → clip_grad_norm_ → step."""
    params = run.trainable_parameters()
    lx, la = official_losses(run, step, lambd)
    opt.zero_grad()
    lx.backward(retain_graph=True)
    snapshot = {p: p.grad.clone() for p in params}
    la.backward()
    accum_a = {p: p.grad.clone() - snapshot[p] for p in params}
    g_x = {p: p.grad.clone() - accum_a[p] for p in params}
    norm_a = torch.norm(torch.stack([torch.norm(g) for g in accum_a.values()]))
    c = S / norm_a
    for p in params:
        p.grad = g_x[p] - c * accum_a[p]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def fastunlearn_step(method, opt, step):
    for p in method.trainable_parameters():
        p.grad = None
    method.step(step, step_generator(0, step))
    opt.step()


def bare_step(run, opt, step):
    gen = step_generator(0, step)
    keep = run.retain_batch(gen, B)
    t = torch.randint(0, 1000, (B,), generator=gen)
    noise = torch.randn(keep.x0.shape, generator=gen)
    opt.zero_grad()
    pred = run.model(keep.x0 + noise, t, class_labels=keep.cond).sample
    ((pred - noise) ** 2).sum().div(B).backward()
    opt.step()


def _bench(benchmark, fn):
    counter = iter(range(10**9))
    benchmark.pedantic(lambda: fn(next(counter)), rounds=15, warmup_rounds=2, iterations=1)


@pytest.mark.benchmark(group="siss-step")
def test_siss_step(benchmark, setup):
    run = _run(setup)
    m = get_method("siss")(run)
    opt = _opt(run)
    _bench(benchmark, lambda s: fastunlearn_step(m, opt, s))


@pytest.mark.benchmark(group="siss-step")
def test_siss_step_lagged_norm(benchmark, setup):
    run = _run(setup)
    m = get_method("siss")(run, norm_every=4)
    opt = _opt(run)
    _bench(benchmark, lambda s: fastunlearn_step(m, opt, s))


@pytest.mark.benchmark(group="siss-step")
def test_reference_siss_step(benchmark, setup):
    run = _run(setup)
    opt = _opt(run)
    _bench(benchmark, lambda s: reference_siss_step(run, opt, s))


@pytest.mark.benchmark(group="siss-step")
def test_naive_step(benchmark, setup):
    run = _run(setup)
    m = get_method("naive")(run)
    opt = _opt(run)
    _bench(benchmark, lambda s: fastunlearn_step(m, opt, s))


@pytest.mark.benchmark(group="siss-step")
def test_bare_forward_backward_step(benchmark, setup):
    run = _run(setup)
    opt = _opt(run)
    _bench(benchmark, lambda s: bare_step(run, opt, s))

"""Every registered method on the real-data benchmark's two settings (``fastunlearn bench``), a few steps each,
plus the evaluation that judges them. Picks up newly registered methods by itself.

    pytest benchmarks/test_bench_methods.py --benchmark-group-by=group     # timings
    pytest benchmarks --benchmark-disable                                  # CI: each runs once as a test
"""
import math

import pytest
import torch

import fastunlearn as fu
from fastunlearn import bench
from fastunlearn.methods import REGISTRY

STEPS = 3
CASES = [(s, m) for s in bench.SETTINGS for m in sorted(REGISTRY) if bench.fits(REGISTRY[m], s)]


@pytest.mark.parametrize("setting,method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_erase_on_real_data(benchmark, setting, method):
    benchmark.group = f"bench-{setting}"
    cls = REGISTRY[method]
    unet, sched = bench.base_model(setting)
    forget, retain, _ = bench.targets(setting, cls)
    options = bench.METHOD_SETTINGS.get(method, {}).get("options", {})
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    def run():
        return fu.erase(unet, forget=forget, retain=retain, method=method, scheduler=sched, steps=STEPS,
                        progress=False, **options)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(res.history) == STEPS and res.meta["skipped_steps"] == 0
    assert all(math.isfinite(v) for h in res.history for v in h.values() if isinstance(v, float))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # input untouched
    # The method trained what it returns: the denoiser (SFD: its fake score ψ, updated every step) and, for SFD,
    # the one-step generator θ, both started from the base weights.
    for name, net in (("model", res.model), ("generator", res.generator)):
        if net is None:
            continue
        after = net.state_dict()
        shared = [k for k in after if k in before]
        assert shared, f"res.{name} shares no weight names with the base model"
        assert any(not torch.equal(before[k], after[k]) for k in shared), f"res.{name} is still the base model"


@pytest.mark.parametrize("setting", bench.SETTINGS)
def test_evaluate_throughput(benchmark, setting):
    benchmark.group = "bench-evaluate"
    unet, sched = bench.base_model(setting)
    _, _, judge = bench.targets(setting)

    def run():
        return fu.evaluate(unet, scheduler=sched, forget=judge, before=False, n_per_class=4, n_samples=40,
                           num_inference_steps=10)

    r = benchmark.pedantic(run, rounds=1, iterations=1)
    m = r["after"]
    if setting == "class":
        assert 0 <= m["forget_rate"] <= 1 and m["fd_retain"] > 0
    else:
        assert 0 <= m["near_copy_rate"] <= 1 and m["fd"] > 0

"""fastunlearn.generation: the disk cache of generated data (its key, where it lives, what switches it off, a
damaged file) and the fingerprint of the frozen base weights. The methods' own use (progress, counts, reuse
across runs) is tested in test_erasediff.py and test_esd.py."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn import generation
from fastunlearn.generation import cache_key, cached, weights_fingerprint
from fastunlearn.run import Run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "generated"


def _run(tiny, **kw):
    unet, sched = tiny
    return Run(unet, sched, forget=None, retain=None, forget_target=fu.Classes([3]), retain_target=None,
               batch_size=2, seed=0, **kw)


def test_fingerprint_sees_one_changed_value_anywhere():
    """Large tensors are sampled (head, strides) and summed: a change outside the samples still shows."""
    lin = torch.nn.Linear(512, 300)
    a = weights_fingerprint(lin)
    assert weights_fingerprint(lin) == a
    with torch.no_grad():
        lin.weight[1, 7] += 1e-3  # not in the first 256 values, not on the 37-element stride
    assert weights_fingerprint(lin) != a


def test_key_changes_with_everything_that_determines_the_data(tiny):
    run = _run(tiny)
    parts = dict(kind="samples", cond="c", seed=0, rows=4, steps=2, guidance=None)
    k = cache_key(run, **parts)
    assert cache_key(_run(tiny), **parts) == k  # the same model and settings: the same key
    for change in (dict(seed=1), dict(rows=5), dict(steps=3), dict(guidance=3.0), dict(cond="d")):
        assert cache_key(run, **{**parts, **change}) != k, change
    run.model.register_to_config(sample_size=16)  # erase(resolution=...) sets the working size so
    assert cache_key(run, **parts) != k
    other = _run(tiny)
    with torch.no_grad():
        other.original.conv_in.weight[0, 0, 0, 0] += 1.0  # other base weights (the caller's model)
    assert cache_key(other, **parts) != k


def test_cache_round_trip_off_switches_and_damaged_files(tiny, cache, monkeypatch):
    run = _run(tiny)
    made = []

    def make():
        made.append(1)
        return {"samples": torch.arange(6.0).view(2, 3)}

    out, hit, f = cached(run, {"kind": "t"}, make)
    assert not hit and len(made) == 1 and f is not None and f.endswith(".safetensors")
    assert [p.name for p in cache.iterdir()] == [f.rsplit("/", 1)[1]]  # one file, no temporary left
    again, hit, _ = cached(run, {"kind": "t"}, make)
    assert hit and len(made) == 1 and torch.equal(again["samples"], out["samples"])
    _, hit, _ = cached(run, {"kind": "t"}, make, cache=False)  # the methods' cache_generated=False
    assert not hit and len(made) == 2
    with generation.caching(False):  # the planner
        _, hit, f = cached(run, {"kind": "t"}, make)
    assert not hit and f is None and len(made) == 3
    (cache / next(cache.iterdir()).name).write_bytes(b"not a safetensors file")
    fixed, hit, _ = cached(run, {"kind": "t"}, make)  # a damaged file: made again and replaced
    assert not hit and torch.equal(fixed["samples"], out["samples"])
    assert cached(run, {"kind": "t"}, make)[1]
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", "off")
    _, hit, f = cached(run, {"kind": "u"}, make)
    assert not hit and f is None and len(list(cache.iterdir())) == 1


def test_planner_cache_shares_the_cache_root(cache):
    from fastunlearn.planner import search

    assert search._cache_dir() == cache.parent / "plans"

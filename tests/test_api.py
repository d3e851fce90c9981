"""erase() / Result / load() contract on tiny models (seconds)."""
import json

import pytest
import torch

import fastunlearn as fu
from fastunlearn.errors import FastUnlearnError


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("method", ["siss", "siss-nois", "naive", "neggrad"])
def test_erase_runs_and_never_touches_input(tiny, digits_split, method):
    unet, sched = tiny
    before = _state(unet)
    forget, retain = digits_split
    res = fu.erase(unet, forget=forget, retain=retain, method=method, scheduler=sched, steps=3, batch_size=4,
                   progress=False)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), f"input model modified at {k}"
    assert type(res.model) is type(unet)
    changed = any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())
    assert changed
    assert len(res.history) == 3 and all("loss" in h for h in res.history)
    assert res.method == method


def test_default_method_for_datapoints_is_siss(tiny, digits_split):
    unet, sched = tiny
    forget, retain = digits_split
    res = fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=1, batch_size=2, progress=False)
    assert res.method == "siss"


def test_same_seed_same_weights(tiny, digits_split):
    unet, sched = tiny
    forget, retain = digits_split
    a = fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=3, batch_size=4, progress=False)
    b = fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=3, batch_size=4, progress=False)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_sample_shapes_and_range(tiny, digits_split):
    unet, sched = tiny
    forget, retain = digits_split
    res = fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=1, batch_size=2, progress=False)
    x = res.sample(6, class_labels=[0, 1, 2, 3, 4, 5], num_inference_steps=5, seed=1)
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    y = res.sample(6, class_labels=[0, 1, 2, 3, 4, 5], num_inference_steps=5, seed=1)
    assert torch.equal(x, y)
    with pytest.raises(FastUnlearnError, match="class_labels"):
        res.sample(2, class_labels=[99, 1])


def test_save_load_round_trip(tmp_path, tiny, digits_split):
    unet, sched = tiny
    forget, retain = digits_split
    res = fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=2, batch_size=2, progress=False,
                   lambd=0.4)
    out = res.save(tmp_path / "r")
    meta = json.loads((out / "fastunlearn.json").read_text())
    for key in ("method", "options", "fastunlearn_version", "torch_version", "seconds", "peak_memory_bytes",
                "setup_peak_memory_bytes", "train_peak_memory_bytes"):
        assert key in meta
    # the run's peak is the larger of its set-up's and its training's (the process's peak so far on the CPU)
    assert meta["peak_memory_bytes"] == max(meta["setup_peak_memory_bytes"], meta["train_peak_memory_bytes"]) > 0
    assert meta["options"]["lambd"] == 0.4
    back = fu.load(out)
    for (k, v), w in zip(res.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert back.method == "siss" and back.options["lambd"] == 0.4
    with pytest.raises(FastUnlearnError, match="exists"):
        res.save(out)
    res.save(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="bogus"), "method"),
    (dict(steps=0), "steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(lambd=1.5), "lambd"),
    (dict(t_sampling="sometimes"), "t_sampling"),
    (dict(not_an_option=1), "not_an_option"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(precision="fp8"), "precision"),
    (dict(seed="zero"), "seed"),
])
def test_bad_arguments_name_the_argument(tiny, digits_split, kwargs, match):
    unet, sched = tiny
    forget, retain = digits_split
    before = _state(unet)
    with pytest.raises(FastUnlearnError, match=match):
        fu.erase(unet, forget=forget, retain=retain, scheduler=sched, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_bad_targets(tiny, digits_split):
    unet, sched = tiny
    forget, retain = digits_split
    with pytest.raises(FastUnlearnError, match="retain"):
        fu.erase(unet, forget=forget, method="siss", scheduler=sched, progress=False)
    with pytest.raises(FastUnlearnError, match="forget"):
        fu.erase(unet, forget="digit three", retain=retain, scheduler=sched, progress=False)
    with pytest.raises(FastUnlearnError, match="scheduler"):
        fu.erase(unet, forget=forget, retain=retain, progress=False)
    bad_labels = fu.DataPoints(forget.images, labels=torch.full((len(forget),), 12))
    with pytest.raises(FastUnlearnError, match="labels"):
        fu.erase(unet, forget=bad_labels, retain=retain, scheduler=sched, progress=False)
    with pytest.raises(FastUnlearnError, match="model"):
        fu.erase(torch.nn.Linear(2, 2), forget=forget, retain=retain, scheduler=sched, progress=False)


def test_datapoints_validation():
    with pytest.raises(FastUnlearnError, match="images"):
        fu.DataPoints(torch.rand(2, 1, 8, 8) * 5)
    with pytest.raises(FastUnlearnError, match="images"):
        fu.DataPoints(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(FastUnlearnError, match="labels"):
        fu.DataPoints(torch.zeros(3, 1, 8, 8), labels=torch.zeros(2, dtype=torch.long))
    ok = fu.DataPoints(torch.rand(2, 1, 8, 8), normalize=True)
    assert ok.images.min() >= -1 and ok.images.max() <= 1
    with pytest.raises(FastUnlearnError, match="Classes"):
        fu.Classes([])
    with pytest.raises(FastUnlearnError, match="override"):
        fu.Classes([3], override=3)


def test_digits_dataset():
    d = fu.datasets.digits()
    assert d.images.shape == (1797, 1, 8, 8)
    assert d.images.min() == -1 and d.images.max() == 1
    assert set(d.labels.tolist()) == set(range(10))

"""The contract every registered method keeps, as one table over ``fastunlearn.methods.REGISTRY``: the input model
untouched, seeded runs reproducible, a crashed run resumed to the same weights bitwise, the result saved and loaded
back, and a bad option refused before any work. A method registered tomorrow is in this table without an edit."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn.checkpoint import list_checkpoints, step_of
from fastunlearn.errors import FastUnlearnError
from fastunlearn.methods import REGISTRY
from helpers.runs import crash_at, digits_split

METHODS = sorted(n for n in REGISTRY if not n.startswith("_"))
# Options that keep a method to seconds on the tiny model (fewer DDIM steps for ESD's trajectory pool); a method
# not listed runs with its defaults.
FAST = {"esd": dict(ddim_steps=4), "erasediff": dict(n_generate=8, generate_steps=4)}


def _model():
    from fastunlearn.models import digits_scheduler
    from helpers.models import tiny_unet

    torch.manual_seed(0)
    return tiny_unet(), digits_scheduler()


def _kwargs(method, sched):
    """A target the method takes: the digit 3's images (with the rest kept) where it takes data, else class 3."""
    cls = REGISTRY[method]
    forget, retain = digits_split(16, 64)
    if "datapoints" in cls.targets:
        kw = dict(forget=forget, retain=retain)
    else:
        kw = dict(forget=fu.Classes([3], override=5), retain=retain if cls.needs_retain else None)
    return dict(kw, method=method, scheduler=sched, steps=4, batch_size=2, progress=False, **FAST.get(method, {}))


def _weights(res) -> dict:
    out = {f"model.{k}": v for k, v in res.model.state_dict().items()}
    if getattr(res, "generator", None) is not None:
        out.update({f"generator.{k}": v for k, v in res.generator.state_dict().items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_input_untouched_and_seeded_runs_reproducible(method):
    unet, sched = _model()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    kw = _kwargs(method, sched)
    torch.manual_seed(1)
    a = fu.erase(unet, seed=0, **kw)
    torch.manual_seed(2)  # the global random state does not matter, only seed=
    b = fu.erase(unet, seed=0, **kw)
    c = fu.erase(unet, seed=1, **kw)
    assert _same(unet.state_dict(), before), "the input model was modified"
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c)), "the seed changed nothing"
    assert not _same({k: v for k, v in _weights(a).items() if k.startswith("model.")},
                     {f"model.{k}": v for k, v in before.items()}) or a.generator is not None, "nothing was trained"


@pytest.mark.parametrize("method", METHODS)
def test_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, method):
    unet, sched = _model()
    kw = _kwargs(method, sched)
    reference = fu.erase(unet, **kw)
    undo = crash_at(monkeypatch, method, at_step=3)
    with pytest.raises(KeyboardInterrupt):
        fu.erase(unet, output_dir=tmp_path, checkpoint_every=2, **kw)
    undo()
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [2]
    resumed = fu.erase(unet, output_dir=tmp_path, resume=True, **kw)
    assert resumed.meta["resumed_from_step"] == 2
    assert _same(_weights(resumed), _weights(reference))


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(tmp_path, method):
    unet, sched = _model()
    res = fu.erase(unet, **dict(_kwargs(method, sched), steps=1))
    res.save(tmp_path / "out")
    back = fu.load(tmp_path / "out")
    assert back.method == method and back.options == res.options
    assert _same(_weights(back), _weights(res))


@pytest.mark.parametrize("method", METHODS)
def test_an_unknown_option_is_refused_before_any_work(monkeypatch, method):
    unet, sched = _model()
    cls = REGISTRY[method]
    monkeypatch.setattr(cls, "setup", lambda self: pytest.fail("work started before the options were checked"))
    with pytest.raises(FastUnlearnError, match="not_an_option"):
        fu.erase(unet, not_an_option=1, **_kwargs(method, sched))


@pytest.mark.parametrize("method", METHODS)
def test_every_option_has_help_a_default_and_a_check(method):
    """Options, their checks and their docs are one object (``Method.Options``): each option is documented, its
    default passes its own check, and a value of the wrong kind is refused with an error naming it."""
    cls = REGISTRY[method]
    assert cls.resolve_options({}) == cls.options
    for name, text in cls.Options.help().items():
        assert text.strip(), f"{method}.{name} has no help"
        with pytest.raises(FastUnlearnError, match=f"^{name}: expected"):
            cls.resolve_options({name: object()})

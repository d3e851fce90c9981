"""Bad input (issue 7): every mistake raises a fastunlearn error that names the argument and says what
was expected, within seconds, before any work: the input model is untouched and nothing is written."""
import functools
import math
import pickle
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastunlearn as fu
from fastunlearn.errors import FastUnlearnError
from fastunlearn.methods import REGISTRY, Method
from helpers.models import tiny_unet


@functools.lru_cache(maxsize=None)
def _setup():
    """A tiny class-conditional UNet (10 classes + null), its scheduler and a digits split (built once)."""
    from fastunlearn.models import digits_scheduler

    torch.manual_seed(0)
    unet = tiny_unet()
    data = fu.datasets.digits()
    three = data.labels == 3
    forget = fu.DataPoints(data.images[three][:8], labels=data.labels[three][:8])
    retain = fu.DataPoints(data.images[~three][:16], labels=data.labels[~three][:16])
    return unet, digits_scheduler(), forget, retain


def _uncond_unet():
    return tiny_unet(class_conditional=False)


class _Probe(Method):
    """Takes classes and concepts; validation must stop every bad call before ``step`` runs."""

    name = "_probe"
    targets = ("classes", "concept")
    defaults = dict(steps=1, batch_size=1)

    def trainable_parameters(self):
        return self.run.trainable_parameters()

    def step(self, step, gen):
        raise AssertionError("validation let a bad call through to training")


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(REGISTRY, "_probe", _Probe)
    return "_probe"


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, [p.requires_grad for p in module.parameters()]


def _files(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _images(n=4, c=1, value=0.0):
    return torch.full((n, c, 8, 8), value)


def _labels(n=4, value=1):
    return torch.full((n,), value, dtype=torch.long)


def _pickle_only_model(tmp):
    folder = tmp / "pickled_model"
    folder.mkdir()
    unet = _uncond_unet()
    unet.save_pretrained(folder, safe_serialization=False)  # config.json + diffusion_pytorch_model.bin only
    return folder


def _file(tmp):
    f = tmp / "a_file.txt"
    f.write_text("keep me")
    return f


# (case id, function (tmp_path, base kwargs) -> kwargs overrides, regex the message must match)
CASES = [
    ("model-wrong-type", lambda t, b: dict(model=torch.nn.Linear(2, 2)), r"^model: expected"),
    ("model-missing-path", lambda t, b: dict(model=t / "no_such_model"), r"^model: .*does not exist"),
    ("model-folder-no-config", lambda t, b: dict(model=(t / "empty").mkdir() or t / "empty"), r"^model: .*config"),
    ("model-pickle-weights-only", lambda t, b: dict(model=_pickle_only_model(t)), r"^model: .*safetensors"),
    ("method-unknown", lambda t, b: dict(method="bogus"), r"^method: expected .*siss"),
    ("method-not-a-string", lambda t, b: dict(method=3), r"^method: expected"),
    ("precision", lambda t, b: dict(precision="fp8"), r"^precision: expected .*bf16"),
    ("optimizer", lambda t, b: dict(optimizer="sgd"), r"^optimizer: expected .*adamw"),
    ("attention", lambda t, b: dict(attention="flash"), r"^attention: expected .*sdpa"),
    ("classes-out-of-range", lambda t, b: dict(method="_probe", forget=fu.Classes([3, 12]), retain=None),
     r"^forget: expected class ids in \[0, 10\)"),
    ("override-out-of-range", lambda t, b: dict(method="_probe", forget=fu.Classes([3], override=10), retain=None),
     r"^forget: expected class ids"),
    ("override-negative", lambda t, b: dict(method="_probe", forget=fu.Classes([3], override=-1), retain=None),
     r"Classes.override: expected"),
    ("classes-on-unconditional-model", lambda t, b: dict(method="_probe", model=_uncond_unet(),
                                                         forget=fu.Classes([3]), retain=None),
     r"^forget: expected fu.Classes only for a class-conditional model"),
    ("concept-on-class-model", lambda t, b: dict(method="_probe", forget=fu.Concept("a cat"), retain=None),
     r"^forget: expected fu.Concept only for a text-conditional model"),
    ("empty-forget-set", lambda t, b: dict(forget=fu.DataPoints(torch.zeros(0, 1, 8, 8))),
     r"^images: expected at least one image"),
    ("empty-classes", lambda t, b: dict(method="_probe", forget=fu.Classes([])), r"^Classes.ids: expected"),
    ("forget-wrong-channels", lambda t, b: dict(forget=fu.DataPoints(_images(c=3), labels=_labels())),
     r"^forget.images: expected 1 channel"),
    ("retain-wrong-channels", lambda t, b: dict(retain=fu.DataPoints(_images(c=3), labels=_labels())),
     r"^retain.images: expected 1 channel"),
    ("images-outside-range", lambda t, b: dict(forget=fu.DataPoints(_images(value=3.0), labels=_labels())),
     r"^images: expected values in \[-1, 1\].*normalize=True"),
    ("images-nan", lambda t, b: dict(forget=fu.DataPoints(_images(value=float("nan")), labels=_labels())),
     r"^images: expected finite values"),
    ("images-inf", lambda t, b: dict(retain=fu.DataPoints(_images(value=float("inf")), labels=_labels())),
     r"^images: expected finite values"),
    ("images-integer-dtype", lambda t, b: dict(forget=fu.DataPoints(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))),
     r"^images: expected a float tensor"),
    ("images-wrong-rank", lambda t, b: dict(forget=fu.DataPoints(torch.zeros(1, 8, 8))), r"^images: expected"),
    ("labels-wrong-length", lambda t, b: dict(forget=fu.DataPoints(_images(), labels=_labels(n=3))),
     r"^labels: expected an integer tensor of shape \[4\]"),
    ("labels-out-of-range", lambda t, b: dict(forget=fu.DataPoints(_images(), labels=_labels(value=10))),
     r"^forget.labels: expected class ids in \[0, 10\)"),
    ("labels-negative", lambda t, b: dict(forget=fu.DataPoints(_images(), labels=_labels(value=-1))),
     r"^labels: expected non-negative"),
    ("labels-float", lambda t, b: dict(forget=fu.DataPoints(_images(), labels=torch.ones(4))),
     r"^labels: expected an integer tensor"),
    ("labels-missing-on-class-model", lambda t, b: dict(forget=fu.DataPoints(_images())),
     r"^forget.labels: expected class labels"),
    ("prompts-wrong-count", lambda t, b: dict(forget=fu.DataPoints(_images(), prompts=["a", "b"])),
     r"^prompts: expected 4 strings"),
    ("steps-zero", lambda t, b: dict(steps=0), r"^steps: expected an int >= 1"),
    ("steps-float", lambda t, b: dict(steps=2.5), r"^steps: expected an int"),
    ("batch-size-negative", lambda t, b: dict(batch_size=-4), r"^batch_size: expected an int >= 1"),
    ("lr-zero", lambda t, b: dict(lr=0.0), r"^lr: expected a positive"),
    ("lr-inf", lambda t, b: dict(lr=float("inf")), r"^lr: expected a positive finite number"),
    ("lr-nan", lambda t, b: dict(lr=float("nan")), r"^lr: expected a positive"),
    ("lambd-above-one", lambda t, b: dict(lambd=1.5), r"^lambd: expected a number in \[0, 1\]"),
    ("lambd-negative", lambda t, b: dict(lambd=-0.1), r"^lambd: expected a number in \[0, 1\]"),
    ("unknown-option", lambda t, b: dict(lamda=0.5), r"^lamda: expected an option of method 'siss'"),
    ("classes-for-a-datapoints-method", lambda t, b: dict(forget=fu.Classes([3])),
     r"^forget: expected a target method 'siss' takes \(datapoints\)"),
    ("missing-retain", lambda t, b: dict(retain=None), r"^retain: expected fu.DataPoints .*needs retain data"),
    ("retain-classes-for-data-method", lambda t, b: dict(retain=fu.Classes([1])), r"^retain: expected fu.DataPoints"),
    ("retain-wrong-type", lambda t, b: dict(retain="the other digits"), r"^retain: expected"),
    ("forget-wrong-type", lambda t, b: dict(forget="digit three"), r"^forget: expected fu.Classes"),
    ("scheduler-missing", lambda t, b: dict(scheduler=None), r"^scheduler: expected a diffusers noise scheduler"),
    ("scheduler-wrong-type", lambda t, b: dict(scheduler="ddpm"), r"^scheduler: expected"),
    ("output-dir-is-a-file", lambda t, b: dict(output_dir=_file(t)), r"^output_dir: expected a folder"),
    ("output-dir-under-a-file", lambda t, b: dict(output_dir=_file(t) / "run"), r"^output_dir: expected a folder"),
    ("output-dir-wrong-type", lambda t, b: dict(output_dir=3), r"^output_dir: expected a folder path"),
    ("checkpoint-every-zero", lambda t, b: dict(checkpoint_every=0), r"^checkpoint_every: expected an int >= 1"),
    ("checkpoint-every-without-output-dir", lambda t, b: dict(output_dir=None), r"^output_dir: expected a folder"),
    ("resume-without-output-dir", lambda t, b: dict(output_dir=None, checkpoint_every=None, resume=True),
     r"^output_dir: expected the folder of the run to resume"),
    ("resume-not-bool", lambda t, b: dict(resume="yes"), r"^resume: expected True or False"),
    ("seed-string", lambda t, b: dict(seed="zero"), r"^seed: expected an int"),
    ("lora-rank-zero", lambda t, b: dict(lora_rank=0), r"^lora_rank: expected an int >= 1"),
    ("max-nonfinite-zero", lambda t, b: dict(max_nonfinite=0), r"^max_nonfinite: expected an int >= 1"),
    ("keep-checkpoints-zero", lambda t, b: dict(keep_checkpoints=0), r"^keep_checkpoints: expected an int >= 1"),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_any_work(tmp_path, probe, make, pattern):
    unet, sched, forget, retain = _setup()
    before, grads = _snapshot(unet)
    base = dict(model=unet, forget=forget, retain=retain, method="siss", scheduler=sched, steps=1, batch_size=1,
                progress=False, output_dir=tmp_path / "out", checkpoint_every=1)
    files_before = None
    t0 = time.perf_counter()
    with pytest.raises(FastUnlearnError) as info:
        kwargs = {**base, **make(tmp_path, base)}
        files_before = _files(tmp_path)
        fu.erase(**kwargs)
    seconds = time.perf_counter() - t0
    message = str(info.value)
    assert re.search(pattern, message), message
    assert len(message) > 25, message  # says what was expected, not just the name
    assert seconds < 15, f"validation took {seconds:.1f} s"
    assert not (tmp_path / "out").exists(), "output written for a rejected call"
    if files_before is not None:
        assert _files(tmp_path) == files_before
    after, grads_after = _snapshot(unet)
    assert grads_after == grads and all(torch.equal(after[k], v) for k, v in before.items())


def test_case_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------- per registered method
def _target_of(kind, forget):
    return {"datapoints": forget, "classes": fu.Classes([3]), "concept": fu.Concept("a photo of a cat")}[kind]


_WRONG_TARGETS = [(name, kind) for name, cls in sorted(REGISTRY.items()) if not name.startswith("_")
                  for kind in ("datapoints", "classes", "concept") if kind not in cls.targets]


@pytest.mark.parametrize("method,kind", _WRONG_TARGETS, ids=[f"{m}-{k}" for m, k in _WRONG_TARGETS])
def test_a_target_the_method_cannot_take_is_named(method, kind):
    unet, sched, forget, retain = _setup()
    with pytest.raises(FastUnlearnError, match=rf"^forget: expected a target method '{re.escape(method)}' takes"):
        fu.erase(unet, forget=_target_of(kind, forget), retain=retain, method=method, scheduler=sched,
                 steps=1, progress=False)


_NEED_RETAIN = [name for name, cls in sorted(REGISTRY.items()) if cls.needs_retain]


@pytest.mark.parametrize("method", _NEED_RETAIN)
def test_a_method_that_needs_retain_data_says_so(method):
    unet, sched, forget, _ = _setup()
    kind = REGISTRY[method].targets[0]
    with pytest.raises(FastUnlearnError, match=rf"^retain: expected .*{re.escape(method)}"):
        fu.erase(unet, forget=_target_of(kind, forget), method=method, scheduler=sched, steps=1, progress=False)


# ------------------------------------------------------------------------- property tests
_not_int = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.booleans(),
                     st.lists(st.integers(), max_size=2))
_bad_count = st.one_of(st.integers(max_value=0), _not_int)
_bad_lr = st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=5),
                    st.booleans(), st.just([1e-4]))
_bad_lambd = st.one_of(st.floats(allow_nan=True).filter(lambda x: not 0.0 <= x <= 1.0), st.text(max_size=5),
                       st.none(), st.booleans())
_GOOD = dict(steps=1, batch_size=1, lr=1e-4, lambd=0.5)
_BAD = dict(steps=_bad_count, batch_size=_bad_count, lr=_bad_lr, lambd=_bad_lambd)


def _erase_with(**overrides):
    unet, sched, forget, retain = _setup()
    return fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, progress=False,
                    **{**_GOOD, **overrides})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arg=st.sampled_from(sorted(_BAD)), data=st.data())
def test_any_bad_scalar_names_its_argument_and_leaves_the_model_alone(arg, data):
    value = data.draw(_BAD[arg], label=arg)
    unet = _setup()[0]
    before, _ = _snapshot(unet)
    with pytest.raises(FastUnlearnError) as info:
        _erase_with(**{arg: value})
    assert str(info.value).startswith(f"{arg}: expected"), str(info.value)
    after, _ = _snapshot(unet)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.sets(st.sampled_from(sorted(_BAD)), min_size=1), data=st.data())
def test_several_bad_values_the_error_names_one_of_them(bad, data):
    overrides = {arg: data.draw(_BAD[arg], label=arg) for arg in sorted(bad)}
    with pytest.raises(FastUnlearnError) as info:
        _erase_with(**overrides)
    named = str(info.value).split(":", 1)[0]
    assert named in bad, (str(info.value), overrides)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-1e6, 1e6), span=st.floats(0.0, 1e6), n=st.integers(1, 3))
def test_images_outside_the_unit_range_are_rejected_or_accepted_exactly(lo, span, n):
    images = torch.linspace(lo, lo + span, n * 64, dtype=torch.float64).float().reshape(n, 1, 8, 8)
    inside = float(images.min()) >= -1.0 - 1e-4 and float(images.max()) <= 1.0 + 1e-4
    if inside:
        assert len(fu.DataPoints(images)) == n
    else:
        with pytest.raises(FastUnlearnError, match=r"^images: expected values in \[-1, 1\]"):
            fu.DataPoints(images)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(0, 8))
def test_label_count_must_match_image_count(n, m):
    if n == m:
        assert fu.DataPoints(torch.zeros(n, 1, 8, 8), labels=torch.zeros(m, dtype=torch.long)).labels.shape == (n,)
    else:
        with pytest.raises(FastUnlearnError, match=rf"^labels: expected an integer tensor of shape \[{n}\]"):
            fu.DataPoints(torch.zeros(n, 1, 8, 8), labels=torch.zeros(m, dtype=torch.long))


def test_a_pickled_model_folder_is_never_unpickled(tmp_path):
    """erase(model=PATH) on a folder whose only weights are a pickle refuses it without loading it."""
    unet, sched, forget, retain = _setup()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(_uncond_unet().to_json_string())
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Marker(str(marker)))
    pickle.loads(payload)  # the payload works: unpickling it creates the marker ...
    assert marker.exists()
    marker.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(payload)
    with pytest.raises(FastUnlearnError, match="safetensors"):
        fu.erase(folder, forget=forget, retain=retain, scheduler=sched, steps=1, progress=False)
    assert not marker.exists()  # ... and fastunlearn never unpickled it


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

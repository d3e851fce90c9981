"""The trainer: the loop's non-finite guard (skipped steps, the error after ``max_nonfinite`` in a row, the streak
carried over a resume) and the run's lifetimes (offload, runtime switches) released when a run fails."""
import math

import pytest
import torch

import fastunlearn as fu
from fastunlearn import runtime
from fastunlearn.errors import NonFiniteError
from fastunlearn.methods import REGISTRY, Method
from fastunlearn.models import digits_scheduler
from fastunlearn.trainer import all_finite, loop, make_optimizer


class _Scripted:
    """A method over one parameter whose gradient at step s is ``script[s]`` (NaN/inf make a bad step)."""

    name = "scripted"

    def __init__(self, script, loss=1.0):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.script, self.loss = script, loss

    def trainable_parameters(self):
        return [self.w]

    def step(self, step, gen):
        assert self.w.grad is None  # the loop zeroes the gradients before every step
        self.w.grad = torch.full((3,), float(self.script[step]))
        return {"loss": self.loss}


def _run(script, history=None, start=0, max_nonfinite=10):
    m = _Scripted(script)
    opt = make_optimizer("adam", m.trainable_parameters(), lr=0.1)
    history = loop(m, opt, len(script), seed=0, start_step=start, history=history, progress=False,
                   max_nonfinite=max_nonfinite)
    return m, history


def test_non_finite_steps_are_skipped_and_logged():
    nan, inf = float("nan"), float("inf")
    m, history = _run([1.0, nan, inf, 1.0])
    assert [h["skipped"] for h in history] == [False, True, True, False]
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert m.w.grad is None  # released after the loop
    only_good, _ = _run([1.0, 1.0])  # two optimizer steps: the skipped ones did not move the weights
    assert torch.equal(m.w, only_good.w)


def test_a_non_finite_loss_is_a_bad_step_too():
    m = _Scripted([1.0, 1.0], loss=float("nan"))
    opt = make_optimizer("adam", m.trainable_parameters(), lr=0.1)
    history = loop(m, opt, 2, seed=0, progress=False)
    assert all(h["skipped"] for h in history) and torch.equal(m.w, torch.zeros(3))


def test_too_many_bad_steps_in_a_row_stop_the_run():
    nan = float("nan")
    _run([nan, nan, 1.0, nan, nan], max_nonfinite=3)  # never three in a row
    with pytest.raises(NonFiniteError, match="3 steps in a row.*step 3"):
        _run([1.0, nan, nan, nan, 1.0], max_nonfinite=3)


def test_a_resumed_run_continues_the_skip_streak():
    nan = float("nan")
    _, history = _run([1.0, nan, nan], max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="3 steps in a row.*step 3"):
        _run([1.0, nan, nan, nan, 1.0], history=list(history), start=3, max_nonfinite=3)
    _, history = _run([1.0, nan, nan, 1.0, nan, 1.0], history=list(history), start=3, max_nonfinite=3)
    assert [h["skipped"] for h in history] == [False, True, True, False, True, False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_fused_guard_finds_one_bad_value_among_many(bad):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 300, 7)]
    for p in params:
        p.grad = torch.randn(p.shape)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient (unused parameter)
    assert all_finite({"loss": 1.0}, params)
    params[1].grad[123] = bad
    assert not all_finite({"loss": 1.0}, params)


def test_the_guard_takes_huge_finite_gradients_as_finite():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3e38)  # their 2-norm overflows fp32; the values are finite
    assert all_finite({}, [p]) and not all_finite({"loss": math.inf}, [p])
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    q.grad = torch.ones(4, dtype=torch.bfloat16)
    assert all_finite({}, [p, q])  # mixed dtypes
    r = torch.nn.Parameter(torch.zeros(5))
    r.grad = torch.ones(1).expand(5)  # autograd may hand back an expanded gradient: read, never written
    assert all_finite({}, [r])


class _StopsAt(_Scripted):
    """A scripted method whose stopping rule (``Method.done``) fires after ``at`` steps."""

    def __init__(self, script, at):
        super().__init__(script)
        self.at, self.asked = at, []

    def done(self, step_done, history):
        self.asked.append(step_done)
        assert len(history) == step_done  # the rule sees every step taken so far
        return step_done >= self.at


def test_a_stopping_rule_ends_the_loop_before_the_cap():
    m = _StopsAt([1.0] * 6, at=3)
    opt = make_optimizer("adam", m.trainable_parameters(), lr=0.1)
    ends = []
    history = loop(m, opt, 6, seed=0, progress=False, on_step_end=lambda step, h: ends.append(step))
    assert len(history) == 3 and history[-1]["stopped"] and not any(h.get("stopped") for h in history[:-1])
    assert ends == [1, 2, 3] and m.asked == [1, 2, 3]  # the hooks (checkpoints) see the stopping step
    w = m.w.detach().clone()
    assert loop(m, opt, 6, seed=0, start_step=3, history=history, progress=False) is history  # resumed: done
    assert len(history) == 3 and torch.equal(m.w, w)
    m = _StopsAt([1.0] * 3, at=3)
    history = loop(m, make_optimizer("adam", m.trainable_parameters(), lr=0.1), 3, seed=0, progress=False)
    assert len(history) == 3 and not any(h.get("stopped") for h in history) and m.asked == [1, 2]  # the cap
    m = _StopsAt([1.0] * 5, at=1)
    history = loop(m, make_optimizer("adam", m.trainable_parameters(), lr=0.1), 5, seed=0, progress=False,
                   agree=lambda flag: False)  # data parallel: process 0 said go on
    assert len(history) == 5


# ------------------------------------------------------------------------------------------ lifetimes
class _FailsAtStep1(Method):
    name = "_fails"
    targets = ("classes",)
    defaults = dict(steps=3, batch_size=1)

    def trainable_parameters(self):
        return self.run.trainable_parameters()

    def step(self, step, gen):
        if step == 1:
            raise RuntimeError("boom")
        for p in self.trainable_parameters():
            p.grad = torch.zeros_like(p)
        return {"loss": 0.0}


def _class_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10)


def test_a_failing_run_releases_what_it_switched_on(monkeypatch):
    monkeypatch.setitem(REGISTRY, "_fails", _FailsAtStep1)
    restored, seen = [], []

    class Offload(runtime.InputOffload):
        def restore(self):
            restored.append(True)
            super().restore()

    monkeypatch.setattr(runtime, "InputOffload", Offload)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with pytest.raises(RuntimeError, match="boom"):
            fu.erase(_class_unet(), forget=fu.Classes([3]), method="_fails", scheduler=digits_scheduler(),
                     precision="bf16", tf32=True, progress=False, callback=lambda step, view: seen.append(view.model))
        assert restored == [True]  # the input offload was undone
        assert torch.backends.cuda.matmul.allow_tf32 is False  # TF32 flags restored
        (model,) = seen  # the model in training, seen after step 0: the autocast hooks are gone, frozen weights fp32
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def test_a_finished_run_records_its_settings():
    unet = _class_unet()
    res = fu.erase(unet, forget=fu.Classes([3]), method="esd", scheduler=digits_scheduler(), steps=2, batch_size=2,
                   ddim_steps=2, progress=False)
    assert (res.meta["steps"], res.meta["batch_size"], res.meta["skipped_steps"]) == (2, 2, 0)
    assert res.meta["max_steps"] == 2  # steps: those run; max_steps: the cap (a stopping rule may end earlier)
    assert [h["step"] for h in res.history] == [0, 1] and res.meta["runtime"]["precision"] == "fp32"
    assert res.meta["forgotten"] == {"kind": "classes", "ids": [3], "override": None}

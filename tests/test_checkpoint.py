"""Checkpoints and exact resume (issue 7): a run killed at any moment, resumed, ends with the same
weights as an uninterrupted run, bitwise, on CPU."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastunlearn as fu
from fastunlearn.checkpoint import CHECKPOINTS, flatten, list_checkpoints, step_of, unflatten
from fastunlearn.errors import FastUnlearnError, InvalidArgumentError
from helpers.runs import crash_at, digits_split

TESTS = Path(__file__).resolve().parent


def _split():
    return digits_split(40, 200)


def _model():
    """The tiny class-conditional UNet with fixed weights (a function, so that the killed subprocess builds it too)."""
    from fastunlearn.models import digits_scheduler
    from helpers.models import tiny_unet

    torch.manual_seed(0)
    return tiny_unet(), digits_scheduler()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"weights differ at {k}"


def _same_history(h1, h2):
    strip = lambda h: [{k: v for k, v in d.items() if k != "seconds"} for d in h]  # noqa: E731
    return strip(h1) == strip(h2)


# ------------------------------------------------------------------------------------ the SIGKILL test
_VICTIM = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import fastunlearn as fu
    from fastunlearn.methods import REGISTRY
    from test_checkpoint import _model, _split

    out, steps = sys.argv[1], int(sys.argv[2])
    siss = REGISTRY["siss"]
    original = siss.step

    def slow_step(self, step, gen):  # slows the run so the parent can kill it mid-way; numerics untouched
        time.sleep(0.15)
        return original(self, step, gen)

    siss.step = slow_step
    unet, sched = _model()
    forget, retain = _split()
    fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, steps=steps, batch_size=4,
             output_dir=out, checkpoint_every=1, progress=False)
    print("FINISHED")
""")


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path, one_thread):
    steps = 24
    script = tmp_path / "victim.py"
    script.write_text(_VICTIM.format(tests=str(TESTS)))
    out = tmp_path / "run"
    env = {**os.environ, "FASTUNLEARN_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            done = [step_of(p) for p in list_checkpoints(out)]
            if done and max(done) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(0.07)  # land anywhere in the next step: mid-compute or mid-checkpoint-write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(step_of(p) for p in list_checkpoints(out))
    assert 3 <= killed_at < steps, "the run finished before it was killed; the test proves nothing"

    unet, sched = _model()
    forget, retain = _split()
    kw = dict(forget=forget, retain=retain, method="siss", scheduler=sched, steps=steps, batch_size=4,
              progress=False)
    resumed = fu.erase(unet, output_dir=out, checkpoint_every=1, resume=True, **kw)
    assert resumed.meta["resumed_from_step"] == killed_at
    reference = fu.erase(unet, **kw)
    _assert_same_weights(resumed.model, reference.model)
    assert _same_history(resumed.history, reference.history)
    assert [step_of(p) for p in list_checkpoints(out)] == [steps, steps - 1]  # the last 2 are kept
    assert not [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".")]  # no temporaries left


# ------------------------------------------------------------------------------------ in-process crashes



# Every registered method with its defaults: tests/test_methods_contract.py. Here the settings with state of
# their own.
@pytest.mark.parametrize("method,extra", [
    ("neggrad", {"superfactor_decay": 0.9}),
    ("siss", {"norm_every": 3}),          # method state (the lagged ‖g_a‖) must come back too
    ("siss", {"lora_rank": 2}),           # LoRA adapter weights only
    ("siss", {"optimizer": "adamw8bit"}),  # bitsandbytes state: nested dicts, int step
])
def test_crash_and_resume_matches_uninterrupted(tmp_path, monkeypatch, method, extra):
    unet, sched = _model()
    forget, retain = _split()
    kw = dict(forget=forget, retain=retain, method=method, scheduler=sched, steps=5, batch_size=2,
              progress=False, **extra)
    torch.manual_seed(1)
    reference = fu.erase(unet, **kw)
    torch.manual_seed(7)  # the global RNG state must not matter (LoRA adapters start from `seed`)
    undo = crash_at(monkeypatch, method, at_step=3)
    with pytest.raises(KeyboardInterrupt):
        fu.erase(unet, output_dir=tmp_path, checkpoint_every=2, **kw)
    undo()
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [2]
    torch.manual_seed(2)  # a different global RNG state on resume must not matter
    resumed = fu.erase(unet, output_dir=tmp_path, resume=True, **kw)  # checkpoint_every comes from the run
    assert resumed.meta["resumed_from_step"] == 2
    _assert_same_weights(resumed.model, reference.model)
    assert _same_history(resumed.history, reference.history)
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [5, 4]


def test_optimizer_state_round_trips_exactly():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        p.grad = torch.randn(3, 4)
        opt.step()
    tensors = {}
    tree = json.loads(json.dumps(flatten(opt.state_dict(), tensors), allow_nan=False))
    back = unflatten(tree, tensors)
    sd = opt.state_dict()
    assert back["param_groups"] == sd["param_groups"]  # tuples (betas) and ints stay what they were
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0]
    for k, v in sd["state"][0].items():
        assert torch.equal(back["state"][0][k], v) and back["state"][0][k].dtype == v.dtype
    assert float(back["state"][0]["step"]) == 3.0
    nested = {"a": [1, 2.5, float("nan"), float("-inf")], 7: (None, "x"), "__odd": True}
    t = {}
    out = unflatten(json.loads(json.dumps(flatten(nested, t), allow_nan=False)), t)
    assert out[7] == (None, "x") and out["__odd"] is True and out["a"][:2] == [1, 2.5]
    assert out["a"][2] != out["a"][2] and out["a"][3] == float("-inf")


# ------------------------------------------------------------------------------------ what is resumed from
def _run(unet, sched, steps=4, **kw):
    forget, retain = _split()
    return fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, steps=steps, batch_size=2,
                    progress=False, **kw)


def test_partial_and_corrupt_checkpoints_are_ignored(tmp_path):
    unet, sched = _model()
    reference = _run(unet, sched)
    _run(unet, sched, output_dir=tmp_path, checkpoint_every=1, keep_checkpoints=4)
    root = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    # step 4: the weights file truncated (size no longer matches state.json) -> incomplete
    w = root / "step-00000004" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    # step 3: same size, garbage content -> unreadable; skipped with a warning
    s = root / "step-00000003" / "state.safetensors"
    s.write_bytes(b"\0" * s.stat().st_size)
    # a killed writer's temporary folder and a newer step without state.json
    (root / ".step-00000009.tmp-4242").mkdir()
    (root / ".step-00000009.tmp-4242" / "weights.safetensors").write_bytes(b"partial")
    (root / "step-00000008").mkdir()
    (root / "step-00000008" / "weights.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="state.safetensors"):
        resumed = _run(unet, sched, output_dir=tmp_path, resume=True)
    assert resumed.meta["resumed_from_step"] == 2
    _assert_same_weights(resumed.model, reference.model)
    assert not (root / ".step-00000009.tmp-4242").exists()


def test_existing_checkpoints_are_never_overwritten_without_resume(tmp_path):
    unet, sched = _model()
    _run(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=1)
    before = {p.name: (p / "state.json").read_bytes() for p in list_checkpoints(tmp_path)}
    with pytest.raises(InvalidArgumentError, match="output_dir.*resume=True"):
        _run(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=1)
    assert {p.name: (p / "state.json").read_bytes() for p in list_checkpoints(tmp_path)} == before


def test_resume_with_different_settings_names_them(tmp_path):
    unet, sched = _model()
    _run(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(InvalidArgumentError, match="resume.*lr"):
        _run(unet, sched, steps=2, output_dir=tmp_path, resume=True, lr=3e-4)
    with pytest.raises(InvalidArgumentError, match="resume.*options"):
        _run(unet, sched, steps=2, output_dir=tmp_path, resume=True, lambd=0.3)
    with pytest.raises(InvalidArgumentError, match="steps"):
        _run(unet, sched, steps=1, output_dir=tmp_path, resume=True)
    other, _ = _model()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(InvalidArgumentError, match="resume.*model"):
        _run(other, sched, steps=2, output_dir=tmp_path, resume=True)


def test_resume_without_checkpoints_starts_fresh_and_finished_runs_return_at_once(tmp_path):
    unet, sched = _model()
    reference = _run(unet, sched, steps=3)
    fresh = _run(unet, sched, steps=3, output_dir=tmp_path, resume=True, checkpoint_every=3)
    assert fresh.meta["resumed_from_step"] is None
    _assert_same_weights(fresh.model, reference.model)
    again = _run(unet, sched, steps=3, output_dir=tmp_path, resume=True)  # already at step 3: nothing to train
    assert again.meta["resumed_from_step"] == 3 and len(again.history) == 3
    _assert_same_weights(again.model, reference.model)


def test_resume_with_more_steps_continues_the_run(tmp_path):
    unet, sched = _model()
    reference = _run(unet, sched, steps=4)
    _run(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=2)
    longer = _run(unet, sched, steps=4, output_dir=tmp_path, resume=True)
    _assert_same_weights(longer.model, reference.model)


def test_result_saved_next_to_its_checkpoints(tmp_path):
    """The CLI saves the result into --out, which holds the run's checkpoints: both must survive."""
    unet, sched = _model()
    res = _run(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=1)
    res.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "checkpoints", "fastunlearn.json", "scheduler", "unet"]
    _assert_same_weights(fu.load(tmp_path).model, res.model)
    assert len(list_checkpoints(tmp_path)) == 2
    with pytest.raises(FastUnlearnError, match="exists"):  # now a result: never replaced silently
        res.save(tmp_path)


def test_cli_resume_continues_a_killed_run(tmp_path, monkeypatch):
    from fastunlearn.cli import main

    common = ["erase", "--model", "digits", "--classes", "3", "--method", "siss", "--batch-size", "2", "--steps", "3",
              "--no-progress"]
    run = tmp_path / "run"
    undo = crash_at(monkeypatch, "siss", at_step=2)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--out", str(run), "--checkpoint-every", "1"])
    undo()
    assert [step_of(p) for p in list_checkpoints(run)] == [2, 1] and not (run / "fastunlearn.json").exists()
    main(common + ["--out", str(run), "--resume"])  # checkpoint frequency comes from the checkpoints
    meta = json.loads((run / "fastunlearn.json").read_text())
    assert meta["resumed_from_step"] == 2 and len(meta["history"]) == 3
    assert [step_of(p) for p in list_checkpoints(run)] == [3, 2]
    main(common + ["--out", str(tmp_path / "ref")])
    _assert_same_weights(fu.load(run).model, fu.load(tmp_path / "ref").model)

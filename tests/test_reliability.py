"""Reliability (issue 7): atomic outputs, numerical guards and safe loading."""
import errno
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import fastunlearn as fu
import fastunlearn.result as result_mod
from fastunlearn.checkpoint import CHECKPOINTS, list_checkpoints, step_of
from fastunlearn.errors import CorruptResultError, InvalidArgumentError, MissingFileError, NonFiniteError, WriteError
from fastunlearn.methods import REGISTRY
from helpers.runs import crash_at, digits_split
from helpers.models import tiny_unet


def _tiny():
    from fastunlearn.models import digits_scheduler

    torch.manual_seed(0)
    return tiny_unet(), digits_scheduler()


def _split():
    return digits_split(16, 64)


def _result():
    """A Result without training (saving and loading do not care how the weights were made)."""
    unet, sched = _tiny()
    return fu.Result(model=unet, scheduler=sched, method="siss", options={"lambd": 0.5},
                     history=[{"step": 0, "loss": 1.0, "skipped": False}], meta={"seconds": 0.0})


def _tree(root: Path):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _no_temporaries(folder: Path):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ================================================================================= atomic outputs
def test_an_existing_file_is_never_replaced(tmp_path):
    target = tmp_path / "result"
    target.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(InvalidArgumentError, match="is a file"):
            _result().save(target, overwrite=overwrite)
        assert target.read_text() == "precious"
    assert _no_temporaries(tmp_path)


def test_an_existing_folder_needs_overwrite(tmp_path):
    target = tmp_path / "result"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    before = _tree(target)
    with pytest.raises(InvalidArgumentError, match="exists; pass overwrite=True"):
        _result().save(target)
    assert _tree(target) == before
    res = _result()
    res.save(target, overwrite=True)
    assert _same_weights(fu.load(target).model, res.model) and not (target / "notes.txt").exists()
    assert _no_temporaries(tmp_path)


def _failing_after_partial_write(err):
    def save_model(model, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")  # partial output
        raise OSError(err, os.strerror(err))
    return save_model


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_names_the_path_and_leaves_nothing(tmp_path, monkeypatch, err):
    monkeypatch.setattr(result_mod, "_save_model", _failing_after_partial_write(err))
    target = tmp_path / "out" / "result"
    with pytest.raises(WriteError) as info:
        _result().save(target)
    assert str(target) in str(info.value) and os.strerror(err) in str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == err
    assert not target.exists() and _no_temporaries(tmp_path / "out")


def test_a_failed_overwrite_keeps_the_previous_result(tmp_path, monkeypatch):
    target = tmp_path / "result"
    old = _result()
    old.save(target)
    before = _tree(target)
    monkeypatch.setattr(result_mod, "_save_model", _failing_after_partial_write(errno.ENOSPC))
    new = _result()
    with torch.no_grad():
        next(new.model.parameters()).add_(1.0)
    with pytest.raises(WriteError, match="No space left"):
        new.save(target, overwrite=True)
    assert _tree(target) == before and _no_temporaries(tmp_path)


def test_a_failed_final_rename_puts_the_previous_result_back(tmp_path, monkeypatch):
    target = tmp_path / "result"
    _result().save(target)
    before = _tree(target)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name and Path(dst) == target:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=re.escape(str(target))):
        _result().save(target, overwrite=True)
    monkeypatch.undo()
    assert _tree(target) == before and _no_temporaries(tmp_path)


def test_an_unwritable_parent_gives_a_clear_error(tmp_path, monkeypatch):
    import tempfile

    def mkdtemp(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(WriteError, match="Permission denied"):
        _result().save(tmp_path / "result")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions; the monkeypatched failures above cover this")
def test_a_read_only_folder_gives_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=re.escape(str(ro / "result"))):
            _result().save(ro / "result")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    unet, sched = _tiny()
    forget, retain = _split()
    real_save = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if "step-00000002" in filename and filename.endswith("state.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(WriteError, match=r"checkpoint: could not write .*step-00000002.*No space left"):
        fu.erase(unet, forget=forget, retain=retain, scheduler=sched, steps=3, batch_size=2, progress=False,
                 output_dir=tmp_path, checkpoint_every=1)
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [1]
    assert _no_temporaries(tmp_path / CHECKPOINTS)


# ================================================================================= numerical guards
def _inject(monkeypatch, bad_steps, how):
    """Wrap SISS's step so that the listed steps produce a NaN gradient, a NaN loss or NaN weights."""
    cls = REGISTRY["siss"]
    original = cls.step

    def step(self, s, gen):
        stats = original(self, s, gen)
        if s in bad_steps:
            p = self.trainable_parameters()[0]
            if how == "grad":
                p.grad.view(-1)[0] = float("nan")
            elif how == "loss":
                stats = {**stats, "loss": float("inf")}
            elif how == "weights":
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(cls, "step", step)


def _erase(unet, sched, **kw):
    forget, retain = _split()
    return fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, batch_size=2,
                    progress=False, **kw)


def test_nonfinite_steps_are_skipped_counted_and_the_result_saves(tmp_path, monkeypatch):
    unet, sched = _tiny()
    reference = _erase(unet, sched, steps=1)  # steps 1..3 below are all skipped: no update after step 0
    _inject(monkeypatch, bad_steps={1, 3}, how="grad")
    monkeypatch.setattr(REGISTRY["siss"], "step", _wrap_loss(REGISTRY["siss"].step, {2}))
    res = _erase(unet, sched, steps=4, max_nonfinite=5)
    assert [h["skipped"] for h in res.history] == [False, True, True, True]
    assert res.meta["skipped_steps"] == 3
    assert _same_weights(res.model, reference.model)
    out = res.save(tmp_path / "r")
    meta = json.loads((out / "fastunlearn.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert meta["skipped_steps"] == 3 and meta["history"][2]["loss"] == "inf" and meta["history"][2]["skipped"]
    assert fu.load(out).meta["skipped_steps"] == 3


def _wrap_loss(step_fn, bad):
    def step(self, s, gen):
        stats = step_fn(self, s, gen)
        return {**stats, "loss": float("inf")} if s in bad else stats
    return step


def test_too_many_nonfinite_steps_in_a_row_abort(monkeypatch):
    unet, sched = _tiny()
    _inject(monkeypatch, bad_steps=set(range(1, 20)), how="grad")
    with pytest.raises(NonFiniteError, match=r"3 steps in a row .*last at step 3"):
        _erase(unet, sched, steps=20, max_nonfinite=3)


def test_the_nonfinite_streak_survives_a_resume(tmp_path, monkeypatch):
    """Steps 2, 3, ... are non-finite; killed after step 3, the resumed run still aborts at step 4."""
    unet, sched = _tiny()
    _inject(monkeypatch, bad_steps=set(range(2, 20)), how="grad")
    undo = crash_at(monkeypatch, "siss", at_step=4)  # on top of the poisoned step
    with pytest.raises(KeyboardInterrupt):
        _erase(unet, sched, steps=20, max_nonfinite=3, output_dir=tmp_path, checkpoint_every=1)
    undo()
    with pytest.raises(NonFiniteError, match=r"last at step 4"):
        _erase(unet, sched, steps=20, max_nonfinite=3, output_dir=tmp_path, resume=True)


def test_nonfinite_weights_are_never_checkpointed_or_saved(tmp_path, monkeypatch):
    unet, sched = _tiny()
    _inject(monkeypatch, bad_steps={2}, how="weights")
    with pytest.raises(NonFiniteError, match=r"checkpoint: parameter .* non-finite at step 3"):
        _erase(unet, sched, steps=4, output_dir=tmp_path, checkpoint_every=1)
    kept = list_checkpoints(tmp_path)
    assert [step_of(p) for p in kept] == [2, 1]
    from safetensors.torch import load_file

    for p in kept:
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "weights.safetensors")).values())
    res = _result()
    with torch.no_grad():
        next(res.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        res.save(tmp_path / "nan_result")
    assert not (tmp_path / "nan_result").exists() and _no_temporaries(tmp_path)


# ================================================================================= safe loading
@pytest.fixture
def saved(tmp_path):
    res = _result()
    return res, res.save(tmp_path / "result")


def test_truncated_weights_name_the_file(saved):
    _, path = saved
    f = path / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptResultError, match=r"diffusion_pytorch_model\.safetensors: corrupt or truncated"):
        fu.load(path)


def test_weights_of_another_model_name_the_file(saved, tmp_path):
    _, path = saved
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CorruptResultError, match=r"diffusion_pytorch_model\.safetensors: weights do not match"):
        fu.load(path)


@pytest.mark.parametrize("content", [b'{"method": "siss", "opt', b"\xff\xfe\x00binary", b"[1, 2]"])
def test_corrupt_metadata_names_the_file(saved, content):
    _, path = saved
    (path / "fastunlearn.json").write_bytes(content)
    with pytest.raises(CorruptResultError, match=r"fastunlearn\.json: corrupt"):
        fu.load(path)


def test_corrupt_model_config_and_scheduler_name_the_file(saved):
    _, path = saved
    cfg = path / "unet" / "config.json"
    good = cfg.read_bytes()
    cfg.write_bytes(good[:40])
    with pytest.raises(CorruptResultError, match=r"unet/config\.json: unreadable"):
        fu.load(path)
    cfg.write_text(json.dumps({**json.loads(good), "_class_name": "DDPMScheduler"}))
    with pytest.raises(CorruptResultError, match=r"unet/config\.json: .*not a diffusers model"):
        fu.load(path)
    cfg.write_bytes(good)
    (path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CorruptResultError, match="scheduler"):
        fu.load(path)


def test_missing_pieces_name_the_file(saved, tmp_path):
    _, path = saved
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"diffusion_pytorch_model\.safetensors: missing"):
        fu.load(path)
    with pytest.raises(MissingFileError, match="not a result folder"):
        fu.load(tmp_path / "nothing_here")
    (path / "fastunlearn.json").unlink()
    with pytest.raises(MissingFileError, match=r"fastunlearn\.json: missing"):
        fu.load(path)


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(folder: Path, marker: Path):
    payload = pickle.dumps(_Marker(str(marker)))
    for rel in ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.pt", "model.pt",
                "pytorch_model.bin", "scheduler/scheduler.pkl", "optimizer.pt", "fastunlearn.pkl"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(payload)
    return payload


def test_planted_pickles_are_never_executed(saved, tmp_path, monkeypatch):
    res, path = saved
    marker = tmp_path / "PWNED"
    payload = _plant(path, marker)
    pickle.loads(payload)  # the payload is live: unpickling it creates the marker ...
    assert marker.exists()
    marker.unlink()
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called by fastunlearn.load"))
    back = fu.load(path)
    assert _same_weights(back.model, res.model)
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # now only the pickles are left
    with pytest.raises(MissingFileError, match="only loads safetensors"):
        fu.load(path)
    assert not marker.exists()  # ... and loading never executed it
    assert torch.load is not torch_load  # the guard was in place throughout


def test_planted_pickles_in_checkpoints_are_never_executed(tmp_path):
    unet, sched = _tiny()
    _erase(unet, sched, steps=2, output_dir=tmp_path, checkpoint_every=1)
    marker = tmp_path / "PWNED"
    for ckpt in list_checkpoints(tmp_path):
        _plant(ckpt, marker)
    res = _erase(unet, sched, steps=3, output_dir=tmp_path, resume=True)
    assert res.meta["resumed_from_step"] == 2 and not marker.exists()


def test_a_truncated_lora_adapter_names_the_file(tmp_path):
    unet, sched = _tiny()
    res = _erase(unet, sched, steps=1, lora_rank=2)
    path = res.save(tmp_path / "lora_result")
    adapter = path / "pytorch_lora_weights.safetensors"
    fu.load(path, base=unet)  # intact: the adapter loads onto its base
    adapter.write_bytes(adapter.read_bytes()[:200])
    with pytest.raises(CorruptResultError, match=r"pytorch_lora_weights\.safetensors: corrupt"):
        fu.load(path, base=unet)

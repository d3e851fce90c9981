"""The benchmark runner: which methods it picks, what each gets, the memory meter, and one tiny full run."""
import json

import pytest
import torch

import fastunlearn as fu
from fastunlearn import bench
from fastunlearn.methods import REGISTRY
from fastunlearn.methods.base import Method


class _ConceptOnly(Method):
    name = "concept-only-test"
    targets = ("concept",)


def test_every_registered_method_that_fits_a_setting_is_picked():
    for name, cls in REGISTRY.items():
        takes_images_or_classes = bool({"classes", "datapoints"} & set(cls.targets))
        assert bench.fits(cls, "class") == takes_images_or_classes, name
        assert bench.fits(cls, "data") == ("datapoints" in cls.targets), name
    assert not bench.fits(_ConceptOnly, "class") and not bench.fits(_ConceptOnly, "data")


def test_targets_follow_what_each_method_takes():
    for name, cls in REGISTRY.items():
        if not bench.fits(cls, "class"):
            continue
        forget, retain, judge = bench.targets("class", cls)
        assert judge.ids == [bench.FORGET_CLASS]
        if isinstance(forget, fu.DataPoints):
            assert (forget.labels == bench.FORGET_CLASS).all() and len(forget) == 183
        else:
            assert isinstance(forget, fu.Classes) and forget.ids == [bench.FORGET_CLASS]
        if cls.needs_retain:  # methods that need retain images get the other 1,614 real digits
            assert isinstance(retain, fu.DataPoints) and len(retain) == 1797 - 183
            assert not (retain.labels == bench.FORGET_CLASS).any()
        elif isinstance(retain, fu.Classes):
            assert bench.FORGET_CLASS not in retain.ids
    forget, retain, _ = bench.targets("data", REGISTRY["siss"])
    assert torch.equal(forget.images, fu.zoo.outlier_image()) and len(retain) == 1797


def test_peak_rss_sees_an_allocation():
    with bench.PeakRSS() as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x.add_(1)
        del x
    assert mem.used >= 48 * 2**20


def test_tiny_bench_writes_json_markdown_and_plots(tmp_path):
    methods = ["naive", "siss"]
    doc = bench.run_bench(out=tmp_path, methods=methods, isolate=False, steps=1, n_per_class=2, n_samples=8,
                          num_inference_steps=1, log=lambda *_: None)
    for f in ("bench.json", "bench.md", "bench.png", "bench_samples.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == doc["rows"]
    for setting in bench.SETTINGS:
        rows = {r["model"]: r for r in doc["rows"] if r["setting"] == setting}
        assert set(rows) == {"original", "retrain", *methods}
        for name in methods:
            r = rows[name]
            assert "error" not in r, r
            assert r["steps"] == 1 and r["seconds"] > 0 and r["peak_memory_mb"] >= 0
        assert rows["retrain"]["steps"] == 4000 and rows["retrain"]["seconds"] > 60  # the committed reference
        key = "forget_rate" if setting == "class" else "near_copy_rate"
        assert all(0 <= r[key] <= 1 for r in rows.values())
    md = (tmp_path / "bench.md").read_text()
    assert "retrained from scratch" in md and "`siss`" in md and "near-copy rate" in md


def test_bench_reports_a_failing_method_and_goes_on(tmp_path, monkeypatch):
    def broken(name, setting, proto, threads=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "run_method", broken)
    doc = bench.run_bench(out=tmp_path, methods=["naive"], settings=("data",), isolate=False, n_samples=4,
                          num_inference_steps=1, log=lambda *_: None)
    row = [r for r in doc["rows"] if r["model"] == "naive"][0]
    assert row["error"] == "RuntimeError: boom"
    assert "error: RuntimeError: boom" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("setting", bench.SETTINGS)
def test_retrain_in_run_leaves_out_the_forgotten_data(setting, monkeypatch):
    from fastunlearn.zoo import recipe

    seen = {}
    real = recipe.train_unet

    def spy(images, labels, class_conditional, steps, batch, seed, log):
        seen.update(images=images, labels=labels, class_conditional=class_conditional)
        return real(images, labels, class_conditional, steps, batch, seed, log)

    monkeypatch.setattr(recipe, "train_unet", spy)
    unet, sched, rec = bench.retrain(setting, steps=1, batch=4)
    assert rec["steps"] == 1 and rec["seconds"] > 0
    if setting == "class":
        assert seen["class_conditional"] and not (seen["labels"] == bench.FORGET_CLASS).any()
        assert len(seen["images"]) == 1797 - 183
    else:  # the plain digits: no copy of the glyph
        assert not seen["class_conditional"] and len(seen["images"]) == 1797
        d = (seen["images"] - fu.zoo.outlier_image()).pow(2).flatten(1).mean(1)
        assert d.min() > 0.1


def test_bench_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        bench.run_bench(out=tmp_path, methods=["nope"], isolate=False)


def test_committed_retrained_references_load():
    for setting in bench.SETTINGS:
        folder = bench.retrained_folder(setting)
        rec = json.loads((folder / "training.json").read_text())
        assert rec["steps"] == 4000 and rec["batch"] == 128
        from fastunlearn.models import load_unet

        unet = load_unet(folder)
        assert (unet.config.num_class_embeds is not None) == (setting == "class")


def test_cli_bench_help(capsys):
    from fastunlearn.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--retrain-steps" in out

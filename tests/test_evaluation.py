"""Evaluation: evaluate() on tiny models (numbers, files, determinism), its argument checks, the CLI."""
import json
import pytest
import torch

import fastunlearn as fu
from fastunlearn.metrics import NEAR_COPY_MSE
from fastunlearn.models import digits_scheduler
from helpers.models import tiny_unet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ evaluate
def _tiny_result(forget):
    base = tiny_unet()
    data = fu.datasets.digits()
    res = fu.erase(base, forget=forget, retain=fu.DataPoints(data.images[:64], labels=data.labels[:64]),
                   method="siss", scheduler=digits_scheduler(), steps=2, batch_size=4, progress=False)
    return base, res


def test_evaluate_class_model_writes_png_and_json(tmp_path):
    data = fu.datasets.digits([3])
    forget = fu.DataPoints(data.images[:8], labels=data.labels[:8])
    base, res = _tiny_result(forget)
    r = fu.evaluate(res, before=base, n_per_class=3, num_inference_steps=2, out=tmp_path / "ev")
    assert r["kind"] == "class" and r["forgotten_classes"] == [3]
    for side in ("before", "after"):
        m = r[side]
        assert sorted(m["recognition"]) == list(range(10)) and 0 <= m["forget_rate"] <= 1
        assert 0 <= m["retain_rate"] <= 1 and 0 <= m["near_copy_rate"] <= 1
        assert m["fd_forget"] > 0 and m["fd_retain"] > 0 and len(m["fd"]) == 10
    assert 0 <= r["retain_ratio_mean"]
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["after"]["forget_rate"] == r["after"]["forget_rate"]
    assert saved["settings"]["n_per_class"] == 3 and saved["settings"]["near_copy_mse"] == NEAR_COPY_MSE
    assert (tmp_path / "ev" / "before_after.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (tmp_path / "ev").iterdir() if ".tmp" in p.name]  # atomic writes leave nothing behind


def test_evaluate_is_deterministic_and_sees_a_changed_model():
    base = tiny_unet()
    sched = digits_scheduler()
    a = fu.evaluate(base, scheduler=sched, forget=fu.Classes([3]), before=False, n_per_class=3,
                    num_inference_steps=2)
    b = fu.evaluate(base, scheduler=sched, forget=fu.Classes([3]), before=False, n_per_class=3,
                    num_inference_steps=2)
    assert a["after"] == b["after"]
    other = tiny_unet()  # different random weights
    c = fu.evaluate(other, scheduler=sched, forget=fu.Classes([3]), before=False, n_per_class=3,
                    num_inference_steps=2)
    assert c["after"]["fd"] != a["after"]["fd"]


def test_evaluate_data_unlearning_on_unconditional_model(tmp_path):
    sched = digits_scheduler()
    model = tiny_unet(class_conditional=False)
    glyph = fu.zoo.outlier_image()
    r = fu.evaluate(model, scheduler=sched, before=model, forget=fu.DataPoints(glyph), n_samples=12,
                    num_inference_steps=2, out=tmp_path)
    assert r["kind"] == "data"
    for side in ("before", "after"):
        assert 0 <= r[side]["near_copy_rate"] <= 1 and 0 <= r[side]["recognisable_rate"] <= 1
    assert r["before"] == r["after"]  # same model, same seeds: same numbers
    assert (tmp_path / "before_after.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_without_base_model_draws_after_only(tmp_path):
    model = tiny_unet()
    r = fu.evaluate(model, scheduler=digits_scheduler(), n_per_class=2, num_inference_steps=1, out=tmp_path)
    assert "before" not in r and r["forgotten"] is None
    assert (tmp_path / "before_after.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_per_class"):
        fu.evaluate(tiny_unet(), scheduler=digits_scheduler(), n_per_class=1)
    with pytest.raises(TypeError, match="result"):
        fu.evaluate(42)
    with pytest.raises(ValueError, match="classifier"):
        from diffusers import UNet2DModel
        big = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                          block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
        fu.evaluate(big, scheduler=digits_scheduler(), n_samples=2, num_inference_steps=1)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_eval_saved_result_end_to_end(tmp_path, capsys):
    from fastunlearn.cli import main

    base_dir = tmp_path / "base"
    tiny_unet().save_pretrained(base_dir)
    digits_scheduler().save_pretrained(base_dir)
    data = fu.datasets.digits()
    res = fu.erase(str(base_dir), forget=fu.DataPoints(data.images[data.labels == 3][:6], labels=torch.full((6,), 3)),
                   retain=fu.DataPoints(data.images[:40], labels=data.labels[:40]), method="siss", steps=2,
                   batch_size=4, progress=False)
    res.save(tmp_path / "result")
    main(["eval", str(tmp_path / "result"), "--n-per-class", "2", "--num_inference_steps", "2"])
    printed = capsys.readouterr().out
    assert "forget_rate" in printed and "before" in printed and "metrics.json" in printed
    m = json.loads((tmp_path / "result" / "eval" / "metrics.json").read_text())
    assert m["method"] == "siss" and m["base_model"] == str(base_dir.resolve())
    assert m["forgotten"]["n"] == 6 and "near_copy_rate" in m["after"] and "before" in m
    assert m["after"]["forget_rate"] is not None and m["before"]["recognition"].keys() == m["after"]["recognition"].keys()
    assert (tmp_path / "result" / "eval" / "before_after.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_eval_missing_folder_is_a_clear_error(tmp_path, capsys):
    from fastunlearn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "nope")])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err

"""Evaluation: the metrics against closed forms and constructed data, evaluate() files, provenance, the CLI."""
import json
import pytest
import torch

import fastunlearn as fu
from fastunlearn.evaluation import (_decode_images, describe_forget, frechet_distance, frechet_from_stats,
                                    nearest_mse)
from fastunlearn.metrics import NEAR_COPY_MSE, near_copy_rate
from fastunlearn.models import digits_scheduler

def tiny_unet(class_conditional=True):
    """A random tiny 8x8 UNet (the conftest's, which --import-mode=importlib keeps from being imported)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11 if class_conditional else None)
    if class_conditional:
        unet.register_to_config(fastunlearn_null_class=10)
    return unet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ Fréchet distance
def _random_spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_diagonal_gaussians_closed_form():
    # Commuting (diagonal) covariances: FD = ‖μ1 − μ2‖² + Σ_i (σ1_i − σ2_i)².
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).pow(2).sum() + (var1.sqrt() - var2.sqrt()).pow(2).sum())
    got = frechet_from_stats(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_against_identity_closed_form():
    # Σ1 = I: tr (Σ1 Σ2)^{1/2} = tr Σ2^{1/2} = Σ sqrt(eigenvalues of Σ2), independent of the rotation of Σ2.
    gen = torch.Generator().manual_seed(1)
    s2 = _random_spd(5, gen)
    mu = torch.randn(5, generator=gen, dtype=torch.float64)
    expected = float(mu.pow(2).sum() + 5 + s2.trace() - 2 * torch.linalg.eigvalsh(s2).sqrt().sum())
    assert frechet_from_stats(torch.zeros(5), torch.eye(5, dtype=torch.float64), mu, s2) == pytest.approx(
        expected, rel=1e-9)


def test_frechet_is_symmetric_and_zero_on_itself():
    gen = torch.Generator().manual_seed(2)
    s1, s2 = _random_spd(4, gen), _random_spd(4, gen)
    m1, m2 = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    assert frechet_from_stats(m1, s1, m2, s2) == pytest.approx(frechet_from_stats(m2, s2, m1, s1), rel=1e-9)
    assert frechet_from_stats(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)
    # Non-commuting: the trace term differs from the (wrong) elementwise sqrt of the product's diagonal.
    assert frechet_from_stats(m1, s1, m2, s2) > 0


def test_frechet_of_samples_converges_to_the_gaussians_distance():
    gen = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    l1 = torch.tensor([[1.0, 0.0], [0.5, 0.8]])  # Σ = L Lᵀ, not diagonal
    l2 = torch.tensor([[2.0, 0.0], [-0.3, 0.5]])
    n = 200_000
    x = mu1 + torch.randn(n, 2, generator=gen) @ l1.T
    y = mu2 + torch.randn(n, 2, generator=gen) @ l2.T
    exact = frechet_from_stats(mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.randn(5, 3))


# ------------------------------------------------------------------------------------------ near copies
def test_near_copy_rate_on_constructed_data():
    gen = torch.Generator().manual_seed(0)
    forgotten = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    exact = forgotten[[0, 2]]                                       # copies: distance 0
    close = forgotten[[1]] + 0.2                                    # MSE 0.04 < 0.1: a near copy
    far = -forgotten[[0]]                                           # MSE = mean (2a)² ≈ 4/3 for uniform a
    border = forgotten[[2]] + (NEAR_COPY_MSE * 1.2) ** 0.5          # MSE 0.12: just outside
    samples = torch.cat([exact, close, far, border])
    d = nearest_mse(samples, forgotten)
    assert d[0] == 0 and d[1] == 0 and d[2] == pytest.approx(0.04, rel=1e-4) and d[4] == pytest.approx(0.12, rel=1e-4)
    assert d[3] > 0.5
    assert near_copy_rate(samples, forgotten) == pytest.approx(3 / 5)
    assert near_copy_rate(samples, forgotten, threshold=0.2) == pytest.approx(4 / 5)


# ------------------------------------------------------------------------------------------ provenance
def test_describe_forget_round_trips_small_image_sets():
    data = fu.datasets.digits(classes=[3])
    rec = describe_forget(data)
    assert rec["kind"] == "datapoints" and rec["n"] == len(data) and rec["label_counts"] == {"3": len(data)}
    assert torch.equal(_decode_images(rec), data.images)
    big = describe_forget(fu.DataPoints(torch.zeros(600, 1, 8, 8)))
    assert "images_float32_base64" not in big and big["n"] == 600  # too large to inline: only counted and hashed
    assert describe_forget(fu.Classes([3, 5])) == {"kind": "classes", "ids": [3, 5], "override": None}


def test_erase_records_base_model_and_forgotten(tmp_path):
    unet, sched = fu.zoo.digits()
    res = fu.erase(unet, forget=fu.DataPoints(fu.datasets.digits([3]).images[:4], labels=torch.full((4,), 3)),
                   retain=fu.datasets.digits([1, 2]), method="siss", scheduler=sched, steps=1, batch_size=4,
                   progress=False)
    assert res.meta["base_model"] == "zoo:digits"
    assert res.meta["forgotten"]["n"] == 4 and res.meta["forgotten"]["label_counts"] == {"3": 4}
    # A bundled model the user changed is no longer "the bundled model".
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)
    res2 = fu.erase(unet, forget=fu.DataPoints(fu.datasets.digits([3]).images[:4], labels=torch.full((4,), 3)),
                    retain=fu.datasets.digits([1]), method="naive", scheduler=sched, steps=1, batch_size=4,
                    progress=False)
    assert res2.meta["base_model"] is None
    # A model given as a folder is recorded as that folder.
    folder = tmp_path / "base"
    tiny_unet().save_pretrained(folder)
    sched.save_pretrained(folder)
    res3 = fu.erase(str(folder), forget=fu.DataPoints(torch.zeros(2, 1, 8, 8), labels=torch.tensor([3, 3])),
                    method="neggrad", steps=1, batch_size=2, progress=False)
    assert res3.meta["base_model"] == str(folder.resolve())


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

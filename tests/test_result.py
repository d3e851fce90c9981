"""Result basics a diffusers user meets first: a one-line repr, saving into an empty folder (as save_pretrained
does) but never over files without overwrite, the model card, and a clear error for pipeline=True on a result
made from a bare UNet."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.models import digits_scheduler
from fastunlearn.result import Result


@pytest.fixture
def result(make_tiny_unet):
    return Result(model=make_tiny_unet(), scheduler=digits_scheduler(), method="esd", options={"negative_guidance": 1.0},
                  meta={"steps": 3, "batch_size": 2, "lr": 1e-4, "seed": 0, "seconds": 1.5,
                        "forgotten": {"kind": "classes", "ids": [3], "override": None}})


def test_repr_is_one_line(result):
    text = repr(result)
    assert "\n" not in text and len(text) < 200
    assert text.startswith("Result(method='esd', model=UNet2DModel(") and "classes [3]" in text


def test_save_into_an_empty_folder_but_not_over_files(result, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = result.save(empty)
    assert (out / "unet" / "config.json").exists() and (out / "fastunlearn.json").exists()
    torch.testing.assert_close(fu.load(out).model.state_dict(), result.model.state_dict())
    with pytest.raises(InvalidArgumentError, match="exists; pass overwrite=True"):
        result.save(out)  # now it holds a result
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="^path"):
        result.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other"]  # no temporary folder left behind
    result.save(out, overwrite=True)


def test_model_card_records_the_run(result, tmp_path):
    out = result.save(tmp_path / "r", evaluation={"forget_rate": 0.01, "per_class": {"3": 0.0}, "method": "esd"})
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    for text in ("classes [3]", "`esd`", '"negative_guidance": 1.0', "3 × 2, 0.0001", "| forget_rate | 0.01 |",
                 "| per_class.3 | 0.0 |"):
        assert text in card, text
    with pytest.raises(InvalidArgumentError, match="^evaluation"):
        result.save(tmp_path / "e", evaluation=[0.1])


def test_pipeline_needs_a_pipeline(result, tmp_path):
    with pytest.raises(InvalidArgumentError, match="^pipeline"):
        result.save(tmp_path / "p", pipeline=True)
    with pytest.raises(InvalidArgumentError, match="^pipeline"):
        result.save(tmp_path / "p", pipeline=str(tmp_path))
    assert not (tmp_path / "p").exists()


def test_load_casts_with_torch_dtype(result, tmp_path):
    out = result.save(tmp_path / "r")
    assert next(fu.load(out, torch_dtype="float16").model.parameters()).dtype == torch.float16
    with pytest.raises(InvalidArgumentError, match="^torch_dtype"):
        fu.load(out, torch_dtype="float64")

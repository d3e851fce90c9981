"""provenance: what fastunlearn.json records about the base model and the forget target, and reading it back."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.provenance import decode_images, describe_forget, forget_from_meta


def test_describe_forget_round_trips_small_image_sets():
    data = fu.datasets.digits(classes=[3])
    rec = describe_forget(data)
    assert rec["kind"] == "datapoints" and rec["n"] == len(data) and rec["label_counts"] == {"3": len(data)}
    assert torch.equal(decode_images(rec), data.images)
    big = describe_forget(fu.DataPoints(torch.zeros(600, 1, 8, 8)))
    assert "images_float32_base64" not in big and big["n"] == 600  # too large to inline: only counted and hashed
    assert describe_forget(fu.Classes([3, 5])) == {"kind": "classes", "ids": [3, 5], "override": None}


def test_erase_records_base_model_and_forgotten(tmp_path, make_tiny_unet):
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
    make_tiny_unet().save_pretrained(folder)
    sched.save_pretrained(folder)
    res3 = fu.erase(str(folder), forget=fu.DataPoints(torch.zeros(2, 1, 8, 8), labels=torch.tensor([3, 3])),
                    method="neggrad", steps=1, batch_size=2, progress=False)
    assert res3.meta["base_model"] == str(folder.resolve())


def test_forget_from_meta_inverts_describe_forget():
    data = fu.DataPoints(torch.rand(3, 1, 8, 8) * 2 - 1, labels=torch.tensor([3, 3, 5]), prompts=["a", "b", "a"])
    back = forget_from_meta({"forgotten": describe_forget(data)})
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
    assert back.prompts == ["a", "b", "a"]
    for target in (fu.Classes([3, 5], override=1), fu.Concept("a cat", anchor="an animal")):
        assert forget_from_meta({"forgotten": describe_forget(target)}) == target
    assert forget_from_meta({}) is None  # a result saved without provenance
    with pytest.raises(InvalidArgumentError, match="too large"):
        forget_from_meta({"forgotten": describe_forget(fu.DataPoints(torch.zeros(600, 1, 8, 8)))})

"""What to forget and what to keep (fastunlearn.targets): DataPoints from tensors, PIL images and folders (real digits
written as PNG files, class subfolders and a datasets-style metadata.jsonl), latents taken as they are, and every
bad input refused with an error naming it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastunlearn as fu
from fastunlearn.errors import FastUnlearnError


@pytest.fixture(scope="module")
def digits():
    return fu.datasets.digits()


def _png(x: torch.Tensor, path):
    """One digit [1, H, W] in [-1, 1] as an 8-bit grayscale PNG."""
    arr = ((x[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def test_tensors_in_range_keep_their_values_labels_and_prompts(digits):
    d = fu.DataPoints(digits.images[:5], labels=digits.labels[:5], prompts="a digit")
    assert torch.equal(d.images, digits.images[:5]) and torch.equal(d.labels, digits.labels[:5])
    assert d.prompts == ["a digit"] * 5 and len(d) == 5
    assert repr(d).count("\n") == 0 and "5 images 1x8x8" in repr(d)


def test_normalize_maps_0_255_and_0_1_into_minus_one_one(digits):
    x = digits.images[:4]
    for scaled in ((x + 1) * 127.5, (x + 1) / 2):
        torch.testing.assert_close(fu.DataPoints(scaled, normalize=True).images, x, atol=1e-5, rtol=0)


def test_pixels_out_of_range_name_the_way_in_for_latents(digits):
    with pytest.raises(FastUnlearnError, match=r"^images: expected values in \[-1, 1\].*from_latents"):
        fu.DataPoints(digits.images[:4] * 4)
    z = fu.DataPoints.from_latents(digits.images[:4] * 4)  # latents: as they are, no range check
    assert z.latents and torch.equal(z.images, digits.images[:4] * 4)


def test_a_folder_of_pngs_reads_back_the_digits(tmp_path, digits):
    for i in range(6):
        _png(digits.images[i], tmp_path / f"{i:02d}.png")
    d = fu.DataPoints(tmp_path)
    assert d.images.shape == (6, 1, 8, 8) and d.from_files and d.labels is None
    torch.testing.assert_close(d.images, digits.images[:6], atol=1 / 127.5, rtol=0)  # 8-bit quantisation


def test_class_subfolders_are_labels_and_metadata_jsonl_are_prompts(tmp_path, digits):
    by_class = tmp_path / "classes"
    for c in (3, 7):
        (by_class / str(c)).mkdir(parents=True)
        idx = (digits.labels == c).nonzero()[:2, 0]
        for j, i in enumerate(idx):
            _png(digits.images[i], by_class / str(c) / f"{j}.png")
    d = fu.DataPoints(by_class)
    assert d.labels.tolist() == [3, 3, 7, 7]
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    rows = []
    for i in range(3):
        _png(digits.images[i], captioned / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"the digit {int(digits.labels[i])}"}))
    (captioned / "metadata.jsonl").write_text("\n".join(rows))
    d = fu.DataPoints(captioned)
    assert d.prompts == [f"the digit {int(c)}" for c in digits.labels[:3]]


def test_pil_images_convert_between_gray_and_rgb_for_the_model(digits):
    ims = [Image.fromarray(((digits.images[i, 0].numpy() + 1) * 127.5).astype(np.uint8), mode="L") for i in range(3)]
    d = fu.DataPoints(ims)
    rgb = d.pixels(3)
    assert rgb.shape == (3, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(FastUnlearnError, match="^images: expected 3 channel"):
        fu.DataPoints(digits.images[:3]).pixels(3)  # tensors must already have the model's channels


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=[1, 2, 3]), r"^images: expected a float tensor"),
    (dict(images=torch.zeros(0, 1, 8, 8)), r"^images: expected at least one image"),
    (dict(images=torch.full((2, 1, 8, 8), float("nan"))), r"^images: expected finite values"),
    (dict(images=torch.zeros(2, 1, 8, 8), labels=torch.tensor([0, -1])), r"^labels: expected non-negative"),
    (dict(images=torch.zeros(2, 1, 8, 8), labels=torch.tensor([0.5, 1.0])), r"^labels: expected an integer"),
    (dict(images=torch.zeros(2, 1, 8, 8), prompts=["one"]), r"^prompts: expected 2 strings"),
    (dict(images=torch.zeros(2, 1, 8, 8), latents=True, normalize=True), r"^normalize: expected False"),
])
def test_bad_datapoints_name_the_argument(kwargs, match):
    with pytest.raises(FastUnlearnError, match=match):
        fu.DataPoints(**kwargs)


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FastUnlearnError, match="is not a folder of images"):
        fu.DataPoints(tmp_path / "nope")
    with pytest.raises(FastUnlearnError, match="holds no image files"):
        fu.DataPoints(tmp_path)


def test_classes_and_concepts_check_themselves():
    assert fu.Classes(3).ids == [3]
    with pytest.raises(FastUnlearnError, match="^Classes.ids: expected at least one"):
        fu.Classes([])
    with pytest.raises(FastUnlearnError, match="^Classes.ids: expected non-negative"):
        fu.Classes([-1])
    with pytest.raises(FastUnlearnError, match="^Classes.override: expected an int class id not among"):
        fu.Classes([3], override=3)
    with pytest.raises(FastUnlearnError, match="^Concept.prompt: expected a non-empty string"):
        fu.Concept("  ")
    with pytest.raises(FastUnlearnError, match="^Concept.anchor: expected a string"):
        fu.Concept("a cat", anchor=3)

"""Small models the project trained itself (``scripts/train_digits.py``) and ships: no download."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ZOO = Path(__file__).resolve().parent


def outlier_image() -> torch.Tensor:
    """The memorised outlier of ``digits_outlier()``: a "T" glyph, [1, 1, 8, 8] in [-1, 1]."""
    img = -torch.ones(1, 1, 8, 8)
    img[..., 1:3, 1:7] = 1.0   # bar
    img[..., 3:7, 3:5] = 1.0   # stem
    return img


def _load(name: str):
    from diffusers import DDPMScheduler

    from ..models import load_unet

    folder = ZOO / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"bundled model {name!r} missing at {folder}: run scripts/train_digits.py")
    unet = load_unet(folder).eval()
    unet.register_to_config(fastunlearn_zoo_name=name)  # erase() records it as base_model "zoo:NAME"
    return unet, DDPMScheduler.from_pretrained(folder)


def digits():
    """The class-conditional digits UNet (labels 0..9, null label 10) and its DDPM scheduler."""
    return _load("digits")


def digits_outlier():
    """An unconditional digits UNet that memorised ``outlier_image()`` (about 5% of its training set)."""
    return _load("digits_outlier")


def classifier():
    """The digits classifier (trained on real digits), in eval mode."""
    from ..classifier import DigitsClassifier

    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(ZOO / "classifier.safetensors")))
    return clf.eval().requires_grad_(False)

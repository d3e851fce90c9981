"""Small models the project trained itself (``scripts/train_digits.py``) and ships: no download."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..classifier import DigitsClassifier
from ..models import load_unet
from ..pipelines import load_pipeline
from ..text import DIGIT_NAMES, digit_prompt

ZOO = Path(__file__).resolve().parent


def outlier_image() -> torch.Tensor:
    """The memorised outlier of ``digits_outlier()``: a "T" glyph, [1, 1, 8, 8] in [-1, 1]."""
    img = -torch.ones(1, 1, 8, 8)
    img[..., 1:3, 1:7] = 1.0   # bar
    img[..., 3:7, 3:5] = 1.0   # stem
    return img


NAMES = ("digits", "digits_outlier", "digits_text")


def get(name: str):
    """A bundled model by name: a UNet with its scheduler as a pair, or the text pipeline."""
    if name not in NAMES:
        raise ValueError(f"name: expected one of {', '.join(NAMES)}, got {name!r}")
    return digits_text() if name == "digits_text" else _load(name)


def _load(name: str):
    """(unet, scheduler) of a bundled model (for the text pipeline: its UNet and scheduler)."""
    from diffusers import DDPMScheduler

    if name == "digits_text":
        pipe = digits_text()
        return pipe.unet, pipe.scheduler
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
    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(ZOO / "classifier.safetensors")))
    return clf.eval().requires_grad_(False)


def digits_text():
    """The text-conditional digits pipeline: a tiny ``StableDiffusionPipeline`` (no VAE; 1x8x8 samples,
    UNet2DConditionModel with cross-attention, CLIP text encoder, tokenizer built locally) trained on the
    digits with prompts that name them, ``fastunlearn.text.digit_prompt(c)`` ("a picture of the digit
    three"). Its UNet records those prompts (``fastunlearn_class_prompts``), so ``evaluate`` judges a
    concept erased from it class by class."""
    folder = ZOO / "digits_text"
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"bundled model 'digits_text' missing at {folder}: run scripts/train_digits.py "
                                "--only digits-text")
    pipe = load_pipeline(folder)
    pipe.unet.eval().register_to_config(fastunlearn_zoo_name="digits_text",
                                        fastunlearn_class_prompts=[digit_prompt(c) for c in range(len(DIGIT_NAMES))])
    pipe.text_encoder.eval()
    return pipe

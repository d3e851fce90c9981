"""Model construction and the denoiser adapter.

The adapter hides the differences between diffusers denoisers behind one call,
``adapter(x_t, t, cond)`` -> ε-prediction, so methods never branch on model type:

* ``UNet2DModel`` (unconditional, or class-conditional through ``num_class_embeds``): ``cond`` is a
  long tensor of class ids or ``None``.
* ``UNet2DConditionModel`` (text): ``cond`` is a dict with ``encoder_hidden_states`` and, for SDXL,
  ``added_cond_kwargs``; prompts are encoded once by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

# Class id used as the "null" label of the bundled class-conditional model: it was trained with 10%
# label dropout onto this id, so the model has an unconditional branch (CFG, ESD's ε(x_t, ∅)).
DIGITS_NULL_CLASS = 10


def digits_unet_config(class_conditional: bool = True) -> dict:
    """Config of the tiny UNet the project trains on scikit-learn's 8x8 digits."""
    return dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # 8x8 images need no attention; conv blocks keep a CPU training step at ~0.1 s (batch 128)
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        num_class_embeds=DIGITS_NULL_CLASS + 1 if class_conditional else None,
    )


def digits_scheduler() -> DDPMScheduler:
    """Linear β schedule 1e-4 → 0.02 over T = 1000 steps (the DDPM / SISS-MNIST schedule)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, prediction_type="epsilon")


@dataclass
class Denoiser:
    """Uniform ε-prediction interface over diffusers denoisers."""

    model: torch.nn.Module

    @property
    def kind(self) -> str:
        if isinstance(self.model, UNet2DConditionModel):
            return "text"
        if isinstance(self.model, UNet2DModel):
            return "class" if self.model.config.num_class_embeds else "uncond"
        raise TypeError(f"unsupported denoiser {type(self.model).__name__}")

    @property
    def num_classes(self) -> Optional[int]:
        """Number of real classes (the null class, if trained, is excluded)."""
        if self.kind != "class":
            return None
        n = self.model.config.num_class_embeds
        return n - 1 if self.has_null_class else n

    @property
    def has_null_class(self) -> bool:
        return bool(getattr(self.model.config, "fastunlearn_null_class", None) is not None)

    @property
    def null_class(self) -> Optional[int]:
        return getattr(self.model.config, "fastunlearn_null_class", None)

    @property
    def sample_shape(self) -> tuple:
        cfg = self.model.config
        size = cfg.sample_size
        if isinstance(size, int):
            size = (size, size)
        return (cfg.in_channels, *size)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if self.kind == "text":
            if not isinstance(cond, dict):
                raise TypeError("text-conditional denoiser needs cond={'encoder_hidden_states': ...}")
            return self.model(x_t, t, **cond).sample
        if self.kind == "class":
            return self.model(x_t, t, class_labels=cond).sample
        return self.model(x_t, t).sample


def restore_extra_config(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """diffusers drops config keys its classes do not declare when loading; put fastunlearn's back."""
    for key, value in config.items():
        if key.startswith("fastunlearn_"):
            model.register_to_config(**{key: value})
    return model


def load_unet(folder, variant=None, torch_dtype=None) -> torch.nn.Module:
    """A UNet2DModel / UNet2DConditionModel from a diffusers folder (safetensors only), with
    fastunlearn's config keys (the null class) restored."""
    import json
    from pathlib import Path

    import diffusers

    config = json.loads((Path(folder) / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # it warns about the fastunlearn_* keys restored below
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, variant=variant, torch_dtype=torch_dtype)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return restore_extra_config(model, config)


def build_digits_unet(class_conditional: bool = True) -> UNet2DModel:
    unet = UNet2DModel(**digits_unet_config(class_conditional))
    if class_conditional:
        unet.register_to_config(fastunlearn_null_class=DIGITS_NULL_CLASS)
    return unet

"""LoRA adapters through peft: trained roles on one shared frozen base.

The frozen teacher is the same model with the adapters switched off (``adapters_off``), never a second
copy. Default targets follow diffusers' training scripts: the attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``); models without attention (the digits UNets) get the convolutions
of their ResNet blocks.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["conv1", "conv2"]


def default_targets(model: torch.nn.Module) -> list:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if {"to_q", "to_k", "to_v"} <= names:
        return ATTENTION_TARGETS
    return CONV_TARGETS


def add_lora(model: torch.nn.Module, rank: int, alpha: Optional[float] = None,
             targets: Optional[Sequence[str]] = None, adapter_name: str = "default") -> None:
    """Freeze ``model`` and inject a LoRA adapter of ``rank`` (only the adapter trains)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                     target_modules=list(targets) if targets else default_targets(model))
    inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model: every LoRA layer disabled for the duration (the frozen teacher)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def lora_state_dict(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain diffusers model with any LoRA adapter merged into the base weights (the model itself is
    left as it is). Models without adapters are returned unchanged."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    return merged

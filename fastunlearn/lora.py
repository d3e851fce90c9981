"""LoRA adapters through peft: trained roles on one shared frozen base.

The frozen teacher is the same model with the adapters switched off, never a second copy; the roles
themselves (which adapter is which, switching between them) are ``fastunlearn.roles``. Default targets
follow diffusers' training scripts: the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``);
models without attention (the digits UNets) get the convolutions of their ResNet blocks.
"""
from __future__ import annotations

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


def shared_base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters are new ``Parameter`` objects over the same tensors:
    no second copy of the weights (one UNet in memory, not two), while the copy's structure, flags, dtype
    casts and device moves are its own (they rebind ``.data`` on the copy's parameters). For LoRA runs,
    whose base weights are never written (adapters train; merges go through ``merge_in_place``, which
    writes a fresh tensor). Buffers are copied (small, and a module may update them in place)."""
    import copy

    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def lora_state_dict(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def merged_copy(model: torch.nn.Module, share: bool = False) -> torch.nn.Module:
    """A plain diffusers model with any LoRA adapter merged into the base weights (the model itself is
    left as it is). Models without adapters are returned unchanged. ``share``: the layers without an adapter
    keep ``model``'s tensors (``shared_base_copy``; only the adapted layers' merged weights are new), for
    copies that are only read (a result's role, a file being written); else every tensor is copied."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    return merge_in_place(shared_base_copy(model) if share else copy.deepcopy(model))


def merge_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself made a plain diffusers model: its active adapter merged into the base weights and
    every peft layer replaced by its base layer (no second copy of the weights: for a model whose adapters
    are no longer needed, such as SFD's run model once its generator has been copied out)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            # peft merges with an in-place add; a run's base may share its tensors with the caller's model
            # (``shared_base_copy``), so each layer's weight is first replaced by its own copy (one layer at a time)
            base = module.get_base_layer()
            base.weight.data = base.weight.data.clone()
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


# ------------------------------------------------------------------------------ diffusers LoRA files
# ``pipe.load_lora_weights(folder)`` reads ``pytorch_lora_weights.safetensors`` with peft-format keys under
# the ``unet.`` prefix (``unet.<module>.lora_A.weight``) and the adapter's LoraConfig in the file's
# ``lora_adapter_metadata``: exactly what diffusers' own ``save_lora_weights`` writes, used here.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def has_lora(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_payload(model: torch.nn.Module, adapter_name: str = "default") -> dict:
    """``{"state", "config"}`` of ``model``'s adapter ``adapter_name``: peft-format weights (CPU, fp32) and its
    LoraConfig, enough to write the diffusers LoRA file later without keeping the model."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in model.peft_config:  # a model whose only role has another name
        adapter_name = next(iter(model.peft_config))
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    return {"state": state, "config": model.peft_config[adapter_name], "adapter": adapter_name}


def write_diffusers_lora(folder, payload: dict) -> dict:
    """Write an ``adapter_payload`` as ``folder/pytorch_lora_weights.safetensors`` (diffusers' own writer);
    returns the adapter's settings (rank, alpha, targets) for the result's metadata."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    cfg = payload["config"]
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(folder), unet_lora_layers=payload["state"],
                                                     unet_lora_adapter_metadata=cfg.to_dict(),
                                                     weight_name=LORA_WEIGHT_NAME)
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules),
            "adapter": payload["adapter"], "file": LORA_WEIGHT_NAME}


def save_diffusers_lora(model: torch.nn.Module, folder, adapter_name: str = "default") -> dict:
    """Write ``model``'s adapter ``adapter_name`` as a diffusers LoRA file into ``folder``; returns the
    adapter's settings (rank, alpha, targets) for the result's metadata."""
    return write_diffusers_lora(folder, adapter_payload(model, adapter_name))


def base_reference(model: torch.nn.Module) -> dict:
    """``{"path", "variant", "fingerprint"}`` of ``model``'s frozen base: the folder it was loaded from when
    the weights there are the ones in memory (``find_base_on_disk``), else ``path`` None."""
    return find_base_on_disk(model) or {"path": None, "variant": None, "fingerprint": base_fingerprint(model)}


def load_diffusers_lora(model: torch.nn.Module, file, adapter_name: str = "default") -> torch.nn.Module:
    """Inject and fill an adapter from a diffusers LoRA file written by ``save_diffusers_lora`` (or by
    diffusers' training scripts with peft keys); ``model`` is changed in place and returned."""
    import json

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k[len("unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
    if not state:
        raise ValueError(f"{file}: no 'unet.' LoRA weights")
    cfg = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    keep = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "lora_bias", "rank_pattern",
            "alpha_pattern")
    kwargs = {k: cfg[k] for k in keep if k in cfg and cfg[k] is not None}
    kwargs.setdefault("r", rank)
    kwargs.setdefault("lora_alpha", kwargs["r"])
    if "target_modules" not in kwargs:
        kwargs["target_modules"] = sorted({k.split(".lora_")[0] for k in state})
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(**kwargs), model, adapter_name=adapter_name)
    dtype = next(model.parameters()).dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()}, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"{file}: LoRA weights do not fit the base model "
                         f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    return model


# --------------------------------------------------------------------- which base a LoRA file belongs to
def _base_tensors(model: torch.nn.Module):
    """(name, tensor) of the frozen base: adapters left out, peft's ``base_layer`` names mapped back."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            yield name.replace(".base_layer", ""), p.detach()


def _fingerprint(tensors: dict, dtype=None) -> dict:
    """Σ_i c_i Σx and Σ_i Σx² over ``tensors`` (name → tensor or zero-argument loader) in name order, in
    float64 (c_i = 1 + i mod 7, so swapped tensors change it too). One tensor is materialized at a time.
    Two copies of the same weights agree to ~1e-12 relative; a trained change shows."""
    s1 = s2 = scale = 0.0
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        t = t() if callable(t) else t
        if dtype is not None:
            t = t.to(getattr(torch, dtype))
        t = t.double()
        c = 1 + i % 7
        sq = float((t * t).sum())
        s1 += c * float(t.sum())
        s2 += sq
        scale += c * (sq * t.numel()) ** 0.5
    return {"tensors": len(tensors), "s1": s1, "s2": s2, "scale": scale}


def base_fingerprint(model: torch.nn.Module) -> dict:
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {**_fingerprint(dict(_base_tensors(model))), "dtype": dtype}


def same_fingerprint(a: dict, b: dict) -> bool:
    if not a or not b or a.get("tensors") != b.get("tensors"):
        return False
    return (abs(a["s2"] - b["s2"]) <= 1e-9 * max(abs(b["s2"]), 1e-30)
            and abs(a["s1"] - b["s1"]) <= 1e-9 * max(b["scale"], 1e-30))


def _weight_files(folder):
    """diffusers weight files of a model folder grouped by variant ('' for the plain files)."""
    from pathlib import Path
    import re

    groups: dict = {}
    for f in sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors")):
        m = re.fullmatch(r"diffusion_pytorch_model(?:\.([A-Za-z0-9_]+))?(?:-\d+-of-\d+)?(?:\.([A-Za-z0-9_]+))?"
                         r"\.safetensors", f.name)
        if m:
            groups.setdefault(m.group(1) or m.group(2) or "", []).append(f)
    return groups


def find_base_on_disk(model: torch.nn.Module) -> "dict | None":
    """A reference to the folder ``model``'s frozen base was loaded from, if the weights there are the
    very ones in memory (checked by fingerprint, so an edited or re-trained base is never referenced):
    ``{"path", "variant", "fingerprint"}``, else None."""
    from pathlib import Path

    from safetensors import safe_open

    src = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not src:
        return None
    folder = Path(src)
    if not (folder / "config.json").exists() and (folder / "unet" / "config.json").exists():
        folder = folder / "unet"
    if not (folder / "config.json").exists():
        return None
    mine = base_fingerprint(model)
    names = {n for n, _ in _base_tensors(model)}
    for variant, files in _weight_files(folder).items():
        where = {}
        for f in files:
            with safe_open(str(f), "pt") as sf:
                where.update({k: f for k in sf.keys() if k in names})
        if set(where) != names:
            continue

        def loader(k, f):
            def get():
                with safe_open(str(f), "pt") as sf:
                    return sf.get_tensor(k)
            return get
        theirs = _fingerprint({k: loader(k, f) for k, f in where.items()}, dtype=mine["dtype"])
        if same_fingerprint(theirs, mine):
            return {"path": str(folder.resolve()), "variant": variant or None, "fingerprint": mine}
    return None

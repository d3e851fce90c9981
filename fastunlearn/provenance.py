"""Provenance of a result: what ``fastunlearn.json`` records about the model before unlearning and what was
forgotten, so that ``fastunlearn eval DIR`` can compare with the same base model on the same target.

``erase()`` writes ``provenance(...)`` (``base_model`` and ``forgotten``); ``evaluate()`` reads them back
(``forget_from_meta``). ``base_model`` is "zoo:NAME" for an unchanged bundled model or a folder path for a
model loaded from disk; ``forgotten`` holds class ids, the concept, or a summary of the images (with the
images themselves when they are small).
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import zoo
from .errors import InvalidArgumentError
from .targets import Classes, Concept, DataPoints

# Forgotten images at most this many values are stored inline in fastunlearn.json (128 KiB of float32).
INLINE_IMAGE_VALUES = 32768


def describe_forget(forget) -> dict:
    """What was forgotten, for ``fastunlearn.json``: class ids, the concept, or the number of images (and the
    images themselves, base64 float32, when they hold at most ``INLINE_IMAGE_VALUES`` values)."""
    if isinstance(forget, Classes):
        return {"kind": "classes", "ids": list(forget.ids), "override": forget.override}
    if isinstance(forget, Concept):
        return {"kind": "concept", "prompt": forget.prompt, "anchor": forget.anchor}
    if isinstance(forget, DataPoints):
        images = forget.images.detach().float().cpu().contiguous()
        raw = images.numpy().tobytes()
        out = {"kind": "datapoints", "n": int(images.shape[0]), "shape": list(images.shape),
               "sha256": hashlib.sha256(raw).hexdigest(), "latents": bool(forget.latents)}
        if forget.labels is not None:
            labels = [int(v) for v in forget.labels]
            out["label_counts"] = {str(c): labels.count(c) for c in sorted(set(labels))}
        if forget.prompts is not None:
            out["prompts"] = list(dict.fromkeys(forget.prompts))[:50]
        if images.numel() <= INLINE_IMAGE_VALUES:
            out["images_float32_base64"] = base64.b64encode(raw).decode("ascii")
            if forget.labels is not None:
                out["labels"] = labels  # per image, with the images
            if forget.prompts is not None:
                out["image_prompts"] = list(forget.prompts)
        return out
    return {"kind": type(forget).__name__}


def decode_images(rec: dict) -> Optional[torch.Tensor]:
    """The images ``describe_forget`` stored inline, or None when they were too large to store."""
    if "images_float32_base64" not in rec:
        return None
    arr = np.frombuffer(base64.b64decode(rec["images_float32_base64"]), dtype=np.float32).copy()
    return torch.from_numpy(arr).view(*rec["shape"])


def base_model_ref(model_arg, unet) -> Optional[str]:
    """How to find the model before unlearning again: "zoo:NAME" when ``unet`` still holds a bundled model's
    weights, the folder for a model given as a path, else None."""
    if isinstance(model_arg, (str, Path)):
        return str(Path(model_arg).resolve())
    name = getattr(getattr(unet, "config", None), "fastunlearn_zoo_name", None)
    if name:
        try:
            ref = zoo._load(name)[0].state_dict()
        except Exception:
            ref = None
        own = unet.state_dict()
        if ref is not None and ref.keys() == own.keys() and all(
                torch.equal(ref[k], own[k].detach().cpu()) for k in ref):
            return f"zoo:{name}"
        return None  # a bundled model the user changed since loading it
    folder = getattr(model_arg, "name_or_path", None) or getattr(getattr(model_arg, "config", None),
                                                                  "_name_or_path", None)
    if isinstance(folder, str) and folder and Path(folder).is_dir():
        return str(Path(folder).resolve())
    return None


def provenance(model_arg, unet, forget) -> dict:
    """The ``fastunlearn.json`` fields ``evaluate`` needs: ``base_model`` and ``forgotten``."""
    return {"base_model": base_model_ref(model_arg, unet), "forgotten": describe_forget(forget)}


def forget_from_meta(meta: dict):
    """The forget target back from ``fastunlearn.json`` (``describe_forget``'s record), or None."""
    rec = meta.get("forgotten") or {}
    kind = rec.get("kind")
    if kind == "classes":
        return Classes(list(rec["ids"]), override=rec.get("override"))
    if kind == "concept":
        return Concept(rec["prompt"], anchor=rec.get("anchor"))
    if kind == "datapoints":
        images = decode_images(rec)
        if images is None and rec.get("prompts"):  # a text model: its measure is the forgotten prompt's shift
            return Concept(rec["prompts"][0])
        if images is None:
            raise InvalidArgumentError(
                f"forget: the result forgot {rec.get('n')} images too large to store in fastunlearn.json; "
                "pass them (evaluate(..., forget=fu.DataPoints(...)) or fastunlearn eval --forget-data DIR)")
        labels = torch.tensor(rec["labels"]) if rec.get("labels") is not None else None
        return DataPoints(images, labels=labels, prompts=rec.get("image_prompts"),
                          latents=bool(rec.get("latents", False)))
    return None

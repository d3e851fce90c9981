"""``Result``: what ``erase()`` returns, and ``load()``: a saved result back.

A result folder holds ``unet/`` (diffusers ``save_pretrained``, safetensors), ``scheduler/``,
``generator/`` (SFD), and ``fastunlearn.json`` (method, options, versions, seconds, peak memory).
It is written to a temporary folder next to the destination and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CorruptResultError, InvalidArgumentError, MissingFileError
from .sampling import ddim_sample

META_FILE = "fastunlearn.json"


@dataclass
class Result:
    model: torch.nn.Module
    scheduler: Any
    method: str
    options: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    generator: Optional[torch.nn.Module] = None
    extras: dict = field(default_factory=dict)  # method-specific state (e.g. SFD's one-step settings)

    # --------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, class_labels=None, prompts=None, num_inference_steps: Optional[int] = None,
               seed: int = 0, guidance_scale: Optional[float] = None) -> torch.Tensor:
        """``n`` images in [-1, 1]. Class-conditional models: ``class_labels`` (an int, or n ids; default
        cycles through the classes). SFD results sample with the one-step generator."""
        from .models import Denoiser

        if not isinstance(n, int) or n <= 0:
            raise InvalidArgumentError(f"n: expected a positive int, got {n!r}")
        den = Denoiser(self.model)
        cond = None
        null = None
        if den.kind == "class":
            k = den.num_classes
            if class_labels is None:
                labels = torch.arange(n) % k
            else:
                labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
                if labels.numel() == 1:
                    labels = labels.expand(n).clone()
            if labels.numel() != n or (labels < 0).any() or (labels >= k).any():
                raise InvalidArgumentError(f"class_labels: expected an int or {n} ids in [0, {k}), got {class_labels!r}")
            cond = labels.to(next(self.model.parameters()).device)
            if guidance_scale is not None and den.null_class is not None:
                null = torch.full_like(cond, den.null_class)
        elif den.kind == "text":
            cond, null = self._encode_prompts(prompts, n)
        if self.generator is not None:
            from .methods.base import get_method

            return get_method(self.method).sample_one_step(self, n, cond, seed)
        steps = num_inference_steps or 50
        return ddim_sample(self.model, self.scheduler, n, cond, steps, seed, guidance_scale, null)

    def _encode_prompts(self, prompts, n):
        enc = self.extras.get("encode_prompts")
        if enc is None:
            raise InvalidArgumentError("prompts: this result has no text encoder attached; sample through a pipeline")
        if prompts is None:
            raise InvalidArgumentError("prompts: a text-conditional model needs prompts")
        if isinstance(prompts, str):
            prompts = [prompts] * n
        if len(prompts) != n:
            raise InvalidArgumentError(f"prompts: expected {n} prompts, got {len(prompts)}")
        return enc(list(prompts)), enc([""] * n)

    # --------------------------------------------------------------------------------------- saving
    def save(self, path, overwrite: bool = False) -> Path:
        """Write the result atomically to ``path`` (a folder). An existing ``path`` is only replaced with
        ``overwrite=True``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise InvalidArgumentError(f"path: {str(path)!r} exists; pass overwrite=True to replace it")
        if path.exists() and not path.is_dir():
            raise InvalidArgumentError(f"path: {str(path)!r} is a file, expected a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            _save_model(self.model, tmp / "unet")
            self.scheduler.save_pretrained(tmp / "scheduler")
            if self.generator is not None:
                _save_model(self.generator, tmp / "generator")
            meta = {**self.meta, "method": self.method, "options": _jsonable(self.options),
                    "history": _jsonable(self.history),
                    "extras": _jsonable({k: v for k, v in self.extras.items() if not callable(v)})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _save_model(model, folder: Path):
    from .lora import merged_copy

    merged_copy(model).save_pretrained(folder, safe_serialization=True)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _load_model(folder: Path):
    import diffusers

    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        cls = getattr(diffusers, cfg["_class_name"])
    except FileNotFoundError as e:
        raise MissingFileError(f"{cfg_file}: missing; not a fastunlearn result") from e
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise CorruptResultError(f"{cfg_file}: unreadable model config ({e})") from e
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise MissingFileError(f"{weights}: missing (fastunlearn only loads safetensors weights)")
    try:
        from safetensors.torch import load_file

        state = load_file(str(weights))
    except Exception as e:
        raise CorruptResultError(f"{weights}: corrupt or truncated safetensors file ({e})") from e
    from .models import restore_extra_config

    model = restore_extra_config(cls.from_config(cfg), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptResultError(f"{weights}: weights do not match the config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def load(path) -> Result:
    """A saved result back. Only safetensors and JSON are read: nothing is unpickled."""
    from diffusers import DDPMScheduler

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"path: {str(path)!r} is not a result folder")
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise MissingFileError(f"{meta_file}: missing; not a fastunlearn result") from e
    except json.JSONDecodeError as e:
        raise CorruptResultError(f"{meta_file}: corrupt JSON ({e})") from e
    model = _load_model(path / "unet")
    try:
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    except Exception as e:
        raise CorruptResultError(f"{path / 'scheduler'}: unreadable scheduler config ({e})") from e
    generator = _load_model(path / "generator") if (path / "generator").is_dir() else None
    method = meta.pop("method", None)
    options = meta.pop("options", {})
    history = meta.pop("history", [])
    extras = meta.pop("extras", {})
    return Result(model=model, scheduler=scheduler, method=method, options=options, history=history, meta=meta,
                  generator=generator, extras=extras)

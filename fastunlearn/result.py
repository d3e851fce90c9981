"""``Result``: what ``erase()`` returns, and ``load()``: a saved result back.

A result folder holds ``unet/`` (diffusers ``save_pretrained``, safetensors), ``scheduler/``,
``generator/`` (SFD), and ``fastunlearn.json`` (method, options, versions, seconds, peak memory). A LoRA
run holds ``pytorch_lora_weights.safetensors`` (diffusers' LoRA file; for SFD the generator's adapter, with
the fake score's under ``fake_score/``) and the full weights only when needed (``Result.save``).
It is written to a temporary folder next to the destination and renamed when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CorruptResultError, InvalidArgumentError, MissingFileError, NonFiniteError, write_error
from .sampling import ddim_sample

META_FILE = "fastunlearn.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # a diffusers pipeline's output_type values


def _prompt_list(prompts, n: int) -> list:
    if prompts is None:
        raise InvalidArgumentError("prompts: a text-conditional model needs prompts")
    if isinstance(prompts, str):
        prompts = [prompts] * n
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError(f"prompts: expected a string or a list of {n} strings, got {type(prompts).__name__}")
    if len(prompts) != n:
        raise InvalidArgumentError(f"prompts: expected {n} prompts, got {len(prompts)}")
    return list(prompts)


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
    # LoRA roles whose adapters the modules above no longer hold (SFD merges them into plain modules):
    # {"generator": adapter_payload, "fake_score": adapter_payload, "base": base_reference}; see save().
    lora_roles: Optional[dict] = None

    # --------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, class_labels=None, prompts=None, num_inference_steps: Optional[int] = None,
               seed: int = 0, guidance_scale: Optional[float] = None, output_type: Optional[str] = None):
        """``n`` samples of the unlearned model, seeded.

        * Pixel-space models (a bare UNet, or a pipeline without a VAE): a tensor [n, C, H, W] in [-1, 1],
          DDIM (η = 0) from the model's scheduler; ``guidance_scale`` needs the model's null class / the
          empty prompt. Class-conditional models take ``class_labels`` (an int, or n ids; default cycles
          through the classes), text models ``prompts``.
        * Latent models (a Stable Diffusion / SDXL pipeline with a VAE): drawn through that pipeline with the
          unlearned UNet in place (its own scheduler, classifier-free guidance at ``guidance_scale`` or the
          pipeline's default, its VAE decoder), and returned as the pipeline returns images: ``output_type``
          "pil" (default; a list of n RGB PIL images), "np" (an array [n, H, W, 3] in [0, 1]), "pt" (a
          tensor [n, 3, H, W] in [0, 1]) or "latent" (the latents, not decoded).

        SFD results sample with the one-step generator (decoded through the VAE on a latent model)."""
        from .models import Denoiser

        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InvalidArgumentError(f"n: expected a positive int, got {n!r}")
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise InvalidArgumentError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
        pipe = self._latent_pipeline()
        if output_type is not None and (pipe is None or output_type not in OUTPUT_TYPES):
            expected = " | ".join(map(repr, OUTPUT_TYPES)) if pipe is not None else \
                "None (a pixel-space model returns a tensor in [-1, 1]; output_type is for pipelines with a VAE)"
            raise InvalidArgumentError(f"output_type: expected {expected}, got {output_type!r}")
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
            prompts = _prompt_list(prompts, n)
            if pipe is not None and self.generator is None:
                return self._sample_with_pipeline(pipe, prompts, num_inference_steps, seed, guidance_scale,
                                                  output_type or "pil")
            cond, null = self._encode_prompts(prompts, n)
        if self.generator is not None:
            from .methods.base import get_method

            x = get_method(self.method).sample_one_step(self, n, cond, seed)
            if pipe is not None:
                from .pipelines import decode_latents

                return decode_latents(pipe, x, output_type or "pil")
            return x
        steps = num_inference_steps or 50
        return ddim_sample(self.model, self.scheduler, n, cond, steps, seed, guidance_scale, null)

    def _latent_pipeline(self):
        """The pipeline a latent model samples through (SD/SDXL with a VAE), or None."""
        pipe = (self.extras or {}).get("pipeline")
        return pipe if pipe is not None and getattr(pipe, "vae", None) is not None else None

    def _sample_with_pipeline(self, pipe, prompts, steps, seed, guidance_scale, output_type):
        """The input pipeline's own ``__call__`` with the unlearned UNet swapped in (``from_pipe`` shares
        every other component; the caller's pipeline is not changed)."""
        from diffusers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()  # from_pipe's notes about shared components
        try:
            drawer = type(pipe).from_pipe(pipe, unet=self.model)
        finally:
            logging.set_verbosity(level)
        drawer.set_progress_bar_config(disable=True)
        kwargs = {"num_inference_steps": steps or 50, "output_type": output_type,
                  "generator": torch.Generator().manual_seed(seed)}  # CPU generator: the same draws on any device
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                images = drawer(prompt=list(prompts), **kwargs).images
        finally:
            self.model.train(was_training)
        return images

    def _encode_prompts(self, prompts, n):
        enc = self.extras.get("encode_prompts")
        if enc is None:
            raise InvalidArgumentError("prompts: this result has no text encoder attached; sample through a pipeline")
        prompts = _prompt_list(prompts, n)
        return enc(prompts), enc([""] * n)

    # --------------------------------------------------------------------------------------- saving
    def save(self, path, overwrite: bool = False, fused: Optional[bool] = None) -> Path:
        """Write the result atomically to ``path`` (a folder). An existing ``path`` is only replaced with
        ``overwrite=True``. A LoRA run writes ``pytorch_lora_weights.safetensors`` (diffusers format:
        ``pipe.load_lora_weights(path)``) and, with ``fused=True``, also the merged full weights under
        ``unet/``; ``fused=None`` writes them only when the base model cannot be found again on disk."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidArgumentError(f"path: {str(path)!r} is a file, expected a folder (never replaced)")
        # A run folder that holds only erase(output_dir=...)'s checkpoints takes the result next to them.
        into_run_folder = path.is_dir() and _only_checkpoints(path)
        if path.exists() and not overwrite and not into_run_folder:
            raise InvalidArgumentError(f"path: {str(path)!r} exists; pass overwrite=True to replace it")
        _check_finite(self.model, "model")
        if self.generator is not None:
            _check_finite(self.generator, "generator")
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            if self.lora_roles is not None:
                lora_meta = _save_roles(self, tmp, fused)
            else:
                lora_meta = _save_weights(self.model, tmp, fused)
            self.scheduler.save_pretrained(tmp / "scheduler")
            if self.generator is not None and (lora_meta is None or "fake_score" not in lora_meta
                                               or lora_meta["fused"]):
                _save_model(self.generator, tmp / "generator")
            meta = {**self.meta, "method": self.method, "options": _jsonable(self.options),
                    "history": _jsonable(self.history),
                    "extras": _jsonable({k: v for k, v in self.extras.items() if not callable(v)})}
            if lora_meta is not None:
                meta["lora"] = lora_meta
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
            if into_run_folder:
                # Entry by entry, fastunlearn.json last: until it lands the folder is not a result.
                for entry in sorted(tmp.iterdir(), key=lambda e: e.name == META_FILE):
                    os.replace(entry, path / entry.name)
                tmp.rmdir()
            elif path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # put the previous result back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(path, e) from e
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _only_checkpoints(folder: Path) -> bool:
    """True for a folder whose visible entries are just erase()'s ``checkpoints/`` (no result yet)."""
    from .checkpoint import CHECKPOINTS

    names = {e.name for e in folder.iterdir() if not e.name.startswith(".")}
    return names == {CHECKPOINTS}


def _check_finite(model, what: str) -> None:
    """Refuse to save NaN/inf weights: a saved result is always usable."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}: {name!r} holds non-finite values (NaN or inf); refusing to save")


def _save_weights(model, folder: Path, fused: Optional[bool]) -> Optional[dict]:
    """The denoiser's weights. Without adapters: the full model under ``unet/``. With LoRA: the adapter
    as a diffusers LoRA file, a reference to the base folder it was loaded from (only if the weights
    there are the ones trained on, checked by fingerprint) and, with ``fused=True`` or when no such
    folder exists (``fused=None``), the merged full weights under ``unet/`` so the result loads alone."""
    from .lora import base_fingerprint, find_base_on_disk, has_lora, save_diffusers_lora

    if not has_lora(model):
        _save_model(model, folder / "unet")
        return None
    info = save_diffusers_lora(model, folder)
    on_disk = None if fused else find_base_on_disk(model)
    info["base"] = on_disk or {"path": None, "variant": None, "fingerprint": base_fingerprint(model)}
    info["fused"] = bool(fused or (fused is None and on_disk is None))
    if info["fused"]:
        _save_model(model, folder / "unet")
    return info


def _save_roles(result, folder: Path, fused: Optional[bool]) -> dict:
    """SFD with LoRA: the generator G_θ is the deliverable, so its adapter is the result's diffusers LoRA
    file (``pipe.load_lora_weights(folder)`` loads the one-step generator); the fake score ψ's adapter is
    a second diffusers LoRA file under ``fake_score/``. Full merged weights (``unet/`` = ψ, ``generator/``)
    are written as ``_save_weights`` decides for other methods."""
    from .lora import write_diffusers_lora

    roles = result.lora_roles
    info = write_diffusers_lora(folder, roles["generator"])
    info["fake_score"] = write_diffusers_lora(folder / "fake_score", roles["fake_score"])
    info["fake_score"]["file"] = f"fake_score/{info['fake_score']['file']}"
    on_disk = roles["base"] if roles["base"].get("path") and not fused else None
    info["base"] = on_disk or {**roles["base"], "path": None, "variant": None}
    info["fused"] = bool(fused or (fused is None and on_disk is None))
    if info["fused"]:
        _save_model(result.model, folder / "unet")  # generator/ is written by save()
    return info


def _load_denoiser(path: Path, meta: dict, base, role: Optional[str] = None):
    """``unet/`` (``generator/`` for SFD's generator role) when the result holds full weights; otherwise the
    base (``base=`` or the folder the result refers to, checked by fingerprint) with the saved LoRA adapter
    injected (``role`` "fake_score": SFD's second adapter file)."""
    lora = meta.get("lora")
    full = path / ("generator" if role == "generator" else "unet")
    if not lora or (full.is_dir() and base is None):
        return _load_model(full)
    if role == "fake_score":
        lora = {**lora, **lora["fake_score"]}
    import copy

    from safetensors import SafetensorError

    from .lora import _base_tensors, _fingerprint, load_diffusers_lora, same_fingerprint

    ref = lora.get("base") or {}
    expected = ref.get("fingerprint")
    if base is None:
        if not ref.get("path"):
            raise MissingFileError(f"{path}: holds LoRA weights only; pass base= (the model it was trained from)")
        base = ref["path"]
    if isinstance(base, (str, Path)):
        from .models import restore_extra_config

        import diffusers

        folder = Path(base)
        if not (folder / "config.json").exists() and (folder / "unet" / "config.json").exists():
            folder = folder / "unet"
        if not (folder / "config.json").exists():
            raise MissingFileError(f"base: {str(folder)!r} is not a diffusers model folder")
        cfg = json.loads((folder / "config.json").read_text())
        dtype = getattr(torch, expected["dtype"]) if expected else None
        level = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()
        try:
            model = getattr(diffusers, cfg["_class_name"]).from_pretrained(
                folder, use_safetensors=True, variant=ref.get("variant"), torch_dtype=dtype)
        finally:
            diffusers.utils.logging.set_verbosity(level)
        model = restore_extra_config(model, cfg)
    else:
        model = getattr(base, "unet", base)
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(f"base: expected a model folder, a diffusers model or pipeline, got {type(base).__name__}")
        model = copy.deepcopy(model)  # the adapter is injected into a copy, never into the caller's model
    if expected and not same_fingerprint(_fingerprint(dict(_base_tensors(model)), dtype=expected["dtype"]), expected):
        raise InvalidArgumentError(f"base: not the weights {path} was trained from (fingerprint differs)")
    try:
        load_diffusers_lora(model, path / lora.get("file", "pytorch_lora_weights.safetensors"),
                            adapter_name=lora.get("adapter", "default"))
    except (ValueError, OSError, SafetensorError) as e:  # SafetensorError: truncated or corrupt file
        raise CorruptResultError(f"{path / lora.get('file', 'pytorch_lora_weights.safetensors')}: corrupt or "
                                 f"unreadable LoRA weights ({e})") from e
    return model.eval()


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
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # "nan" / "inf": fastunlearn.json stays strict JSON
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _load_model(folder: Path):
    import diffusers

    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        cls = getattr(diffusers, cfg["_class_name"])
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise TypeError(f"{cfg['_class_name']!r} is not a diffusers model class")
    except FileNotFoundError as e:
        raise MissingFileError(f"{cfg_file}: missing; not a fastunlearn result") from e
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # JSON and UTF-8 errors are ValueErrors
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

    try:
        model = restore_extra_config(cls.from_config(cfg), cfg)
    except Exception as e:
        raise CorruptResultError(f"{cfg_file}: the config does not build a {cls.__name__} ({e})") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CorruptResultError(f"{weights}: weights do not match the config ({str(e)[:300]})") from e
    if missing or unexpected:
        raise CorruptResultError(f"{weights}: weights do not match the config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def load(path, base=None) -> Result:
    """A saved result back. Only safetensors and JSON are read: nothing is unpickled. A LoRA-only
    result needs its base model: ``base=`` (folder, diffusers model or pipeline) or the folder recorded
    at save time."""
    from diffusers import DDPMScheduler

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"path: {str(path)!r} is not a result folder")
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise MissingFileError(f"{meta_file}: missing; not a fastunlearn result") from e
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise CorruptResultError(f"{meta_file}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CorruptResultError(f"{meta_file}: corrupt (expected a JSON object, got {type(meta).__name__})")
    roles = isinstance(meta.get("lora"), dict) and "fake_score" in meta["lora"]  # SFD saved with LoRA
    model = _load_denoiser(path, meta, base, role="fake_score" if roles else None)
    try:
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    except Exception as e:
        raise CorruptResultError(f"{path / 'scheduler'}: unreadable scheduler config ({e})") from e
    if roles:
        generator = _load_denoiser(path, meta, base, role="generator")
    else:
        generator = _load_model(path / "generator") if (path / "generator").is_dir() else None
    method = meta.pop("method", None)
    options = meta.pop("options", {})
    history = meta.pop("history", [])
    extras = meta.pop("extras", {})
    return Result(model=model, scheduler=scheduler, method=method, options=options, history=history, meta=meta,
                  generator=generator, extras=extras)

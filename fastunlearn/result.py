"""``Result``: what ``erase()`` returns, and ``load()``: a saved result back.

A result folder holds ``unet/`` (diffusers ``save_pretrained``, safetensors: the model a diffusers user
samples), ``scheduler/``, ``README.md`` (a model card) and ``fastunlearn.json`` (method, options, versions,
seconds, peak memory of the set-up, of training and the larger of the two, the training noise schedule). A LoRA
run holds ``pytorch_lora_weights.safetensors`` (diffusers' LoRA file) and the full weights only when needed.
``save(..., pipeline=True)`` also writes the input pipeline's other components and ``model_index.json``:
``DiffusionPipeline.from_pretrained(dir)`` loads it.

SFD: ``unet/`` (and the LoRA file) is the one-step generator G_θ, ``scheduler/`` a one-step configuration of
diffusers' ``EulerDiscreteScheduler`` that samples it exactly as ``sample_one_step`` does (see
``one_step_scheduler``), and the fake score ψ is under ``fake_score/`` (full weights and/or its LoRA file).
Results saved before this layout (``generator/`` + ``unet/`` = ψ) still load.
Everything is written to a temporary folder next to the destination and renamed when complete.
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

from .config import as_torch_dtype
from .errors import CorruptResultError, InvalidArgumentError, MissingFileError, NonFiniteError, write_error
from .files import publish_dir
from .lora import (_base_tensors, _fingerprint, base_fingerprint, find_base_on_disk, has_lora, load_diffusers_lora,
                   merged_copy, same_fingerprint, save_diffusers_lora, write_diffusers_lora)
from .methods import REGISTRY, get_method
from .models import Denoiser, restore_extra_config
from .pipelines import decode_latents, is_pipeline, load_pipeline, pipeline_parts
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
    """What ``erase()`` returns. With ``lora_rank``, ``model`` is the input's architecture with the adapters
    attached, and its frozen base weights are the input model's own tensors (shared, not copied: the run never
    writes them); changing the input's weights in place afterwards (``pipe.fuse_lora()``) changes this model
    too, so ``save()`` or ``pipeline()`` it first. ``save()``, ``pipeline()`` and merges write new tensors."""

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

    def __repr__(self) -> str:  # one line: the dataclass default would print every module
        def size(m):
            n = sum(p.numel() for p in m.parameters())
            return f"{type(m).__name__}({n / 1e6:.3g}M params)" if n >= 1e5 else f"{type(m).__name__}({n:,} params)"

        parts = [f"method={self.method!r}", f"model={size(self.model)}"]
        if self.generator is not None:
            parts.append(f"generator={size(self.generator)}")
        for k in ("steps", "lora_rank", "seconds"):
            if self.meta.get(k) is not None:
                parts.append(f"{k}={self.meta[k]}")
        if self.meta.get("forgotten"):
            parts.append(f"forgotten={_describe_target(self.meta['forgotten'])}")
        return f"Result({', '.join(parts)})"

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
            x = get_method(self.method).sample_one_step(self, n, cond, seed)
            if pipe is not None:
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
    def save(self, path, overwrite: bool = False, fused: Optional[bool] = None, pipeline=False,
             evaluation: Optional[dict] = None) -> Path:
        """Write the result atomically to ``path`` (a folder; an existing empty one is fine). A non-empty
        ``path`` is only replaced with ``overwrite=True``. A LoRA run writes ``pytorch_lora_weights.safetensors``
        (diffusers format: ``pipe.load_lora_weights(path)``) and, with ``fused=True``, also the merged full
        weights under ``unet/``; ``fused=None`` writes them only when the base model cannot be found again on disk.

        ``pipeline=True`` writes a complete pipeline folder (``DiffusionPipeline.from_pretrained(path)``): the
        pipeline ``erase()`` was given, with the erased UNet (LoRA merged; the LoRA file is written alongside).
        ``pipeline`` may also be a diffusers pipeline or a pipeline folder to take the other components from
        (needed after ``fu.load`` when the base folder is gone). ``evaluation`` (e.g. what ``fu.evaluate``
        returned) is recorded in the model card, ``README.md``, which every save writes."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidArgumentError(f"path: {str(path)!r} is a file, expected a folder (never replaced)")
        # A run folder that holds only erase(output_dir=...)'s checkpoints takes the result next to them.
        into_run_folder = path.is_dir() and _only_checkpoints(path)
        if path.exists() and not overwrite and not into_run_folder and any(path.iterdir()):
            raise InvalidArgumentError(f"path: {str(path)!r} exists; pass overwrite=True to replace it (an empty "
                                       "folder is used as it is)")
        parts = self._pipeline_parts(pipeline)
        if parts is not None and fused is False:
            raise InvalidArgumentError("fused: True or None with pipeline=True (a pipeline folder holds the full "
                                       "erased UNet)")
        if evaluation is not None and not isinstance(evaluation, dict):
            raise InvalidArgumentError(f"evaluation: expected a dict of metrics (what fu.evaluate returns), got "
                                       f"{type(evaluation).__name__}")
        if parts is not None:
            fused = True
        _check_finite(self.model, "model")
        if self.generator is not None:
            _check_finite(self.generator, "generator")
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            sfd = self.generator is not None
            # What a diffusers user samples: SFD's one-step generator with its one-step scheduler, else the model.
            scheduler = one_step_scheduler(self) if sfd else self.scheduler
            if parts is not None:  # writes unet/ (LoRA merged) and scheduler/ with the other components
                _save_pipeline(parts, self.generator if sfd else self.model, scheduler if sfd else None, tmp)
            write_full = parts is None
            if self.lora_roles is not None:
                lora_meta = _save_roles(self, tmp, fused, write_full)
            elif sfd:
                lora_meta = None
                if write_full:
                    _save_model(self.generator, tmp / "unet")
                _save_model(self.model, tmp / FAKE_SCORE)
            else:
                lora_meta = _save_weights(self.model, tmp, fused, write_full)
            if parts is None:
                scheduler.save_pretrained(tmp / "scheduler")
            meta = {**self.meta, "method": self.method, "options": _jsonable(self.options),
                    "history": _jsonable(self.history),
                    "extras": _jsonable({k: v for k, v in self.extras.items()
                                         if not callable(v) and k not in RUNTIME_EXTRAS}),
                    "training_scheduler": dict(self.scheduler.config, _class_name=type(self.scheduler).__name__)}
            if sfd:
                meta["layout"] = {"unet": "generator", FAKE_SCORE: "fake_score"}
            if evaluation is not None:
                meta["evaluation"] = _jsonable(evaluation)
            if lora_meta is not None:
                meta["lora"] = lora_meta
            meta = json.loads(json.dumps(meta, default=_jsonable_default))  # scheduler configs hold tuples/arrays
            (tmp / "README.md").write_text(model_card(meta, pipeline=parts is not None))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
            if into_run_folder:
                # Entry by entry, fastunlearn.json last: until it lands the folder is not a result.
                for entry in sorted(tmp.iterdir(), key=lambda e: e.name == META_FILE):
                    os.replace(entry, path / entry.name)
                tmp.rmdir()
            else:
                publish_dir(tmp, path)
        except OSError as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(path, e) from e
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _pipeline_parts(self, pipeline) -> Optional[dict]:
        """``save(pipeline=...)``: the parts of the pipeline to write around the erased UNet, or None."""
        if pipeline is False or pipeline is None:
            return None
        if pipeline is True:
            parts = self.extras.get("pipeline_parts")
            if parts is not None:
                return parts
            base = self.meta.get("base_model")
            if not (isinstance(base, str) and (Path(base) / "model_index.json").exists()):
                raise InvalidArgumentError(
                    "pipeline: this result was not made from a pipeline (or its folder is gone); pass the "
                    "pipeline to take the text encoders, tokenizers and VAE from (pipeline=pipe or a folder)")
            pipeline = base
        if isinstance(pipeline, (str, Path)):
            if not (Path(pipeline) / "model_index.json").exists():
                raise InvalidArgumentError(f"pipeline: {str(pipeline)!r} is not a diffusers pipeline folder "
                                           "(no model_index.json)")
            pipeline = load_pipeline(pipeline)
        if not is_pipeline(pipeline):
            raise InvalidArgumentError(f"pipeline: expected True, a diffusers pipeline or a pipeline folder, got "
                                       f"{type(pipeline).__name__}")
        return pipeline_parts(pipeline)


# extras that only live in memory (functions, modules): never written to fastunlearn.json
RUNTIME_EXTRAS = ("encode_prompts", "pipeline", "pipeline_parts", "vae")
FAKE_SCORE = "fake_score"


def one_step_scheduler(result):
    """SFD's one-step sampling as a diffusers scheduler configuration: ``EulerDiscreteScheduler`` on the
    training schedule with a single noise level, s* = σ_{t*}/γ_{t*} (Karras spacing between s* and s*).
    The pipeline then draws x = s*·z in Euler's variance-exploding form (``init_noise_sigma`` = s*, the
    "linspace" spacing), feeds the UNet x/√(s*²+1) = σ_{t*} z at the timestep of s* (t*), and one Euler step
    to σ = 0 returns x − s*·ε = x_{t*}/γ_{t*} − s*·ε_θ(x_{t*}, t*, c): SFD's generator (§5.3). So
    ``pipe(prompt, num_inference_steps=1, guidance_scale=1.0)`` samples G_θ in plain diffusers (exactly one
    step: the schedule has a single noise level; guidance 1.0 because SFD distils without CFG)."""
    from diffusers import EulerDiscreteScheduler

    ex = result.extras
    s_star = float(ex["sigma_init"]) / float(ex["gamma_init"])
    cfg = {k: v for k, v in result.scheduler.config.items() if not k.startswith("_")}
    cfg.update(use_karras_sigmas=True, sigma_min=s_star, sigma_max=s_star, timestep_spacing="linspace",
               final_sigmas_type="zero", timestep_type="discrete", interpolation_type="linear",
               use_exponential_sigmas=False, use_beta_sigmas=False, rescale_betas_zero_snr=False)
    return EulerDiscreteScheduler.from_config(cfg)


def _save_pipeline(parts: dict, unet, scheduler, folder: Path) -> None:
    """The pipeline of ``parts`` (``pipelines.pipeline_parts``) with ``unet`` (LoRA merged) and, when given,
    ``scheduler``, saved with diffusers' ``save_pretrained`` (safetensors)."""
    import diffusers

    comps = dict(parts["components"], unet=merged_copy(unet).eval())
    if scheduler is not None:
        comps["scheduler"] = scheduler
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the no-safety-checker notice: the input had none either
    try:
        pipe = getattr(diffusers, parts["class"])(**comps, **parts["settings"])
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _describe_target(f: dict) -> str:
    kind = f.get("kind")
    if kind == "concept":
        anchor = f" (anchor {f['anchor']!r})" if f.get("anchor") is not None else ""
        return f"concept {f.get('prompt')!r}{anchor}"
    if kind == "classes":
        over = f" (mapped onto class {f['override']})" if f.get("override") is not None else ""
        return f"classes {f.get('ids')}{over}"
    if kind == "datapoints":
        return f"{f.get('n')} training images"
    return repr(f)


def model_card(meta: dict, pipeline: bool = False) -> str:
    """The result's ``README.md``: Hugging Face model-card metadata and what was done, with how to load it."""
    from huggingface_hub import ModelCardData

    method = meta.get("method")
    base = meta.get("base_model")
    local = isinstance(base, str) and (base.startswith("zoo:") or Path(base).is_absolute())
    sd = meta.get("extras", {}).get("sdxl")
    tags = ["fastunlearn", "machine-unlearning", str(method), "diffusers",
            "stable-diffusion-xl" if sd else "stable-diffusion" if pipeline else "unet"]
    lora = meta.get("lora")
    if lora:
        tags.append("lora")
    data = ModelCardData(library_name="diffusers", base_model=None if local or not base else base, tags=tags)
    forgotten = _describe_target(meta["forgotten"]) if meta.get("forgotten") else "(not recorded)"
    desc = getattr(REGISTRY.get(method), "description", "") or ""
    rows = [("base model", f"`{base}`" if base else "(an in-memory model)"), ("method", f"`{method}`: {desc}"),
            ("forgotten", forgotten),
            ("steps × batch, lr", f"{meta.get('steps')} × {meta.get('batch_size')}, {meta.get('lr')}"),
            ("LoRA rank", meta.get("lora_rank") or "none (weights trained directly)"),
            ("options", f"`{json.dumps(meta.get('options', {}), sort_keys=True)}`"),
            ("seed", meta.get("seed")), ("training time", f"{meta.get('seconds')} s"),
            ("fastunlearn", meta.get("fastunlearn_version"))]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {method}: {forgotten} erased", "",
             f"Made with fastunlearn's `erase(method={method!r})`. Settings:", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + ["", "## Evaluation", ""]
    ev = meta.get("evaluation")
    if ev:
        flat = {k: v for k, v in ev.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        flat.update({f"{k}.{j}": w for k, v in ev.items() if isinstance(v, dict)
                     for j, w in v.items() if isinstance(w, (int, float)) and not isinstance(w, bool)})
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in flat.items()]
    else:
        lines.append("Not evaluated when saved (`fastunlearn eval DIR` measures it against the base model).")
    sfd = (meta.get("layout") or {}).get("unet") == "generator"
    lines += ["", "## Use", "", "```python"]
    if pipeline:
        lines += ["from diffusers import DiffusionPipeline", "", 'pipe = DiffusionPipeline.from_pretrained("DIR")']
        lines.append('image = pipe("a prompt", num_inference_steps=1, guidance_scale=1.0).images[0]  # one-step generator'
                     if sfd else 'image = pipe("a prompt").images[0]')
    elif lora:
        lines += ["pipe = DiffusionPipeline.from_pretrained(BASE)  # the base model above",
                  'pipe.load_lora_weights("DIR")' + ("  # the one-step generator" if sfd else "")]
    lines += ["", "import fastunlearn as fu", 'res = fu.load("DIR")  # the Result: res.sample(...), res.model', "```"]
    if pipeline and lora:
        lines += ["", "`pytorch_lora_weights.safetensors` is the same edit as a LoRA for the base model: load it into "
                  "the base (`load_lora_weights`), not into this pipeline, whose UNet already holds it."]
    if sfd:
        lines += ["", "`unet/` (and the LoRA file) is SFD's one-step generator; `scheduler/` samples it in one step "
                  "(Euler at the generator's noise level); the fake score is in `fake_score/`."]
    return "\n".join(lines) + "\n"


def _jsonable_default(x):
    if isinstance(x, tuple):
        return list(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


RUN_FOLDERS = ("checkpoints", "validation")  # what a run writes into its output folder before the result


def _only_checkpoints(folder: Path) -> bool:
    """True for a folder whose visible entries are just a run's ``checkpoints/`` (erase(output_dir=...)) and
    ``validation/`` (the CLI's --validation_prompt samples): no result yet."""
    names = {e.name for e in folder.iterdir() if not e.name.startswith(".")}
    return bool(names) and names <= set(RUN_FOLDERS)


def _check_finite(model, what: str) -> None:
    """Refuse to save NaN/inf weights: a saved result is always usable."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}: {name!r} holds non-finite values (NaN or inf); refusing to save")


def _save_weights(model, folder: Path, fused: Optional[bool], write_full: bool = True) -> Optional[dict]:
    """The denoiser's weights. Without adapters: the full model under ``unet/``. With LoRA: the adapter
    as a diffusers LoRA file, a reference to the base folder it was loaded from (only if the weights
    there are the ones trained on, checked by fingerprint) and, with ``fused=True`` or when no such
    folder exists (``fused=None``), the merged full weights under ``unet/`` so the result loads alone."""
    if not has_lora(model):
        if write_full:
            _save_model(model, folder / "unet")
        return None
    info = save_diffusers_lora(model, folder)
    on_disk = None if fused else find_base_on_disk(model)
    info["base"] = on_disk or {"path": None, "variant": None, "fingerprint": base_fingerprint(model)}
    info["fused"] = bool(fused or (fused is None and on_disk is None))
    if info["fused"] and write_full:
        _save_model(model, folder / "unet")
    return info


def _save_roles(result, folder: Path, fused: Optional[bool], write_full: bool = True) -> dict:
    """SFD with LoRA: the generator G_θ is the deliverable, so its adapter is the result's diffusers LoRA
    file (``pipe.load_lora_weights(folder)`` loads the one-step generator); the fake score ψ's adapter is
    a second diffusers LoRA file under ``fake_score/``. Full merged weights (``unet/`` = G_θ, ``fake_score/``
    = ψ) are written as ``_save_weights`` decides for other methods."""
    roles = result.lora_roles
    info = write_diffusers_lora(folder, roles["generator"])
    info["fake_score"] = write_diffusers_lora(folder / "fake_score", roles["fake_score"])
    info["fake_score"]["file"] = f"fake_score/{info['fake_score']['file']}"
    on_disk = roles["base"] if roles["base"].get("path") and not fused else None
    info["base"] = on_disk or {**roles["base"], "path": None, "variant": None}
    info["fused"] = bool(fused or (fused is None and on_disk is None))
    if info["fused"]:
        if write_full:
            _save_model(result.generator, folder / "unet")
        _save_model(result.model, folder / FAKE_SCORE)
    return info


def _full_weights_folder(path: Path, meta: dict, role: Optional[str]) -> Path:
    """Where a role's full weights are: ``unet/``, except SFD's roles (generator ``unet/`` and fake score
    ``fake_score/``; ``generator/`` and ``unet/`` in results saved before that layout)."""
    if (meta.get("layout") or {}).get("unet") == "generator":
        return path / ("unet" if role == "generator" else FAKE_SCORE)
    return path / ("generator" if role == "generator" else "unet")


def _load_denoiser(path: Path, meta: dict, base, role: Optional[str] = None):
    """The role's full weights (``_full_weights_folder``) when the result holds them; otherwise the
    base (``base=`` or the folder the result refers to, checked by fingerprint) with the saved LoRA adapter
    injected (``role`` "fake_score": SFD's second adapter file)."""
    lora = meta.get("lora")
    full = _full_weights_folder(path, meta, role)
    if not lora or ((full / "config.json").exists() and base is None):
        return _load_model(full)
    if role == "fake_score":
        lora = {**lora, **lora["fake_score"]}
    import copy

    from safetensors import SafetensorError

    ref = lora.get("base") or {}
    expected = ref.get("fingerprint")
    if base is None:
        if not ref.get("path"):
            raise MissingFileError(f"{path}: holds LoRA weights only; pass base= (the model it was trained from)")
        base = ref["path"]
    if isinstance(base, (str, Path)):
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
    merged_copy(model, share=True).save_pretrained(folder, safe_serialization=True)  # read, then dropped


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


def load(path, base=None, torch_dtype=None) -> Result:
    """A saved result back. Only safetensors and JSON are read: nothing is unpickled. A LoRA-only
    result needs its base model: ``base=`` (folder, diffusers model or pipeline) or the folder recorded
    at save time. ``torch_dtype`` (e.g. ``torch.float16`` or "float16") casts the loaded networks."""
    if torch_dtype is not None:
        torch_dtype = as_torch_dtype("torch_dtype", torch_dtype)
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
    sfd_layout = (meta.get("layout") or {}).get("unet") == "generator"
    model = _load_denoiser(path, meta, base, role="fake_score" if roles or sfd_layout else None)
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # another scheduler class's keys (SDXL's Euler) are ignored
    try:  # the training noise schedule (scheduler/ is what a diffusers user samples with)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")  # read even when replaced: a check
        training = meta.pop("training_scheduler", None)
        if isinstance(training, dict):
            scheduler = DDPMScheduler.from_config(training)
    except Exception as e:
        raise CorruptResultError(f"{path / 'scheduler'}: unreadable scheduler config ({e})") from e
    finally:
        diffusers.utils.logging.set_verbosity(level)
    if roles:
        generator = _load_denoiser(path, meta, base, role="generator")
    elif sfd_layout:
        generator = _load_model(path / "unet")
    else:
        generator = _load_model(path / "generator") if (path / "generator").is_dir() else None
    if torch_dtype is not None:
        model = model.to(torch_dtype)
        generator = generator.to(torch_dtype) if generator is not None else None
    method = meta.pop("method", None)
    options = meta.pop("options", {})
    history = meta.pop("history", [])
    extras = meta.pop("extras", {})
    return Result(model=model, scheduler=scheduler, method=method, options=options, history=history, meta=meta,
                  generator=generator, extras=extras)

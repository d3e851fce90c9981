"""What the user passed, resolved once: the model (a diffusers UNet, a Stable Diffusion / SDXL pipeline, or a
local folder of a UNet, a pipeline or a saved result) becomes ``Inputs(denoiser, scheduler, extras)``, and the
forget / retain data are checked against it.

``extras`` carries what a pipeline adds to its UNet (``fastunlearn.pipelines`` explains each key):
``encode_prompts`` (the frozen text encoders, cached per prompt), ``vae_scale_factor``, ``encode_images``
and ``pipeline`` (with a VAE), ``pipeline_parts`` (to save a whole pipeline), and for SDXL ``sdxl`` and
``resolution`` (its ``time_ids`` carry the image size). A bare UNet has none.

Nothing is downloaded and nothing is unpickled: folders load through safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import pipelines
from .errors import CorruptResultError, MissingFileError, bad_type, bad_value
from .models import Denoiser, load_unet
from .prompts import prompt_encoder, sdxl_prompt_encoder
from .pipelines import is_pipeline  # noqa: F401  (re-exported: resolvers ask inputs.is_pipeline)
from .targets import Classes, Concept, DataPoints
from .result import load
from .validation import check_target_fits


class Inputs(NamedTuple):
    """The resolved model: unpacks as ``denoiser, scheduler, extras``."""

    denoiser: torch.nn.Module   # the UNet that is copied and trained
    scheduler: object           # the noise scheduler (its alphas_cumprod)
    extras: dict                # what a pipeline adds (see the module docstring); {} for a bare UNet


def resolve(model, scheduler=None, resolution: Optional[int] = None, variant: Optional[str] = None,
            torch_dtype: Optional[torch.dtype] = None) -> Inputs:
    """``Inputs`` of a diffusers model, a pipeline, or a local folder (of a model, a pipeline or a result).
    ``resolution`` reaches SDXL's ``time_ids``; ``variant`` / ``torch_dtype`` are diffusers'
    ``from_pretrained`` options, for a folder only."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    check_load_options(model, variant, torch_dtype)
    if isinstance(model, (str, Path)):
        return _resolve_folder(Path(model), scheduler, resolution, variant, torch_dtype)
    if is_pipeline(model):
        return resolve_pipeline(model, scheduler, resolution)
    if not isinstance(model, (UNet2DModel, UNet2DConditionModel)):
        raise bad_type("model", "a diffusers UNet2DModel / UNet2DConditionModel, a pipeline, or a local path", model)
    if scheduler is None:
        raise bad_value("scheduler", "a diffusers noise scheduler (needed with a bare UNet; "
                        "fu.zoo.digits() returns one)", None)
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
        raise bad_type("scheduler", "a diffusers noise scheduler with alphas_cumprod (e.g. DDPMScheduler)", scheduler)
    return Inputs(model, scheduler, {})


def check_load_options(model, variant, torch_dtype) -> None:
    """``variant`` / ``torch_dtype`` (checked by ``RunConfig``) are options of loading a folder, nothing else."""
    if (variant is not None or torch_dtype is not None) and not isinstance(model, (str, Path)):
        raise bad_value("variant" if variant is not None else "torch_dtype",
                        "None unless model is a folder (they are options of loading it)", variant or torch_dtype)


def _resolve_folder(folder: Path, scheduler, resolution, variant, torch_dtype) -> Inputs:
    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    if not folder.exists():
        raise MissingFileError(f"model: {str(folder)!r} does not exist (fastunlearn never downloads models)")
    if (folder / "model_index.json").exists():  # a pipeline folder (a result saved with pipeline=True too)
        pipe = pipelines.load_pipeline(folder, variant=variant, torch_dtype=torch_dtype)
        return resolve_pipeline(pipe, scheduler, resolution)
    if (folder / "fastunlearn.json").exists():
        res = load(folder)
        return Inputs(res.model, scheduler or res.scheduler, {})
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    if not (unet_dir / "config.json").exists():
        raise MissingFileError(f"model: {str(folder)!r} has no config.json (expected a diffusers model folder)")
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if getattr(diffusers, str(cls_name), None) not in (UNet2DModel, UNet2DConditionModel):
        raise bad_value("model", "a folder of a UNet2DModel or UNet2DConditionModel", cls_name)
    if not any(unet_dir.glob("*.safetensors")):
        raise MissingFileError(f"model: {str(unet_dir)!r} has no .safetensors weights (fastunlearn never loads "
                               "pickled .bin/.pt/.ckpt files)")
    variant = pipelines.weights_variant(unet_dir, variant)
    try:
        unet = load_unet(unet_dir, variant=variant, torch_dtype=torch_dtype)
    except Exception as e:
        raise CorruptResultError(f"model: could not load {str(unet_dir)!r} ({str(e)[:300]})") from e
    if scheduler is None:
        sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
        if (sched_dir / "scheduler_config.json").exists():
            scheduler = DDPMScheduler.from_pretrained(sched_dir)
    return resolve(unet, scheduler)


# ------------------------------------------------------------------------------------------ pipelines
def resolve_pipeline(pipe, scheduler=None, resolution: Optional[int] = None) -> Inputs:
    """``Inputs`` of a Stable Diffusion 1.x/2.x or SDXL pipeline (``fastunlearn.pipelines``, ``fastunlearn.prompts``).
    ``resolution`` (pixels) only matters for SDXL, whose ``time_ids`` carry the image size."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise bad_type("model", "a text-to-image pipeline with a UNet2DConditionModel (pipe.unet)", unet)
    if is_sdxl(pipe):
        names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        missing = [n for n in names if getattr(pipe, n, None) is None]
        if missing:
            raise bad_value("model", f"an SDXL pipeline with both text encoders and tokenizers (missing {missing})",
                            type(pipe).__name__)
        res = int(resolution) if resolution is not None else default_resolution(pipe)
        encode = sdxl_prompt_encoder(*(getattr(pipe, n) for n in names), time_ids=(res, res, 0, 0, res, res),
                                     zeros_for_empty=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True)))
        extras = {"encode_prompts": encode, "sdxl": True, "resolution": res}
    elif getattr(pipe, "text_encoder_2", None) is not None or unet.config.get("addition_embed_type") is not None:
        # e.g. an SDXL refiner (text_embeds only) or a UNet with other added conditions
        raise bad_value("model", "a Stable Diffusion 1.x/2.x or SDXL base pipeline (added conditions "
                        f"{unet.config.get('addition_embed_type')!r} are not supported)", type(pipe).__name__)
    else:
        text_encoder, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
        if text_encoder is None or tokenizer is None:
            raise bad_value("model", "a pipeline with a text_encoder and a tokenizer", type(pipe).__name__)
        extras = {"encode_prompts": prompt_encoder(text_encoder, tokenizer)}
    scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
        raise bad_type("scheduler", "a diffusers noise scheduler with alphas_cumprod", scheduler)
    return Inputs(unet, scheduler, {**extras, **latent_extras(pipe), "pipeline_parts": pipelines.pipeline_parts(pipe)})


def is_sdxl(pipe) -> bool:
    """Two text encoders and a UNet with SDXL's ``text_time`` added conditions."""
    cfg = getattr(getattr(pipe, "unet", None), "config", None)
    return (getattr(pipe, "text_encoder_2", None) is not None
            and cfg is not None and cfg.get("addition_embed_type") == "text_time")


def default_resolution(pipe) -> int:
    """The pipeline's image size in pixels: the UNet's sample size times the VAE factor."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * getattr(pipe, "vae_scale_factor", 8)) if getattr(pipe, "vae", None) is not None else int(size)


def latent_extras(pipe) -> dict:
    """What SD and SDXL share: the VAE's scale factor and, with a VAE, the pixel encoder and the pipeline
    that ``Result.sample`` draws through."""
    extras = {"vae_scale_factor": pipelines.vae_scale_factor(pipe),
              "pipeline_guidance": pipelines.default_guidance(pipe)}
    if getattr(pipe, "vae", None) is not None:
        extras.update(encode_images=pipelines.image_encoder(pipe.vae), pipeline=pipe)
    return extras


# ------------------------------------------------------------------------------------------ targets and data
def target_kind(target) -> str:
    if isinstance(target, DataPoints):
        return "datapoints"
    if isinstance(target, Classes):
        return "classes"
    if isinstance(target, Concept):
        return "concept"
    raise bad_type("forget", "fu.Classes, fu.DataPoints or fu.Concept", target)


def check_targets(forget, retain, method: str, cls) -> None:
    """The targets suit the method (before the model is even loaded)."""
    if target_kind(forget) not in cls.targets:
        raise bad_value("forget", f"a target method {method!r} takes ({', '.join(cls.targets)})",
                        type(forget).__name__)
    if retain is not None and not isinstance(retain, (DataPoints, Classes, list, tuple, Concept)):
        raise bad_type("retain", "fu.DataPoints, fu.Classes, a list of prompts or None", retain)
    if cls.needs_retain and not isinstance(retain, DataPoints):
        raise bad_value("retain", f"fu.DataPoints of what to keep (method {method!r} needs retain data)",
                        type(retain).__name__ if retain is not None else None)


def check_fits(inputs: Inputs, forget, retain, resolution: Optional[int]) -> None:
    """The targets and the working resolution suit the model."""
    unet, extras = inputs.denoiser, inputs.extras
    den = Denoiser(unet)
    if resolution is not None and "vae_scale_factor" not in extras:
        raise bad_value("resolution", "None with a bare UNet (it works at its config's sample_size; resolution= "
                        "sets a pipeline's working size in pixels)", resolution)
    if resolution is not None and resolution % extras["vae_scale_factor"]:
        raise bad_value("resolution", f"a multiple of the VAE's scale factor {extras['vae_scale_factor']}", resolution)
    check_target_fits(forget, den)
    if den.kind == "text" and extras.get("encode_prompts") is None and any(
            isinstance(t, (DataPoints, Concept, list, tuple)) for t in (forget, retain)):
        raise bad_value("model", "a text-to-image pipeline (the prompts need its text encoder; a bare "
                        "UNet2DConditionModel has none)", type(unet).__name__)
    if isinstance(forget, Classes):
        if den.kind != "class":
            raise bad_value("forget", "fu.Classes only for a class-conditional model (num_class_embeds)",
                            type(unet).__name__)
        bad = [c for c in forget.ids if c >= den.num_classes]
        if bad or (forget.override is not None and forget.override >= den.num_classes):
            raise bad_value("forget", f"class ids in [0, {den.num_classes})", bad or forget.override)


def prepare_data(name: str, target, inputs: Inputs, resolution=None):
    """DataPoints → ``(x0 tensor on CPU, conditioning)`` after checking them against the model (None for
    other targets). On a pipeline with a VAE, x0 holds the pixel images still (checked against the working
    resolution); ``encode_data`` turns them into latents once the run starts."""
    if not isinstance(target, DataPoints):
        return None
    extras = inputs.extras
    den = Denoiser(inputs.denoiser)
    what = f"{name}.images"
    shape = den.sample_shape
    if extras.get("encode_images") is not None and not target.latents:
        vae = extras["pipeline"].vae
        f = extras["vae_scale_factor"]
        side = resolution if resolution is not None else shape[1] * f
        c = int(vae.config.in_channels)
        images = target.pixels(c, what, f"{c}-channel pixel images for the pipeline's VAE (latents already in "
                               f"the UNet's {shape[0]}-channel space go in through DataPoints.from_latents)")
        if tuple(images.shape[2:]) != (side, side):
            raise bad_value(what, f"pixel images of {side}x{side} (the working resolution: "
                            f"{'resolution=' if resolution is not None else 'the UNet sample_size x the VAE factor'} "
                            f"{side}; resize them, or pass resolution=), or latents of {shape[0]}x{side // f}x"
                            f"{side // f} through DataPoints.from_latents", tuple(target.images.shape))
    else:
        images = target.pixels(shape[0], what) if not target.latents else target.images
        if tuple(images.shape[1:2]) != shape[:1]:
            hint = ""
            if "vae_scale_factor" in extras and extras.get("encode_images") is None and not target.latents:
                hint = " (this pipeline has no VAE: images must be in the UNet's sample space)"
            raise bad_value(what, f"{shape[0]} channel(s) to match the model{hint}", tuple(target.images.shape))
        if target.latents and "vae_scale_factor" in extras:
            side = (resolution // extras["vae_scale_factor"]) if resolution is not None else shape[1]
            if tuple(images.shape[2:]) != (side, side):
                raise bad_value(what, f"latents of {shape[0]}x{side}x{side} (the UNet's working size)",
                                tuple(images.shape))
    if den.kind == "class":
        if target.labels is None:
            raise bad_value(f"{name}.labels", "class labels for a class-conditional model", None)
        k = den.num_classes
        if (target.labels >= k).any():
            raise bad_value(f"{name}.labels", f"class ids in [0, {k})", int(target.labels.max()))
        return images.float(), target.labels.clone()
    if den.kind == "text":
        if target.prompts is None:
            raise bad_value(f"{name}.prompts", "one prompt per image for a text-conditional model", None)
        return images.float(), list(target.prompts)
    return images.float(), None


def encode_data(data, target, extras: dict, seed: int, progress: bool, what: str, cache: dict):
    """Pixel images → the VAE's scaled latents (pipelines with a VAE; anything else passes through). Each
    DataPoints is encoded once per run (``cache``: forget and retain may be the same object)."""
    if data is None or extras.get("encode_images") is None or target.latents:
        return data
    key = id(target)
    if key not in cache:
        cache[key] = extras["encode_images"](data[0], seed=seed, progress=progress, what=what)
    return cache[key], data[1]

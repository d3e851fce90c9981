"""Text-to-image pipelines as ``erase()`` inputs: loading them, and the prompt and image encoders that
``fastunlearn.inputs.resolve_pipeline`` puts in a run's ``extras``.

``erase(pipe, forget=fu.Concept(...))`` accepts a diffusers ``StableDiffusionPipeline`` (SD 1.x/2.x
layout: ``unet`` = ``UNet2DConditionModel``, ``text_encoder`` = CLIP, ``tokenizer``) or a
``StableDiffusionXLPipeline`` (two text encoders and ``added_cond_kwargs``: ``fastunlearn.prompts``). The
methods only ever see

* the UNet (the model that is copied and trained; the text encoders and VAE stay untouched),
* the scheduler (the pipeline's own unless the caller passes one), and
* ``extras["encode_prompts"](list_of_str) -> cond``: the frozen text encoders' output for the UNet,
  computed once per distinct prompt and cached for the run. For SD, ``{"encoder_hidden_states": [N, L, D]}``
  (the last hidden state, what SD's UNet cross-attends to); for SDXL, also
  ``added_cond_kwargs = {"text_embeds", "time_ids"}`` (``fastunlearn.prompts``). Methods pass the dict
  through (``unet(x_t, t, **cond)``) and never branch on the model family.

The methods work in the UNet's sample space: the VAE latent space of a real Stable Diffusion pipeline
(data-free methods sample there directly, so they need no VAE), or pixel space for a pipeline built
without a VAE (``vae=None``, as the tiny test pipelines of ``fastunlearn.text`` are). On a pipeline with a
VAE, ``DataPoints`` pixel images are encoded once through its own VAE (``extras["encode_images"]``: batched,
``(z - shift_factor) * scaling_factor`` as the diffusers training scripts do, shown in a progress bar) and
latents given with ``DataPoints.from_latents`` are used as they are. ``extras["pipeline"]`` keeps the
pipeline itself: ``Result.sample`` draws through it (its scheduler, guidance and VAE decoder).
``extras["pipeline_guidance"]`` is the guidance scale its ``__call__`` uses by default (``default_guidance``):
methods that generate images from a text pipeline guide them as the pipeline would.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import CorruptResultError, MissingFileError, bad_value


def load_pipeline(folder, variant=None, torch_dtype=None) -> "DiffusionPipeline":
    """A diffusers pipeline from a local folder: safetensors only, never the hub, no safety checker.
    ``variant`` ("fp16", ...) picks ``*.{variant}.safetensors``; None finds it when the folder holds only one."""
    import json
    from pathlib import Path

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    folder = Path(folder)
    if not any(folder.glob("*/*.safetensors")):
        raise MissingFileError(f"model: {str(folder)!r} has no .safetensors weights (fastunlearn never loads "
                               "pickled .bin/.pt/.ckpt files)")
    index = json.loads((folder / "model_index.json").read_text())
    variant = weights_variant(folder, variant)
    # Components saved as absent ([null, null], e.g. no VAE) are passed as None, or diffusers refuses them.
    absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the safety-checker warning: it is not part of what fastunlearn trains
    try:
        return DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True, variant=variant,
                                                 torch_dtype=torch_dtype,
                                                 **{"safety_checker": None, **absent, "requires_safety_checker": False})
    except Exception as e:
        raise CorruptResultError(f"model: could not load the pipeline in {str(folder)!r} ({str(e)[:300]})") from e
    finally:
        logging.set_verbosity(level)


def weights_variant(folder, variant):
    """The weights variant to load from ``folder`` (a model or pipeline folder): ``variant`` checked against the
    files there, or, when None, the one variant found when the folder has no plain ``*.safetensors`` weights
    (a folder saved with ``save_pretrained(variant="fp16")`` only holds ``*.fp16.safetensors``)."""
    import re
    from pathlib import Path

    folder = Path(folder)
    files = [f.name for f in list(folder.glob("*.safetensors")) + list(folder.glob("*/*.safetensors"))]
    found = sorted({m.group(1) for f in files if (m := re.match(r".+\.([A-Za-z0-9_-]+)\.safetensors$", f))})
    plain = [f for f in files if not re.match(r".+\.([A-Za-z0-9_-]+)\.safetensors$", f)]
    if variant is not None:
        if variant not in found:
            raise bad_value("variant", f"a weights variant saved in {str(folder)!r} ({', '.join(found) or 'none'})",
                            variant)
        return variant
    if not plain and len(found) == 1:
        return found[0]
    if not plain and found:
        raise bad_value("variant", f"one of the weights variants in {str(folder)!r} ({', '.join(found)})", None)
    return None


def pipeline_parts(pipe) -> dict:
    """What ``Result.save(..., pipeline=True)`` needs to write a complete pipeline around the erased UNet: the
    pipeline class and its components other than the UNet (references, not copies), and its non-module
    settings (``requires_safety_checker``, ``force_zeros_for_empty_prompt``, ...)."""
    _, optional = pipe._get_signature_keys(pipe)
    return {"class": type(pipe).__name__,
            "components": {k: v for k, v in pipe.components.items() if k != "unet"},
            "settings": {k: pipe.config[k] for k in optional if k in pipe.config}}


def is_pipeline(obj) -> bool:
    """True for any diffusers ``DiffusionPipeline`` (whether supported is decided by ``resolve``)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def _working_vae(vae):
    """The VAE to run: a float32 copy when it is fp16 and asks for upcasting (``force_upcast``, the SDXL VAE,
    which overflows in fp16), as the pipelines do; never the caller's module changed in place."""
    p = next(vae.parameters())
    if p.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        import copy

        return copy.deepcopy(vae).float()
    return vae


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Latents in the UNet's sample space → images as ``pipe`` returns them (``output_type`` "pil", "np",
    "pt" or "latent"): undo ``scaling_factor`` / ``shift_factor``, decode with the pipeline's VAE and
    post-process with its ``image_processor``."""
    if output_type == "latent":
        return latents
    vae = _working_vae(pipe.vae)
    p = next(vae.parameters())
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    z = latents.to(p.device, p.dtype) / float(vae.config.scaling_factor) + shift
    images = torch.cat([vae.decode(z[a:a + 8]).sample for a in range(0, z.shape[0], 8)])
    return pipe.image_processor.postprocess(images.float(), output_type=output_type)


def image_encoder(the_vae, batch_size: int = 8) -> Callable:
    """``encode(pixels [N, 3, H, W] in [-1, 1], seed, progress) -> latents [N, C, H/f, W/f]`` on the CPU in
    fp32: ``vae.encode(x).latent_dist.sample()``, minus ``shift_factor`` (SD3/Flux VAEs; absent for SD/SDXL),
    times ``scaling_factor``, as the diffusers training scripts prepare latents. ``batch_size`` images per VAE
    call: the VAE's activations at SDXL size are large, a few images at a time keep the peak low."""
    from tqdm.auto import tqdm

    scaling = float(the_vae.config.scaling_factor)
    shift = float(getattr(the_vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(pixels: torch.Tensor, seed: int = 0, progress: bool = False, what: str = "images") -> torch.Tensor:
        vae = _working_vae(the_vae)
        p = next(vae.parameters())
        gen = torch.Generator(device=p.device).manual_seed(int(seed))  # the posterior draw is part of the run's seed
        was_training = vae.training
        vae.eval()
        out = []
        try:
            for a in tqdm(range(0, pixels.shape[0], batch_size), disable=not progress, leave=False,
                          desc=f"encoding {what} through the VAE", unit="batch"):
                x = pixels[a:a + batch_size].to(p.device, p.dtype)
                z = vae.encode(x).latent_dist.sample(generator=gen)
                out.append(((z - shift) * scaling).float().cpu())
        finally:
            vae.train(was_training)
        z = torch.cat(out)
        if not torch.isfinite(z).all():  # e.g. the SDXL VAE in fp16, which overflows
            raise bad_value(what, f"images the VAE encodes to finite latents (the VAE in {p.dtype} gave NaN/inf; "
                            "run it in float32 or use an fp16-safe VAE)", "non-finite latents")
        return z

    return encode


def default_guidance(pipe) -> Optional[float]:
    """The classifier-free guidance scale the pipeline's ``__call__`` uses by default (7.5 for Stable Diffusion,
    5.0 for SDXL), or None when it has none."""
    import inspect

    try:
        p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    except (TypeError, ValueError):
        return None
    d = getattr(p, "default", None)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def vae_scale_factor(pipe) -> int:
    """Pixels per UNet sample: the VAE's downsampling (8 for Stable Diffusion), 1 for a pipeline without a
    VAE (the tiny ones of ``fastunlearn.text`` work in pixel space)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)

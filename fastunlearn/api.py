"""``erase()``: validate the inputs, resolve defaults, run the method, return a ``Result``.

Everything the user passes is checked before any work starts; errors name the argument and what
was expected. The input model is deep-copied, never modified.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .errors import bad_type, bad_value, MissingFileError
from .methods import REGISTRY, get_method
from .models import Denoiser
from .result import Result
from .run import Run
from .targets import Classes, Concept, DataPoints
from .train import OPTIMIZERS, make_optimizer, train
from . import distributed as _distributed
from . import runtime as _runtime
from . import validation as _validation

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "xformers")


def _target_kind(target) -> str:
    if isinstance(target, DataPoints):
        return "datapoints"
    if isinstance(target, Classes):
        return "classes"
    if isinstance(target, Concept):
        return "concept"
    raise bad_type("forget", "fu.Classes, fu.DataPoints or fu.Concept", target)


def default_method(forget, retain) -> str:
    """DataPoints → SISS; classes with retain data → EraseDiff; classes or concepts without data → ESD."""
    kind = _target_kind(forget)
    if kind == "datapoints":
        choice = "siss"
    elif kind == "classes" and isinstance(retain, DataPoints):
        choice = "erasediff"
    else:
        choice = "esd"
    if choice not in REGISTRY:
        raise bad_value("method", f"one of {sorted(REGISTRY)} (the default for this target, {choice!r}, "
                        "is not available)", None)
    return choice


def resolve_model(model, scheduler, resolution=None, variant=None, torch_dtype=None):
    """(denoiser module, scheduler, extras) from a diffusers model, a pipeline, or a local folder (of a
    model, a pipeline or a result). ``resolution`` reaches SDXL's ``time_ids``; ``variant`` / ``torch_dtype``
    are diffusers' ``from_pretrained`` options for a folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not folder.exists():
            raise MissingFileError(f"model: {str(folder)!r} does not exist (fastunlearn never downloads models)")
        if (folder / "model_index.json").exists():  # a pipeline folder (a result saved with pipeline=True too)
            model = _pipeline_resolver().load_pipeline(folder, variant=variant, torch_dtype=torch_dtype)
            return _pipeline_resolver().resolve(model, scheduler, resolution=resolution)
        if (folder / "fastunlearn.json").exists():
            from .result import load
            res = load(folder)
            return res.model, scheduler or res.scheduler, {}
        unet_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
        if not (unet_dir / "config.json").exists():
            raise MissingFileError(f"model: {str(folder)!r} has no config.json (expected a diffusers model folder)")
        import json
        import diffusers
        cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
        cls = getattr(diffusers, str(cls_name), None)
        if cls not in (UNet2DModel, UNet2DConditionModel):
            raise bad_value("model", "a folder of a UNet2DModel or UNet2DConditionModel", cls_name)
        from .models import load_unet
        if not any(unet_dir.glob("*.safetensors")):
            raise MissingFileError(f"model: {str(unet_dir)!r} has no .safetensors weights (fastunlearn never loads "
                                   "pickled .bin/.pt/.ckpt files)")
        variant = _pipeline_resolver().weights_variant(unet_dir, variant)
        try:
            unet = load_unet(unet_dir, variant=variant, torch_dtype=torch_dtype)
        except Exception as e:
            from .errors import CorruptResultError
            raise CorruptResultError(f"model: could not load {str(unet_dir)!r} ({str(e)[:300]})") from e
        if scheduler is None:
            sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
            if (sched_dir / "scheduler_config.json").exists():
                scheduler = DDPMScheduler.from_pretrained(sched_dir)
        model = unet
    pipe_resolver = _pipeline_resolver()
    if pipe_resolver is not None and pipe_resolver.is_pipeline(model):
        return pipe_resolver.resolve(model, scheduler, resolution=resolution)
    if not isinstance(model, (UNet2DModel, UNet2DConditionModel)):
        raise bad_type("model", "a diffusers UNet2DModel / UNet2DConditionModel, a pipeline, or a local path", model)
    if scheduler is None:
        raise bad_value("scheduler", "a diffusers noise scheduler (needed with a bare UNet; "
                        "fu.zoo.digits() returns one)", None)
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
        raise bad_type("scheduler", "a diffusers noise scheduler with alphas_cumprod (e.g. DDPMScheduler)", scheduler)
    return model, scheduler, {}


def _pipeline_resolver():
    try:
        from . import pipelines
        return pipelines
    except ImportError:
        return None


TORCH_DTYPES = ("float32", "float16", "bfloat16")


def _check_load_options(model, variant, torch_dtype):
    """``variant`` / ``torch_dtype``: diffusers' loading options, for a model given as a folder; the dtype
    as a ``torch.dtype`` (a name such as "float16" is accepted)."""
    if variant is not None and not isinstance(variant, str):
        raise bad_type("variant", "a weights variant name such as 'fp16'", variant)
    if isinstance(torch_dtype, str):
        if torch_dtype not in TORCH_DTYPES:
            raise bad_value("torch_dtype", " | ".join(TORCH_DTYPES) + " (or a torch.dtype)", torch_dtype)
        torch_dtype = getattr(torch, torch_dtype)
    if torch_dtype is not None and torch_dtype not in tuple(getattr(torch, n) for n in TORCH_DTYPES):
        raise bad_value("torch_dtype", " | ".join(f"torch.{n}" for n in TORCH_DTYPES), torch_dtype)
    if (variant is not None or torch_dtype is not None) and not isinstance(model, (str, Path)):
        raise bad_value("variant" if variant is not None else "torch_dtype",
                        "None unless model is a folder (they are options of loading it)", variant or torch_dtype)
    return torch_dtype


def _check_int(name, value, lo=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, "an int", value)
    if value < lo:
        raise bad_value(name, f"an int >= {lo}", value)


def _prepare_data(name: str, target, den: Denoiser, extras=None, resolution=None):
    """DataPoints → (x0 tensor on CPU, conditioning) after checking them against the model. On a pipeline
    with a VAE, x0 holds the pixel images still (checked against the working resolution); ``_encode_data``
    turns them into latents once the run starts."""
    if target is None:
        return None
    if not isinstance(target, DataPoints):
        return None
    extras = extras or {}
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


def _encode_data(data, target, extras, seed: int, progress: bool, what: str, cache: dict):
    """Pixel images → the VAE's scaled latents (pipelines with a VAE; anything else passes through). Each
    DataPoints is encoded once per run (``cache``: forget and retain may be the same object)."""
    if data is None or extras.get("encode_images") is None or target.latents:
        return data
    key = id(target)
    if key not in cache:
        cache[key] = extras["encode_images"](data[0], seed=seed, progress=progress, what=what)
    return cache[key], data[1]


def erase(model, forget, retain=None, method: Optional[str] = None, scheduler=None, steps: Optional[int] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, seed: int = 0,
          lora_rank: Optional[int] = None, precision=None, optimizer=None, gradient_checkpointing=None,
          attention=None, compile=None, resolution=None, output_dir=None, checkpoint_every=None, resume=False,
          progress: bool = True, tf32=None, max_nonfinite: int = 10, keep_checkpoints: int = 2,
          offload_input: bool = True, variant: Optional[str] = None, torch_dtype=None, callback=None,
          **method_options) -> Result:
    """Make ``model`` forget ``forget`` while keeping ``retain``; see the README for the full contract."""
    # ---------------------------------------------------------------- validate everything first
    kind = _target_kind(forget)
    if method is None:
        method = default_method(forget, retain)
    cls = get_method(method)
    if kind not in cls.targets:
        raise bad_value("forget", f"a target method {method!r} takes ({', '.join(cls.targets)})",
                        type(forget).__name__)
    if retain is not None and not isinstance(retain, (DataPoints, Classes, list, tuple, Concept)):
        raise bad_type("retain", "fu.DataPoints, fu.Classes, a list of prompts or None", retain)
    if cls.needs_retain and not isinstance(retain, DataPoints):
        raise bad_value("retain", f"fu.DataPoints of what to keep (method {method!r} needs retain data)",
                        type(retain).__name__ if retain is not None else None)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_type("seed", "an int", seed)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if v is not None:
            _check_int(name, v)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr != lr):
        raise bad_value("lr", "a positive number", lr)
    if lora_rank is not None:
        _check_int("lora_rank", lora_rank)
    if precision is not None and precision not in PRECISIONS:
        raise bad_value("precision", " | ".join(PRECISIONS), precision)
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise bad_value("optimizer", " | ".join(OPTIMIZERS), optimizer)
    if attention is not None and attention not in ATTENTIONS:
        raise bad_value("attention", " | ".join(ATTENTIONS), attention)
    _runtime.resolve(precision, gradient_checkpointing, attention, compile, tf32)  # validates the switches
    _runtime.check_resolution(resolution)
    _validation.check_run_args(seed=seed, steps=steps, batch_size=batch_size, lr=lr, lora_rank=lora_rank,
                               output_dir=output_dir, checkpoint_every=checkpoint_every, resume=resume,
                               progress=progress, max_nonfinite=max_nonfinite, keep_checkpoints=keep_checkpoints)
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise bad_value("output_dir", "a folder path", str(output_dir))
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every)
        if output_dir is None:
            raise bad_value("output_dir", "a folder (checkpoint_every needs somewhere to write)", None)
    if resume and output_dir is None:
        raise bad_value("output_dir", "the folder of the run to resume", None)
    _distributed.check_args(checkpoint_every, resume)
    if not isinstance(offload_input, bool):
        raise bad_type("offload_input", "True or False", offload_input)
    if callback is not None and not callable(callback):
        raise bad_type("callback", "a function callback(step, result) called after every step", callback)
    opts = cls.resolve_options(method_options)
    torch_dtype = _check_load_options(model, variant, torch_dtype)

    unet, scheduler, extras = resolve_model(model, scheduler, resolution, variant=variant, torch_dtype=torch_dtype)
    if isinstance(model, (str, Path)) and _distributed.world_size() > 1:
        unet = unet.to(_distributed.device())  # loaded here, so ours to move: each process on its own device
    den = Denoiser(unet)
    if resolution is not None and "vae_scale_factor" not in extras:
        raise bad_value("resolution", "None with a bare UNet (it works at its config's sample_size; resolution= "
                        "sets a pipeline's working size in pixels)", resolution)
    if resolution is not None and resolution % extras["vae_scale_factor"]:
        raise bad_value("resolution", f"a multiple of the VAE's scale factor {extras['vae_scale_factor']}", resolution)
    _validation.check_target_fits(forget, den)
    if den.kind == "text" and extras.get("encode_prompts") is None and any(
            isinstance(t, DataPoints) or isinstance(t, Concept) or isinstance(t, (list, tuple)) for t in (forget, retain)):
        raise bad_value("model", "a text-to-image pipeline (the prompts need its text encoder; a bare "
                        "UNet2DConditionModel has none)", type(unet).__name__)
    if isinstance(forget, Classes):
        if den.kind != "class":
            raise bad_value("forget", "fu.Classes only for a class-conditional model (num_class_embeds)",
                            type(unet).__name__)
        bad = [c for c in forget.ids if c >= den.num_classes]
        if bad or (forget.override is not None and forget.override >= den.num_classes):
            raise bad_value("forget", f"class ids in [0, {den.num_classes})", bad or forget.override)
    forget_data = _prepare_data("forget", forget, den, extras, resolution)
    retain_data = _prepare_data("retain", retain, den, extras, resolution)
    concept_data = None  # Concept.images: checked (and, on a latent pipeline, encoded) like DataPoints
    if isinstance(forget, Concept) and isinstance(forget.images, DataPoints):
        concept_data = _prepare_data("forget.images", forget.images, den, extras, resolution)
    if cls.needs_forget_data and forget_data is None:
        raise bad_value("forget", f"fu.DataPoints (method {method!r} needs the images to forget)", type(forget).__name__)

    d = cls.defaults_for(forget, opts, lora_rank) if hasattr(cls, "defaults_for") else cls.defaults  # per target
    steps = steps or d.get("steps", 100)
    batch_size = batch_size or d.get("batch_size", 16)
    lr = lr or d.get("lr", 1e-4)
    optimizer = optimizer or d.get("optimizer", "adamw")
    ckpt = None  # checkpoints / resume (fastunlearn.checkpoint): checked here, before any work
    if output_dir is not None and (checkpoint_every is not None or resume):
        from .checkpoint import Checkpointer, run_fingerprint
        fingerprint = run_fingerprint(method=method, options=opts, batch_size=batch_size, lr=lr, seed=seed,
                                      optimizer=optimizer, defaults=d, lora_rank=lora_rank, precision=precision,
                                      model=unet, forget=forget, forget_data=forget_data, retain=retain,
                                      retain_data=retain_data)
        ckpt = Checkpointer.prepare(output_dir, every=checkpoint_every, keep=keep_checkpoints, resume=resume,
                                    fingerprint=fingerprint, steps=steps)

    # ---------------------------------------------------------------- run
    # The caller's modules leave the accelerator for the run (and come back at the end, also on errors):
    # the UNet before it is copied, so that only the trained copy is there; the text encoders and VAE once
    # the method's set-up has encoded its prompts and generated its images. A no-op on CPU.
    offload = _runtime.InputOffload(enabled=offload_input)
    device = offload.move_unet(unet)
    try:
        t_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        encoded: dict = {}  # before the Run: the VAE is still where the caller put it (runtime.InputOffload)
        forget_data = _encode_data(forget_data, forget, extras, seed, progress, "forget images", encoded)
        retain_data = _encode_data(retain_data, retain, extras, seed, progress, "retain images", encoded)
        if concept_data is not None and extras.get("encode_images") is not None and not forget.images.latents:
            z = _encode_data(concept_data, forget.images, extras, seed, progress, "concept images", encoded)[0]
            pts = forget.images
            forget = dataclasses.replace(forget, images=DataPoints.from_latents(z, labels=pts.labels, prompts=pts.prompts))
        run = Run(unet, scheduler, forget=forget_data, retain=retain_data, forget_target=forget, retain_target=retain,
                  batch_size=batch_size, seed=seed, lora_rank=lora_rank, encode_prompts=extras.get("encode_prompts"),
                  trainable=getattr(cls, "trainable_filter", lambda opts: None)(opts), device=device)
        run.resolution = resolution
        if resolution is not None:  # the working size: what data-free methods and Result.sample draw at
            run.model.register_to_config(sample_size=resolution // extras["vae_scale_factor"])
        m = cls(run, **opts)
        m.setup()
        for data in (run.forget, run.retain):  # prompts of DataPoints: encoded now, while the encoders are here
            if data is not None and isinstance(data[1], list) and run.encode_prompts is not None:
                run.encode_prompts(sorted(set(data[1])))
        offload.move_encoders(model)
        rt = _runtime.resolve(precision, gradient_checkpointing, attention, compile, tf32, model=run.model)
        applied = _runtime.apply(run, rt, method=m)  # after setup: every role exists; adapters stay fp32
        dp = _distributed.attach(run, m)  # None unless launched as several processes (accelerate launch)
        params = m.trainable_parameters()
        opt = make_optimizer(optimizer, params, lr, betas=d.get("betas", (0.9, 0.999)),
                             weight_decay=d.get("weight_decay", 0.0), eps=d.get("eps", 1e-8))
        start_step, history = ckpt.restore(run, m, opt) if ckpt is not None else (0, [])
        # callback(step, view): the model in training as a Result (e.g. for validation samples every N steps)
        view = Result(model=run.model, scheduler=scheduler, method=method, options=opts, extras=extras)
        hooks = [h for h in (ckpt.on_step_end if ckpt is not None else None,
                             (lambda step, _history: callback(step, view)) if callback is not None else None) if h]
        history = train(m, opt, steps, seed, start_step=start_step, history=history,
                        progress=progress and (dp is None or dp.rank == 0), max_nonfinite=max_nonfinite,
                        on_step_end=(lambda step, h: [f(step, h) for f in hooks]) if hooks else None)
        drift = dp.detach() if dp is not None else None
        applied.release()
        seconds = time.perf_counter() - t_start
        meta = {
            "fastunlearn_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "optimizer": optimizer,
            "lora_rank": lora_rank, "runtime": rt.as_dict(), "seconds": round(seconds, 3), "peak_memory_bytes": _peak_memory(run.device),
            "forget": repr(forget)[:500], "skipped_steps": sum(1 for h in history if h.get("skipped")),
            "resumed_from_step": ckpt.resumed_from if ckpt is not None else None,
        }
        if dp is not None:  # data-parallel: processes and the largest weight difference between them (0.0)
            meta.update(processes=dp.size, process_weight_drift=drift)
        try:
            import diffusers
            meta["diffusers_version"] = diffusers.__version__
        except Exception:  # pragma: no cover
            pass
        from .provenance import provenance
        meta.update(provenance(model, unet, forget))  # base_model + forgotten: what `fastunlearn eval DIR` reads
        result = Result(model=run.model.eval(), scheduler=scheduler, method=method, options=opts, history=history,
                        meta=meta, extras=extras)
        finish = getattr(m, "finish", None)
        if finish is not None:
            finish(result)
        return result
    finally:
        offload.restore()


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

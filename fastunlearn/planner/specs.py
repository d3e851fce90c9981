"""Model specs: what the planner knows of a model before any weight is loaded (its config files), and the
UNet built from them (under ``FakeTensorMode`` in the trace: shapes and dtypes, no storage)."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from ..errors import MissingFileError, bad_type, bad_value
from ..models import restore_extra_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BUILTIN = {"sdxl": "sdxl.json", "sd15": "sd15.json"}


def load_spec(model) -> dict:
    """``{"name", "unet", "text_encoders", "vae", "resolution", ...}`` for "sdxl", "sd15", a JSON file
    of that form, or a diffusers model / pipeline folder (only its config files are read)."""
    if isinstance(model, str) and model in BUILTIN:
        return json.loads((CONFIG_DIR / BUILTIN[model]).read_text())
    if isinstance(model, dict):
        return model if "unet" in model else {"name": "model", "unet": model}
    if isinstance(model, torch.nn.Module) or hasattr(model, "unet"):
        return _spec_of_object(model)
    if not isinstance(model, (str, Path)):
        raise bad_type("model", "'sdxl', 'sd15', a path to a diffusers model folder, a UNet or a pipeline", model)
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        spec = json.loads(path.read_text())
        if "unet" not in spec:
            spec = {"name": path.stem, "unet": spec}
        return spec
    if not path.is_dir():
        raise MissingFileError(f"model: {str(path)!r} is neither 'sdxl', 'sd15' nor a model folder")
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    if not (unet_dir / "config.json").exists():
        raise MissingFileError(f"model: {str(path)!r} has no config.json (expected a diffusers model folder)")
    spec = {"name": path.name, "unet": json.loads((unet_dir / "config.json").read_text()), "text_encoders": []}
    for sub in ("text_encoder", "text_encoder_2"):
        f = path / sub / "config.json"
        if f.exists():
            cfg = json.loads(f.read_text())
            cfg["_class_name"] = (cfg.get("architectures") or ["CLIPTextModel"])[0]
            spec["text_encoders"].append(cfg)
    if (path / "vae" / "config.json").exists():
        spec["vae"] = json.loads((path / "vae" / "config.json").read_text())
        spec["vae_scale_factor"] = 2 ** (len(spec["vae"].get("block_out_channels", [0] * 4)) - 1)
    return spec


def _spec_of_object(model) -> dict:
    """The spec of an in-memory UNet or pipeline (its configs; the weights are not touched)."""
    unet = getattr(model, "unet", model)
    if not hasattr(unet, "config"):
        raise bad_type("model", "a diffusers UNet or pipeline", model)
    spec = {"name": type(model).__name__, "unet": {**dict(unet.config), "_class_name": type(unet).__name__},
            "text_encoders": []}
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(model, name, None)
        if te is not None:
            spec["text_encoders"].append({**te.config.to_dict(), "_class_name": type(te).__name__})
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        spec["text_length"] = int(tok.model_max_length)
    vae = getattr(model, "vae", None)
    if vae is not None:
        spec["vae"] = {**dict(vae.config), "_class_name": type(vae).__name__}
    spec["vae_scale_factor"] = int(getattr(model, "vae_scale_factor", 8)) if vae is not None else 1
    te2 = getattr(model, "text_encoder_2", None)
    if te2 is not None:
        spec["pooled_dim"] = int(te2.config.projection_dim)
    return spec


def unet_kind(spec) -> str:
    """"text" (prompt embeddings), "class" (class labels) or "uncond", as ``models.Denoiser.kind``."""
    cls = spec["unet"].get("_class_name", "UNet2DConditionModel")
    if cls == "UNet2DConditionModel":
        return "text"
    if cls == "UNet2DModel":
        return "class" if spec["unet"].get("num_class_embeds") else "uncond"
    raise bad_value("model", "a UNet2DModel or UNet2DConditionModel config", cls)


def default_resolution(spec) -> int:
    """The model's own working size in pixels (latent size × the VAE factor for text models)."""
    size = spec["unet"].get("sample_size", 64)
    size = size if isinstance(size, int) else size[0]
    if unet_kind(spec) != "text":
        return size
    return spec.get("resolution") or size * spec.get("vae_scale_factor", 8)


def sample_side(spec, resolution: int) -> int:
    """The side of the UNet's input at ``resolution`` pixels (latents for text models)."""
    return resolution // spec.get("vae_scale_factor", 8) if unet_kind(spec) == "text" else resolution


def build_unet(spec):
    """The UNet of ``spec`` (built on the current device / tensor mode), with fastunlearn's own config keys
    (the null class) kept as a loaded model keeps them."""
    cfg = {k: v for k, v in spec["unet"].items() if not k.startswith("_")}
    cls = getattr(diffusers, spec["unet"].get("_class_name", "UNet2DConditionModel"))
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return restore_extra_config(cls.from_config(cfg), cfg)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def build_scheduler(spec):
    """A noise scheduler for the trace. The schedule decides no byte of a step (only values such as SFD's
    timesteps), so the family's usual one serves: SD's scaled-linear for text models, DDPM's linear for pixel
    models."""
    if unet_kind(spec) == "text":
        return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012)
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def count_params(spec) -> dict:
    """Parameter counts of the pipeline parts besides the UNet (meta device: no memory)."""
    import transformers

    out = {"text_encoders": 0, "vae": 0}
    with torch.device("meta"):
        for cfg in spec.get("text_encoders") or []:
            c = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
            cls = getattr(transformers, cfg.get("_class_name", "CLIPTextModel"), transformers.CLIPTextModel)
            out["text_encoders"] += sum(p.numel() for p in cls(transformers.CLIPTextConfig(**c)).parameters())
        if spec.get("vae"):
            c = {k: v for k, v in spec["vae"].items() if not k.startswith("_")}
            out["vae"] = sum(p.numel() for p in diffusers.AutoencoderKL.from_config(c).parameters())
    return out

"""Stable Diffusion XL pipelines as ``erase()`` inputs (issue 6).

An SDXL UNet is conditioned on more than SD's one text embedding (SDXL paper §2.1-2.2; diffusers
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``):

* ``encoder_hidden_states`` [N, 77, 768 + 1280]: the penultimate hidden states of both text encoders
  (CLIP ViT-L and OpenCLIP ViT-bigG), concatenated along the features;
* ``added_cond_kwargs["text_embeds"]`` [N, 1280]: the pooled, projected output of the second encoder;
* ``added_cond_kwargs["time_ids"]`` [N, 6]: micro-conditioning (original size, crop top-left, target
  size), here (R, R, 0, 0, R, R) for the pipeline's default resolution R, as the pipeline passes at
  sampling time.

``resolve(pipe)`` returns what ``fastunlearn.pipelines.resolve`` returns for SD, ``(unet, scheduler,
extras)``, with ``extras["encode_prompts"](prompts)`` producing that conditioning dict (cached per prompt on
the CPU, encoders run once). The methods never branch on SDXL: they index, concatenate and pass the
dict through (``Denoiser`` calls ``unet(x_t, t, **cond)``). The empty prompt "" is SDXL's unconditional
branch; with the pipeline's ``force_zeros_for_empty_prompt`` (True for SDXL base) it is all zeros, as
the pipeline builds it for classifier-free guidance.

``tiny_sdxl_pipeline()`` builds a random-weight SDXL pipeline with the real layout at toy size, for tests.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import bad_type, bad_value
from .prompts import sdxl_prompt_encoder as prompt_encoder


def is_sdxl(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    cfg = getattr(unet, "config", None)
    return (getattr(pipe, "text_encoder_2", None) is not None
            and cfg is not None and cfg.get("addition_embed_type") == "text_time")


def default_resolution(pipe) -> int:
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * getattr(pipe, "vae_scale_factor", 8)) if getattr(pipe, "vae", None) is not None else int(size)


def resolve(pipe, scheduler=None, resolution: Optional[int] = None):
    """``(unet, scheduler, extras)`` of an SDXL pipeline; see the module docstring."""
    unet = pipe.unet
    parts = {n: getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    missing = [n for n, v in parts.items() if v is None]
    if missing:
        raise bad_value("model", f"an SDXL pipeline with both text encoders and tokenizers (missing {missing})",
                        type(pipe).__name__)
    scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
        raise bad_type("scheduler", "a diffusers noise scheduler with alphas_cumprod", scheduler)
    res = int(resolution) if resolution is not None else default_resolution(pipe)
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
    encode = prompt_encoder(parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"], parts["tokenizer_2"],
                            time_ids=(res, res, 0, 0, res, res), zeros_for_empty=zeros)
    from .pipelines import latent_extras

    return unet, scheduler, {"encode_prompts": encode, "sdxl": True, "resolution": res, **latent_extras(pipe)}


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8, hidden: int = 32, max_length: int = 16,
                       with_vae: bool = True):
    """A random-weight ``StableDiffusionXLPipeline`` small enough for CPU tests: two CLIP text encoders of
    width ``hidden`` (the second with a projection), the SDXL UNet layout (``text_time`` added conditions,
    cross-attention over both encoders' features) on 4x``sample_size``² latents, and, with ``with_vae``,
    a two-level VAE (scale factor 2)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .text import BOS, EOS, WORDS, tiny_tokenizer

    tok = tiny_tokenizer(WORDS, max_length)
    tok2 = tiny_tokenizer(WORDS, max_length)
    vocab = tok.get_vocab()
    te_cfg = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=vocab[BOS],
                  eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], projection_dim=hidden)
    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(CLIPTextConfig(**te_cfg)).eval()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg)).eval()
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * hidden,
            attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=hidden + 6 * time_dim, norm_num_groups=8)
        vae = None
        if with_vae:
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size,
                                scaling_factor=0.13025).eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, prediction_type="epsilon",
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)

"""Stable Diffusion XL pipelines as ``erase()`` inputs (issue 6).

An SDXL UNet is conditioned on more than SD's one text embedding (SDXL paper §2.1-2.2; diffusers
``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``):

* ``encoder_hidden_states`` [N, 77, 768 + 1280]: the penultimate hidden states of both text encoders
  (CLIP ViT-L and OpenCLIP ViT-bigG), concatenated along the features;
* ``added_cond_kwargs["text_embeds"]`` [N, 1280]: the pooled, projected output of the second encoder;
* ``added_cond_kwargs["time_ids"]`` [N, 6]: micro-conditioning (original size, crop top-left, target
  size), here (R, R, 0, 0, R, R) for the pipeline's default resolution R, as the pipeline passes at
  sampling time.

``fastunlearn.inputs.resolve_pipeline(pipe)`` returns ``Inputs(unet, scheduler, extras)`` for SDXL as for
SD, with ``extras["encode_prompts"](prompts)`` (``fastunlearn.prompts.sdxl_prompt_encoder``) producing that conditioning dict
(cached per prompt on the CPU, encoders run once). The methods never branch on SDXL: they index, concatenate and pass the
dict through (``Denoiser`` calls ``unet(x_t, t, **cond)``). The empty prompt "" is SDXL's unconditional
branch; with the pipeline's ``force_zeros_for_empty_prompt`` (True for SDXL base) it is all zeros, as
the pipeline builds it for classifier-free guidance.

``tiny_sdxl_pipeline()`` builds a random-weight SDXL pipeline with the real layout at toy size, for tests.
"""
from __future__ import annotations

import torch


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

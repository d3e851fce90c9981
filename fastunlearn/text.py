"""Tiny text-to-image pipelines built locally from configs, for tests and examples: no download.

``tiny_text_pipeline()`` returns a diffusers ``StableDiffusionPipeline`` whose parts have the real
Stable Diffusion layout at toy size: a ``UNet2DConditionModel`` with cross-attention (``attn2``) blocks,
a CLIP text encoder (``CLIPTextModel`` from a ``CLIPTextConfig``) and a byte-level BPE ``CLIPTokenizer``
whose vocabulary and merges are written here (the byte alphabet, each byte as a word end, and whole-
word merges for a small word list). There is no VAE: the UNet works directly on 4x8x8 "latents". The
weights are random (seeded), which is enough to check that a method moves the predictions for a prompt
where it should and leaves other prompts alone.

``tiny_sdxl_pipeline()`` builds a random-weight ``StableDiffusionXLPipeline`` with the real SDXL layout at
toy size (two text encoders, ``text_time`` added conditions, optionally a VAE), for tests.
"""
from __future__ import annotations

from pathlib import Path

from typing import Iterable, Optional

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words that become single tokens; anything else is spelled out byte by byte (still valid input).
WORDS = ("a photo of an the in style by painting picture cat dog car tree house man woman bird flower "
         "van gogh monet picasso red blue green church garbage truck parachute fish golf ball").split()


def tiny_vocab(words: Iterable[str] = WORDS):
    """(vocab, merges) of a CLIP-style BPE: byte alphabet, byte+"</w>", whole-word merges, BOS/EOS."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in dict.fromkeys(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for s in (BOS, EOS):
        vocab.setdefault(s, len(vocab))
    return vocab, merges


def tiny_tokenizer(words: Iterable[str] = WORDS, max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab(words)
    try:
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    except TypeError:  # transformers < 5 builds a CLIP tokenizer from files only
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "vocab.json").write_text(json.dumps(vocab))
            (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
            return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                                 model_max_length=max_length)


def tiny_vae(sample_size: int = 16, seed: int = 1, latent_channels: int = 4, scaling_factor: float = 0.18215):
    """A random-weight two-level ``AutoencoderKL`` (RGB ↔ ``latent_channels`` at half the size: VAE scale
    factor 2), with Stable Diffusion's ``scaling_factor``."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size,
                             scaling_factor=scaling_factor).eval()


def tiny_text_pipeline(seed: int = 0, sample_size: int = 8, hidden: int = 32, max_length: int = 16,
                       words: Optional[Iterable[str]] = None, in_channels: int = 4, scheduler=None,
                       with_vae: bool = False):
    """A random-weight ``StableDiffusionPipeline`` (no safety checker) small enough for CPU tests: UNet
    ``in_channels``x8x8 with blocks (32, 64), cross-attention in the outer blocks, CLIP text encoder with 2
    layers of width ``hidden``, tokenizer of ``max_length`` tokens, and ``scheduler`` (default: DDPM
    scaled-linear, SD's). Without a VAE (default) the UNet works in pixel space; ``with_vae=True`` adds
    ``tiny_vae`` (RGB pixels at 2x ``sample_size``, a latent-space pipeline like the real ones)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(words or WORDS, max_length)
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])).eval()
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden,
            attention_head_dim=8, norm_num_groups=8)
    if scheduler is None:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")
    vae = tiny_vae(2 * sample_size, latent_channels=in_channels) if with_vae else None
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---------------------------------------------------------------------------------------- digits by prompt
# The bundled text-conditional model (``fastunlearn.zoo.digits_text()``, trained by
# ``scripts/train_digits.py --only digits-text``) is this pipeline at the digits' size (1x8x8, the digits'
# linear schedule), trained on scikit-learn's digits with prompts that name the digit. Its prompts map to
# classes, so a concept erased from it is judged with the digits classifier like a class.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a picture of the digit {}", "handwritten {}")
DIGIT_WORDS = tuple("a picture of the digit handwritten".split()) + DIGIT_NAMES


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8, hidden: int = 32, max_length: int = 16,
                       with_vae: bool = True):
    """A random-weight ``StableDiffusionXLPipeline`` small enough for CPU tests: two CLIP text encoders of
    width ``hidden`` (the second with a projection), the SDXL UNet layout (``text_time`` added conditions,
    cross-attention over both encoders' features) on 4x``sample_size``² latents, and, with ``with_vae``,
    a two-level VAE (scale factor 2)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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


def digit_prompt(c: int, template: int = 0) -> str:
    """The prompt that names digit ``c`` (``template`` indexes ``DIGIT_TEMPLATES``)."""
    return DIGIT_TEMPLATES[template].format(DIGIT_NAMES[c])


def digits_text_pipeline(seed: int = 0):
    """The untrained digits text-to-image pipeline (random weights): what the bundled one was trained from."""
    from diffusers import DDPMScheduler

    # The digits' schedule (linear β 1e-4 → 0.02) with the two settings StableDiffusionPipeline would
    # otherwise rewrite with a warning: steps_offset 1 and no clipping of x0 (the sampler clips).
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, steps_offset=1, prediction_type="epsilon")
    return tiny_text_pipeline(seed=seed, sample_size=8, hidden=32, max_length=8, words=DIGIT_WORDS,
                              in_channels=1, scheduler=scheduler)

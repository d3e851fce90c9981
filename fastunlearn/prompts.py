"""Prompt encoding for text-to-image UNets: ``encode(list_of_prompts) -> cond``, the conditioning dict that
``Denoiser`` passes through (``unet(x_t, t, **cond)``).

The frozen text encoders run once per distinct prompt (tokens padded to ``model_max_length``, as the
diffusers pipelines do) and the embeddings are cached on the CPU in fp32 for the run; the caller moves them.
``encode.cache`` maps each prompt seen so far to its entry (tests count text-encoder calls with it).

* Stable Diffusion 1.x/2.x: ``{"encoder_hidden_states": [N, L, D]}``, the last hidden state of CLIP.
* SDXL (SDXL paper §2.1-2.2; ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``):
  ``encoder_hidden_states`` [N, 77, 768 + 1280], the penultimate hidden states of both encoders (CLIP ViT-L
  and OpenCLIP ViT-bigG) concatenated along the features, plus ``added_cond_kwargs = {"text_embeds": [N, 1280]
  the pooled projection of the second encoder, "time_ids": [N, 6]}``, the micro-conditioning (original
  size, crop top-left, target size) = (R, R, 0, 0, R, R) at the working resolution R, as the pipeline passes
  at sampling time. The empty prompt "" is SDXL's unconditional branch; with the pipeline's
  ``force_zeros_for_empty_prompt`` (True for SDXL base) it is all zeros, as the pipeline builds it.

The methods never branch on SDXL: they index, concatenate and pass the dict through (``fastunlearn.conditioning``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from .errors import bad_type


def _run_encoder(tokenizer, text_encoder, prompts: List[str], **kwargs):
    """One frozen text encoder on ``prompts``, in eval mode (dropout off) whatever mode it was in."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        return text_encoder(ids.to(text_encoder.device), **kwargs)
    finally:
        text_encoder.train(was_training)


def _cached(embed: Callable[[List[str]], Sequence], assemble: Callable[[list], Dict]) -> Callable[[List[str]], Dict]:
    """``encode(prompts)``: ``embed`` runs on the prompts not seen yet (sorted, so the batch does not depend on
    the order they arrive in) and returns one entry per prompt; ``assemble`` stacks the entries of a batch."""
    cache: dict = {}

    def encode(prompts: List[str]) -> Dict:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise bad_type("prompts", "a list of strings", prompts)
        new = sorted({p for p in prompts if p not in cache})
        if new:
            for p, entry in zip(new, embed(new)):
                cache[p] = entry
        return assemble([cache[p] for p in prompts])

    encode.cache = cache
    return encode


def prompt_encoder(text_encoder, tokenizer) -> Callable[[List[str]], Dict[str, torch.Tensor]]:
    """Stable Diffusion 1.x/2.x: ``prompts -> {"encoder_hidden_states": [N, L, D]}``."""

    @torch.no_grad()
    def embed(prompts):
        return _run_encoder(tokenizer, text_encoder, prompts)[0].float().cpu()

    return _cached(embed, lambda rows: {"encoder_hidden_states": torch.stack(rows)})


def sdxl_prompt_encoder(text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                        time_ids=(1024, 1024, 0, 0, 1024, 1024), zeros_for_empty: bool = True) -> Callable[[List[str]], Dict]:
    """SDXL: ``prompts -> {"encoder_hidden_states", "added_cond_kwargs": {"text_embeds", "time_ids"}}``.

    ``time_ids`` is the micro-conditioning (original size, crop top-left, target size) the pipeline passes at
    sampling time; with ``zeros_for_empty`` (the pipeline's ``force_zeros_for_empty_prompt``) the empty prompt,
    SDXL's unconditional branch, is all zeros, as the pipeline builds it for classifier-free guidance."""
    ids6 = torch.tensor(time_ids, dtype=torch.float32)

    @torch.no_grad()
    def embed(prompts):
        hidden, pooled = [], None
        for tok, te in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
            out = _run_encoder(tok, te, prompts, output_hidden_states=True)
            pooled = out[0]  # the last encoder's pooled projection (text_embeds), as the pipeline keeps it
            hidden.append(out.hidden_states[-2])
        h, pooled = torch.cat(hidden, dim=-1).float().cpu(), pooled.float().cpu()
        return [(torch.zeros_like(hi), torch.zeros_like(pi)) if (zeros_for_empty and p == "") else (hi, pi)
                for p, hi, pi in zip(prompts, h, pooled)]

    def assemble(entries):
        return {"encoder_hidden_states": torch.stack([h for h, _ in entries]),
                "added_cond_kwargs": {"text_embeds": torch.stack([p for _, p in entries]),
                                      "time_ids": ids6.expand(len(entries), 6).clone()}}

    return _cached(embed, assemble)

"""The tiny pipelines built locally from configs (fastunlearn.text): a CLIP-style tokenizer that round-trips its
words, SD and SDXL pipelines with the real layout that are seeded, and whose prompt conditioning drives the UNet."""
import pytest
import torch

from fastunlearn.prompts import prompt_encoder, sdxl_prompt_encoder
from fastunlearn.text import BOS, EOS, WORDS, digit_prompt, tiny_sdxl_pipeline, tiny_text_pipeline, tiny_tokenizer


def test_prompts_tokenize_between_bos_and_eos_and_decode_back():
    tok = tiny_tokenizer(max_length=16)
    vocab = tok.get_vocab()
    ids = tok("a photo of a cat", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == vocab[BOS] and ids[6] == vocab[EOS]
    assert tok.decode(ids[1:6]) == "a photo of a cat"
    for w in WORDS:  # every word of the vocabulary round-trips
        assert tok.decode(tok(w).input_ids[1:-1]) == w


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("build", [tiny_text_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_pipelines_are_seeded(build):
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    for part in ("unet", "text_encoder"):
        assert torch.equal(_weights(getattr(a, part)), _weights(getattr(b, part)))
        assert not torch.equal(_weights(getattr(a, part)), _weights(getattr(c, part)))


def test_sd_prompts_condition_the_unet():
    pipe = tiny_text_pipeline(seed=0)
    enc = prompt_encoder(pipe.text_encoder, pipe.tokenizer)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        out = pipe.unet(x, t, **enc([digit_prompt(3), digit_prompt(7)])).sample
    assert out.shape == x.shape and not torch.allclose(out[0], pipe.unet(x[:1], t[:1], **enc([digit_prompt(7)])).sample[0])


def test_sdxl_conditioning_has_the_pipelines_shapes():
    pipe = tiny_sdxl_pipeline(seed=0, with_vae=False)
    enc = sdxl_prompt_encoder(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                              time_ids=(16, 16, 0, 0, 16, 16))
    cond = enc(["a cat", ""])
    assert cond["encoder_hidden_states"].shape[-1] == pipe.unet.config.cross_attention_dim
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert not cond["encoder_hidden_states"][1].any()  # force_zeros_for_empty_prompt: "" is all zeros
    with torch.no_grad():
        out = pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), **cond).sample
    assert out.shape == (2, 4, 8, 8)

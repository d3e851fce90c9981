"""prompts: the SD and SDXL prompt encoders agree with the diffusers pipelines' own encode_prompt, run the text
encoders once per distinct prompt, and leave them in the mode they were in."""
import pytest
import torch

from fastunlearn.errors import FastUnlearnError
from fastunlearn.prompts import prompt_encoder, sdxl_prompt_encoder

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_sd_matches_the_pipeline_and_caches(tiny_pipelines):
    pipe = tiny_pipelines["sd"]()
    calls = _count_calls(pipe.text_encoder)
    pipe.text_encoder.train()  # dropout on: the encoder must switch it off and back
    enc = prompt_encoder(pipe.text_encoder, pipe.tokenizer)
    out = enc(PROMPTS)["encoder_hidden_states"]
    assert pipe.text_encoder.training
    assert calls == [2]  # one batch of the two distinct prompts
    again = enc(list(reversed(PROMPTS)))["encoder_hidden_states"]
    assert calls == [2] and torch.equal(again, out.flip(0))  # cached, and rows follow the order asked
    pipe.text_encoder.eval()
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FastUnlearnError):
        enc("a photo of a cat")  # a bare string, not a list


def test_sdxl_matches_the_pipeline_and_zeros_the_empty_prompt(tiny_pipelines):
    pipe = tiny_pipelines["sdxl"]()
    enc = sdxl_prompt_encoder(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                              time_ids=(16, 16, 0, 0, 16, 16))
    out = enc(PROMPTS[:2] + [""])
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    torch.testing.assert_close(out["encoder_hidden_states"][:2], hidden.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["added_cond_kwargs"]["text_embeds"][:2], pooled.float(), rtol=1e-5, atol=1e-6)
    assert not out["encoder_hidden_states"][2].any() and not out["added_cond_kwargs"]["text_embeds"][2].any()
    assert torch.equal(out["added_cond_kwargs"]["time_ids"], torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 3))
    keep_empty = sdxl_prompt_encoder(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                                     zeros_for_empty=False)
    assert keep_empty([""])["encoder_hidden_states"].any()  # force_zeros_for_empty_prompt=False: encoded

"""Text concepts on a tiny Stable Diffusion pipeline built locally (random weights, no download): the
pipeline adapter, and ESD / EraseDiff moving the concept prompt's prediction toward the target each
method defines on held-out noisy inputs (unrelated prompts: tests/test_concepts_digits.py, on a trained model)."""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn.api import default_method
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.generation import ddim_states
from fastunlearn.text import tiny_text_pipeline

CONCEPT, ANCHOR = "a photo of a cat", "a photo of a dog"
UNRELATED = ["a red car", "a green tree", "a painting of a house"]


@pytest.fixture
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny_text_pipeline(seed=0)


def _eps(unet, x, t, enc, prompt):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=enc([prompt] * x.shape[0])["encoder_hidden_states"]).sample


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def test_tiny_pipeline_resolves_to_unet_scheduler_and_cached_encoder(pipe):
    from fastunlearn import inputs, pipelines

    assert pipelines.is_pipeline(pipe) and not pipelines.is_pipeline(pipe.unet)
    unet, sched, extras = inputs.resolve(pipe, None)
    assert unet is pipe.unet and sched is pipe.scheduler
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(CONCEPT).input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]
    enc = extras["encode_prompts"]
    out = enc([CONCEPT, "", CONCEPT])["encoder_hidden_states"]
    assert out.shape == (3, 16, 32) and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert len(enc.cache) == 2  # one text-encoder pass per distinct prompt


def test_default_methods_by_target():
    data = fu.DataPoints(torch.zeros(2, 1, 8, 8), labels=torch.tensor([1, 2]))
    assert default_method(fu.DataPoints(torch.zeros(2, 1, 8, 8)), None) == "siss"
    assert default_method(fu.Classes([3]), data) == "erasediff"
    assert default_method(fu.Classes([3]), None) == "esd"
    assert default_method(fu.Concept(CONCEPT), UNRELATED) == "esd"


def test_concept_on_a_class_model_is_a_clear_error(tiny):
    unet, sched = tiny
    with pytest.raises(InvalidArgumentError, match="^forget"):
        fu.erase(unet, forget=fu.Concept(CONCEPT), method="esd", scheduler=sched, steps=1, progress=False)


# This pipeline has random weights: its text encoder gives every prompt ~85% of the same hidden state, and its
# UNet is nowhere near the minimum of the denoising loss, so what a method does to *other* prompts says nothing
# here. Selectivity (unrelated prompts stay close, other classes keep their rate) is tested on the trained
# text-to-image digits model in tests/test_concepts_digits.py; the moves toward each method's target are
# tested here.


@pytest.fixture(scope="module")
def esd_run():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = tiny_text_pipeline(seed=0)
    base = copy.deepcopy(pipe.unet)
    res = fu.erase(pipe, forget=fu.Concept(CONCEPT), steps=60, batch_size=8, lr=1e-3, ddim_steps=10,
                   negative_guidance=1.0, progress=False)
    enc = res.extras["encode_prompts"]
    # Held-out noisy inputs: states of fresh DDIM trajectories of the frozen base (another seed).
    gen = torch.Generator().manual_seed(1234)
    x_T = torch.randn(16, 4, 8, 8, generator=gen)
    eps_base = lambda x, t, cond: base(x, t, **cond).sample  # noqa: E731
    states, ts = ddim_states(eps_base, pipe.scheduler, x_T, enc([CONCEPT] * 16), 10, 9, 3.0, enc([""] * 16))
    k = torch.randint(0, 10, (16,), generator=gen)
    x, t = torch.stack(states)[k, torch.arange(16)], ts[k]
    e_c, e_null = _eps(base, x, t, enc, CONCEPT), _eps(base, x, t, enc, "")
    return dict(pipe=pipe, base=base, res=res, enc=enc, x=x, t=t, target=e_c - 1.0 * (e_c - e_null), e_c=e_c)


def test_esd_moves_the_concept_toward_its_target(esd_run):
    pipe, base, res, enc, x, t = (esd_run[k] for k in ("pipe", "base", "res", "enc", "x", "t"))
    assert res.method == "esd" and res.extras["params"] == "esd-x"
    for (n, p), p0 in zip(pipe.unet.named_parameters(), base.parameters()):
        assert torch.equal(p, p0)  # the input pipeline is untouched
    changed = {n for (n, p), p0 in zip(res.model.named_parameters(), base.parameters()) if not torch.equal(p, p0)}
    assert changed and all(".attn2." in n for n in changed)  # ESD-x trains cross-attention only
    before = _mse(esd_run["e_c"], esd_run["target"])
    after = _mse(_eps(res.model, x, t, enc, CONCEPT), esd_run["target"])
    assert after < 0.3 * before, (before, after)  # measured: ~0.005x



@pytest.fixture(scope="module")
def erasediff_runs():
    """EraseDiff and its retain-only control (λ = 0, same seed: the same batches, timesteps and noise), so
    the forget term's own effect is separated from what the retain term does to a random-weight UNet."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = tiny_text_pipeline(seed=0)
    base = copy.deepcopy(pipe.unet)
    kw = dict(forget=fu.Concept(CONCEPT, anchor=ANCHOR), retain=UNRELATED, method="erasediff", steps=60,
              batch_size=8, lr=1e-3, n_generate=24, generate_steps=10, progress=False)
    res = fu.erase(pipe, lambd=1.0, **kw)
    control = fu.erase(pipe, lambd=0.0, **kw)
    enc = res.extras["encode_prompts"]
    # Held-out forget inputs: images of the concept generated by the base with another seed, noised.
    gen = torch.Generator().manual_seed(99)
    eps_base = lambda x, t, cond: base(x, t, **cond).sample  # noqa: E731
    x0 = ddim_states(eps_base, pipe.scheduler, torch.randn(16, 4, 8, 8, generator=gen), enc([CONCEPT] * 16), 10,
                     10)[0][-1]
    ac = pipe.scheduler.alphas_cumprod
    t = torch.randint(0, 1000, (16,), generator=gen)
    g, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    x = g * x0 + s * torch.randn(x0.shape, generator=gen)
    return dict(base=base, res=res, control=control, enc=enc, x=x, t=t)


def _gap(model, r):
    return _mse(_eps(model, r["x"], r["t"], r["enc"], CONCEPT), _eps(model, r["x"], r["t"], r["enc"], ANCHOR))


def test_erasediff_maps_the_concept_onto_its_anchor(erasediff_runs):
    r = erasediff_runs
    assert r["res"].extras["forget_target"] == "relabel"
    gap_before, gap_after, gap_control = _gap(r["base"], r), _gap(r["res"].model, r), _gap(r["control"].model, r)
    print(f"gap to the anchor: base {gap_before:.3g}, retain-only control {gap_control:.3g}, erasediff {gap_after:.3g}")
    # measured with the generated images guided at the pipeline's 7.5: 0.29x (the control alone: 0.39x); unguided
    # (the earlier default) 0.30x and 0.44x
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)
    assert gap_after < 0.85 * gap_control, (gap_control, gap_after)  # the forget term's own doing (0.75x; 0.68x)

"""LoRA output end to end on tiny SD and SDXL pipelines built here (random weights, local tokenizers).

For every concept-capable method in the registry: erase a concept with ``lora_rank``, save, load the
file into a fresh pipeline with diffusers' own ``pipe.load_lora_weights(dir)``, check that the loaded
UNet predicts exactly what the trained one does, and generate. The input pipeline is never changed.
"""
import pytest
import torch

import fastunlearn as fu
from fastunlearn.lora import LORA_WEIGHT_NAME, has_lora
from fastunlearn.methods import REGISTRY

CONCEPT_METHODS = sorted(n for n, cls in REGISTRY.items() if "concept" in cls.targets)
# Small and fast: a few sampling steps for ESD's x_t, few steps everywhere.
FAST_OPTIONS = {"esd": {"ddim_steps": 3}, "erasediff": {"n_generate": 4, "generate_steps": 2}}


def _erase_args(method, pipe):
    cls = REGISTRY[method]
    kw = dict(method=method, lora_rank=4, steps=2, batch_size=2, progress=False, **FAST_OPTIONS.get(method, {}))
    retain = ["a photo of a cat", "a red car"]
    if cls.needs_retain:
        x = torch.randn(4, *_sample_shape(pipe.unet))
        retain = fu.DataPoints(x, prompts=["a photo of a cat", "a red car", "a tree", "a house"])
    return fu.Concept("van gogh style painting", anchor="a painting"), retain, kw


def _sample_shape(unet):
    cfg = unet.config
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def _predict(unet, cond, seed=0):
    """ε for two fixed noisy inputs at two timesteps under ``cond`` (a prompt-embedding dict)."""
    x = torch.randn(2, *_sample_shape(unet), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unet(x, torch.tensor([50, 700]), **cond).sample


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("method", CONCEPT_METHODS)
def test_lora_result_loads_into_a_fresh_pipeline(tmp_path, kind, method, tiny_pipelines):
    BUILDERS = tiny_pipelines
    pipe = BUILDERS[kind]()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    forget, retain, kw = _erase_args(method, pipe)
    res = fu.erase(pipe, forget=forget, retain=retain, **kw)

    # The input pipeline is untouched: same weights, no adapter injected.
    assert not has_lora(pipe.unet)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    out = res.save(tmp_path / "r")
    assert (out / LORA_WEIGHT_NAME).exists()

    fresh = BUILDERS[kind]()  # same seed: the same base weights, as from_pretrained would give
    fresh.load_lora_weights(str(out))
    enc = res.extras["encode_prompts"]
    cond = enc(["van gogh style painting", "a photo of a cat"])
    base = _predict(pipe.unet, cond)
    # SFD delivers the one-step generator G_θ: its adapter is the LoRA file (the fake score is in fake_score/)
    delivered = res.generator if res.generator is not None else res.model
    trained = _predict(delivered, cond)
    loaded = _predict(fresh.unet, cond)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loaded, base, atol=1e-7)  # the adapter did train

    img = fresh("van gogh style painting", num_inference_steps=2, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()

    back = fu.load(out)  # a pipeline built in memory has no folder to refer to: full weights were written too
    torch.testing.assert_close(_predict(back.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)
    if res.generator is not None:
        torch.testing.assert_close(_predict(back.generator, cond), trained, atol=1e-5, rtol=1e-4)
        # ... and the LoRA files alone rebuild both roles on the base
        lora_only = fu.load(out, base=pipe)
        torch.testing.assert_close(_predict(lora_only.generator, cond), trained, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_predict(lora_only.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)


def test_sdxl_conditioning_has_both_encoders_and_time_ids(tiny_pipelines):
    from fastunlearn.inputs import resolve

    pipe = tiny_pipelines["sdxl"]()
    unet, sched, extras = resolve(pipe)
    c = extras["encode_prompts"](["a photo of a cat", ""])
    d1, d2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert c["encoder_hidden_states"].shape == (2, pipe.tokenizer.model_max_length, d1 + d2)
    assert c["added_cond_kwargs"]["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert c["added_cond_kwargs"]["time_ids"][0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    # "" is SDXL's unconditional branch: zeros with force_zeros_for_empty_prompt (as the pipeline does)
    assert not c["encoder_hidden_states"][1].any() and not c["added_cond_kwargs"]["text_embeds"][1].any()
    assert c["encoder_hidden_states"][0].abs().sum() > 0
    # the same embeddings the pipeline computes for its UNet
    pe, _, pooled, _ = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
    torch.testing.assert_close(c["encoder_hidden_states"][:1], pe.float())
    torch.testing.assert_close(c["added_cond_kwargs"]["text_embeds"][:1], pooled.float())


def test_lora_only_result_needs_and_checks_its_base(tmp_path, tiny_pipelines):
    """save(fused=False) writes only the adapter; load(base=...) checks the base by fingerprint."""
    pipe = tiny_pipelines["sd"]()
    res = fu.erase(pipe, forget=fu.Concept("van gogh style painting"), retain=["a tree"], method=CONCEPT_METHODS[0],
                   lora_rank=4, steps=1, batch_size=2, progress=False, **FAST_OPTIONS.get(CONCEPT_METHODS[0], {}))
    out = res.save(tmp_path / "lora", fused=False)
    assert not (out / "unet").exists()
    with pytest.raises(fu.errors.MissingFileError, match="base="):
        fu.load(out)
    back = fu.load(out, base=pipe)
    cond = res.extras["encode_prompts"](["van gogh style painting", "a tree"])
    torch.testing.assert_close(_predict(back.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)
    other = tiny_pipelines["sd"]()
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)  # a different base must be refused
    with pytest.raises(fu.errors.InvalidArgumentError, match="fingerprint"):
        fu.load(out, base=other)


def test_result_on_a_folder_base_refers_to_it(tmp_path, tiny_pipelines):
    """A base loaded from disk is referred to (no full copy written) and found again by fu.load."""
    from fastunlearn.models import load_unet

    pipe = tiny_pipelines["sd"]()
    pipe.unet.save_pretrained(tmp_path / "base")
    pipe.unet = load_unet(tmp_path / "base")
    res = fu.erase(pipe, forget=fu.Concept("van gogh style painting"), retain=["a tree"], method=CONCEPT_METHODS[0],
                   lora_rank=4, steps=1, batch_size=2, progress=False, **FAST_OPTIONS.get(CONCEPT_METHODS[0], {}))
    out = res.save(tmp_path / "r")
    assert (out / LORA_WEIGHT_NAME).exists() and not (out / "unet").exists()
    back = fu.load(out)
    cond = res.extras["encode_prompts"](["van gogh style painting", "a tree"])
    torch.testing.assert_close(_predict(back.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)
    assert (res.save(tmp_path / "f", fused=True) / "unet").is_dir()


# ------------------------------------------------------------------------ a pipeline folder back (issue 15)
def _fresh(code: str, **paths):
    """Run ``code`` in a new interpreter that never imports fastunlearn (and checks it did not)."""
    import subprocess
    import sys

    pre = "import sys, torch\n" + "".join(f"{k} = {str(v)!r}\n" for k, v in paths.items())
    post = "\nassert 'fastunlearn' not in sys.modules\n"
    r = subprocess.run([sys.executable, "-c", pre + code + post], capture_output=True, text=True, timeout=300,
                       cwd=paths.get("cwd", "/"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("kind", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_pipeline_folder_loads_in_plain_diffusers(tmp_path, kind, tiny_pipelines):
    """save(pipeline=True): DiffusionPipeline.from_pretrained in a fresh process gets the erased UNet (LoRA
    merged, the LoRA file alongside) and generates; the model card records the run; fu.load round-trips."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipelines[kind]()
    res = fu.erase(pipe, forget=fu.Concept("van gogh style painting", anchor="a painting"), method="esd", lora_rank=4,
                   steps=1, batch_size=2, ddim_steps=2, progress=False)
    out = res.save(tmp_path / "pipe", pipeline=True)
    assert (out / "model_index.json").exists() and (out / LORA_WEIGHT_NAME).exists()
    size = 16
    _fresh(f"""
from diffusers import DiffusionPipeline
p = DiffusionPipeline.from_pretrained(out)
assert type(p).__name__ == {type(pipe).__name__!r}, type(p)
img = p("van gogh style painting", num_inference_steps=2, height={size}, width={size}, output_type="pt",
        generator=torch.Generator().manual_seed(0)).images
assert img.shape == (1, 3, {size}, {size}) and torch.isfinite(img).all()
""", out=out)
    cond = res.extras["encode_prompts"](["van gogh style painting", "a tree"])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    torch.testing.assert_close(_predict(unet, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_predict(unet, cond), _predict(pipe.unet, cond), atol=1e-7)
    card = (out / "README.md").read_text()
    for text in ("library_name: diffusers", "esd", "van gogh style painting", '"ddim_steps": 2', "LoRA rank | 4"):
        assert text in card, text
    back = fu.load(out)
    torch.testing.assert_close(_predict(back.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)


def test_sfd_generator_is_the_unet_and_samples_in_one_step_in_plain_diffusers(tmp_path, tiny_pipelines):
    """Full-weight SFD: unet/ is the one-step generator G_θ, fake_score/ the fake score ψ; the saved scheduler
    makes pipe(..., num_inference_steps=1, guidance_scale=1.0) compute SFD's x_g (§5.3) exactly."""
    pipe = tiny_pipelines["sd"]()
    res = fu.erase(pipe, forget=fu.Concept("van gogh style painting", anchor="a painting"), method="sfd", steps=1,
                   batch_size=2, progress=False)
    out = res.save(tmp_path / "p", pipeline=True)
    plain = res.save(tmp_path / "r")
    for folder in (out, plain):
        assert (folder / "fake_score" / "config.json").exists() and not (folder / "generator").exists()
    ex = res.extras
    cond = res.extras["encode_prompts"](["a painting", "van gogh style painting"])
    z = torch.randn(1, *_sample_shape(pipe.unet), generator=torch.Generator().manual_seed(3))
    s, g = ex["sigma_init"], ex["gamma_init"]
    one = res.extras["encode_prompts"](["a painting"])
    with torch.no_grad():  # G_θ(z) = x/γ − (σ/γ) ε_θ(x, t*), x = σ z
        x_g = (s * z - s * res.generator(s * z, torch.tensor([ex["t_init"]]), **one).sample) / g
    torch.save(x_g, tmp_path / "x_g.pt")
    _fresh("""
from diffusers import DiffusionPipeline
p = DiffusionPipeline.from_pretrained(out)
lat = p("a painting", num_inference_steps=1, guidance_scale=1.0, output_type="latent",
        generator=torch.Generator().manual_seed(3)).images
ref = torch.load(ref_file)
torch.testing.assert_close(lat, ref, atol=1e-4, rtol=1e-4)
img = p("a painting", num_inference_steps=1, guidance_scale=1.0, height=16, width=16).images[0]
assert img.size == (16, 16)
""", out=out, ref_file=tmp_path / "x_g.pt")
    for folder in (out, plain):
        back = fu.load(folder)
        torch.testing.assert_close(_predict(back.generator, cond), _predict(res.generator, cond), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_predict(back.model, cond), _predict(res.model, cond), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(back.scheduler.alphas_cumprod, res.scheduler.alphas_cumprod)
    assert "num_inference_steps=1, guidance_scale=1.0" in (out / "README.md").read_text()


def test_variant_folders_are_inputs(tmp_path, tiny_pipelines):
    """A pipeline saved with variant="fp16" loads as erase()'s input (found, or named with variant=), in the
    dtype asked for with torch_dtype=; a variant that is not there is named."""
    pipe = tiny_pipelines["sd"]().to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    kw = dict(forget=fu.Concept("van gogh style painting"), method="esd", steps=1, batch_size=2, ddim_steps=2,
              progress=False)
    res = fu.erase(str(tmp_path / "fp16"), variant="fp16", torch_dtype="float32", **kw)
    assert next(res.model.parameters()).dtype == torch.float32
    res = fu.erase(str(tmp_path / "fp16"), torch_dtype=torch.float32, **kw)  # the only variant there: found
    out = res.save(tmp_path / "out", pipeline=True)  # the components come from that folder
    assert (out / "model_index.json").exists()
    with pytest.raises(fu.errors.InvalidArgumentError, match="^variant"):
        fu.erase(str(tmp_path / "fp16"), variant="bf16", **kw)
    with pytest.raises(fu.errors.InvalidArgumentError, match="^torch_dtype"):
        fu.erase(str(tmp_path / "fp16"), torch_dtype="float64", **kw)

"""Pipelines as inputs: prompt-labelled images for data methods, pipeline folders, the working resolution,
and the input's modules kept off the accelerator during a run."""
import copy

import pytest
import torch

import fastunlearn as fu
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.runtime import InputOffload
from fastunlearn.text import tiny_text_pipeline

PROMPTS = ["a photo of a cat", "a red car", "a green tree", "a photo of a dog"]


@pytest.fixture
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny_text_pipeline(seed=0)


def _digits(n, start=0):
    """Real pictures: scikit-learn digits upscaled to the latent pipeline's 16 px, as RGB PIL images."""
    images, _ = fu.datasets.digits_pil(16, n=start + n, mode="RGB")
    return images[start:]


@pytest.mark.parametrize("method", ["siss", "naive", "neggrad"])
def test_data_methods_take_images_with_prompts_on_a_pipeline(method):
    # A latent pipeline (VAE included) and real pixel images: encoded through its VAE, trained on latents.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = tiny_text_pipeline(seed=0, with_vae=True)
    before = copy.deepcopy(pipe.unet.state_dict())
    forget = fu.DataPoints(_digits(2), prompts=PROMPTS[:1] * 2)
    retain = fu.DataPoints(_digits(4, 2), prompts=PROMPTS)
    res = fu.erase(pipe, forget=forget, retain=retain, method=method, steps=2, batch_size=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # input untouched
    changed = [n for n, p in res.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    enc = res.extras["encode_prompts"]
    assert set(PROMPTS) <= set(enc.cache)  # every image's prompt was encoded (once) for the run


def test_prompts_need_the_text_encoder(pipe):
    x = fu.datasets.digits().images[:6].expand(-1, 4, -1, -1)  # real digits, in the 4-channel UNet's space
    with pytest.raises(InvalidArgumentError, match="^model"):
        fu.erase(pipe.unet, forget=fu.DataPoints(x[:2], prompts=PROMPTS[:2]),
                 retain=fu.DataPoints(x[2:], prompts=PROMPTS), method="siss",
                 scheduler=pipe.scheduler, steps=1, progress=False)


def test_a_pipeline_folder_is_an_input(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    res = fu.erase(str(tmp_path / "pipe"), forget=fu.Concept("a photo of a cat"), method="esd", steps=1,
                   batch_size=2, ddim_steps=2, progress=False)
    assert res.extras["encode_prompts"](["a red car"])["encoder_hidden_states"].shape == (1, 16, 32)
    assert res.meta["base_model"] == str((tmp_path / "pipe").resolve())


def test_resolution_sets_the_working_size(pipe):
    res = fu.erase(pipe, forget=fu.Concept("a photo of a cat"), method="esd", steps=1, batch_size=2, ddim_steps=2,
                   resolution=16, progress=False)
    assert res.model.config.sample_size == 16 and pipe.unet.config.sample_size == 8  # no VAE: pixels = samples
    assert res.sample(2, prompts="a red car", num_inference_steps=2).shape == (2, 4, 16, 16)
    with pytest.raises(InvalidArgumentError, match="^resolution"):
        fu.erase(pipe.unet, forget=fu.Classes([1]), scheduler=pipe.scheduler, resolution=16, progress=False)


def test_resolution_reaches_sdxl_time_ids():
    from fastunlearn.text import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline(seed=0)
    res = fu.erase(xl, forget=fu.Concept("a photo of a cat"), method="esd", steps=1, batch_size=2, ddim_steps=2,
                   resolution=32, progress=False)
    ids = res.extras["encode_prompts"](["a red car"])["added_cond_kwargs"]["time_ids"]
    assert ids.flatten().tolist() == [32, 32, 0, 0, 32, 32]
    assert res.model.config.sample_size == 32 // res.extras["vae_scale_factor"]


def test_input_offload_is_a_no_op_on_cpu_and_validated(pipe):
    off = InputOffload()
    assert off.move_unet(pipe.unet) is None and off.moved == []
    off.move_encoders(pipe)
    assert off.moved == []
    with pytest.raises(TypeError, match="^offload_input"):
        fu.erase(pipe, forget=fu.Concept("a cat"), method="esd", offload_input="yes", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_input_on_the_gpu_leaves_it_for_the_run_and_comes_back(pipe):
    pipe.to("cuda")
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    kwargs = dict(forget=fu.Concept("a photo of a cat"), method="esd", steps=2, batch_size=2, ddim_steps=2,
                  lora_rank=4, progress=False)
    # A first call makes the CUDA libraries' own buffers (cuBLAS workspaces: tens of MB on an H200, 20 times
    # this toy UNet), which stay allocated; the second call is measured on top of them.
    fu.erase(pipe, **kwargs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    during = []

    def where(step, view):  # during the run: the caller's modules are off the GPU
        during.append((next(pipe.unet.parameters()).device.type, next(pipe.text_encoder.parameters()).device.type))

    res = fu.erase(pipe, callback=where, **kwargs)
    assert during and all(d == ("cpu", "cpu") for d in during)
    assert next(pipe.unet.parameters()).device.type == "cuda"
    assert next(pipe.text_encoder.parameters()).device.type == "cuda"
    assert next(res.model.parameters()).device.type == "cuda"
    # Peak above what was there before: the copy, adapters, activations; not a second input UNet on top.
    assert torch.cuda.max_memory_allocated() - base < 2 * unet_bytes

"""The one resolver of what the user passed as a model: UNet objects, SD and SDXL pipelines, folders of a UNet,
a pipeline or a saved result, and the errors for everything else."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn import inputs
from fastunlearn.errors import FastUnlearnError, MissingFileError
from fastunlearn.models import digits_scheduler


def _unet(classes=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=classes)


def test_a_unet_object_resolves_to_itself_and_unpacks():
    unet, sched = _unet(), digits_scheduler()
    got = inputs.resolve(unet, sched)
    assert isinstance(got, inputs.Inputs) and got.denoiser is unet and got.scheduler is sched and got.extras == {}
    den, s, extras = got  # the shape the callers unpack
    assert den is unet and s is sched


@pytest.mark.parametrize("model,scheduler,pattern", [
    (torch.nn.Linear(2, 2), None, r"^model: expected a diffusers UNet2DModel"),
    ("not a model object", None, r"^model: .*does not exist"),
    (None, None, r"^model: expected"),
])
def test_what_is_not_a_model_is_named(model, scheduler, pattern):
    with pytest.raises(FastUnlearnError, match=pattern):
        inputs.resolve(model, scheduler)


def test_a_bare_unet_needs_a_noise_scheduler():
    with pytest.raises(FastUnlearnError, match=r"^scheduler: expected a diffusers noise scheduler"):
        inputs.resolve(_unet(), None)
    with pytest.raises(FastUnlearnError, match=r"^scheduler: expected .*alphas_cumprod"):
        inputs.resolve(_unet(), "ddpm")


def test_loading_options_only_for_a_folder():
    with pytest.raises(FastUnlearnError, match=r"^variant: expected None unless model is a folder"):
        inputs.resolve(_unet(), digits_scheduler(), variant="fp16")
    with pytest.raises(FastUnlearnError, match=r"^torch_dtype: expected None unless model is a folder"):
        inputs.resolve(_unet(), digits_scheduler(), torch_dtype=torch.float16)


def test_a_text_pipeline_gives_its_unet_scheduler_and_encoders():
    from fastunlearn.text import tiny_text_pipeline

    pipe = tiny_text_pipeline(seed=0)
    unet, sched, extras = inputs.resolve(pipe)
    assert unet is pipe.unet and sched is pipe.scheduler
    assert {"encode_prompts", "vae_scale_factor", "pipeline_parts"} <= set(extras) and "sdxl" not in extras
    assert extras["encode_prompts"](["a red car"])["encoder_hidden_states"].shape[0] == 1
    own = digits_scheduler()
    assert inputs.resolve(pipe, own).scheduler is own  # a scheduler given wins over the pipeline's


def test_an_sdxl_pipeline_carries_its_resolution_into_time_ids():
    from fastunlearn.text import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    assert inputs.is_sdxl(pipe)
    default = inputs.resolve(pipe).extras
    assert default["sdxl"] and default["resolution"] == inputs.default_resolution(pipe) == 16
    extras = inputs.resolve(pipe, resolution=32).extras
    assert extras["resolution"] == 32
    assert extras["encode_prompts"](["a cat"])["added_cond_kwargs"]["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]


def test_an_sdxl_pipeline_without_its_second_encoder_is_refused():
    from fastunlearn.text import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.tokenizer_2 = None
    with pytest.raises(FastUnlearnError, match=r"^model: expected an SDXL pipeline .*tokenizer_2"):
        inputs.resolve(pipe)


def test_a_unet_folder_loads_with_its_scheduler(tmp_path):
    unet = _unet()
    unet.save_pretrained(tmp_path / "m", safe_serialization=True)
    digits_scheduler().save_pretrained(tmp_path / "m")
    got = inputs.resolve(str(tmp_path / "m"))
    assert got.denoiser is not unet and got.scheduler is not None and got.extras == {}
    assert all(torch.equal(a, b) for a, b in zip(got.denoiser.state_dict().values(), unet.state_dict().values()))
    half = inputs.resolve(tmp_path / "m", torch_dtype=torch.float16)
    assert next(half.denoiser.parameters()).dtype == torch.float16


def test_a_pipeline_folder_loads_as_a_pipeline(tmp_path):
    from fastunlearn.text import tiny_text_pipeline

    tiny_text_pipeline(seed=0).save_pretrained(tmp_path / "p", safe_serialization=True)
    got = inputs.resolve(tmp_path / "p")
    assert "encode_prompts" in got.extras and got.scheduler is not None


def test_a_result_folder_loads_the_result_model(tmp_path):
    unet, sched = _unet(), digits_scheduler()
    res = fu.erase(unet, forget=fu.DataPoints(torch.zeros(2, 1, 8, 8)), retain=fu.DataPoints(torch.zeros(4, 1, 8, 8)),
                   method="naive", scheduler=sched, steps=1, batch_size=2, progress=False)
    res.save(tmp_path / "r")
    got = inputs.resolve(tmp_path / "r")
    assert all(torch.equal(a, b) for a, b in zip(got.denoiser.state_dict().values(), res.model.state_dict().values()))


def test_folders_that_are_not_models(tmp_path):
    with pytest.raises(MissingFileError, match=r"^model: .*does not exist"):
        inputs.resolve(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match=r"^model: .*config.json"):
        inputs.resolve(tmp_path / "empty")
    _unet().save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(MissingFileError, match=r"^model: .*safetensors"):
        inputs.resolve(tmp_path / "pickled")
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "vae")
    with pytest.raises(FastUnlearnError, match=r"^model: expected a folder of a UNet2DModel"):
        inputs.resolve(tmp_path / "vae")


# ------------------------------------------------------------------------------------------ targets against the model
def test_targets_must_suit_the_method_and_the_model():
    from fastunlearn.methods import get_method

    with pytest.raises(FastUnlearnError, match=r"^forget: expected a target method 'siss' takes"):
        inputs.check_targets(fu.Classes([3]), None, "siss", get_method("siss"))
    with pytest.raises(FastUnlearnError, match=r"^forget: expected fu.Classes"):
        inputs.check_targets("three", None, "esd", get_method("esd"))
    got = inputs.resolve(_unet(), digits_scheduler())
    with pytest.raises(FastUnlearnError, match=r"^forget: expected fu.Classes only for a class-conditional"):
        inputs.check_fits(got, fu.Classes([3]), None, None)
    with pytest.raises(FastUnlearnError, match=r"^resolution: expected None with a bare UNet"):
        inputs.check_fits(got, fu.DataPoints(torch.zeros(1, 1, 8, 8)), None, 64)


def test_data_are_checked_against_the_model():
    got = inputs.resolve(_unet(classes=10), digits_scheduler())
    x0, labels = inputs.prepare_data("forget", fu.DataPoints(torch.zeros(2, 1, 8, 8), labels=torch.tensor([1, 2])),
                                     got)
    assert x0.shape == (2, 1, 8, 8) and labels.tolist() == [1, 2]
    with pytest.raises(FastUnlearnError, match=r"^retain.labels: expected class labels"):
        inputs.prepare_data("retain", fu.DataPoints(torch.zeros(2, 1, 8, 8)), got)
    with pytest.raises(FastUnlearnError, match=r"^forget.images: expected 1 channel"):
        inputs.prepare_data("forget", fu.DataPoints(torch.zeros(2, 3, 8, 8), labels=torch.tensor([1, 2])), got)
    assert inputs.prepare_data("forget", fu.Classes([3]), got) is None

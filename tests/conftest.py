import os

import pytest
import torch

os.environ.setdefault("FASTUNLEARN_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet(class_conditional=True, null=True):
    """A random tiny UNet2DModel (8x8, 1 channel) for fast tests."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=(11 if null else 10) if class_conditional else None)
    if class_conditional and null:
        unet.register_to_config(fastunlearn_null_class=10)
    return unet


@pytest.fixture(scope="session")
def digits_rates_before():
    """Per-digit recognition rates of the bundled digits model (100 DDIM samples per label, seed 0), computed
    once per session for the end-to-end class-erasure tests (about 40 s on one core)."""
    import fastunlearn as fu
    from fastunlearn.metrics import recognition_rates

    unet, sched = fu.zoo.digits()
    return recognition_rates(unet, sched, range(10), n_per_class=100, seed=0)


@pytest.fixture
def make_tiny_unet():
    """The ``tiny_unet`` builder as a fixture: under --import-mode=importlib tests cannot import conftest."""
    return tiny_unet


@pytest.fixture
def tiny():
    from fastunlearn.models import digits_scheduler

    return tiny_unet(), digits_scheduler()


@pytest.fixture
def digits_split():
    import fastunlearn as fu

    data = fu.datasets.digits()
    three = data.labels == 3
    return (fu.DataPoints(data.images[three][:40], labels=data.labels[three][:40]),
            fu.DataPoints(data.images[~three][:200], labels=data.labels[~three][:200]))


@pytest.fixture
def poison_kernels(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel does not write fails the comparison."""
    from fastunlearn.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


def tiny_sd():
    """fastunlearn.text's tiny SD pipeline with its tiny VAE, so that it generates images."""
    from fastunlearn.text import tiny_text_pipeline

    return tiny_text_pipeline(seed=0, with_vae=True)


def tiny_xl():
    from fastunlearn.sdxl import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def tiny_pipelines():
    """Builders of the tiny random-weight SD (with VAE) and SDXL pipelines: {"sd": fn, "sdxl": fn}; the same
    seed gives the same weights, as from_pretrained of one folder would."""
    return {"sd": tiny_sd, "sdxl": tiny_xl}

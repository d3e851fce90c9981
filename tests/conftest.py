import os

import pytest
import torch
from helpers.models import tiny_unet

os.environ.setdefault("FASTUNLEARN_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_rates_before():
    """Per-digit recognition rates of the bundled digits model (100 DDIM samples per label, seed 0), computed
    once per session for the end-to-end class-erasure tests (about 40 s on one core)."""
    import fastunlearn as fu
    from fastunlearn.metrics import recognition_rates

    unet, sched = fu.zoo.digits()
    return recognition_rates(unet, sched, range(10), n_per_class=100, seed=0)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny networks only pay for the synchronisation (10x slower on a busy 2-core machine),
    and bitwise equality across processes needs the same thread count (reduction order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_tiny_unet():
    """The tiny UNet builder (``helpers.models.tiny_unet``) as a fixture."""
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
    from fastunlearn.text import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def tiny_pipelines():
    """Builders of the tiny random-weight SD (with VAE) and SDXL pipelines: {"sd": fn, "sdxl": fn}; the same
    seed gives the same weights, as from_pretrained of one folder would."""
    return {"sd": tiny_sd, "sdxl": tiny_xl}


# Generated data (fastunlearn.generation) is not cached on disk in the tests unless a test asks for it
# (monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", ...)): counts of UNet evaluations and timings stay those of a
# first run, and nothing is written to the home folder.
os.environ["FASTUNLEARN_CACHE_DIR"] = "off"

"""models: Denoiser presents unconditional, class-conditional and text UNets as one ε(x_t, t, cond)."""
import pytest
import torch

from fastunlearn.models import Denoiser, restore_extra_config


def test_denoiser_kinds_and_shapes(make_tiny_unet):
    cls, uncond, no_null = make_tiny_unet(), make_tiny_unet(class_conditional=False), make_tiny_unet(null=False)
    assert Denoiser(cls).kind == "class" and Denoiser(cls).num_classes == 10 and Denoiser(cls).null_class == 10
    assert Denoiser(no_null).num_classes == 10 and not Denoiser(no_null).has_null_class
    assert Denoiser(uncond).kind == "uncond" and Denoiser(uncond).num_classes is None
    assert Denoiser(cls).sample_shape == (1, 8, 8)
    with pytest.raises(TypeError, match="unsupported denoiser"):
        Denoiser(torch.nn.Linear(2, 2)).kind


def test_denoiser_passes_the_conditioning(make_tiny_unet):
    unet = make_tiny_unet()
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 4])
    torch.testing.assert_close(Denoiser(unet)(x, t, labels), unet(x, t, class_labels=labels).sample)
    other = Denoiser(unet)(x, t, torch.tensor([5, 6]))
    assert not torch.allclose(other, unet(x, t, class_labels=labels).sample)  # the labels reach the model


def test_restore_extra_config_puts_back_only_fastunlearn_keys(make_tiny_unet):
    unet = make_tiny_unet(class_conditional=False)
    restore_extra_config(unet, {"fastunlearn_class_prompts": ["a", "b"], "sample_size": 99})
    assert unet.config.fastunlearn_class_prompts == ["a", "b"] and unet.config.sample_size == 8

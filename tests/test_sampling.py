"""sampling: seeded DDIM draws, split into batches without changing them, guidance, the model's mode kept."""
import torch

from fastunlearn.models import digits_scheduler
from fastunlearn.sampling import ddim_sample


def test_ddim_is_seeded_batch_independent_and_keeps_the_mode(make_tiny_unet):
    unet, sched = make_tiny_unet(), digits_scheduler()
    labels = torch.tensor([0, 1, 2, 3, 4])
    unet.train()
    one = ddim_sample(unet, sched, 5, labels, num_inference_steps=4, seed=7)
    assert unet.training  # put back as it was
    assert one.shape == (5, 1, 8, 8) and one.abs().max() <= 1.0
    split = ddim_sample(unet, sched, 5, labels, num_inference_steps=4, seed=7, batch_size=2)  # rows 2+2+1
    torch.testing.assert_close(split, one, rtol=1e-3, atol=1e-4)  # float noise of other batch shapes only
    assert torch.equal(ddim_sample(unet, sched, 5, labels, num_inference_steps=4, seed=7), one)
    assert not torch.equal(ddim_sample(unet, sched, 5, labels, num_inference_steps=4, seed=8), one)


def test_guidance_scale_one_is_the_conditional_model(make_tiny_unet):
    unet, sched = make_tiny_unet(), digits_scheduler()
    labels, null = torch.tensor([3, 5]), torch.tensor([10, 10])
    plain = ddim_sample(unet, sched, 2, labels, num_inference_steps=3, seed=0)
    guided = ddim_sample(unet, sched, 2, labels, num_inference_steps=3, seed=0, guidance_scale=1.0, null_cond=null)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-6)
    strong = ddim_sample(unet, sched, 2, labels, num_inference_steps=3, seed=0, guidance_scale=4.0, null_cond=null)
    assert not torch.allclose(strong, plain)

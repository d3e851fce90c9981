"""datasets: the bundled digits as the contract describes them (1,797 images, 1x8x8 in [-1, 1], labels 0..9)."""
import torch

from fastunlearn import datasets


def test_digits_tensors_and_class_filter():
    data = datasets.digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.float32
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    assert sorted(set(data.labels.tolist())) == list(range(10))
    some = datasets.digits(classes=[3, 5])
    assert set(some.labels.tolist()) == {3, 5} and len(some) == int(torch.isin(data.labels, torch.tensor([3, 5])).sum())
    assert torch.equal(some.images, data.images[torch.isin(data.labels, torch.tensor([3, 5]))])


def test_digits_pil_round_trips_the_pixels():
    images, labels = datasets.digits_pil(size=8, classes=[7], n=4)
    assert len(images) == 4 and labels.tolist() == [7] * 4 and images[0].size == (8, 8) and images[0].mode == "L"
    back = torch.tensor([list(im.getdata()) for im in images], dtype=torch.float32).view(4, 1, 8, 8) / 127.5 - 1
    torch.testing.assert_close(back, datasets.digits(classes=[7]).images[:4], atol=1 / 127.5, rtol=0)
    big, _ = datasets.digits_pil(size=32, n=1, mode="RGB")
    assert big[0].size == (32, 32) and big[0].mode == "RGB"

"""Real data that ships in packages: scikit-learn's handwritten digits (no download)."""
from __future__ import annotations

import torch

from .targets import DataPoints


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(images [1797, 1, 8, 8] in [-1, 1], labels [1797])``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixel range 0..16
    labels = torch.tensor(d.target, dtype=torch.long)
    return images, labels


def digits(classes=None) -> DataPoints:
    """scikit-learn's digits as ``DataPoints`` (1,797 images, 1x8x8, labels 0..9), optionally only ``classes``."""
    images, labels = digits_tensors()
    if classes is not None:
        keep = torch.isin(labels, torch.as_tensor(list(classes)))
        images, labels = images[keep], labels[keep]
    return DataPoints(images, labels=labels)


def digits_pil(size: int = 8, classes=None, n=None, mode: str = "L"):
    """scikit-learn's digits as PIL images (``mode`` "L" or "RGB", upscaled to ``size`` px with nearest
    neighbour), optionally only ``classes`` and the first ``n``: real pictures for pipelines that take
    pixel images. Returns ``(images, labels [N])``."""
    import numpy as np
    from PIL import Image

    images, labels = digits_tensors()
    if classes is not None:
        keep = torch.isin(labels, torch.as_tensor(list(classes)))
        images, labels = images[keep], labels[keep]
    if n is not None:
        images, labels = images[:n], labels[:n]
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    out = [Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.NEAREST).convert(mode)
           for a in pixels]
    return out, labels

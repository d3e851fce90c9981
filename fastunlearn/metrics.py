"""Measures of forgetting and keeping on the digits models, judged by the project's classifier
(trained on real digits, ``fastunlearn.zoo.classifier``)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .sampling import ddim_sample

# A generated image counts as a near-copy of a forgotten image when their mean squared pixel distance
# (images in [-1, 1]) is below this: about a quarter of the mean distance between two real digits of
# one class (~0.35), far above DDIM sampling jitter around a memorised image (~0.01).
NEAR_COPY_MSE = 0.1


@torch.no_grad()
def classify(images: torch.Tensor, classifier=None) -> torch.Tensor:
    from . import zoo

    clf = classifier or zoo.classifier()
    return clf(images.float().clamp(-1, 1)).argmax(1)


@torch.no_grad()
def recognition_rates(model, scheduler, classes: Iterable[int] = range(10), n_per_class: int = 100,
                      num_inference_steps: int = 50, seed: int = 0, classifier=None, sampler=None) -> dict:
    """Per class c: the fraction of samples drawn with label c that the classifier calls c.
    ``sampler(n, labels, seed)`` replaces DDIM (SFD's one-step generator)."""
    classes = list(classes)
    labels = torch.tensor(classes).repeat_interleave(n_per_class)
    if sampler is not None:
        images = sampler(labels.numel(), labels, seed)
    else:
        images = ddim_sample(model, scheduler, labels.numel(), labels.to(next(model.parameters()).device),
                             num_inference_steps, seed)
    pred = classify(images, classifier)
    return {c: float((pred[labels == c] == c).float().mean()) for c in classes}


def near_copy_rate(samples: torch.Tensor, forgotten: torch.Tensor, threshold: float = NEAR_COPY_MSE) -> float:
    """Fraction of ``samples`` whose nearest forgotten image is closer than ``threshold`` (mean squared
    pixel distance)."""
    d = torch.cdist(samples.flatten(1).float(), forgotten.flatten(1).float()).pow(2) / samples[0].numel()
    return float((d.min(1).values < threshold).float().mean())


def summarize_classes(before: dict, after: dict, forgotten: Iterable[int]) -> dict:
    """Forget rate (recognition of the forgotten classes after) and the retained fraction of the others'
    rate, per class and on average."""
    forgotten = set(forgotten)
    kept = [c for c in before if c not in forgotten]
    kept_ratio = {c: (after[c] / before[c] if before[c] > 0 else 1.0) for c in kept}
    return {
        "forget_rate_before": sum(before[c] for c in forgotten) / len(forgotten),
        "forget_rate_after": sum(after[c] for c in forgotten) / len(forgotten),
        "retain_rate_before": sum(before[c] for c in kept) / max(1, len(kept)),
        "retain_rate_after": sum(after[c] for c in kept) / max(1, len(kept)),
        "retain_ratio_mean": sum(kept_ratio.values()) / max(1, len(kept)),
        "retain_ratio_min": min(kept_ratio.values()) if kept_ratio else 1.0,
        "per_class_before": before, "per_class_after": after,
    }

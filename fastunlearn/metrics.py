"""Measures of forgetting and keeping on the digits models, judged by the project's classifier
(trained on real digits, ``fastunlearn.zoo.classifier``)."""
from __future__ import annotations

from typing import Iterable

import torch

from . import zoo
from .errors import bad_value
from .sampling import ddim_sample

# A generated image counts as a near-copy of a forgotten image when their mean squared pixel distance
# (images in [-1, 1]) is below this: about a quarter of the mean distance between two real digits of
# one class (~0.35), far above DDIM sampling jitter around a memorised image (~0.01).
NEAR_COPY_MSE = 0.1


@torch.no_grad()
def classify(images: torch.Tensor, classifier=None) -> torch.Tensor:
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
    return float((nearest_mse(samples, forgotten) < threshold).float().mean())


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


@torch.no_grad()
def judge(classifier, images: torch.Tensor):
    """(predicted class, top probability, penultimate features) of images in [-1, 1]."""
    x = images.float().clamp(-1, 1)
    feats = classifier.embed(x) if hasattr(classifier, "embed") else classifier(x)
    logits = classifier.head(feats) if hasattr(classifier, "head") else classifier(x)
    prob = logits.softmax(1)
    return prob.argmax(1), prob.max(1).values, feats.double()


# ------------------------------------------------------------------ Fréchet distance (FID's recipe on any features)
def covariance(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if x.shape[0] < 2:
        raise bad_value("features", "at least 2 samples for a covariance", x.shape[0])
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / (x.shape[0] - 1)


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}, with tr (Σ1 Σ2)^{1/2} computed as the sum of the square
    roots of the eigenvalues of the symmetric Σ1^{1/2} Σ2 Σ1^{1/2} (same spectrum, no non-symmetric sqrtm)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ sigma2 @ root1
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    fd = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * lam.sqrt().sum()
    return float(fd.clamp_min(0))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``x`` [n, d] and ``y`` [m, d] (float64)."""
    return frechet_from_stats(x.double().mean(0), covariance(x), y.double().mean(0), covariance(y))


def nearest_mse(samples: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per sample: mean squared pixel distance to the nearest of ``images`` (the measure behind
    ``metrics.near_copy_rate``)."""
    d = torch.cdist(samples.flatten(1).float(), images.flatten(1).float()).pow(2) / samples[0].numel()
    return d.min(1).values

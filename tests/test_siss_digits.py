"""End-to-end SISS on the bundled digits models and real data (about a minute each on 2 CPU cores)."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn.metrics import near_copy_rate, recognition_rates, summarize_classes
from fastunlearn.sampling import ddim_sample

pytestmark = pytest.mark.slow


def test_siss_forgets_one_digit_and_keeps_the_rest():
    unet, sched = fu.zoo.digits()
    data = fu.datasets.digits()
    digit = 3
    m = data.labels == digit
    forget = fu.DataPoints(data.images[m], labels=data.labels[m])
    retain = fu.DataPoints(data.images[~m], labels=data.labels[~m])
    before = recognition_rates(unet, sched, range(10), n_per_class=60, seed=0)
    res = fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, progress=False)
    after = recognition_rates(res.model, sched, range(10), n_per_class=60, seed=0)
    s = summarize_classes(before, after, [digit])
    assert s["forget_rate_before"] >= 0.75, s
    assert s["forget_rate_after"] <= 0.05, s
    assert s["retain_ratio_mean"] >= 0.95, s


def test_siss_removes_memorised_outlier_without_hurting_the_rest():
    unet, sched = fu.zoo.digits_outlier()
    outlier = fu.zoo.outlier_image()
    clf = fu.zoo.classifier()

    def measure(model):
        x = ddim_sample(model, sched, 600, None, 50, seed=0)
        with torch.no_grad():
            conf = clf(x).softmax(1).max(1).values
        rest = torch.cdist(x.flatten(1), outlier.flatten(1)).squeeze(1).pow(2) / 64 >= 0.1
        return near_copy_rate(x, outlier), float((conf[rest] > 0.9).float().mean())

    copies_before, quality_before = measure(unet)
    res = fu.erase(unet, forget=fu.DataPoints(outlier), retain=fu.datasets.digits(), method="siss",
                   scheduler=sched, progress=False)
    copies_after, quality_after = measure(res.model)
    assert copies_before >= 0.02  # the bundled model really memorised it
    assert copies_after <= 0.25 * copies_before
    assert quality_after >= quality_before - 0.05

"""The main job: erase the training images of one digit from the bundled digits model with SISS, and
show before/after numbers and a picture."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .files import write_text
from .metrics import recognition_rates, summarize_classes
from .models import Denoiser
from .sampling import ddim_sample
from .viz import save_before_after


def run_demo(out="fastunlearn-demo", digit: int = 3, n_per_class: int = 100, steps=None, progress: bool = True,
             seed: int = 0, overwrite: bool = True) -> dict:
    import fastunlearn as fu

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet, scheduler = fu.zoo.digits()
    data = fu.datasets.digits()
    is_digit = data.labels == digit
    forget = fu.DataPoints(data.images[is_digit], labels=data.labels[is_digit])
    retain = fu.DataPoints(data.images[~is_digit], labels=data.labels[~is_digit])
    print(f"fastunlearn demo: erase the {int(is_digit.sum())} training images of digit {digit} "
          f"from the bundled digits model with SISS ({len(retain)} images kept)")

    t0 = time.perf_counter()
    before = recognition_rates(unet, scheduler, range(10), n_per_class, seed=seed)
    res = fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=scheduler, steps=steps,
                   progress=progress, seed=seed)
    after = recognition_rates(res.model, scheduler, range(10), n_per_class, seed=seed)
    summary = summarize_classes(before, after, [digit])

    print(f"\n{'digit':>5} {'before':>8} {'after':>8}")
    for c in range(10):
        mark = "  <- forgotten" if c == digit else ""
        print(f"{c:>5} {before[c]:>8.1%} {after[c]:>8.1%}{mark}")
    print(f"\ndigit {digit}: label {digit} still yields a {digit} in {summary['forget_rate_after']:.1%} of samples "
          f"(was {summary['forget_rate_before']:.1%})")
    print(f"other digits keep {summary['retain_ratio_mean']:.1%} of their recognition rate on average "
          f"(worst {summary['retain_ratio_min']:.1%}); unlearning took {res.meta['seconds']:.0f} s")

    k = 8
    labels = torch.arange(10).repeat_interleave(k)
    grid_before = ddim_sample(unet, scheduler, labels.numel(), labels, 50, seed + 1).view(10, k, *unet_shape(unet))
    grid_after = ddim_sample(res.model, scheduler, labels.numel(), labels, 50, seed + 1).view(10, k, *unet_shape(unet))
    png = save_before_after(out / "before_after.png", list(grid_before), list(grid_after),
                            [f"label {c}" for c in range(10)],
                            title=f"SISS: erase the training images of digit {digit}", highlight_rows=[digit])
    res.save(out / "result", overwrite=overwrite)
    report = {"digit": digit, "method": "siss", "seconds_unlearning": res.meta["seconds"],
              "seconds_total": round(time.perf_counter() - t0, 1), **summary}
    write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {png}, {out / 'metrics.json'} and the unlearned model in {out / 'result'}")
    return report


def unet_shape(unet):
    return Denoiser(unet).sample_shape

"""Method checks on the bundled digits model whose numbers the README's method sections quote (issue 16).

    python benchmarks/method_checks.py esd-null          # ESD with the real null class vs the class mean (null hidden)
    python benchmarks/method_checks.py erasediff-sweep   # EraseDiff defaults, every digit forgotten in turn
    python benchmarks/method_checks.py erasediff-sweep --steps 150 --option forget_tol=0   # the former default
    python benchmarks/method_checks.py erasediff-ema     # EraseDiff on digit 3 with and without the EMA copy
    python benchmarks/method_checks.py siss-lr           # SISS on digit 3 at lr 1e-4 and the official 5e-5

Each prints one line per run (forget rate after, mean and worst kept ratio, steps run, seconds) and a JSON summary
at the end; ``erasediff-sweep --out DIR`` also writes ``DIR/erasediff_sweep.{json,md}`` (the committed table is
``benchmarks/results/erasediff_sweep.md``). Rates: 100 DDIM samples (50 steps) per label (``--samples N``),
judged by the bundled classifier (``fastunlearn.metrics``), seed 0, as the tests and ``fastunlearn bench`` do. The
numbers change with the machine's threads only by float noise.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fastunlearn as fu
from fastunlearn.metrics import recognition_rates, summarize_classes

SAMPLES = 100  # DDIM samples per label for every rate here (``--samples``): 100 as the tests and the bench


def without_null_class(unet):
    """A copy of a class-conditional UNet with its null class removed: a plain ``UNet2DModel(num_class_embeds=K)``
    as most class models are trained (no label dropout), with the K real classes' weights."""
    from diffusers import UNet2DModel

    k = unet.config.num_class_embeds - 1
    cfg = {key: v for key, v in unet.config.items() if not key.startswith(("_", "fastunlearn_"))}
    plain = UNet2DModel.from_config({**cfg, "num_class_embeds": k})
    state = dict(unet.state_dict())
    state["class_embedding.weight"] = state["class_embedding.weight"][:k]
    plain.load_state_dict(state)
    return plain.eval()


def split(digit: int):
    data = fu.datasets.digits()
    hit = data.labels == digit
    return (fu.DataPoints(data.images[hit], labels=data.labels[hit]),
            fu.DataPoints(data.images[~hit], labels=data.labels[~hit]))


def judge(res, sched, before, digit, seconds, label, **extra):
    after = recognition_rates(res.model, sched, range(10), n_per_class=SAMPLES, seed=0)
    s = summarize_classes(before, after, [digit])
    kept = {c: after[c] / before[c] for c in after if c != digit}
    worst = min(kept, key=kept.get)
    row = dict(run=label, digit=digit, forget_before=s["forget_rate_before"], forget_after=s["forget_rate_after"],
               kept_mean=s["retain_ratio_mean"], kept_min=s["retain_ratio_min"], worst_kept_digit=worst,
               steps=res.meta["steps"], seconds=round(seconds, 1), **extra)
    print(f"{label} digit {digit}: forget {s['forget_rate_before']:.2f} -> {s['forget_rate_after']:.2f}, kept mean "
          f"{s['retain_ratio_mean']:.3f}, worst {s['retain_ratio_min']:.3f} (digit {worst}), {res.meta['steps']} "
          f"steps, {seconds:.0f} s {extra or ''}", flush=True)
    return row


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def esd_null(digits=(3,)):
    unet, sched = fu.zoo.digits()
    plain = without_null_class(unet)
    before = recognition_rates(unet, sched, range(10), n_per_class=SAMPLES, seed=0)
    before_plain = recognition_rates(plain, sched, range(10), n_per_class=SAMPLES, seed=0)
    rows = []
    for d in digits:
        res, sec = timed(lambda: fu.erase(unet, forget=fu.Classes([d]), method="esd", scheduler=sched, progress=False))
        rows.append(judge(res, sched, before, d, sec, "esd null class 10", null=res.extras["null"]))
        res, sec = timed(lambda: fu.erase(plain, forget=fu.Classes([d]), method="esd", scheduler=sched,
                                          progress=False))
        rows.append(judge(res, sched, before_plain, d, sec, "esd null hidden (default)", null=res.extras["null"]))
    return rows


def erasediff_sweep(digits=range(10), out=None, **options):
    """EraseDiff with the defaults (and ``options``: erase() arguments such as steps, method options), forgetting
    each digit in turn: its images to forget, the other digits' images to keep."""
    unet, sched = fu.zoo.digits()
    before = recognition_rates(unet, sched, range(10), n_per_class=SAMPLES, seed=0)
    rows = []
    for d in digits:
        forget, retain = split(d)
        res, sec = timed(lambda: fu.erase(unet, forget=forget, retain=retain, method="erasediff", scheduler=sched,
                                          progress=False, **options))
        rows.append(judge(res, sched, before, d, sec, f"erasediff {options or 'defaults'}",
                          target=res.extras.get("relabel"), stopped_at=res.extras.get("stopped_at")))
    forget = max(r["forget_after"] for r in rows)
    kept = min(rows, key=lambda r: r["kept_min"])
    print(f"worst forget rate {forget:.2f}; worst kept ratio {kept['kept_min']:.3f} (digit {kept['worst_kept_digit']} "
          f"when forgetting {kept['digit']})")
    if out is not None:
        write_sweep(rows, options, before, out)
    return rows


def write_sweep(rows, options, before, out):
    """``erasediff_sweep.json`` (the rows, the options, the base model's rates, the machine) and a Markdown table."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"options": {k: v if isinstance(v, (int, float, str, type(None))) else repr(v) for k, v in options.items()},
           "protocol": f"{SAMPLES} DDIM-50 samples per label, seed 0, judged by fastunlearn.zoo.classifier; kept: "
                       "each other digit's rate after / before",
           "before": before, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    (out / "erasediff_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    lines = [f"# EraseDiff, every digit forgotten in turn ({settings})",
             "", f"{doc['protocol']}. `benchmarks/method_checks.py erasediff-sweep`.", "",
             "| digit | relabel target | forget rate (before → after) | kept: mean / worst (digit) | steps | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['digit']} | {r['target']} | {r['forget_before']:.0%} → **{r['forget_after']:.0%}** | "
                     f"{r['kept_mean']:.1%} / {r['kept_min']:.1%} ({r['worst_kept_digit']}) | {r['steps']} | "
                     f"{r['seconds']:.0f} |")
    kept = min(rows, key=lambda r: r["kept_min"])
    lines += ["", f"Worst forget rate {max(r['forget_after'] for r in rows):.0%}; worst kept digit "
              f"{kept['kept_min']:.1%} (digit {kept['worst_kept_digit']} when forgetting {kept['digit']}); "
              f"{sum(r['steps'] for r in rows) / len(rows):.0f} steps on average.", ""]
    (out / "erasediff_sweep.md").write_text("\n".join(lines))


def erasediff_ema(digit=3):
    rows = []
    for ema in (None, "official"):
        rows += erasediff_sweep([digit], ema=ema)
    return rows


def siss_lr(digit=3):
    unet, sched = fu.zoo.digits()
    before = recognition_rates(unet, sched, range(10), n_per_class=SAMPLES, seed=0)
    forget, retain = split(digit)
    rows = []
    for lr in (1e-4, 5e-5):
        res, sec = timed(lambda: fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, lr=lr,
                                          progress=False))
        rows.append(judge(res, sched, before, digit, sec, f"siss lr {lr:g}"))
    return rows


if __name__ == "__main__":
    checks = {"esd-null": esd_null, "erasediff-sweep": erasediff_sweep, "erasediff-ema": erasediff_ema,
              "siss-lr": siss_lr}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=sorted(checks))
    p.add_argument("--digits", type=int, nargs="*", help="digits to forget (default: the check's own)")
    p.add_argument("--steps", type=int, default=None, help="erasediff-sweep: erase()'s steps (default: the method's)")
    p.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="erasediff-sweep: a method option (value parsed as JSON, else a string), repeatable")
    p.add_argument("--samples", type=int, default=SAMPLES, help="DDIM samples per label for every rate (default 100; "
                   "a rate near 95%% has a standard error of ~2 points at 100, ~1.3 at 300)")
    p.add_argument("--out", default=None, help="erasediff-sweep: folder for erasediff_sweep.{json,md}")
    a = p.parse_args()
    SAMPLES = a.samples
    torch.manual_seed(0)
    fn = checks[a.check]
    if a.check == "erasediff-sweep":
        options = {} if a.steps is None else {"steps": a.steps}
        for kv in a.option:
            k, v = kv.split("=", 1)
            try:
                options[k] = json.loads(v)
            except json.JSONDecodeError:
                options[k] = v
        out = fn(a.digits if a.digits else range(10), out=a.out, **options)
    else:
        out = fn(a.digits) if a.digits and a.check == "esd-null" else fn()
    print(json.dumps(out, indent=1))

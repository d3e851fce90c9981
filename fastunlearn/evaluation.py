"""``evaluate()`` and ``fastunlearn eval DIR``: one pinned protocol for how much was forgotten and what was kept.

Users of the method repositories cannot reproduce or compare published numbers because the evaluation
protocol is unclear: classifier versions and thresholds, sample counts, seeds, FID feature extractors
(ecosystem survey §2, theme #1). Here every number comes from one function whose settings are written into
the JSON next to the numbers, with the same sampler, seeds and judge for the model before and after.

What is measured, by the kind of model and target:

* Class-conditional models (``fu.Classes``, or ``fu.DataPoints`` with labels): for every class c,
  ``n_per_class`` DDIM samples drawn with label c (the scheduler turned into DDIM, η = 0, seeded) are
  judged by the project's digits classifier (``fu.zoo.classifier()``, 98.3% on held-out real digits).
  The *recognition rate* of c is the fraction the classifier calls c: on the forgotten classes it is the
  *forget rate* (lower is better), on the others the *retain rate*. The *Fréchet distance* (FD) of class c
  compares Gaussians fitted to the classifier's penultimate features (``DigitsClassifier.embed``, 128-d)
  of the samples and of the real images of c (``fu.datasets.digits()``): FID's recipe with a judge that
  knows digits. FD is biased upward at small n, so compare FDs only at equal ``n_per_class``.
* Data unlearning (``fu.DataPoints``): the *near-copy rate*, the fraction of samples whose mean squared
  pixel distance to the nearest forgotten image is below ``metrics.NEAR_COPY_MSE`` (0.1, about a quarter
  of the distance between two real digits of one class). On unconditional models ``n_samples`` samples
  are drawn; the others ("the rest") are judged by the *recognisable rate* (the classifier is more than
  90% sure of some digit) and their pooled FD against all real digits. On class-conditional models the
  near-copy rate is taken over the samples drawn with the forgotten images' labels, and the class measures
  above are reported as well.
* Text-conditional models (with ``fastunlearn.pipelines``): the *shift* of the concept's noise
  prediction, ‖ε_after(x_t, c) − ε_before(x_t, c)‖² per element, on held-out noisy inputs, against the
  same shift for unrelated prompts (lower is better for those: the edit stayed local). Where the model was
  trained on labelled data, ``class_prompts`` (one prompt per class; the bundled ``zoo.digits_text()``
  records its own) maps prompts to classes, and the class measures above are taken on samples drawn with
  those prompts: the forgotten classes are those whose prompt is the erased concept.

Every evaluation with an output folder writes ``metrics.json`` and ``before_after.png`` (sample grid per
class, per prompt, or nearest-to-forgotten rows), both atomically. The "before" model of a saved result is
found through ``fastunlearn.json``: ``erase()`` records ``base_model`` ("zoo:digits" for a bundled model,
a folder path for a model loaded from disk) and ``forgotten`` (class ids, or the number of images with
the images themselves when they are small).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import datasets, zoo
from .errors import FastUnlearnError, bad_type, bad_value
from .files import write_json
from .inputs import is_pipeline, resolve
from .metrics import NEAR_COPY_MSE, frechet_distance, judge, near_copy_rate, nearest_mse, summarize_classes
from .models import Denoiser
from .provenance import describe_forget, forget_from_meta
from .result import META_FILE, Result, load
from .targets import Classes, Concept, DataPoints
from .viz import save_evaluation_picture

# Recognisable: the classifier's top softmax probability exceeds this (the SISS outlier test's judge).
CONFIDENT = 0.9
GRID_PER_ROW = 8
METRICS_FILE = "metrics.json"
PICTURE_FILE = "before_after.png"


# ------------------------------------------------------------------------------------------------ resolving
def _as_result(obj, scheduler, what: str):
    """A ``Result`` (and its folder, if it came from one) from a Result, a folder, a model or "zoo:NAME"."""
    if isinstance(obj, Result):
        return obj, None
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if text.startswith("zoo:"):
            name = text[4:]
            if name not in zoo.NAMES:
                raise bad_value(what, " | ".join(f"zoo:{n}" for n in zoo.NAMES) + " or a folder", text)
            model = zoo.get(name)
            if isinstance(model, tuple):
                return Result(model=model[0], scheduler=model[1], method=None), None
            obj = model  # the text pipeline: resolved below
    if isinstance(obj, (str, Path)) and (Path(obj) / META_FILE).exists():
        return load(Path(obj)), Path(obj)
    if isinstance(obj, (str, Path, torch.nn.Module)) or is_pipeline(obj):  # what erase() takes as its model
        unet, sched, extras = resolve(Path(obj) if isinstance(obj, str) else obj, scheduler)
        return Result(model=unet, scheduler=sched, method=None, extras=extras), None
    raise bad_type(what, "a Result, a result or model folder, 'zoo:NAME', a diffusers model or a pipeline", obj)


def _sample(res, n: int, labels, steps: int, seed: int, class_prompts=None) -> torch.Tensor:
    """Samples of a result (its one-step generator for SFD) or a plain model (DDIM), in [-1, 1], on CPU;
    with ``class_prompts``, class ``c`` is drawn with the prompt ``class_prompts[c]``."""
    if class_prompts is not None:
        prompts = [class_prompts[int(c)] for c in labels]
        return _draw(res, n, prompts, steps, seed)
    return res.sample(n, class_labels=labels, num_inference_steps=steps, seed=seed).float().cpu()


def _class_prompts(class_prompts, res):
    """The prompts that name the classes of a text model: the argument, else the model's own record."""
    if class_prompts is None:
        class_prompts = getattr(res.model.config, "fastunlearn_class_prompts", None)
        if class_prompts is None:
            return None
    if isinstance(class_prompts, str) or not all(isinstance(q, str) for q in class_prompts) or len(class_prompts) < 2:
        raise bad_type("class_prompts", "a list of at least two prompts (the prompt of class i at index i)",
                       class_prompts)
    return list(class_prompts)


_BUNDLED_JUDGE = {}


def _default_judge(shape, classifier, reference):
    """(classifier, reference labels, reference features); the bundled pair's features are computed once."""
    digits_like = tuple(shape) == (1, 8, 8)
    if classifier is None and not digits_like:
        raise bad_value("classifier", f"a classifier module for {tuple(shape)} images (with .embed() for "
                        "features; the bundled one judges 1x8x8 digits)", None)
    if reference is None and not digits_like:
        raise bad_value("reference", f"fu.DataPoints of real {tuple(shape)} images (the bundled ones are "
                        "1x8x8 digits)", None)
    if classifier is None and reference is None:
        if not _BUNDLED_JUDGE:
            clf, ref = zoo.classifier(), datasets.digits()
            _BUNDLED_JUDGE["judge"] = (clf, ref.labels, judge(clf, ref.images)[2])
        return _BUNDLED_JUDGE["judge"]
    classifier = (classifier or zoo.classifier()).eval()
    reference = reference if reference is not None else datasets.digits()
    return classifier, reference.labels, judge(classifier, reference.images)[2]


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(result, *, before=None, forget=None, scheduler=None, reference=None, classifier=None,
             n_per_class: int = 100, n_samples: int = 1000, num_inference_steps: int = 50, seed: int = 0,
             out=None, prompts=None, class_prompts=None) -> dict:
    """Measure forgetting and retained quality of ``result`` against the model before unlearning.

    ``result``: a ``Result``, a saved result folder, a diffusers model (with ``scheduler``) or a pipeline.
    ``before``: the model before unlearning (same kinds, or "zoo:NAME"); None takes ``base_model`` from the
    result's ``fastunlearn.json`` when there is one; False skips the comparison.
    ``forget``: what was forgotten (``fu.Classes`` / ``fu.DataPoints`` / ``fu.Concept``); None takes it from
    the result. ``reference`` (real data for FD) and ``classifier`` default to the bundled digits ones.
    ``out``: folder for ``metrics.json`` and ``before_after.png``; defaults to ``DIR/eval`` when ``result``
    is a folder (no files for in-memory results without ``out``). Text-conditional models: ``prompts`` are
    the unrelated prompts of the shift measure; ``class_prompts`` (a list, prompt of class i at i) adds the
    class measures through prompts (default: the model's own, when it records them). Returns the metrics.
    """
    report, grid = _evaluate(result, before=before, forget=forget, scheduler=scheduler, reference=reference,
                             classifier=classifier, n_per_class=n_per_class, n_samples=n_samples,
                             num_inference_steps=num_inference_steps, seed=seed, prompts=prompts,
                             class_prompts=class_prompts)
    folder = report.pop("_folder")
    if out is None and folder is not None:
        out = folder / "eval"
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        png = save_evaluation_picture(out / PICTURE_FILE, grid, report["method"])
        report["files"] = {"metrics": str(out / METRICS_FILE), "picture": str(png) if png else None}
        write_json(out / METRICS_FILE, report)
    return report


def _evaluate(result, *, before=None, forget=None, scheduler=None, reference=None, classifier=None,
              n_per_class=100, n_samples=1000, num_inference_steps=50, seed=0, prompts=None, class_prompts=None):
    """``evaluate`` without the files: (report, picture rows)."""
    for name, v, lo in (("n_per_class", n_per_class, 2), ("n_samples", n_samples, 2),
                        ("num_inference_steps", num_inference_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise bad_value(name, f"an int >= {lo}", v)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_type("seed", "an int", seed)
    t0 = time.perf_counter()
    res, folder = _as_result(result, scheduler, "result")
    meta = res.meta or {}
    if forget is None:
        forget = forget_from_meta(meta)
    before_res = None
    if before is None and meta.get("base_model"):
        before = meta["base_model"]
    if before is not None and before is not False:
        before_res, _ = _as_result(before, scheduler or res.scheduler, "before")

    den = Denoiser(res.model)
    settings = {"num_inference_steps": num_inference_steps, "seed": seed, "sampler": "DDIM eta=0 (SFD: one-step)",
                "near_copy_mse": NEAR_COPY_MSE, "confident": CONFIDENT}
    report = {"method": res.method, "forgotten": _describe_short(forget), "base_model": _ref_text(before),
              "settings": settings}
    if den.kind == "text":
        if before_res is not None:
            # a saved result carries no text encoder or VAE: the base pipeline's are the same frozen ones
            for key in ("encode_prompts", "pipeline"):
                if not (res.extras or {}).get(key) and before_res.extras.get(key) is not None:
                    res.extras = {**(res.extras or {}), key: before_res.extras[key]}
        if res._latent_pipeline() is not None:
            settings["sampler"] = f"the pipeline's {type(res._latent_pipeline().scheduler).__name__}, decoded by its VAE"
        class_prompts = _class_prompts(class_prompts, res)
        if prompts is None and class_prompts is not None and getattr(forget, "prompt", None) in class_prompts:
            prompts = [q for q in class_prompts if q != forget.prompt]  # the other classes are the unrelated ones
        measured, grid = {"kind": "text"}, None
        if (before_res is not None and forget is not None) or class_prompts is None:  # the shift: before + concept
            measured, grid = _evaluate_text(res, before_res, forget, prompts, seed, settings, num_inference_steps)
        if class_prompts is not None:
            clf, ref_labels, ref_feats = _default_judge(den.sample_shape, classifier, reference)
            settings.update(class_prompts=class_prompts, n_per_class=n_per_class,
                            classifier="fastunlearn.zoo.classifier" if classifier is None else type(classifier).__name__)
            hit = [c for c, q in enumerate(class_prompts) if q == getattr(forget, "prompt", None)]
            by_class, grid = _evaluate_classes(res, before_res, Classes(hit) if hit else None, clf, ref_labels,
                                               ref_feats, n_per_class, num_inference_steps, seed, len(class_prompts),
                                               class_prompts)
            measured = {**by_class, **measured, "kind": "text"}
    else:
        clf, ref_labels, ref_feats = _default_judge(den.sample_shape, classifier, reference)
        settings["classifier"] = "fastunlearn.zoo.classifier" if classifier is None else type(classifier).__name__
        settings["fd_features"] = "classifier penultimate features (embed)"
        if den.kind == "class":
            settings["n_per_class"] = n_per_class
            measured, grid = _evaluate_classes(res, before_res, forget, clf, ref_labels, ref_feats, n_per_class,
                                               num_inference_steps, seed, den.num_classes)
        else:
            settings["n_samples"] = n_samples
            measured, grid = _evaluate_unconditional(res, before_res, forget, clf, ref_feats, n_samples,
                                                     num_inference_steps, seed)
    report.update(measured)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["_folder"] = folder
    return report, grid


def _describe_short(forget):
    if forget is None:
        return None
    rec = describe_forget(forget)
    rec.pop("images_float32_base64", None)
    rec.pop("labels", None)
    return rec


def _ref_text(before):
    if before is None or before is False:
        return None
    if isinstance(before, (str, Path)):
        return str(before)
    return type(before).__name__


def _forgotten_classes(forget) -> list:
    if isinstance(forget, Classes):
        return list(forget.ids)
    if isinstance(forget, DataPoints) and forget.labels is not None:
        return sorted(set(int(v) for v in forget.labels))
    return []


def _class_measures(res, clf, ref_feats, classes, n_per_class, steps, seed, forget_imgs, forgotten,
                    class_prompts=None):
    labels = torch.tensor(classes).repeat_interleave(n_per_class)
    imgs = _sample(res, labels.numel(), labels, steps, seed, class_prompts)
    pred, _, feats = judge(clf, imgs)
    rec = {c: float((pred[labels == c] == c).float().mean()) for c in classes}
    fd = {c: frechet_distance(feats[labels == c], ref_feats[c]) for c in classes if c in ref_feats}
    kept = [c for c in classes if c not in forgotten]
    m = {"recognition": rec, "fd": fd,
         "retain_rate": _mean(rec[c] for c in kept), "fd_retain": _mean(fd[c] for c in kept if c in fd)}
    if forgotten:
        m["forget_rate"] = _mean(rec[c] for c in forgotten)
        m["fd_forget"] = _mean(fd[c] for c in forgotten if c in fd)
    if forget_imgs is not None:
        mask = torch.isin(labels, torch.tensor(forgotten)) if forgotten else torch.ones_like(labels, dtype=torch.bool)
        m["near_copy_rate"] = near_copy_rate(imgs[mask], forget_imgs)
    rows = [imgs[labels == c][:GRID_PER_ROW] for c in classes]
    return m, rows


def _evaluate_classes(res, before_res, forget, clf, ref_labels, rf, n_per_class, steps, seed, num_classes,
                      class_prompts=None):
    classes = list(range(num_classes))
    forgotten = _forgotten_classes(forget)
    if ref_labels is None:
        raise bad_value("reference.labels", "class labels for a class-conditional model", None)
    ref_feats = {c: rf[ref_labels == c] for c in classes if int((ref_labels == c).sum()) >= 2}
    forget_imgs = forget.images.float() if isinstance(forget, DataPoints) else None
    after, rows_after = _class_measures(res, clf, ref_feats, classes, n_per_class, steps, seed, forget_imgs, forgotten,
                                        class_prompts)
    report = {"kind": "class", "forgotten_classes": forgotten, "after": after}
    rows_before = None
    if before_res is not None:
        report["before"], rows_before = _class_measures(before_res, clf, ref_feats, classes, n_per_class, steps,
                                                        seed, forget_imgs, forgotten, class_prompts)
        if forgotten:
            s = summarize_classes(report["before"]["recognition"], after["recognition"], forgotten)
            report["retain_ratio_mean"], report["retain_ratio_min"] = s["retain_ratio_mean"], s["retain_ratio_min"]
    names = [q[-24:] for q in class_prompts] if class_prompts is not None else [f"label {c}" for c in classes]
    grid = {"before": rows_before, "after": rows_after, "labels": names,
            "highlight": [classes.index(c) for c in forgotten]}
    return report, grid


def _uncond_measures(res, clf, ref_feats, n, steps, seed, forget_imgs):
    imgs = _sample(res, n, None, steps, seed)
    pred, conf, feats = judge(clf, imgs)
    m = {}
    near = torch.zeros(n, dtype=torch.bool)
    order = torch.arange(n)
    if forget_imgs is not None:
        d = nearest_mse(imgs, forget_imgs)
        near = d < NEAR_COPY_MSE
        m["near_copy_rate"] = float(near.float().mean())
        order = d.argsort()
    rest = ~near
    m["recognisable_rate"] = float((conf[rest] > CONFIDENT).float().mean()) if rest.any() else 0.0
    m["fd"] = frechet_distance(feats[rest], ref_feats) if int(rest.sum()) >= 2 else None
    m["predicted_class_fraction"] = {int(c): float((pred[rest] == c).float().mean()) for c in pred.unique()}
    k = min(GRID_PER_ROW, n)  # every row of the picture holds k images
    rows = []
    if forget_imgs is not None:
        rows.append(forget_imgs[torch.arange(k) % forget_imgs.shape[0]])
        rows.append(imgs[order[:k]])
    rows += [imgs[i * k:(i + 1) * k] for i in range(min(3, n // k))]
    return m, rows


def _evaluate_unconditional(res, before_res, forget, clf, ref_feats, n, steps, seed):
    forget_imgs = forget.images.float() if isinstance(forget, DataPoints) else None
    after, rows_after = _uncond_measures(res, clf, ref_feats, n, steps, seed, forget_imgs)
    report = {"kind": "data" if forget_imgs is not None else "unconditional", "after": after}
    rows_before = None
    if before_res is not None:
        report["before"], rows_before = _uncond_measures(before_res, clf, ref_feats, n, steps, seed, forget_imgs)
    labels = (["forgotten", "nearest"] if forget_imgs is not None else []) + ["samples"] * min(3, n // min(GRID_PER_ROW, n))
    grid = {"before": rows_before, "after": rows_after, "labels": labels,
            "highlight": [0, 1] if forget_imgs is not None else []}
    return report, grid


# ------------------------------------------------------------------------------------------------ text models
def _draw(res, n: int, prompts, steps: int, seed: int) -> torch.Tensor:
    """Samples for prompts as a CPU tensor [n, C, H, W] in [-1, 1]: decoded RGB images on a latent model."""
    if res._latent_pipeline() is not None:
        return res.sample(n, prompts=prompts, num_inference_steps=steps, seed=seed, output_type="pt").float().cpu() * 2 - 1
    return res.sample(n, prompts=prompts, num_inference_steps=steps, seed=seed).float().cpu()


def _evaluate_text(res, before_res, forget, prompts, seed, settings, steps: int = 50, n_noisy: int = 16):
    """Concept shift on held-out noisy inputs: mean squared change of ε(x_t, prompt) from before to after,
    for the forgotten concept and for unrelated prompts (no sampling, no classifier)."""
    if before_res is None:
        raise bad_value("before", "the model before unlearning (a text model has no labelled judge; the measure "
                        "is the change of the concept's prediction)", None)
    enc = res.extras.get("encode_prompts") or before_res.extras.get("encode_prompts")
    if enc is None:
        raise bad_value("result", "a pipeline result with a text encoder (encode_prompts)", None)
    concept = forget.prompt if isinstance(forget, Concept) else None
    if concept is None and getattr(forget, "prompts", None):  # DataPoints: the prompt of the forgotten images
        concept = max(set(forget.prompts), key=list(forget.prompts).count)
    if concept is None:
        raise bad_value("forget", "fu.Concept(prompt), or fu.DataPoints with prompts, for a text-conditional model",
                        forget)
    others = list(prompts) if prompts else ["a photo of a dog", "a landscape painting", "a red car"]
    den_a, den_b = Denoiser(res.model), Denoiser(before_res.model)
    gen = torch.Generator().manual_seed(10_000 + seed)  # held out: not a seed any method trains with
    shape = den_a.sample_shape
    x0 = torch.randn(n_noisy, *shape, generator=gen)
    t = torch.randint(100, int(res.scheduler.config.num_train_timesteps) - 100, (n_noisy,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ac = res.scheduler.alphas_cumprod[t].view(-1, *[1] * len(shape)).float()
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    p = next(res.model.parameters())
    x_t, tt = x_t.to(p.device, p.dtype), t.to(p.device)

    @torch.no_grad()
    def shift(prompt):
        cond = enc([prompt] * n_noisy)
        a, b = den_a(x_t, tt, cond).float(), den_b(x_t, tt, cond).float()
        return float((a - b).pow(2).mean()), (a, b)

    concept_shift, _ = shift(concept)
    other = {q: shift(q)[0] for q in others}
    settings.update({"noisy_inputs": n_noisy, "unrelated_prompts": others})
    report = {"kind": "text", "concept": concept, "concept_shift": concept_shift, "unrelated_shift": other,
              "unrelated_shift_mean": _mean(other.values()),
              "locality": concept_shift / max(_mean(other.values()), 1e-12)}
    grid = None
    try:
        k = 4
        rows_a = [_draw(res, k, q, steps, seed) for q in [concept] + others]
        rows_b = [_draw(before_res, k, q, steps, seed) for q in [concept] + others]
        grid = {"before": rows_b, "after": rows_a, "labels": [q[:24] for q in [concept] + others], "highlight": [0]}
    except FastUnlearnError:
        pass  # results without a sampler for prompts: numbers only
    return report, grid


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------ CLI
def format_report(r: dict) -> str:
    """A few human-readable lines of an evaluation."""
    lines = [f"method: {r.get('method')}   forgotten: {_short(r.get('forgotten'))}   base: {r.get('base_model')}"]

    def table(cols, width):
        """A header row and one row per side (before/after) present: rates as percentages, the rest as numbers."""
        lines.append(f"{'':8}" + "".join(f"{c:>{width}}" for c in cols))
        for side in ("before", "after"):
            if side in r:
                cells = (r[side].get(c) for c in cols)
                lines.append(f"{side:8}" + "".join(
                    f"{'-' if v is None else format(v, '.1%' if 'rate' in c else '.3g'):>{width}}"
                    for c, v in zip(cols, cells)))

    if r["kind"] == "text" and "concept_shift" in r:
        lines.append(f"concept shift {r['concept_shift']:.4g}; unrelated prompts {r['unrelated_shift_mean']:.4g} "
                     f"(ratio {r['locality']:.3g})")
    if r["kind"] == "class" or (r["kind"] == "text" and "after" in r):  # text: classes through their prompts
        table(["forget_rate", "retain_rate", "fd_forget", "fd_retain", "near_copy_rate"], 16)
        if "retain_ratio_mean" in r:
            lines.append(f"other classes keep {r['retain_ratio_mean']:.1%} of their recognition rate "
                         f"(worst {r['retain_ratio_min']:.1%})")
    elif r["kind"] in ("data", "unconditional"):
        table(["near_copy_rate", "recognisable_rate", "fd"], 20)
    return "\n".join(lines)


def _short(f):
    if not f:
        return None
    if f.get("kind") == "classes":
        return f"classes {f['ids']}"
    if f.get("kind") == "datapoints":
        return f"{f['n']} images"
    return f.get("prompt", f.get("kind"))

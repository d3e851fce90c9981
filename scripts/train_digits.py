"""Train the models bundled in ``fastunlearn/zoo`` on scikit-learn's digits (CPU, a few minutes).

* ``digits``: class-conditional UNet2DModel (labels 0..9, null label 10 via 10% label dropout);
* ``digits_outlier``: unconditional UNet2DModel on the digits plus many copies of one outlier
  image (a "T" glyph), so that the model memorises it: the data-unlearning test bed (SISS);
* ``digits_text``: a tiny Stable Diffusion pipeline (no VAE; UNet2DConditionModel with cross-attention,
  CLIP text encoder, tokenizer built locally) trained on the digits with prompts such as "a picture of
  the digit three": the concept-erasure test bed (ESD, EraseDiff with prompts);
* ``classifier.safetensors``: a CNN that judges generated digits (trained on real digits).

The benchmark (``fastunlearn bench``) compares unlearning with retraining from scratch without the
forgotten data. The same recipe (steps, batch, seed, schedule, EMA) trains those reference models:

* ``--only retrain-class --forget-class 3``: ``digits`` without the images of digit 3 (label 3 is never
  seen, so its embedding stays at its random initialisation);
* ``--only retrain-outlier``: ``digits_outlier`` without the outlier copies, i.e. the plain digits.

    python scripts/train_digits.py            # writes fastunlearn/zoo/...
    python scripts/train_digits.py --only retrain-class --threads 1    # writes fastunlearn/zoo/retrained/...
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastunlearn.classifier import DigitsClassifier
from fastunlearn.datasets import digits_tensors
from fastunlearn.models import digits_scheduler
from fastunlearn.zoo import ZOO, outlier_image
from fastunlearn.zoo.recipe import RETRAINED, noised_batch, retrained_name, train_unet

OUTLIER_COPIES = 90  # ~5% of the training set: enough that the plain model reproduces it


def train_text_pipeline(images, labels, steps, batch, seed, log):
    """The digits as a text-to-image model: ``fastunlearn.text.digits_text_pipeline`` trained on prompts
    that name the digit (two templates; 10% empty prompts, the unconditional branch of guidance). The text
    encoder is trained with the UNet (a random CLIP gives every prompt nearly the same hidden state, which
    no real text encoder does), at the UNet's recipe otherwise: AdamW, one-cycle lr, EMA, clipping."""
    from fastunlearn.text import DIGIT_NAMES, DIGIT_TEMPLATES, digit_prompt, digits_text_pipeline

    torch.manual_seed(seed)
    pipe = digits_text_pipeline(seed)
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train()
    prompts = [digit_prompt(c, k) for k in range(len(DIGIT_TEMPLATES)) for c in range(len(DIGIT_NAMES))] + [""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    ac = pipe.scheduler.alphas_cumprod
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    n_templates = len(DIGIT_TEMPLATES)
    t0 = time.time()
    for step in range(steps):
        idx, t, eps, x_t = noised_batch(images, ac, batch)
        row = torch.randint(0, n_templates, (batch,)) * 10 + labels[idx]
        row[torch.rand(batch) < 0.1] = len(prompts) - 1
        hidden = text_encoder(ids[row])[0]
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=hidden).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log(f"  step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval(), text_encoder.eval()
    return pipe


def train_classifier(images, labels, seed, log):
    torch.manual_seed(seed)
    perm = torch.randperm(images.shape[0])
    n_test = 300
    test, train = perm[:n_test], perm[n_test:]
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)

    def fit(idx, epochs):
        for _ in range(epochs):
            for b in idx[torch.randperm(len(idx))].split(64):
                x = images[b] + 0.1 * torch.randn_like(images[b])  # robustness to sampler noise
                loss = F.cross_entropy(clf(x.clamp(-1, 1)), labels[b])
                opt.zero_grad()
                loss.backward()
                opt.step()

    fit(train, 40)
    clf.eval()
    with torch.no_grad():
        acc = (clf(images[test]).argmax(1) == labels[test]).float().mean().item()
    log(f"  classifier held-out accuracy {acc:.4f} on {n_test} real digits")
    return clf, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ZOO)
    ap.add_argument("--only", choices=["digits", "outlier", "classifier", "digits-text", "retrain-class",
                                       "retrain-outlier"],
                    default=None)
    ap.add_argument("--forget-class", type=int, default=3, help="retrain-class: the digit left out")
    ap.add_argument("--retrained-out", type=Path, default=RETRAINED,
                    help="where retrain-class / retrain-outlier write their model folder")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = digits_tensors()
    if args.only in ("retrain-class", "retrain-outlier"):
        retrain(args, images, labels)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    if args.only in (None, "classifier"):
        print("classifier")
        clf, acc = train_classifier(images, labels, 0, print)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out / "classifier.safetensors"))
        meta["classifier"] = {"held_out_accuracy": acc, "epochs": 40}
    if args.only in (None, "digits"):
        print("class-conditional digits UNet")
        t0 = time.time()
        unet = train_unet(images, labels, True, args.steps, args.batch, 0, print)
        unet.save_pretrained(args.out / "digits")
        digits_scheduler().save_pretrained(args.out / "digits")
        meta["digits"] = {"steps": args.steps, "batch": args.batch, "seconds": round(time.time() - t0)}
    if args.only in (None, "outlier"):
        print("unconditional digits UNet with a memorised outlier")
        t0 = time.time()
        out = outlier_image()
        imgs = torch.cat([images, out.expand(OUTLIER_COPIES, -1, -1, -1)])
        unet = train_unet(imgs, None, False, args.steps, args.batch, 1, print)
        unet.save_pretrained(args.out / "digits_outlier")
        digits_scheduler().save_pretrained(args.out / "digits_outlier")
        meta["digits_outlier"] = {"steps": args.steps, "batch": args.batch, "outlier_copies": OUTLIER_COPIES,
                                  "seconds": round(time.time() - t0)}
    if args.only in (None, "digits-text"):
        print("text-conditional digits pipeline (prompts name the digit)")
        t0 = time.time()
        pipe = train_text_pipeline(images, labels, args.steps, args.batch, 2, print)
        tmp = args.out / ".digits_text.tmp"
        pipe.save_pretrained(tmp, safe_serialization=True)
        if (args.out / "digits_text").exists():
            import shutil
            shutil.rmtree(args.out / "digits_text")
        tmp.rename(args.out / "digits_text")
        meta["digits_text"] = {"steps": args.steps, "batch": args.batch, "seconds": round(time.time() - t0),
                               "threads": torch.get_num_threads()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def retrain(args, images, labels):
    """A reference model trained from scratch without the forgotten data, with the bundled model's recipe
    and seed (so the only difference to the bundled model is the data)."""
    if args.only == "retrain-class":
        keep = labels != args.forget_class
        name = retrained_name("class", args.forget_class)
        what = {"base": "digits", "excluded": f"the {int((~keep).sum())} images of digit {args.forget_class}",
                "forget_class": args.forget_class}
        print(f"class-conditional digits UNet without digit {args.forget_class}")
        t0 = time.time()
        unet = train_unet(images[keep], labels[keep], True, args.steps, args.batch, 0, print)
    else:
        name = retrained_name("outlier")
        what = {"base": "digits_outlier", "excluded": f"the {OUTLIER_COPIES} copies of the outlier image"}
        print("unconditional digits UNet without the outlier")
        t0 = time.time()
        unet = train_unet(images, None, False, args.steps, args.batch, 1, print)
    seconds = round(time.time() - t0)
    folder = args.retrained_out / name
    tmp = folder.with_name(f".{name}.tmp")
    unet.save_pretrained(tmp)
    digits_scheduler().save_pretrained(tmp)
    record = {**what, "steps": args.steps, "batch": args.batch, "seconds": seconds,
              "threads": torch.get_num_threads(), "recipe": "fastunlearn.zoo.recipe:train_unet"}
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(f"wrote {folder} ({seconds} s)")


if __name__ == "__main__":
    main()

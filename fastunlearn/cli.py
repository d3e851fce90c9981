"""Command line: ``fastunlearn demo | erase | ...`` (diffusers' flag names where they exist)."""
from __future__ import annotations

import argparse
import json
import sys


def _demo(args):
    from .demo import run_demo

    run_demo(args.out, digit=args.digit, steps=args.steps, progress=not args.no_progress, seed=args.seed)


def _parse_option(text: str):
    key, _, value = text.partition("=")
    if not _:
        raise SystemExit(f"--option: expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


_DATA_METHODS = ("siss", "siss-nois", "naive", "neggrad")
_DATA_FREE = ("esd", "sfd")  # they refuse retain images


def _erase(args):
    import torch

    import fastunlearn as fu
    from .errors import FastUnlearnError

    try:
        forget = retain = None
        if args.classes:
            forget = fu.Classes([int(c) for c in args.classes.split(",")], override=args.override)
        elif args.concept:
            forget = fu.Concept(args.concept, anchor=args.anchor)
        elif args.data:
            forget = fu.DataPoints(args.data)
        if args.retain:
            retain = fu.DataPoints(args.retain)
        elif args.retain_prompts:
            retain = list(args.retain_prompts)
        model = args.model
        scheduler = None
        if model == "digits_text":  # the bundled text pipeline: erase a prompt such as "a picture of the digit three"
            model = fu.zoo.digits_text()
        if model == "digits":
            model, scheduler = fu.zoo.digits()
            if args.classes and args.data is None and retain is None and args.method not in _DATA_FREE:
                # The bundled model's own training data: forget = that class's images, retain = the rest.
                data = fu.datasets.digits()
                hit = torch.isin(data.labels, torch.tensor(forget.ids))
                retain = fu.DataPoints(data.images[~hit], labels=data.labels[~hit])
                if args.method in _DATA_METHODS:
                    forget = fu.DataPoints(data.images[hit], labels=data.labels[hit])
        options = dict(_parse_option(o) for o in args.option)
        res = fu.erase(model, forget=forget, retain=retain, method=args.method, scheduler=scheduler,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       lora_rank=args.rank, precision=args.mixed_precision, optimizer="adamw8bit" if args.use_8bit_adam else None,
                       gradient_checkpointing=args.gradient_checkpointing or None,
                       attention="xformers" if args.enable_xformers_memory_efficient_attention else None,
                       output_dir=args.out if (args.checkpoint_every or args.resume) else None,
                       checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.no_progress,
                       **options)
        from .distributed import is_main_process

        if not is_main_process():  # accelerate launch: every process trained the same weights; one writes
            return
        path = res.save(args.result_dir or args.out, overwrite=args.overwrite)
    except FastUnlearnError as e:
        print(f"fastunlearn erase: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"saved {path} ({res.meta['seconds']:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastunlearn", description="Make a diffusion model forget.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="erase one digit from the bundled digits model with SISS (the main job)")
    d.add_argument("--out", default="fastunlearn-demo", help="output folder (picture, metrics, model)")
    d.add_argument("--digit", type=int, default=3, choices=range(10))
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)

    e = sub.add_parser("erase", help="run one unlearning method and save the result")
    e.add_argument("--model", required=True, help="a diffusers model or pipeline folder, or 'digits' / 'digits_text' (bundled)")
    e.add_argument("--method", default=None)
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", help="comma-separated class ids to forget")
    g.add_argument("--concept", help="a text concept to forget")
    g.add_argument("--data", help="a folder of the training images to forget")
    e.add_argument("--override", type=int, default=None, help="SFD: safe class the forgotten ones map to")
    e.add_argument("--anchor", default=None, help="the anchor prompt a concept is mapped toward")
    e.add_argument("--retain", default=None, help="a folder of images to keep")
    e.add_argument("--retain-prompts", nargs="*", default=None)
    e.add_argument("--out", required=True, help="result folder")
    e.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--batch-size", "--train_batch_size", dest="batch_size", type=int, default=None)
    e.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--rank", type=int, default=None, help="LoRA rank (default: train the weights directly)")
    e.add_argument("--mixed_precision", "--mixed-precision", default=None, choices=["fp32", "bf16", "fp16"])
    e.add_argument("--use_8bit_adam", "--use-8bit-adam", action="store_true")
    e.add_argument("--gradient_checkpointing", "--gradient-checkpointing", action="store_true")
    e.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    e.add_argument("--checkpoint-every", "--checkpointing_steps", dest="checkpoint_every", type=int, default=None)
    e.add_argument("--resume", action="store_true")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option lambd=0.5 (values parsed as JSON when possible)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_erase)

    for extra in _extra_commands():
        extra(sub)
    return ap


def _extra_commands():
    """Subcommands contributed by other modules (eval, plan, bench), registered when present."""
    found = []
    for mod_name in ("fastunlearn.evaluation", "fastunlearn.planner", "fastunlearn.bench"):
        try:
            mod = __import__(mod_name, fromlist=["add_cli"])
        except ImportError:
            continue
        if hasattr(mod, "add_cli"):
            found.append(mod.add_cli)
    return found


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

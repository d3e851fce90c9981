"""Command line: ``fastunlearn demo | erase | ...``.

Flags take the diffusers training scripts' names and style (``--pretrained_model_name_or_path``,
``--output_dir``, ``--max_train_steps``, ``--learning_rate``, underscores); the earlier short names (``--model``,
``--out``, ``--steps``, ``--lr``, dashed forms) stay as aliases. ``erase`` checks its output folder and numbers
before loading anything, and its errors name the flag, not ``erase()``'s Python argument.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import typing

from .config import PRECISIONS, RunConfig, fields
from .distributed import is_main_process
from .errors import FastUnlearnError
from .files import atomic_path, json_default
from .methods import REGISTRY
from .result import RUN_FOLDERS
from .targets import DataPoints


def _demo(args):
    from .demo import run_demo  # each command's module is loaded when the command runs

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


def _config_flags() -> dict:
    """erase()'s argument names -> the flags that set them, so that errors name what the user typed."""

    flags = {f.name: f.metadata["flag"].names[0] for f in fields() if f.metadata["flag"] is not None}
    return {**flags, "model": "--pretrained_model_name_or_path", "method": "--method", "output_dir": "--output_dir",
            "path": "--output_dir", "overwrite": "--overwrite", "resume": "--resume_from_checkpoint",
            "retain": "--retain"}


def _flag_error(message: str, args) -> str:
    """``"lr: expected ..."`` -> ``"--learning_rate: expected ..."`` (method options: ``--option NAME``)."""
    head, sep, rest = message.partition(":")
    if not sep or " " in head:
        return message
    name = head.split(".")[0]
    target = "--classes" if args.classes else "--concept" if args.concept else "--data"
    flag = {**_config_flags(), "forget": target}.get(name)
    if flag is None:

        if any(name in cls.options for cls in REGISTRY.values()):
            flag = f"--option {name}"
    if flag is None:
        return message
    return f"{flag}{head[len(name):]}{sep}{rest}"


def _settings(args) -> dict:
    """The ``RunConfig`` fields the erase flags set (``add_config_flags``), and the checkpoint folder: the result
    folder, when the run writes or resumes checkpoints."""

    settings = {f.name: getattr(args, f.metadata["flag"].dest or f.name) for f in fields()
                if f.metadata["flag"] is not None}
    resume = args.resume_from_checkpoint is not None
    out = args.result_dir or args.output_dir
    return {**settings, "resume": resume, "output_dir": out if (args.checkpoint_every or resume) else None}


def _check_erase_args(args) -> None:
    """What can be checked before anything is loaded: the output folder first (found at save time, after the
    training, it would cost the whole run)."""
    from pathlib import Path

    def fail(msg):
        raise SystemExit(f"fastunlearn erase: error: {msg}")

    out = Path(args.result_dir or args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir: {str(out)!r} is a file, expected a folder")
    if out.is_dir() and not args.overwrite:
        names = {e.name for e in out.iterdir() if not e.name.startswith(".")}
        resumable = args.resume_from_checkpoint and names <= set(RUN_FOLDERS)
        if names and not resumable:
            fail(f"--output_dir: {str(out)!r} exists and is not empty; pass --overwrite to replace it"
                 + (" (or --resume_from_checkpoint latest to continue its run)" if "checkpoints" in names else ""))
    for flag, v in (("--validation_steps", args.validation_steps), ("--num_validation_images",
                                                                     args.num_validation_images)):
        if v < 1:
            fail(f"{flag}: expected an int >= 1, got {v}")
    try:  # the run settings, checked as erase() checks them (fastunlearn.config), errors naming the flag
        RunConfig(**_settings(args))
    except FastUnlearnError as e:
        fail(_flag_error(str(e), args))
    is_pipeline = args.model == "digits_text" or (Path(args.model) / "model_index.json").exists()
    if args.save_pipeline and not is_pipeline:
        fail(f"--save_pipeline: needs a pipeline as --pretrained_model_name_or_path (a folder with "
             f"model_index.json, or digits_text), got {args.model!r}")
    if args.validation_prompt is not None:
        if args.method == "sfd":
            fail("--validation_prompt: not available with --method sfd (its one-step generator exists only at the "
                 "end of the run); evaluate the result instead")
        if not is_pipeline:
            fail("--validation_prompt: needs a text-to-image pipeline (a pipeline folder or digits_text), got "
                 f"{args.model!r}")


def _validation_writer(args):
    """``erase(callback=...)``: every ``--validation_steps`` steps, sample
    ``--num_validation_images`` images of ``--validation_prompt`` with the model in training and write them as
    one grid, ``OUTPUT_DIR/validation/step-NNNNNN.png``, as the diffusers training scripts log theirs."""
    if args.validation_prompt is None:
        return None
    from pathlib import Path

    import torch
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import make_image_grid

    folder = Path(args.result_dir or args.output_dir) / "validation"

    def write(step: int, view) -> None:
        if step % args.validation_steps or not is_main_process():
            return
        n = args.num_validation_images
        images = view.sample(n, prompts=[args.validation_prompt] * n, num_inference_steps=args.num_inference_steps,
                             seed=args.seed)
        if isinstance(images, torch.Tensor):  # [-1, 1] tensors (pixel models); a latent model's images come decoded
            x = ((images.float().clamp(-1, 1) + 1) / 2)[:, :3].permute(0, 2, 3, 1).cpu().numpy()
            images = VaeImageProcessor.numpy_to_pil(x)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        with atomic_path(path, ".png") as tmp:
            make_image_grid(list(images), rows=1, cols=len(images)).save(tmp)

    return write


def _erase(args):
    import torch

    import fastunlearn as fu
    _check_erase_args(args)
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
        callback = _validation_writer(args)
        res = fu.erase(model, forget=forget, retain=retain, method=args.method, scheduler=scheduler, **_settings(args),
                       callback=callback, **options)

        if not is_main_process():  # accelerate launch: every process trained the same weights; one writes
            return
        path = res.save(args.result_dir or args.output_dir, overwrite=args.overwrite, pipeline=args.save_pipeline)
    except FastUnlearnError as e:
        print(f"fastunlearn erase: error: {_flag_error(str(e), args)}", file=sys.stderr)
        raise SystemExit(2)
    print(f"saved {path} ({res.meta['seconds']:.1f} s)")


class _Formatter(argparse.HelpFormatter):
    """Help with each flag's default, as the diffusers scripts show them ("default: the method's" for None); the
    epilog (each method's options) keeps its lines."""

    def _fill_text(self, text, width, indent):
        out = []
        for line in text.splitlines():
            lead = indent + " " * (len(line) - len(line.lstrip()))
            out.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead + "    "))
        return "\n".join(out)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.option_strings == []:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the run settings: names, choices, help and defaults from ``fastunlearn.config``. A switch
    (``Flag.const``) sets its field to that value; absent, the field keeps its default."""
    hints = typing.get_type_hints(RunConfig)
    for f in fields():
        flag = f.metadata["flag"]
        if flag is None:
            continue
        kw = dict(dest=flag.dest or f.name, default=f.default, help=flag.help or f.metadata["help"])
        if flag.const is not None:
            kw.update(action="store_const", const=flag.const)
        else:
            kind = next(t for t in (*typing.get_args(hints[f.name]), hints[f.name]) if t is not type(None))
            kw.update(type=kind, metavar=flag.metavar)
            if f.metadata["choices"] is not None:
                kw["choices"] = sorted(f.metadata["choices"])
        parser.add_argument(*flag.names, **kw)


def _method_options_help() -> str:
    """Every registered method's options, from its ``Options`` (default and help), for ``erase --help``."""
    lines = ["method options (--option KEY=VALUE):"]
    for name, cls in sorted(REGISTRY.items()):
        if name.startswith("_"):
            continue
        lines.append(f"  {name}:")
        for key, text in cls.Options.help().items():
            lines.append(f"    {key}={cls.options[key]!r}: {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastunlearn", description="Make a diffusion model forget.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="erase one digit from the bundled digits model with SISS (the main job)",
                       formatter_class=_Formatter)
    d.add_argument("--output_dir", "--out", dest="out", default="fastunlearn-demo",
                   help="output folder (picture, metrics, model)")
    d.add_argument("--digit", type=int, default=3, choices=range(10), help="the digit to forget")
    d.add_argument("--max_train_steps", "--steps", dest="steps", type=int, metavar="N", default=None,
                   help="training steps (default: SISS's, see the README's defaults table)")
    d.add_argument("--seed", type=int, default=0, help="seed of the training draws and the samples")
    d.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bar")
    d.set_defaults(func=_demo)

    e = sub.add_parser("erase", help="run one unlearning method and save the result", formatter_class=_Formatter,
                       description="Flags follow the diffusers training scripts (--pretrained_model_name_or_path, "
                                   "--output_dir, --max_train_steps, ...); the older short names still work.",
                       epilog=_method_options_help())
    e.add_argument("--pretrained_model_name_or_path", "--model", dest="model", metavar="PATH", required=True,
                   help="a local diffusers pipeline or model folder, or 'digits' / 'digits_text' (bundled); "
                        "never downloaded")
    e.add_argument("--method", default=None, choices=sorted(REGISTRY),
                   help="the unlearning method (default: picked by target: siss for --data, esd for --classes or "
                        "--concept without retain images, erasediff for --classes with --retain)")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", default=None, help="comma-separated class ids to forget (default: none)")
    g.add_argument("--concept", default=None, help="a text concept to forget (default: none)")
    g.add_argument("--data", default=None, help="a folder of the training images to forget (default: none)")
    e.add_argument("--override", type=int, default=None,
                   help="the safe class the forgotten ones are mapped onto (SFD, EraseDiff; default: the method's)")
    e.add_argument("--anchor", default=None, help="the prompt a concept is mapped toward (default: the method's)")
    e.add_argument("--retain", default=None, help="a folder of images to keep (default: none)")
    e.add_argument("--retain_prompts", "--retain-prompts", dest="retain_prompts", nargs="*", default=None,
                   help="prompts to keep, for data-free retain terms (default: none)")
    e.add_argument("--output_dir", "--out", dest="output_dir", metavar="DIR", required=True,
                   help="result folder; must not exist or be empty unless --overwrite (checked before training)")
    e.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    e.add_argument("--save_pipeline", "--save-pipeline", dest="save_pipeline", action="store_true",
                   help="also write the input pipeline's other components: DiffusionPipeline.from_pretrained("
                        "OUTPUT_DIR) loads the erased model")
    add_config_flags(e)
    e.add_argument("--resume_from_checkpoint", default=None, choices=["latest"],
                   help="continue from the newest complete checkpoint in --output_dir (default: start anew)")
    e.add_argument("--resume", dest="resume_from_checkpoint", action="store_const", const="latest",
                   help="same as --resume_from_checkpoint latest")
    e.add_argument("--validation_prompt", metavar="PROMPT", default=None,
                   help="write --num_validation_images samples of this prompt every --validation_steps steps to "
                        "OUTPUT_DIR/validation/ (default: none)")
    e.add_argument("--validation_steps", type=int, metavar="N", default=100, help="steps between validation samples")
    e.add_argument("--num_validation_images", type=int, metavar="N", default=4, help="images per validation")
    e.add_argument("--num_inference_steps", type=int, metavar="N", default=25, help="sampling steps of the validation images")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option lambd=0.5, repeatable (values parsed as JSON when possible; "
                        "default: the method's options)")
    e.set_defaults(func=_erase)

    for add in (_add_eval, _add_plan, _add_bench):
        add(sub)
    return ap


# ------------------------------------------------------------------------------------------ eval
def _eval(args):
    from .evaluation import evaluate, format_report

    try:
        forget = DataPoints(args.forget_data) if args.forget_data else None
        before = False if args.no_before else args.before
        r = evaluate(args.result_dir, before=before, forget=forget, n_per_class=args.n_per_class,
                     n_samples=args.samples, num_inference_steps=args.num_inference_steps, seed=args.seed,
                     out=args.out)
    except FastUnlearnError as e:
        print(f"fastunlearn eval: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        print(json.dumps(r, indent=2, default=json_default))
    else:
        print(format_report(r))
        files = r.get("files", {})
        print(f"wrote {files.get('metrics')}" + (f" and {files['picture']}" if files.get("picture") else ""))


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="metrics and a before/after picture for a saved result",
                              description="Forget rate, retain rate, Fréchet distance and near-copy rate of a "
                                          "saved result against the model it was made from.")
    p.add_argument("result_dir", help="a folder written by Result.save / fastunlearn erase")
    p.add_argument("--out", default=None, help="output folder (default: RESULT_DIR/eval)")
    p.add_argument("--before", default=None, help="the model before unlearning: a folder or zoo:NAME "
                                                  "(default: base_model recorded in fastunlearn.json)")
    p.add_argument("--no-before", action="store_true", help="measure the result alone")
    p.add_argument("--forget-data", default=None, help="folder of the forgotten images (when not stored in the "
                                                        "result)")
    p.add_argument("--n-per-class", type=int, default=100, help="samples per class (class-conditional models)")
    p.add_argument("--samples", type=int, default=1000, help="samples (unconditional models)")
    p.add_argument("--num_inference_steps", "--num-inference-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_eval)


# ------------------------------------------------------------------------------------------ plan
def _add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan the peak GPU memory of a run before loading any weight")
    p.add_argument("--model", default="sdxl", help="'sdxl', 'sd15' (configs ship with fastunlearn) or a diffusers "
                   "model/pipeline folder (only its configs are read)")
    p.add_argument("--method", default="siss", choices=sorted(REGISTRY))
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--vram", type=float, default=None, help="GPU memory in GiB")
    p.add_argument("--batch-size", "--train_batch_size", dest="batch_size", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: full weights, or 16 with --auto)")
    p.add_argument("--mixed_precision", "--mixed-precision", "--precision", dest="precision", default=None,
                   choices=sorted(PRECISIONS))
    p.add_argument("--gradient_checkpointing", "--gradient-checkpointing", action="store_const", const=True,
                   default=None)
    p.add_argument("--use_8bit_adam", "--use-8bit-adam", action="store_const", const="adamw8bit", default=None,
                   dest="optimizer")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_const", const="xformers",
                   default=None, dest="attention")
    p.add_argument("--auto", action="store_const", const=True, default=None,
                   help="pick the settings left open so that the run fits in --vram (default when --vram is given)")
    p.add_argument("--no-auto", dest="auto", action="store_const", const=False,
                   help="plan exactly erase()'s defaults for the settings left open")
    p.add_argument("--text-encoders-off-gpu", action="store_true",
                   help="do not count the pipeline's text encoders and VAE (kept on the CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with peak_gib)")
    p.set_defaults(func=_plan)


def _plan(args):
    from .planner import plan

    try:
        p = plan(args.model, method=args.method, resolution=args.resolution, vram=args.vram,
                 batch_size=args.batch_size, lora_rank=args.rank, precision=args.precision,
                 gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                 attention=args.attention, auto=args.auto, text_encoders_on_gpu=not args.text_encoders_off_gpu)
    except FastUnlearnError as e:
        print(f"fastunlearn plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        print(json.dumps(p.as_dict()))
    else:
        print(p.table())
    if p.fits is False:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------ bench
def _bench(args):
    from .bench import SETTINGS, markdown, run_bench

    try:
        doc = run_bench(out=args.out, quick=args.quick,
                        methods=args.methods.split(",") if args.methods else None,
                        settings=tuple(args.settings.split(",")) if args.settings else SETTINGS,
                        isolate=not args.no_isolate, retrain_steps=args.retrain_steps, threads=args.threads,
                        steps=args.steps)
    except FastUnlearnError as e:
        print(f"fastunlearn bench: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print()
    print(markdown(doc))


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="the real-data benchmark: every method against retraining from scratch",
                              description="Every registered method on the bundled digits models, against models retrained "
                                          "without the forgotten data.")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 10 steps per method, 20 samples per label")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results in a source clone, "
                                               "./fastunlearn-bench elsewhere; fastunlearn-bench-quick with --quick)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    p.add_argument("--settings", default=None, help="class,data (default: both)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for every method (default: each "
                                                           "method's own)")
    p.add_argument("--retrain-steps", type=int, default=None,
                   help="retrain the references within the run for N steps (default: the bundled ones)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--no-isolate", action="store_true", help="run every method in this process (faster start, "
                                                             "less exact peak memory)")
    p.set_defaults(func=_bench)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

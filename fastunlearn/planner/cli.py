"""``fastunlearn plan``: the command line of the memory planner (``fastunlearn.cli`` registers it)."""
from __future__ import annotations

import json
import sys

from ..errors import FastUnlearnError
from ..methods import REGISTRY
from .search import plan


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan the peak GPU memory of a run before loading any weight")
    p.add_argument("--model", default="sdxl", help="'sdxl', 'sd15' (configs ship with fastunlearn) or a diffusers "
                   "model/pipeline folder (only its configs are read)")
    p.add_argument("--method", default="siss", choices=sorted(REGISTRY))
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--vram", type=float, default=None, help="GPU memory in GiB")
    p.add_argument("--batch-size", "--train_batch_size", dest="batch_size", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: full weights, or 16 with --auto)")
    p.add_argument("--mixed_precision", "--mixed-precision", "--precision", dest="precision", default=None,
                   choices=["fp32", "bf16", "fp16"])
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
    p.set_defaults(func=_plan_cli)


def _plan_cli(args):
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

"""The run configuration: every setting of ``erase()`` written once, with its type, default, valid values,
one-line help and check.

``RunConfig(...)`` checks itself when built (``validate``): a bad value raises one of fastunlearn's errors
whose message starts with the argument's name and says what was expected, before any work. ``erase()``, the
command line (``fastunlearn.cli`` builds its ``erase`` flags from ``fields()``: choices, help, defaults)
and the memory planner read the lists of valid values from here and nowhere else.

``None`` means "the method's default" for ``steps``, ``batch_size``, ``lr`` and ``optimizer`` (filled by
``with_method_defaults``) and "decided for the device" for the runtime switches (``runtime.resolve``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import bad_type, bad_value

# The valid values, each listed once. PRECISIONS maps the name to the compute dtype (runtime, planner).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTIONS = ("sdpa", "xformers")
OPTIMIZERS = ("adamw", "adam", "adamw8bit")
TORCH_DTYPES = ("float32", "float16", "bfloat16")  # diffusers' torch_dtype, by name or as a torch.dtype


# ------------------------------------------------------------------------------------------ checks
def check_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, f"an int >= {lo}", value)
    if value < lo:
        raise bad_value(name, f"an int >= {lo}", value)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise bad_type(name, "True or False", value)


def check_positive_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(name, "a positive finite number", value)
    if not (math.isfinite(value) and value > 0):
        raise bad_value(name, "a positive finite number", value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise bad_value(name, " | ".join(choices), value)


def check_output_dir(name: str, output_dir) -> None:
    """A folder path (existing or not) whose nearest existing ancestor is a folder."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise bad_type(name, "a folder path (str or pathlib.Path)", output_dir)
    path = Path(output_dir)
    if str(output_dir) == "":
        raise bad_value(name, "a folder path", "")
    if path.exists() and not path.is_dir():
        raise bad_value(name, "a folder path (this is an existing file)", str(output_dir))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise bad_value(name, f"a folder path ({str(parent)!r} is a file)", str(output_dir))
            break


def _switch(name: str, value) -> None:  # runtime switches: None leaves the choice to runtime.resolve
    if not isinstance(value, bool):
        raise bad_type(name, "True, False or None", value)


def _attention(name: str, value) -> None:
    check_choice(name, value, ATTENTIONS)
    if value == "xformers" and importlib.util.find_spec("xformers") is None:
        raise bad_value(name, "'sdpa' (xformers is not installed; pip install 'fastunlearn[xformers]' to use it)",
                        value)


def _resolution(name: str, value) -> None:
    """Pipelines sample and encode at ``resolution`` pixels: an int divisible by 8 (the VAE factor)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, "an int (pixels, a multiple of 8)", value)
    if value < 8 or value % 8:
        raise bad_value(name, "a positive multiple of 8 (pixels)", value)


def _seed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(name, "an int", value)


def _variant(name: str, value) -> None:
    if not isinstance(value, str):
        raise bad_type(name, "a weights variant name such as 'fp16'", value)


def _callback(name: str, value) -> None:
    if not callable(value):
        raise bad_type(name, "a function callback(step, result) called after every step", value)


def as_torch_dtype(name: str, value) -> torch.dtype:
    """``torch_dtype`` as a ``torch.dtype``; a name such as "float16" is accepted."""
    if isinstance(value, str):
        if value not in TORCH_DTYPES:
            raise bad_value(name, " | ".join(TORCH_DTYPES) + " (or a torch.dtype)", value)
        value = getattr(torch, value)
    if value not in tuple(getattr(torch, n) for n in TORCH_DTYPES):
        raise bad_value(name, " | ".join(f"torch.{n}" for n in TORCH_DTYPES), value)
    return value


# ------------------------------------------------------------------------------------------ fields
@dataclass(frozen=True)
class Flag:
    """How the command line spells a setting: diffusers' training-script name first, older aliases after.
    ``const``: the flag is a switch that sets the field to ``const``; ``dest``: argparse's attribute when it
    is not the field's name; ``help``: when the switch reads differently from the field's help."""

    names: tuple
    dest: Optional[str] = None
    const: Any = None
    metavar: Optional[str] = None
    help: Optional[str] = None


def setting(default, help: str, check: Optional[Callable] = None, choices=None, flag: Optional[Flag] = None):
    """A ``RunConfig`` field: default, one-line help, the check of a non-None value (raises an error naming the
    argument; may return the normalised value), the valid values and the command-line flag."""
    if choices is not None and check is None:
        check = lambda name, v: check_choice(name, v, choices)  # noqa: E731
    return dataclasses.field(default=default, metadata=dict(help=help, check=check, choices=choices, flag=flag))


@dataclass(frozen=True)
class RunConfig:
    """Every run setting of ``erase()``; see ``fields()`` for each one's help, and the README's defaults table
    for the methods' defaults."""

    steps: Optional[int] = setting(
        None, "training steps (default: the method's, see the README's defaults table)", check_int,
        flag=Flag(("--max_train_steps", "--steps"), metavar="N"))
    batch_size: Optional[int] = setting(
        None, "batch size (default: the method's)", check_int,
        flag=Flag(("--train_batch_size", "--batch-size", "--batch_size"), metavar="N"))
    lr: Optional[float] = setting(
        None, "learning rate (default: the method's)", check_positive_finite,
        flag=Flag(("--learning_rate", "--lr"), metavar="LR"))
    seed: int = setting(0, "seed of every random draw (runs are reproducible)", _seed, flag=Flag(("--seed",)))
    lora_rank: Optional[int] = setting(
        None, "LoRA rank (default: none, the method's parameters are trained directly)", check_int,
        flag=Flag(("--rank", "--lora_rank"), metavar="R"))
    precision: Optional[str] = setting(
        None, "compute precision, trainable weights kept in fp32 (default: bf16 on a CUDA GPU that supports it, "
        "else the model's dtype)", choices=tuple(PRECISIONS),
        flag=Flag(("--mixed_precision", "--mixed-precision"), dest="mixed_precision"))
    optimizer: Optional[str] = setting(
        None, "optimizer (default: the method's, adamw)", choices=OPTIMIZERS,
        flag=Flag(("--use_8bit_adam", "--use-8bit-adam"), const="adamw8bit", help="bitsandbytes 8-bit AdamW"))
    gradient_checkpointing: Optional[bool] = setting(
        None, "recompute activations in the backward pass (less memory)", _switch,
        flag=Flag(("--gradient_checkpointing", "--gradient-checkpointing"), const=True))
    attention: Optional[str] = setting(
        None, "attention implementation (default: the model's, PyTorch SDPA)", _attention, choices=ATTENTIONS,
        flag=Flag(("--enable_xformers_memory_efficient_attention",), const="xformers",
                  help="xformers attention instead of PyTorch SDPA"))
    compile: Optional[bool] = setting(None, "regional torch.compile of the repeated blocks (default: off)", _switch)
    tf32: Optional[bool] = setting(None, "TF32 matmuls for the fp32 parts (default: on for CUDA)", _switch)
    resolution: Optional[int] = setting(
        None, "pipelines: the image size in pixels the method samples or encodes at (default: the pipeline's)",
        _resolution, flag=Flag(("--resolution",), metavar="PIXELS"))
    output_dir: Optional[Any] = setting(
        None, "folder of the run's checkpoints (default: none)", check_output_dir)
    checkpoint_every: Optional[int] = setting(
        None, "write a resumable checkpoint to OUTPUT_DIR/checkpoints every N steps (default: none)", check_int,
        flag=Flag(("--checkpointing_steps", "--checkpoint-every", "--checkpoint_every"), metavar="N"))
    resume: bool = setting(False, "continue from the newest complete checkpoint in output_dir", check_bool)
    keep_checkpoints: int = setting(2, "complete checkpoints kept on disk", check_int)
    progress: bool = setting(
        True, "show a progress bar", check_bool,
        flag=Flag(("--no_progress", "--no-progress"), const=False, help="no progress bar"))
    max_nonfinite: int = setting(10, "non-finite steps in a row (skipped) before the run stops", check_int)
    offload_input: bool = setting(
        True, "move the caller's modules off the accelerator during the run (back at the end)", check_bool)
    variant: Optional[str] = setting(
        None, "weights variant of the folder, e.g. fp16 (default: found when the folder holds only one)", _variant,
        flag=Flag(("--variant",)))
    torch_dtype: Optional[Any] = setting(
        None, "dtype the model folder is loaded in: " + " | ".join(TORCH_DTYPES) + " or a torch.dtype",
        as_torch_dtype, choices=TORCH_DTYPES)
    callback: Optional[Callable] = setting(None, "callback(step, result) called after every step", _callback)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (errors name the argument), normalise ``torch_dtype`` to a ``torch.dtype``, then
        the settings that need each other."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # None: "not set", where that is the default
                continue
            out = f.metadata["check"](f.name, value)
            if out is not None:
                object.__setattr__(self, f.name, out)
        if self.checkpoint_every is not None and self.output_dir is None:
            raise bad_value("output_dir", "a folder (checkpoint_every needs somewhere to write)", None)
        if self.resume and self.output_dir is None:
            raise bad_value("output_dir", "the folder of the run to resume", None)

    def with_method_defaults(self, defaults: dict) -> "RunConfig":
        """``steps``, ``batch_size``, ``lr``, ``optimizer`` filled from a method's defaults where not given."""
        return dataclasses.replace(
            self, steps=self.steps or defaults.get("steps", 100), batch_size=self.batch_size or
            defaults.get("batch_size", 16), lr=self.lr or defaults.get("lr", 1e-4),
            optimizer=self.optimizer or defaults.get("optimizer", "adamw"))


def fields() -> tuple:
    """``RunConfig``'s fields (``f.metadata``: help, check, choices, flag), in declaration order."""
    return dataclasses.fields(RunConfig)

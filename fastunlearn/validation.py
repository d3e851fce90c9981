"""Input checks ``erase()`` runs before any work, beyond the ones next to each type (``targets.py``,
each method's ``validate_options``, ``runtime.resolve``).

Every check raises one of fastunlearn's errors (``fastunlearn.errors``) whose message starts with the
argument's name and says what was expected, so a typo costs milliseconds, not a failed run an hour in.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import bad_type, bad_value


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


def check_output_dir(output_dir) -> None:
    """A folder path (existing or not) whose nearest existing ancestor is a folder."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise bad_type("output_dir", "a folder path (str or pathlib.Path)", output_dir)
    path = Path(output_dir)
    if str(output_dir) == "":
        raise bad_value("output_dir", "a folder path", "")
    if path.exists() and not path.is_dir():
        raise bad_value("output_dir", "a folder path (this is an existing file)", str(output_dir))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise bad_value("output_dir", f"a folder path ({str(parent)!r} is a file)", str(output_dir))
            break


def check_run_args(*, seed, steps, batch_size, lr, lora_rank, output_dir, checkpoint_every, resume, progress,
                   max_nonfinite, keep_checkpoints) -> None:
    """The scalar arguments of ``erase`` (``None`` = the method's default where one exists)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_type("seed", "an int", seed)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("lora_rank", lora_rank),
                    ("checkpoint_every", checkpoint_every)):
        if v is not None:
            check_int(name, v)
    if lr is not None:
        check_positive_finite("lr", lr)
    check_int("max_nonfinite", max_nonfinite)
    check_int("keep_checkpoints", keep_checkpoints)
    check_bool("resume", resume)
    check_bool("progress", progress)
    if output_dir is not None:
        check_output_dir(output_dir)
    if checkpoint_every is not None and output_dir is None:
        raise bad_value("output_dir", "a folder (checkpoint_every needs somewhere to write)", None)
    if resume and output_dir is None:
        raise bad_value("output_dir", "the folder of the run to resume", None)


def check_target_fits(forget, den) -> None:
    """The target matches the model: a text concept needs a text-conditional model, class ids a
    class-conditional one (the range of ids and labels is checked in ``erase``)."""
    from .targets import Classes, Concept

    if isinstance(forget, Concept) and den.kind != "text":
        raise bad_value("forget", "fu.Concept only for a text-conditional model (UNet2DConditionModel or a "
                        "pipeline)", type(den.model).__name__)
    if isinstance(forget, Classes) and forget.override is not None:
        if isinstance(forget.override, bool) or forget.override < 0:
            raise bad_value("Classes.override", "a non-negative class id", forget.override)


def model_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model (names, shapes, dtypes and the first values of every tensor): a
    resumed run must start from the same base weights, which a LoRA checkpoint does not contain."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        head = t.detach().reshape(-1)[:256].to("cpu", copy=True).contiguous()
        h.update(head.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

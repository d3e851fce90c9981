"""``erase()``: check the settings, resolve the inputs, run the trainer, return a ``Result``.

Everything the user passes is checked before any work starts (``RunConfig``, ``inputs``, the method's
options, then the ``Trainer``'s checks against the resolved model); errors name the argument and what was
expected. The input model is deep-copied, never modified.
"""
from __future__ import annotations

from typing import Optional

from . import distributed as _distributed
from .config import RunConfig
from .errors import bad_value
from .inputs import check_targets, resolve, target_kind
from .targets import DataPoints
from .methods import REGISTRY, get_method
from .result import Result
from .trainer import Trainer

def default_method(forget, retain) -> str:
    """DataPoints → SISS; classes with retain data → EraseDiff; classes or concepts without data → ESD."""
    kind = target_kind(forget)
    if kind == "datapoints":
        choice = "siss"
    elif kind == "classes" and isinstance(retain, DataPoints):
        choice = "erasediff"
    else:
        choice = "esd"
    if choice not in REGISTRY:
        raise bad_value("method", f"one of {sorted(REGISTRY)} (the default for this target, {choice!r}, "
                        "is not available)", None)
    return choice


def erase(model, forget, retain=None, method: Optional[str] = None, scheduler=None, steps: Optional[int] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, seed: int = 0,
          lora_rank: Optional[int] = None, precision=None, optimizer=None, gradient_checkpointing=None,
          attention=None, compile=None, resolution=None, output_dir=None, checkpoint_every=None, resume=False,
          progress: bool = True, tf32=None, max_nonfinite: int = 10, keep_checkpoints: int = 2,
          offload_input: bool = True, variant: Optional[str] = None, torch_dtype=None, callback=None,
          **method_options) -> Result:
    """Make ``model`` forget ``forget`` while keeping ``retain``; see the README for the full contract."""
    if method is None:
        method = default_method(forget, retain)
    cls = get_method(method)
    check_targets(forget, retain, method, cls)
    config = RunConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, lora_rank=lora_rank, precision=precision,
                       optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, attention=attention,
                       compile=compile, tf32=tf32, resolution=resolution, output_dir=output_dir,
                       checkpoint_every=checkpoint_every, resume=resume, keep_checkpoints=keep_checkpoints,
                       progress=progress, max_nonfinite=max_nonfinite, offload_input=offload_input, variant=variant,
                       torch_dtype=torch_dtype, callback=callback)
    _distributed.check_args(config.checkpoint_every, config.resume)
    options = cls.resolve_options(method_options)
    inputs = resolve(model, scheduler, resolution, variant=config.variant, torch_dtype=config.torch_dtype)
    return Trainer(config, method=method, options=options, inputs=inputs, forget=forget, retain=retain,
                   model=model).run()

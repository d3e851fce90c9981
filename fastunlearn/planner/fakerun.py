"""One training step of the registered method, traced on a fake run: no weight is allocated.

``trace`` builds what ``erase()`` builds, from the model's config under ``FakeTensorMode`` (tensors with
shapes and dtypes but no storage: a 2.6 B-parameter SDXL UNet costs no memory): the input UNet, the real
``fastunlearn.run.Run`` around it (the working copy, LoRA adapters), the method class from
``fastunlearn.methods.REGISTRY`` with its options, its own ``setup()`` (roles, trainable subset, frozen
copies), the runtime switches (``runtime.apply``: precision, checkpointing, autocast), the training loop's
optimizer (all three by ``fastunlearn.trainer.Trainer``, as ``erase()`` does), and then runs one step of the
real loop (``fastunlearn.trainer.loop``): the method's ``step()``
and the optimizer step. Nothing of a method is modelled here; a method registered tomorrow is planned the
same way. ``LiveBytes`` / ``BatchLines`` count the bytes.

What the trace feeds the method (erase() would get it from the user):

* data: targets of the kinds the method takes (``cls.targets``), fake latents of the model's sample shape
  at the planned resolution with real class labels (class models) or their prompts' embeddings (text models),
  as many rows as one batch draws. DataPoints when the method takes them (SISS, EraseDiff: no generation),
  else ``fu.Concept`` (text models) or ``fu.Classes`` (class models). The data set itself stays on the CPU in
  a run, as here (made before the count starts); the batches drawn from it and what the method builds in
  ``setup`` count.
* prompt embeddings: an encoder that returns fake embeddings of the pipeline's shapes (SD:
  ``encoder_hidden_states``; SDXL: also the pooled ``text_embeds`` and ``time_ids``).
* the schedule: ``specs.build_scheduler`` (values only; no byte depends on it).

Not traced: images a method generates in ``setup`` when the user gives no data (EraseDiff with
``fu.Classes`` / ``fu.Concept`` samples ``n_generate`` images with ``generate_steps`` DDIM steps): that is a
no-grad sampling phase before training whose peak is one no-grad forward of ``chunk`` rows, not a training
step's. Plans are made with data targets, which need none. The disk cache of generated data
(``fastunlearn.generation``) is off during a trace, so a trace always does (and counts) the real work.

Speed. Host values (``.item()``, norms as floats, guards) come from ``livebytes.HostValues``; no-grad calls of
the UNet (ESD's 49 DDIM steps of its trajectory pool, EraseDiff's relabel search) are traced once per signature
and replayed (``livebytes.replay_no_grad_calls``), so a setup that samples costs one traced forward. A trace is
about a million dispatched ops on SDXL: ``HostValues`` is the only Python layer above ``FakeTensorMode`` (it counts
for the tracker), answers the metadata queries, views and value-only in-place ops of fake tensors itself and the
other ops from a memo of their outputs' metadata (``livebytes``: each answer is the one FakeTensorMode gives). The
checkpointing settings ``--auto`` may need share one set-up, the further ones traced by forked children side by
side (``_trace``). All of it leaves the bytes as they were: tests/test_planner.py compares every trace of the
seed methods' SDXL and SD 1.5 plans byte for byte with the planner before (tests/data/planner_exact_golden.json).

Steady state. The plan is a step after the first: every optimizer the run made (the loop's and a method's
own, recorded by ``cuda_optimizers``) has its state before the traced step (a warm-up update with zero
gradients), and the peak is reset after the set-up (the fp32 copy before the low-precision cast, the
warm-up) so the parts are the step's. Step 0 is the step traced: methods with periodic work (ESD's
trajectory pool) do it there, so the plan covers their worst step.

Categories: everything the set-up leaves alive is "weights", except the parameters the optimizers train
("trainable") and their state ("optimizer"); what the step allocates is "activations", a trained
parameter's gradient is a "gradient" from the moment the backward produces it (a tensor hook), and what a
method writes into ``p.grad`` is one from the optimizer step on (a global step pre-hook); the optimizer
step's temporaries are "optimizer".
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pickle
import signal
import time
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import bad_value
from ..generation import caching
from ..methods import get_method
from ..models import Denoiser
from ..config import RunConfig
from ..inputs import Inputs
from ..targets import Classes, Concept, DataPoints
from ..trainer import Trainer, loop
from .specs import build_scheduler, build_unet, sample_side, unet_kind
from .livebytes import (TRACE_ROWS, BatchLines, HostValues, cuda_norm_policy, cuda_optimizers, peft_in_place,
                    replay_no_grad_calls)

PARTS_TRACED = ("weights", "trainable", "gradients", "optimizer", "activations")


def _prompt_encoder(spec):
    """``encode_prompts`` of the pipeline, as fake embeddings of its shapes (fp32, one row per prompt)."""
    cfg = spec["unet"]
    length, dim = spec.get("text_length", 77), cfg["cross_attention_dim"]
    sdxl = cfg.get("addition_embed_type") == "text_time"

    def encode(prompts):
        n = len(prompts)
        cond = {"encoder_hidden_states": torch.zeros(n, length, dim)}
        if sdxl:
            cond["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, spec.get("pooled_dim", 1280)),
                                         "time_ids": torch.zeros(n, spec.get("time_ids", 6))}
        return cond

    return encode


def target_kind(cls, spec) -> str:
    """The kind of target the plan feeds ``cls``: "datapoints" when it takes them (no generation), else
    "concept" on text models and "classes" on class-conditional ones."""
    kind = unet_kind(spec)
    if "datapoints" in cls.targets:
        return "datapoints"
    if kind == "text" and "concept" in cls.targets:
        return "concept"
    if kind == "class" and "classes" in cls.targets:
        return "classes"
    raise bad_value("method", f"a method that takes a target this model has (method {cls.name!r} takes "
                    f"{', '.join(cls.targets)}; the model is {kind}-conditional)", cls.name)


def run_defaults(spec, method: str, lora_rank=None, options=None) -> dict:
    """The run defaults (batch size, optimizer, lr, ...) ``erase()`` takes for the planned target: the method's
    ``defaults_for(...)`` where it has one, else its ``defaults``."""
    cls = get_method(method)
    if not hasattr(cls, "defaults_for"):
        return dict(cls.defaults)
    opts = cls.resolve_options(dict(options or {}))
    forget = {"datapoints": lambda: DataPoints.from_latents(torch.zeros(1, 1, 1, 1)),
              "concept": lambda: Concept("what to forget"), "classes": lambda: Classes([0])}[target_kind(cls, spec)]()
    return dict(cls.defaults_for(forget, opts, lora_rank))


def _targets(cls, spec, den, rows: int, side: int):
    """(forget, retain, forget data, retain data) as ``erase()`` hands them to the Run (module docstring)."""
    kind, target = unet_kind(spec), target_kind(cls, spec)
    if target == "datapoints":
        shape = (rows, spec["unet"].get("in_channels", 4), side, side)
        if kind == "class":  # forget class 0, keep the others; labels are real (methods read them on the host)
            others = max(den.num_classes - 1, 1)
            with unset_fake_temporarily():
                f_cond, r_cond = torch.zeros(rows, dtype=torch.long), 1 + torch.arange(rows) % others
            forget = DataPoints.from_latents(torch.zeros(shape), labels=f_cond)
            retain = DataPoints.from_latents(torch.zeros(shape), labels=r_cond)
            return forget, retain, (forget.images, f_cond), (retain.images, r_cond)
        if kind == "uncond":
            forget, retain = DataPoints.from_latents(torch.zeros(shape)), DataPoints.from_latents(torch.zeros(shape))
            return forget, retain, (forget.images, None), (retain.images, None)
        # Text: the Run takes the prompts' embeddings (it encodes a list of prompts per batch; indexing a list
        # by a fake index would read every row's value on the host), the same rows per batch either way.
        forget = DataPoints.from_latents(torch.zeros(shape), prompts=["what to forget"] * rows)
        retain = DataPoints.from_latents(torch.zeros(shape), prompts=["what to keep"] * rows)
        encode = _prompt_encoder(spec)
        return forget, retain, (forget.images, encode(forget.prompts)), (retain.images, encode(retain.prompts))
    return (Concept("what to forget") if target == "concept" else Classes([0])), None, None, None


def _bnb_state(params) -> int:
    """bitsandbytes AdamW8bit: uint8 state1/state2 + fp32 absmax per 256-element block for tensors of
    at least 4096 elements, fp32 states below that (``spec/performance.md`` §5: 2.031 B/param)."""
    n = 0
    for p in params:
        k = p.numel()
        n += 2 * k + 2 * 4 * math.ceil(k / 256) if k >= 4096 else 8 * k
    return n + 2 * 256 * 4


def _optimizer_state(opt):
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                yield v


@contextlib.contextmanager
def _optimizer_steps(tracker):
    """During any optimizer's step: its temporaries are "optimizer", the gradients it reads are "gradients"
    (a method may have combined them into fresh tensors), and its state stays "optimizer"."""
    def pre(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    tracker.retag(p.grad, "gradients")
        tracker.category = "optimizer"

    def post(opt, args, kwargs):
        for v in _optimizer_state(opt):
            tracker.retag(v, "optimizer")
        tracker.category = "activations"

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclasses.dataclass
class _Lines:
    """What a trace leaves for the plans: each view's peak and split (``BatchLines.views``), the gradients' own
    maximum per batch, the parameter counts and the 8-bit optimizer's state in closed form."""

    views: dict
    gradients_most: dict
    counts: dict
    bnb: int


def _trace(spec, *, method, resolution, rows, batches, lora_rank, precision, gradient_checkpointing, optimizer,
           options=None, fake=True) -> dict:
    """Trace one step at ``rows`` rows with ``BatchLines`` over ``batches``; returns ``{checkpointing: _Lines}``.

    ``gradient_checkpointing`` is one setting or a tuple of them: the set-up (the UNet, the Run, the method's
    ``setup()``, LoRA adapters) does not depend on checkpointing, which only the runtime switches after it turn
    on, so several settings share one set-up. Each further setting's step is traced in a child process forked
    after the set-up (``_fork``): an exact copy of the state, the settings traced side by side on two cores."""
    settings = tuple(gradient_checkpointing) if isinstance(gradient_checkpointing, (tuple, list)) \
        else (gradient_checkpointing,)
    cls = get_method(method)
    opts = cls.resolve_options(dict(options or {}))
    side = sample_side(spec, resolution)
    scheduler = build_scheduler(spec)  # real: the schedule's values are read on the host
    tracker = BatchLines(rows, batches)
    made: list = []
    mode = contextlib.nullcontext()
    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # The Run's working copy (and SFD's role copies) are deep copies: their fake tensors must stay in this
        # mode, not in a copy of it (every op would convert them again).
        mode.__deepcopy__ = lambda memo: mode
    host = HostValues() if fake else contextlib.nullcontext()
    children: dict = {}
    with mode, warnings.catch_warnings(), peft_in_place(), caching(False):  # the trace does the real work
        warnings.simplefilter("ignore")  # deep copies of fake tensors and peft's second adapter warn
        unet = build_unet(spec)  # the input model: not counted (erase() trains a copy of it)
        if unet_kind(spec) == "text":
            unet.register_to_config(sample_size=side)  # erase(resolution=...) sets the working size so
        n_unet = sum(p.numel() for p in unet.parameters())
        with host, cuda_norm_policy(precision != "fp32"):
            forget, retain, forget_data, retain_data = _targets(cls, spec, Denoiser(unet), rows, side)
            # erase()'s own pipeline: the Trainer builds the Run and the method, switches the runtime on and makes
            # the loop's optimizer; only the step count and the bookkeeping below are the planner's.
            config = RunConfig(batch_size=rows, seed=0, lora_rank=lora_rank, precision=precision,
                               gradient_checkpointing=settings[0], optimizer=optimizer, progress=False)
            extras = {"encode_prompts": _prompt_encoder(spec)} if unet_kind(spec) == "text" else {}
            trainer = Trainer(config, method=method, options=opts, inputs=Inputs(unet, scheduler, extras),
                              forget=forget, retain=retain, model=unet, data=(forget_data, retain_data))
            # The runtime switches are released (frozen weights cast back) after the count stops.
            # Fake: the host-values mode counts for the tracker (one dispatch layer); real: the tracker is a mode.
            counting = host.counting(tracker) if fake else tracker
            with contextlib.ExitStack() as switched, counting, cuda_optimizers(made), \
                    replay_no_grad_calls(type(unet), tracker):
                tracker.category = "weights"
                # The run's model as on an accelerator: a copy of the (offloaded) input, counted as the run's weights.
                # Sharing the input's tensors, as a LoRA run does on the host, would count no UNet where the
                # precision casts nothing (the input's storages predate the count).
                run, m = trainer.build(next(unet.parameters()).device, share_input=False)
                own, child_of = _fork(settings, children)
                if children:  # the parent: its children are ended if its own trace fails
                    switched.push(lambda kind, error, tb: kind is not None and _stop(children))
                trainer.cfg = dataclasses.replace(trainer.cfg, gradient_checkpointing=own)
                switched.enter_context(trainer.switched_on(run, m))
                loop_opt = trainer.optimizer(m)
                trainable = {id(p): p for opt in made for g in opt.param_groups for p in g["params"]}
                for opt in made:  # steady state: the state exists from the first step on
                    params = [p for g in opt.param_groups for p in g["params"]]
                    for p in params:
                        p.grad = torch.zeros_like(p)
                    opt.step()
                    for p in params:
                        p.grad = None
                for p in trainable.values():
                    tracker.retag(p, "trainable")
                    p.register_hook(lambda g: tracker.retag(g, "gradients"))
                for opt in made:
                    for v in _optimizer_state(opt):
                        tracker.retag(v, "optimizer")
                tracker.category = "activations"
                tracker.reset_peak()
                with _optimizer_steps(tracker):
                    loop(m, loop_opt, 1, run.seed, progress=False)
                lines = _Lines(views=tracker.views, gradients_most=dict(tracker.gradients_most),
                               counts={"unet": n_unet, "trainable": sum(p.numel() for p in trainable.values())},
                               bnb=_bnb_state(trainable.values()))
                if child_of is not None:
                    _send(child_of, lines)  # a child: its setting's answer to the parent, and nothing else
    out = {own: lines}
    for setting, (pid, read) in children.items():
        # A child that could not answer (killed, out of memory): its setting is traced here instead.
        again = functools.partial(_trace, spec, method=method, resolution=resolution, rows=rows, batches=batches,
                                  lora_rank=lora_rank, precision=precision, gradient_checkpointing=setting,
                                  optimizer=optimizer, options=options, fake=fake)
        out[setting] = _Child(pid, read, lambda again=again, setting=setting: again()[setting])
    return out


class _Child:
    """A setting traced by a child process (``_fork``): ``result()`` waits for its ``_Lines`` (traced here
    instead if the child could not answer), ``cancel()`` ends it when its answer is not needed after all."""

    def __init__(self, pid, read, fallback):
        self.pid, self.read, self.fallback, self.lines = pid, read, fallback, None

    def result(self) -> "_Lines":
        if self.lines is None:
            got = _receive(self.pid, self.read) if self.pid is not None else None
            self.pid = None
            self.lines = got if got is not None else self.fallback()
        return self.lines

    def cancel(self) -> None:
        if self.pid is not None:
            _stop({None: (self.pid, self.read)})
            self.pid = None


def _fork(settings, children: dict):
    """(the setting this process traces, the pipe to write its answer to when it is a child, else None).
    The first setting stays here; each other one goes to a child forked now, recorded in ``children`` as
    ``{setting: (pid, read end)}``. Without ``os.fork`` (or with one core) every setting stays here, traced one
    after the other by ``_trace`` itself."""
    if len(settings) == 1:
        return settings[0], None
    for setting in settings[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only this setting, then _send exits
            os.close(read)
            return setting, write
        os.close(write)
        children[setting] = (pid, read)
    return settings[0], None


def _stop(children: dict) -> None:
    """The children of a trace that failed here: ended and reaped."""
    for pid, read in children.values():
        os.close(read)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def _send(write: int, lines: _Lines) -> None:
    try:
        with os.fdopen(write, "wb") as f:
            pickle.dump(lines, f)
    finally:
        os._exit(0)  # no clean-up of the parent's objects: they are the parent's


def _receive(pid: int, read: int):
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return None
    return pickle.loads(data)


def _parallel() -> bool:
    """Several checkpointing settings are traced side by side (``_trace``): a fork and two cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return hasattr(os, "fork") and cores >= 2


def _parts(lines: _Lines, b, eight_bit) -> dict:
    _, at = lines.views[(b, eight_bit)]
    parts = {k: int(at.get(k, 0)) for k in PARTS_TRACED}
    if eight_bit:
        parts["optimizer"] += lines.bnb
    return {"parts": parts, "peak": sum(parts.values()), "gradients_most": int(lines.gradients_most[b])}


def _torch_optimizer(optimizer):
    """The optimizer traced: bitsandbytes' 8-bit AdamW has no fake kernels; its step is AdamW's without the
    state and the update's temporaries (``BatchLines``' without-optimizer view), its state is added in closed
    form (``_bnb_state``)."""
    return "adamw" if optimizer in (None, "adamw8bit") else optimizer


def trace(spec, *, method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer,
          options=None, fake: bool = True) -> dict:
    """Bytes by category at the peak of one step of ``method`` (``fake=False`` runs the same step on real
    tensors, for the planner's own check on small models): ``{"parts", "peak", "counts", "gradients_most"}``."""
    lines = _trace(spec, method=method, resolution=resolution, rows=batch_size, batches=[batch_size],
                   lora_rank=lora_rank, precision=precision, gradient_checkpointing=gradient_checkpointing,
                   optimizer=_torch_optimizer(optimizer), options=options, fake=fake)[gradient_checkpointing]
    return {**_parts(lines, batch_size, optimizer == "adamw8bit"), "counts": lines.counts}


def trace_batches(spec, *, method, resolution, batches, lora_rank, precision, gradient_checkpointing,
                  optimizer=None, options=None) -> dict:
    """``trace()``'s answer for every batch in ``batches`` and both optimizer kinds, from one fake trace.

    The step is traced once with ``TRACE_ROWS`` rows (``BatchLines``); returns
    ``{(batch, eight_bit): {"parts", "peak", "gradients_most"}, "counts": ..., "seconds": ...}`` where
    ``eight_bit`` is True for ``adamw8bit`` (its state added in closed form, as ``trace()`` does) and False for
    ``optimizer`` (adam or adamw; default adamw). Equal to ``trace()`` at each batch byte for byte where the
    step's ops do not depend on the batch (``tests/test_planner.py`` checks it).

    A tuple of checkpointing settings (``(False, True)``) returns ``{setting: answer}``, the settings sharing
    one set-up and traced side by side where the machine allows (``_trace``); the same answers as one call
    per setting."""
    several = isinstance(gradient_checkpointing, (tuple, list))
    settings = tuple(gradient_checkpointing) if several else (gradient_checkpointing,)
    t0 = time.perf_counter()
    if several and not _parallel():
        traced = {}
        for c in settings:
            traced.update(_trace(spec, method=method, resolution=resolution, rows=TRACE_ROWS, batches=batches,
                                 lora_rank=lora_rank, precision=precision, gradient_checkpointing=c,
                                 optimizer=_torch_optimizer(optimizer), options=options))
    else:
        traced = _trace(spec, method=method, resolution=resolution, rows=TRACE_ROWS, batches=batches,
                        lora_rank=lora_rank, precision=precision, gradient_checkpointing=settings,
                        optimizer=_torch_optimizer(optimizer), options=options)
    answers = {c: (Pending(lines, t0) if isinstance(lines, _Child) else _answer(lines, time.perf_counter() - t0))
               for c, lines in traced.items()}
    return answers if several else answers[gradient_checkpointing]


def _answer(lines: "_Lines", seconds: float) -> dict:
    out = {"counts": lines.counts, "seconds": seconds}
    for (b, eight) in lines.views:
        out[(b, eight)] = {**_parts(lines, b, eight), "counts": lines.counts}
    return out


class Pending:
    """``trace_batches``' answer for a setting still being traced by a child process: ``result()`` waits for it,
    ``cancel()`` ends the child (``plan()`` cancels the settings its search did not need)."""

    def __init__(self, child: "_Child", t0: float):
        self.child, self.t0 = child, t0

    def result(self) -> dict:
        return _answer(self.child.result(), time.perf_counter() - self.t0)

    def cancel(self) -> None:
        self.child.cancel()

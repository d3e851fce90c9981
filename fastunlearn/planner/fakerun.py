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
step's. Plans are made with data targets, which need none.

Speed. Host values (``.item()``, norms as floats, guards) come from ``livebytes.HostValues``; no-grad calls of
the UNet (ESD's 49 DDIM steps of its trajectory pool, EraseDiff's relabel search) are traced once per signature
and replayed (``livebytes.replay_no_grad_calls``), so a setup that samples costs one traced forward.

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
import math
import time
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import bad_value
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


def _trace(spec, *, method, resolution, rows, batches, lora_rank, precision, gradient_checkpointing, optimizer,
           options=None, fake=True):
    """Trace one step at ``rows`` rows with ``BatchLines`` over ``batches``; returns (tracker, counts,
    trainable parameters)."""
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
    with mode, warnings.catch_warnings(), peft_in_place():
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
                               gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, progress=False)
            extras = {"encode_prompts": _prompt_encoder(spec)} if unet_kind(spec) == "text" else {}
            trainer = Trainer(config, method=method, options=opts, inputs=Inputs(unet, scheduler, extras),
                              forget=forget, retain=retain, model=unet, data=(forget_data, retain_data))
            # The runtime switches are released (frozen weights cast back) after the count stops.
            # Fake: the host-values mode counts for the tracker (one dispatch layer); real: the tracker is a mode.
            counting = host.counting(tracker) if fake else tracker
            with contextlib.ExitStack() as switched, counting, cuda_optimizers(made), \
                    replay_no_grad_calls(type(unet), tracker):
                tracker.category = "weights"
                run, m = trainer.build(next(unet.parameters()).device)
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
    counts = {"unet": n_unet, "trainable": sum(p.numel() for p in trainable.values())}
    return tracker, counts, list(trainable.values())


def _parts(tracker, b, eight_bit, bnb) -> dict:
    _, at = tracker.views[(b, eight_bit)]
    parts = {k: int(at.get(k, 0)) for k in PARTS_TRACED}
    if eight_bit:
        parts["optimizer"] += bnb
    return {"parts": parts, "peak": sum(parts.values()), "gradients_most": int(tracker.gradients_most[b])}


def _torch_optimizer(optimizer):
    """The optimizer traced: bitsandbytes' 8-bit AdamW has no fake kernels; its step is AdamW's without the
    state and the update's temporaries (``BatchLines``' without-optimizer view), its state is added in closed
    form (``_bnb_state``)."""
    return "adamw" if optimizer in (None, "adamw8bit") else optimizer


def trace(spec, *, method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer,
          options=None, fake: bool = True) -> dict:
    """Bytes by category at the peak of one step of ``method`` (``fake=False`` runs the same step on real
    tensors, for the planner's own check on small models): ``{"parts", "peak", "counts", "gradients_most"}``."""
    tracker, counts, trainable = _trace(spec, method=method, resolution=resolution, rows=batch_size,
                                        batches=[batch_size], lora_rank=lora_rank, precision=precision,
                                        gradient_checkpointing=gradient_checkpointing,
                                        optimizer=_torch_optimizer(optimizer), options=options, fake=fake)
    eight = optimizer == "adamw8bit"
    return {**_parts(tracker, batch_size, eight, _bnb_state(trainable) if eight else 0), "counts": counts}


def trace_batches(spec, *, method, resolution, batches, lora_rank, precision, gradient_checkpointing,
                  optimizer=None, options=None) -> dict:
    """``trace()``'s answer for every batch in ``batches`` and both optimizer kinds, from one fake trace.

    The step is traced once with ``TRACE_ROWS`` rows (``BatchLines``); returns
    ``{(batch, eight_bit): {"parts", "peak", "gradients_most"}, "counts": ..., "seconds": ...}`` where
    ``eight_bit`` is True for ``adamw8bit`` (its state added in closed form, as ``trace()`` does) and False for
    ``optimizer`` (adam or adamw; default adamw). Equal to ``trace()`` at each batch byte for byte where the
    step's ops do not depend on the batch (``tests/test_planner.py`` checks it)."""
    t0 = time.perf_counter()
    tracker, counts, trainable = _trace(spec, method=method, resolution=resolution, rows=TRACE_ROWS,
                                        batches=batches, lora_rank=lora_rank, precision=precision,
                                        gradient_checkpointing=gradient_checkpointing,
                                        optimizer=_torch_optimizer(optimizer), options=options)
    bnb = _bnb_state(trainable)
    out = {"counts": counts, "seconds": time.perf_counter() - t0}
    for (b, eight) in tracker.views:
        out[(b, eight)] = {**_parts(tracker, b, eight, bnb), "counts": counts}
    return out

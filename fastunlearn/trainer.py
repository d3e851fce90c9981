"""The run pipeline behind ``erase()``: ``Trainer(config, ...).run()`` builds the run, switches the runtime on,
trains and assembles the ``Result``.

Construction does every check that needs the resolved model (targets against it, the data, the method's
defaults, the checkpoint folder) and no work; ``run()`` owns the lifetimes, as nested ``with`` blocks:

    input offload          the caller's modules off the accelerator, back at the end (also on errors)
      runtime switches     precision / attention / checkpointing / compile / TF32 (``runtime.apply``)
        data parallel      rows split across processes, gradients all-reduced (``distributed.attach``)
          optimizer, checkpoints, the training loop
    Result                 weights back at the input's precision, meta data, provenance

The training loop (``loop``) is short enough to read in one sitting. Each step: zero the gradients, let the
method write this step's gradients into ``p.grad`` with every random draw from the step's own generator (so a
resumed run replays the same randomness), skip the step if anything is non-finite (counted, and fatal after
``max_nonfinite`` in a row), take the optimizer step, log, ask the method whether it has reached its goal
(``Method.done``: a stopping rule, with ``steps`` as the cap; the step it stops at is marked ``stopped`` in the
history and checkpointed), call the hooks (checkpoints, callback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from . import distributed, runtime
from .checkpoint import Checkpointer, run_fingerprint
from .config import OPTIMIZERS, RunConfig
from .errors import NonFiniteError, bad_value
from .inputs import Inputs, check_fits, encode_data, prepare_data
from .methods import get_method
from .provenance import provenance
from .result import Result
from .run import Run, step_generator
from .targets import Concept, DataPoints


def make_optimizer(name: str, params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise bad_value("optimizer", "'adamw' (bitsandbytes is not installed for 'adamw8bit')", name) from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise bad_value("optimizer", " | ".join(OPTIMIZERS), name)


# ------------------------------------------------------------------------------------------ the loop
def all_finite(stats: dict, params) -> bool:
    """Every float the method reported and every gradient is finite. One fused 2-norm per gradient tensor
    (``_foreach_norm``) and one host synchronisation; only a non-finite norm, which finite values can give too
    when their squares overflow, is looked at element by element."""
    if not all(math.isfinite(v) for v in stats.values() if isinstance(v, float)):
        return False
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def loop(method, optimizer, steps: int, seed: int, *, start_step: int = 0, history=None, progress: bool = True,
         max_nonfinite: int = 10, on_step_end=None, desc: str | None = None, agree=None) -> list:
    """Run optimizer steps ``start_step .. steps-1`` of ``method``, or fewer when its stopping rule
    (``method.done``) says so; returns the history (one dict per step). ``optimizer`` holds
    ``method.trainable_parameters()``. ``agree(flag)``: the stop decision every process takes (data parallel:
    process 0's, since float summation order may differ across processes)."""
    params = method.trainable_parameters()
    history = [] if history is None else history
    if history and history[-1].get("stopped"):  # resuming a run that had already met its stopping rule
        return history
    done = getattr(method, "done", None)
    bad_in_row = 0
    for h in reversed(history):  # a resumed run continues the streak of skipped steps it was in
        if not h.get("skipped"):
            break
        bad_in_row += 1
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not progress,
               desc=desc or method.name, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 5.0)  # logs and CI get a line every 5 s, not every step
    for step in bar:
        t0 = time.perf_counter()
        for p in params:  # ~10 µs for a hundred tensors; optimizer.zero_grad is this loop plus a profiler scope
            p.grad = None
        stats = method.step(step, step_generator(seed, step))
        ok = all_finite(stats, params)
        if ok:
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
            if bad_in_row >= max_nonfinite:
                raise NonFiniteError(f"{bad_in_row} steps in a row had a non-finite loss or gradient "
                                     f"(last at step {step}); lower lr or check the inputs")
        stats = {**stats, "step": step, "skipped": not ok, "seconds": time.perf_counter() - t0}
        history.append(stats)
        stop = step + 1 < steps and done is not None and done(step + 1, history)  # the stopping rule; steps: the cap
        if agree is not None and step + 1 < steps:
            stop = agree(stop)
        if stop:
            stats["stopped"] = True
        if progress and "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.4g}", refresh=False)  # printed at the bar's own pace
        if on_step_end is not None:
            on_step_end(step + 1, history)
        if stop:
            break
    bar.close()
    for p in params:
        p.grad = None
    return history


# ------------------------------------------------------------------------------------------ the run
class Trainer:
    """One unlearning run of ``method`` (a registered name, options already resolved) on resolved ``inputs``."""

    def __init__(self, config: RunConfig, *, method: str, options: dict, inputs: Inputs, forget, retain, model,
                 data=None):
        """``data``: the run's ``(forget data, retain data)`` as ``prepare_data`` returns them, when the caller
        made them itself (the memory planner feeds fake latents with their prompts' embeddings)."""
        cfg = config
        self.cls = get_method(method)
        self.method, self.options, self.model_arg = method, options, model
        if isinstance(model, (str, Path)) and distributed.world_size() > 1:
            # loaded here, so ours to move: each process on its own device
            inputs = inputs._replace(denoiser=inputs.denoiser.to(distributed.device()))
        self.inputs = inputs
        self.forget, self.retain = forget, retain
        check_fits(inputs, forget, retain, cfg.resolution)
        if data is None:
            data = (prepare_data("forget", forget, inputs, cfg.resolution),
                    prepare_data("retain", retain, inputs, cfg.resolution))
        self.forget_data, self.retain_data = data
        self.concept_data = None  # Concept.images: checked (and, on a latent pipeline, encoded) like DataPoints
        if isinstance(forget, Concept) and isinstance(forget.images, DataPoints):
            self.concept_data = prepare_data("forget.images", forget.images, inputs, cfg.resolution)
        if self.cls.needs_forget_data and self.forget_data is None:
            raise bad_value("forget", f"fu.DataPoints (method {method!r} needs the images to forget)",
                            type(forget).__name__)
        cls = self.cls
        self.defaults = cls.defaults_for(forget, options, cfg.lora_rank) if hasattr(cls, "defaults_for") \
            else cls.defaults  # per target
        self.cfg = cfg.with_method_defaults(self.defaults)
        self.ckpt = None  # checkpoints / resume: the folder and the saved settings are checked now, before any work
        if cfg.output_dir is not None and (cfg.checkpoint_every is not None or cfg.resume):
            c = self.cfg
            fingerprint = run_fingerprint(
                method=method, options=options, batch_size=c.batch_size, lr=c.lr, seed=c.seed, optimizer=c.optimizer,
                defaults=self.defaults, lora_rank=c.lora_rank, precision=c.precision, model=inputs.denoiser,
                forget=forget, forget_data=self.forget_data, retain=retain, retain_data=self.retain_data)
            self.ckpt = Checkpointer.prepare(c.output_dir, every=c.checkpoint_every, keep=c.keep_checkpoints,
                                             resume=c.resume, fingerprint=fingerprint, steps=c.steps)

    def run(self) -> Result:
        t_start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            # The caller's modules leave the accelerator for the run: the UNet before it is copied, so that only
            # the trained copy is there; the text encoders and VAE once the method's set-up has used them.
            offload = runtime.InputOffload(enabled=self.cfg.offload_input)
            stack.callback(offload.restore)
            device = offload.move_unet(self.inputs.denoiser)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            run, m = self.build(device)
            offload.move_encoders(self.model_arg)
            # Two peaks: the set-up's (the run's UNet next to the text encoders and VAE that encode its data) and
            # training's (what the planner plans, the encoders gone); on the CPU both read the process's peak so far.
            setup_peak = _peak_memory(run.device)
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            with self.switched_on(run, m) as dp:
                history = self._train(run, m, dp)
            return self._result(run, m, history, dp, time.perf_counter() - t_start, setup_peak)

    def build(self, device, share_input: bool = True):
        """The run (a copy of the model, the data as tensors) and the method, set up. ``share_input``: see ``Run``."""
        cfg, extras = self.cfg, self.inputs.extras
        encoded: dict = {}  # before the Run: the VAE is still where the caller put it
        forget, forget_data = self.forget, self.forget_data
        forget_data = encode_data(forget_data, forget, extras, cfg.seed, cfg.progress, "forget images", encoded)
        retain_data = encode_data(self.retain_data, self.retain, extras, cfg.seed, cfg.progress, "retain images",
                                  encoded)
        if self.concept_data is not None and extras.get("encode_images") is not None and not forget.images.latents:
            z = encode_data(self.concept_data, forget.images, extras, cfg.seed, cfg.progress, "concept images",
                            encoded)[0]
            pts = forget.images
            forget = dataclasses.replace(forget, images=DataPoints.from_latents(z, labels=pts.labels,
                                                                                prompts=pts.prompts))
        self.forget = forget  # what the method and the result's provenance see
        run = Run(self.inputs.denoiser, self.inputs.scheduler, forget=forget_data, retain=retain_data,
                  forget_target=forget, retain_target=self.retain, batch_size=cfg.batch_size, seed=cfg.seed,
                  lora_rank=cfg.lora_rank, share_input=share_input, encode_prompts=extras.get("encode_prompts"),
                  trainable=getattr(self.cls, "trainable_filter", lambda opts: None)(self.options), device=device,
                  progress=cfg.progress and distributed.rank() == 0, latent=extras.get("encode_images") is not None,
                  sdxl=bool(extras.get("sdxl")), pipeline_guidance=extras.get("pipeline_guidance"))
        run.resolution = cfg.resolution
        if cfg.resolution is not None:  # the working size: what data-free methods and Result.sample draw at
            run.model.register_to_config(sample_size=cfg.resolution // extras["vae_scale_factor"])
        m = self.cls(run, **self.options)
        m.setup()
        for data in (run.forget, run.retain):  # prompts of DataPoints: encoded now, while the encoders are here
            if data is not None and isinstance(data[1], list) and run.encode_prompts is not None:
                run.encode_prompts(sorted(set(data[1])))
        return run, m

    @contextlib.contextmanager
    def switched_on(self, run, m):
        """The runtime switches (after set-up: every role and adapter exists) and, when launched as several
        processes, data parallelism. Both are released before the result is assembled."""
        c = self.cfg
        self.rt = runtime.resolve(c.precision, c.gradient_checkpointing, c.attention, c.compile, c.tf32,
                                  model=run.model)
        applied = runtime.apply(run, self.rt, method=m)
        with contextlib.ExitStack() as stack:
            stack.callback(applied.release)  # frozen weights back at the input's precision, TF32 flags restored
            dp = distributed.attach(run, m)  # None unless launched as several processes (accelerate launch)
            yield dp
            # Only after a finished run: detaching compares the weights across processes (a collective call,
            # which would hang if this process alone had failed).
            self.drift = dp.detach() if dp is not None else None

    def optimizer(self, m):
        """The loop's optimizer over the method's trainable parameters, with the method's defaults."""
        c, d = self.cfg, self.defaults
        return make_optimizer(c.optimizer, m.trainable_parameters(), c.lr, betas=d.get("betas", (0.9, 0.999)),
                              weight_decay=d.get("weight_decay", 0.0), eps=d.get("eps", 1e-8))

    def _train(self, run, m, dp) -> list:
        c = self.cfg
        opt = self.optimizer(m)
        start_step, history = self.ckpt.restore(run, m, opt) if self.ckpt is not None else (0, [])
        hooks = []
        if self.ckpt is not None:
            hooks.append(self.ckpt.on_step_end)
        if c.callback is not None:  # callback(step, view): the model in training as a Result (validation samples)
            view = Result(model=run.model, scheduler=self.inputs.scheduler, method=self.method, options=self.options,
                          extras=self.inputs.extras)
            hooks.append(lambda step, _history: c.callback(step, view))
        return loop(m, opt, c.steps, c.seed, start_step=start_step, history=history,
                    progress=c.progress and (dp is None or dp.rank == 0), max_nonfinite=c.max_nonfinite,
                    on_step_end=(lambda step, h: [f(step, h) for f in hooks]) if hooks else None,
                    agree=dp.agree if dp is not None else None)

    def _result(self, run, m, history: list, dp, seconds: float, setup_peak: int) -> Result:
        c = self.cfg
        train_peak = _peak_memory(run.device)
        meta = {
            "fastunlearn_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
            "steps": len(history), "max_steps": c.steps,  # steps run: fewer than the cap when a stopping rule ended it
            "batch_size": c.batch_size, "lr": c.lr, "seed": c.seed, "optimizer": c.optimizer,
            "lora_rank": c.lora_rank, "runtime": self.rt.as_dict(), "seconds": round(seconds, 3),
            "peak_memory_bytes": max(setup_peak, train_peak), "setup_peak_memory_bytes": setup_peak,
            "train_peak_memory_bytes": train_peak, "forget": repr(self.forget)[:500],
            "skipped_steps": sum(1 for h in history if h.get("skipped")),
            "resumed_from_step": self.ckpt.resumed_from if self.ckpt is not None else None,
        }
        if dp is not None:  # data-parallel: processes and the largest weight difference between them (0.0)
            meta.update(processes=dp.size, process_weight_drift=self.drift)
        try:
            import diffusers
            meta["diffusers_version"] = diffusers.__version__
        except Exception:  # pragma: no cover
            pass
        # base_model + forgotten: what `fastunlearn eval DIR` reads
        meta.update(provenance(self.model_arg, self.inputs.denoiser, self.forget))
        result = Result(model=run.model.eval(), scheduler=self.inputs.scheduler, method=self.method,
                        options=self.options, history=history, meta=meta, extras=self.inputs.extras)
        finish = getattr(m, "finish", None)
        if finish is not None:
            finish(result)
        return result


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

"""``plan()``: the planned peak of a configuration, and ``--auto``'s search for the settings that fit.

A plan is the trace of one real step (``fakerun``) plus what a trace cannot see: the pipeline's text
encoders and VAE when they stay on the GPU (counted from their configs, in the run's precision) and a
workspace margin, 0.5 GiB + 5% of the traced peak (CUDA context, cuBLAS/cuDNN workspaces, allocator
fragmentation; ``spec/performance.md`` §1.5 budgets 1.0-1.5 GiB). ``--auto`` answers every (batch,
optimizer) it tries from one trace per checkpointing setting (``fakerun.trace_batches``), kept in a cache
(this process, then ``$FASTUNLEARN_CACHE_DIR/plans``): a trace is a pure function of its key.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import diffusers
import peft
import torch

from ..errors import bad_type, bad_value
from ..methods import get_method
from ..config import ATTENTIONS, RunConfig, check_choice
from ..files import cache_dir, write_json
from . import fakerun
from .specs import count_params, default_resolution, load_spec, unet_kind
from .livebytes import TRACE_ROWS

GiB = 2**30
PARTS = ("weights", "trainable", "gradients", "optimizer", "activations", "workspace")


# ============================================================================ the plan
@dataclass
class Plan:
    model: str
    method: str
    resolution: int
    batch_size: int
    lora_rank: Optional[int]
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    attention: str
    parts_gib: dict
    peak_gib: float
    vram_gib: Optional[float] = None
    fits: Optional[bool] = None
    auto: bool = False
    trace_seconds: float = 0.0
    params: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def erase_kwargs(self) -> dict:
        """The ``erase()`` arguments this plan is for."""
        return {"batch_size": self.batch_size, "lora_rank": self.lora_rank, "precision": self.precision,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "resolution": self.resolution}

    def table(self) -> str:
        rows = [f"{self.method} on {self.model} at {self.resolution}px, batch {self.batch_size}: "
                f"{'LoRA r=' + str(self.lora_rank) if self.lora_rank else 'full weights'}, {self.precision}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.optimizer}, {self.attention}"
                + (" (picked by --auto)" if self.auto else "")]
        labels = {"weights": "weights (frozen base + pipeline)", "trainable": "trainable weights",
                  "gradients": "gradients", "optimizer": "optimizer state", "activations": "activations",
                  "workspace": "workspace margin (estimate)"}
        for k in PARTS:
            rows.append(f"  {labels[k]:34s} {self.parts_gib.get(k, 0.0):8.2f} GiB")
        rows.append(f"  {'planned peak':34s} {self.peak_gib:8.2f} GiB")
        if self.vram_gib is not None:
            rows.append(f"  {'fits in ' + _fmt(self.vram_gib) + ' GiB':34s} {'yes' if self.fits else 'NO'}")
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)


def _fmt(x):
    return f"{x:g}"


# ============================================================================ the trace cache
def _cache_dir() -> Optional[Path]:
    """Where traces are kept between runs: ``$FASTUNLEARN_CACHE_DIR/plans`` (default
    ``~/.cache/fastunlearn/plans``); ``FASTUNLEARN_CACHE_DIR=off`` keeps none (``files.cache_dir``)."""
    return cache_dir("plans")


def _trace_key(spec, **settings) -> str:
    """What a trace depends on: the model's config, the settings, the library's code (the trace runs the
    method's own step, the run, the loop and the runtime switches: any of them can change its bytes) and the
    versions of the libraries whose modules it runs (a new diffusers can change a UNet's activations)."""
    package = Path(__file__).resolve().parent.parent
    code = b"".join(f.read_bytes() for f in sorted(package.rglob("*.py")))
    blob = json.dumps({"spec": spec, "settings": settings, "rows": TRACE_ROWS, "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "peft": peft.__version__,
                       "code": hashlib.sha256(code).hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_TRACES: dict = {}  # this process's traces, by key
_FRESH: dict = {}  # key -> seconds of a trace made in this process and not handed out yet
_PENDING: dict = {}  # key -> fakerun.Pending: a trace a child process is making

def cached_traces() -> list:
    """Every trace this process holds, as plain data ({"counts", "B:adamw" / "B:8bit": its answer}), in a fixed
    order: what scripts/record_planner_exact.py records and tests/test_planner.py compares."""
    out = []
    for answer in _TRACES.values():
        row = {"counts": answer["counts"]}
        for k, v in answer.items():
            if isinstance(k, tuple):
                row[f"{k[0]}:{'8bit' if k[1] else 'adamw'}"] = {x: v[x] for x in ("parts", "peak", "gradients_most")}
        out.append(row)
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))



def cached_trace_batches(spec, *, also=(), **settings) -> dict:
    """``trace_batches`` through a cache (this process, then the cache folder): a trace is a pure function
    of its key, so the second ``plan --auto`` of a model answers without tracing (``seconds`` is then 0).

    ``also``: further checkpointing settings the caller may ask for next; where the machine traces settings
    side by side (``fakerun._parallel``), those not cached yet are traced now with this one, on one shared
    set-up, and cached."""
    c = settings["gradient_checkpointing"]
    wanted = [c] + [o for o in also if o != c]
    if len(wanted) > 1 and fakerun._parallel():
        missing = [o for o in wanted if _cached(spec, {**settings, "gradient_checkpointing": o}) is None]
        if len(missing) > 1:
            traced = fakerun.trace_batches(spec, **{**settings, "gradient_checkpointing": tuple(missing)})
            for o, out in traced.items():
                if isinstance(out, fakerun.Pending):
                    _PENDING[_trace_key(spec, **{**settings, "gradient_checkpointing": o})] = out
                else:
                    _store(spec, {**settings, "gradient_checkpointing": o}, out)
    out = _cached(spec, settings)
    if out is not None:
        return out
    out = fakerun.trace_batches(spec, **settings)
    _store(spec, settings, out)
    return out


def cancel_pending() -> None:
    """End the traces still running for settings nobody asked for (``plan()``, once its search is done)."""
    while _PENDING:
        _PENDING.popitem()[1].cancel()


def _cached(spec, settings) -> Optional[dict]:
    """The trace of ``settings`` from this process's cache or the cache folder (``seconds`` is then 0, except
    for a trace this process made itself with another: its own time), or None."""
    key = _trace_key(spec, **settings)
    if key in _PENDING:  # traced by a child process, with another setting: wait for it
        _store(spec, settings, _PENDING.pop(key).result())
    if key in _TRACES:
        return {**_TRACES[key], "seconds": _FRESH.pop(key, 0.0)}
    folder = _cache_dir()
    f = folder / f"{key}.json" if folder is not None else None
    if f is not None and f.exists():
        try:
            raw = json.loads(f.read_text())
            out = {"counts": raw["counts"], "seconds": 0.0}
            for k, v in raw["batches"].items():
                b, eight = k.split(":")
                out[(int(b), eight == "8bit")] = v
            _TRACES[key] = out
            return out
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another layout: trace again and overwrite it
    return None


def _store(spec, settings, out) -> None:
    key = _trace_key(spec, **settings)
    _TRACES[key] = out
    _FRESH[key] = out["seconds"]
    folder = _cache_dir()
    if folder is None:
        return
    batches = {f"{b}:{'8bit' if eight else 'adamw'}": v for (b, eight), v in
               ((k, v) for k, v in out.items() if isinstance(k, tuple))}
    try:
        write_json(folder / f"{key}.json", {"counts": out["counts"], "batches": batches})
    except OSError:
        pass  # a read-only home: the plan is still right, only not remembered


# ============================================================================ plan() and --auto
def _validate(method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer, attention,
              vram):
    get_method(method)  # the registry's names
    # erase()'s checks of the same settings (config.py); attention is planned, it need not be installed here
    RunConfig(resolution=resolution, batch_size=batch_size, lora_rank=lora_rank, precision=precision,
              gradient_checkpointing=gradient_checkpointing, optimizer=optimizer)
    if attention is not None:
        check_choice("attention", attention, ATTENTIONS)
    if vram is not None and (isinstance(vram, bool) or not isinstance(vram, (int, float)) or not vram > 0):
        raise bad_value("vram", "a positive number of GiB", vram)


def _evaluate(spec, name, method, resolution, batch, rank, precision, ckpt, optimizer, attention, extras_bytes,
              vram, auto) -> Plan:
    t0 = time.perf_counter()
    tr = fakerun.trace(spec, method=method, resolution=resolution, batch_size=batch, lora_rank=rank,
                       precision=precision, gradient_checkpointing=ckpt, optimizer=optimizer)
    return _make_plan(tr, time.perf_counter() - t0, name, method, resolution, batch, rank, precision, ckpt, optimizer,
                      attention, extras_bytes, vram, auto)


def _make_plan(tr, seconds, name, method, resolution, batch, rank, precision, ckpt, optimizer, attention,
               extras_bytes, vram, auto) -> Plan:
    parts = dict(tr["parts"])
    parts["weights"] += extras_bytes
    traced = sum(parts.values())
    parts["workspace"] = int(0.5 * GiB + 0.05 * traced)
    peak = traced + parts["workspace"]
    gib = {k: round(parts[k] / GiB, 3) for k in PARTS}
    plan = Plan(model=name, method=method, resolution=resolution, batch_size=batch, lora_rank=rank,
                precision=precision, gradient_checkpointing=ckpt, optimizer=optimizer, attention=attention or "sdpa",
                parts_gib=gib, peak_gib=round(peak / GiB, 3), vram_gib=vram,
                fits=None if vram is None else peak <= vram * GiB, auto=auto,
                trace_seconds=round(seconds, 2),
                params={**tr["counts"], "pipeline_extras_bytes": extras_bytes})
    if tr["gradients_most"] > parts["gradients"] + GiB / 200:
        # Honest about the split: the parts are what is live at the peak, which falls where a backward
        # starts (all activations saved, few gradients yet); the gradients peak later, below it.
        plan.notes.append(f"the parts are those live at the peak; gradients reach "
                          f"{tr['gradients_most'] / GiB:.2f} GiB later in the step, when the activations are freed")
    return plan


def plan(model="sdxl", method: str = "siss", resolution: Optional[int] = None, vram: Optional[float] = None,
         batch_size: Optional[int] = None, lora_rank: Optional[int] = None, precision: Optional[str] = None,
         gradient_checkpointing: Optional[bool] = None, optimizer: Optional[str] = None,
         attention: Optional[str] = None, auto: Optional[bool] = None,
         text_encoders_on_gpu: bool = True) -> Plan:
    """Plan the peak GPU memory of ``erase(model, method=method, ...)`` with these settings.

    Settings left as None take ``erase()``'s defaults (the method's batch size and optimizer, full
    weights, bf16 on GPU, no checkpointing), except with ``auto`` (the default when ``vram`` is given),
    where the planner picks the ones left open so that the run fits in ``vram`` GiB: LoRA rank 16, bf16,
    AdamW or 8-bit AdamW, and the largest batch up to the method's default (powers of two), without
    gradient checkpointing when that reaches the default batch, else with it if that allows a larger batch
    (checkpointing costs ~48% more compute, ``spec/performance.md`` §6.1, but a batch of 1 or 2 costs more).
    """
    try:
        return _plan(model, method, resolution, vram, batch_size, lora_rank, precision, gradient_checkpointing,
                     optimizer, attention, auto, text_encoders_on_gpu)
    finally:
        cancel_pending()  # a checkpointing setting traced on the side that the search did not need


def _plan(model, method, resolution, vram, batch_size, lora_rank, precision, gradient_checkpointing, optimizer,
          attention, auto, text_encoders_on_gpu) -> Plan:
    _validate(method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer, attention,
              vram)
    if auto is not None and not isinstance(auto, bool):
        raise bad_type("auto", "True, False or None", auto)
    if auto and vram is None:
        raise bad_value("vram", "the GPU memory in GiB (auto picks the settings that fit in it)", None)
    spec = load_spec(model)
    name = spec.get("name", str(model))
    kind = unet_kind(spec)
    resolution = resolution or default_resolution(spec)
    # The pipeline's text encoders and VAE, when they stay on the GPU, in the run's precision.
    counts = count_params(spec) if text_encoders_on_gpu and kind == "text" else {"text_encoders": 0, "vae": 0}
    n_extra = counts["text_encoders"] + counts["vae"]
    d = fakerun.run_defaults(spec, method, lora_rank)
    default_batch = d.get("batch_size", 16)
    auto = (vram is not None) if auto is None else bool(auto)
    ev = lambda b, r, p, c, o, a=auto: _evaluate(spec, name, method, resolution, b, r, p, c, o, attention,  # noqa: E731
                                                n_extra * (4 if p == "fp32" else 2), vram, a)
    if not auto:
        return ev(batch_size or default_batch, lora_rank, precision or "bf16", bool(gradient_checkpointing),
                  optimizer or d.get("optimizer", "adamw"))
    rank = lora_rank if lora_rank is not None else 16
    prec = precision or "bf16"
    ckpts = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    opts = [optimizer] if optimizer is not None else [d.get("optimizer", "adamw"), "adamw8bit"]
    # The search below asks for many (batch, optimizer) pairs; one trace per checkpointing setting answers
    # them all (``trace_batches``), the same bytes as a trace per pair at a fraction of the time.
    batches = {1, 2, default_batch} | ({batch_size} if batch_size else set())
    batches |= {2 ** k for k in range(1, default_batch.bit_length()) if 2 ** k <= default_batch}
    lines = {}

    def ev(b, r, p, c, o):
        if c not in lines:
            lines[c] = cached_trace_batches(spec, method=method, resolution=resolution, batches=sorted(batches),
                                            lora_rank=r, precision=p, gradient_checkpointing=c, optimizer=opts[0],
                                            also=ckpts)
        return _make_plan(lines[c][(b, o == "adamw8bit")], lines[c]["seconds"], name, method, resolution, b, r, p, c, o,
                          attention, n_extra * (4 if p == "fp32" else 2), vram, True)

    budget = vram * GiB
    tried = []

    def first_fit(b, ckpt):
        """A plan at batch ``b`` that fits, trying the optimizers in order (8-bit is traced only when the
        state it saves, 5.97 B per trainable parameter, could make the difference), or None."""
        p = None
        for opt in opts:
            if p is not None:
                saved = p.parts_gib["optimizer"] * (1 - 2.031 / 8) * GiB if opt == "adamw8bit" else 0
                if p.peak_gib * GiB - saved > budget:
                    continue
            p = ev(b, rank, prec, ckpt, opt)
            tried.append(p)
            if p.fits:
                return p
        return None

    def largest_fit(ckpt):
        """The plan with the largest batch (powers of two up to the method's default) that fits, or None."""
        if batch_size is not None:
            return first_fit(batch_size, ckpt)
        # The peak is affine in the batch: B=1 and B=2 give the line, larger picks are traced to confirm.
        p1 = first_fit(1, ckpt)
        if p1 is None or default_batch == 1:
            return p1
        p2 = first_fit(2, ckpt)
        if p2 is None:
            return p1
        slope = max(p2.peak_gib - p1.peak_gib, 1e-6) * GiB
        b = 2
        while b * 2 <= default_batch and p1.peak_gib * GiB + (b * 2 - 1) * slope <= budget:
            b *= 2
        while b > 2:
            p = first_fit(b, ckpt)
            if p is not None:
                return p
            b //= 2
        return p2

    # The batch matters more than checkpointing's ~48% extra compute (a batch of 1 or 2 gives noisy
    # gradients and idles the GPU): checkpointing is tried when the default batch does not fit without
    # it, and the larger batch wins; at equal batch, no checkpointing.
    found = []
    for ckpt in ckpts:
        p = largest_fit(ckpt)
        if p is not None:
            found.append(p)
            if p.batch_size >= (batch_size or default_batch):
                break
    if found:
        best = max(found, key=lambda p: (p.batch_size, not p.gradient_checkpointing))
        if len(found) > 1:
            other = next(p for p in found if p is not best)
            best.notes.append(f"checkpointing {'on' if best.gradient_checkpointing else 'off'}: batch "
                              f"{best.batch_size} fits, {other.batch_size} with it "
                              f"{'on' if other.gradient_checkpointing else 'off'}")
        return best
    best = min(tried, key=lambda p: p.peak_gib)
    best.notes.append(f"nothing tried fits in {_fmt(vram)} GiB; this is the smallest planned peak")
    return best



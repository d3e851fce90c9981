"""Memory planner: will this unlearning run fit on this GPU? Answered before any weight is loaded.

``fu.plan(model="sdxl", method="esd", resolution=1024, vram=24)`` (CLI: ``fastunlearn plan``) builds the
UNet from its config under ``torch._subclasses.FakeTensorMode`` (tensors with shapes and dtypes but no
storage: a 2.6 B-parameter SDXL UNet costs no memory and traces in seconds on a CPU) and runs one
training step of the method on it, with the same roles, the same switches (``fastunlearn.runtime``)
and the same LoRA layout as ``erase()``. A TorchDispatchMode follows every storage from allocation to
release and records the peak and what was live at that moment (the parts below are that moment's; a
parameter's gradient counts as a gradient from the moment the backward produces it, and when the
gradients peak later, below the total, a note says how large they get):

* weights: the frozen base, in the run's precision (one copy: with LoRA the teacher is the base with
  adapters off, never a second UNet), plus the pipeline's resident text encoders and VAE;
* trainable weights (fp32), gradients, optimizer state;
* activations: saved tensors and transients of the forward and backward passes;
* workspace: what a trace cannot see (CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation),
  an estimate of 0.5 GiB + 5% of the traced peak (``spec/performance.md`` §1.5 budgets 1.0-1.5 GiB).

Not counted: the model object passed to ``erase()``. ``erase()`` trains a copy on the input's device and
never modifies the input, so an input UNet already on the GPU adds one more copy of the weights there.

Each method's step is modelled on its implementation (the passes, their batch, which of them keep a
graph, how many gradient buffers are alive at once):

* ``siss``: one forward of the B-row mixture batch, two VJPs (ℓ_x then ℓ_a) into fresh gradient tensors,
  no teacher. ``siss-nois``: two B-row forwards, two VJPs. ``naive``/``neggrad``: one forward, one VJP.
* ``erasediff``: one forward of the retain and forget rows concatenated (2B rows, with graph), the
  relabelled target's no-grad forward of the B forget rows, one VJP of L_r + λ L_f (the default fixed λ;
  the adaptive rules take a second VJP on the same graph, whose gradients are small next to it).
* ``esd``: x_t sampling with the frozen teacher (no grad, CFG: 2 rows per trajectory, a pool of 4B
  trajectories), the teacher's c and ∅ evaluations as one 2B-row no-grad forward, the student's B-row
  forward and backward; without LoRA a frozen copy of the trained subset (``esd-x``: ``attn2``) only.
* ``sfd``: generator, fake score and teacher as LoRA roles on one base (or three modules without LoRA):
  the ψ step (generator no-grad, fake score with graph, ψ's Adam step) then the θ step (generator with
  graph, teacher and fake score with input graphs, since θ's gradient flows through their inputs), on
  B remain + B forget rows.

The methods' data and prompt embeddings are small next to these and are traced as inputs. Under a
low precision the trace applies CUDA's autocast policy for the norms (GroupNorm and LayerNorm run in
fp32 and keep fp32 outputs), which CPU autocast does not do.

Checked against real peaks measured on CPU for small configs (``tests/test_planner.py``): the real
training steps of ``erase()`` for every method, LoRA and full weights, with and without checkpointing,
followed by the same byte counter on real tensors, agree with the plan within 1% (the test allows 15%);
the fake trace equals the same trace on real tensors byte for byte. On CUDA the check is against
``torch.cuda.max_memory_allocated`` (a gpu-marked test).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
import warnings
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import MissingFileError, bad_type, bad_value

GiB = 2**30
CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN = {"sdxl": "sdxl.json", "sd15": "sd15.json"}
PARTS = ("weights", "trainable", "gradients", "optimizer", "activations", "workspace")
METHODS = ("siss", "siss-nois", "naive", "neggrad", "erasediff", "esd", "sfd")
# Per method: batch size and optimizer when the user gives none (the methods' own defaults), and
# whether its default trainable set is a subset (ESD-x on models with cross-attention).
_METHOD_DEFAULTS = {"siss": 64, "siss-nois": 64, "naive": 64, "neggrad": 64, "erasediff": 16, "esd": 16, "sfd": 16}


def _method_defaults(method: str) -> dict:
    try:
        from .methods import REGISTRY

        cls = REGISTRY.get(method)
        if cls is not None:
            return dict(cls.defaults)
    except Exception:  # pragma: no cover - the registry is optional for planning
        pass
    return {"batch_size": _METHOD_DEFAULTS.get(method, 16), "optimizer": "adamw"}


# ============================================================================ model specs (configs)
def load_spec(model) -> dict:
    """``{"name", "unet", "text_encoders", "vae", "resolution", ...}`` for "sdxl", "sd15", a JSON file
    of that form, or a diffusers model / pipeline folder (only its config files are read)."""
    if isinstance(model, str) and model in BUILTIN:
        return json.loads((CONFIG_DIR / BUILTIN[model]).read_text())
    if isinstance(model, dict):
        return model if "unet" in model else {"name": "model", "unet": model}
    if isinstance(model, torch.nn.Module) or hasattr(model, "unet"):
        return _spec_of_object(model)
    if not isinstance(model, (str, Path)):
        raise bad_type("model", "'sdxl', 'sd15', a path to a diffusers model folder, a UNet or a pipeline", model)
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        spec = json.loads(path.read_text())
        if "unet" not in spec:
            spec = {"name": path.stem, "unet": spec}
        return spec
    if not path.is_dir():
        raise MissingFileError(f"model: {str(path)!r} is neither 'sdxl', 'sd15' nor a model folder")
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    if not (unet_dir / "config.json").exists():
        raise MissingFileError(f"model: {str(path)!r} has no config.json (expected a diffusers model folder)")
    spec = {"name": path.name, "unet": json.loads((unet_dir / "config.json").read_text()), "text_encoders": []}
    for sub in ("text_encoder", "text_encoder_2"):
        f = path / sub / "config.json"
        if f.exists():
            cfg = json.loads(f.read_text())
            cfg["_class_name"] = (cfg.get("architectures") or ["CLIPTextModel"])[0]
            spec["text_encoders"].append(cfg)
    if (path / "vae" / "config.json").exists():
        spec["vae"] = json.loads((path / "vae" / "config.json").read_text())
        spec["vae_scale_factor"] = 2 ** (len(spec["vae"].get("block_out_channels", [0] * 4)) - 1)
    return spec


def _spec_of_object(model) -> dict:
    """The spec of an in-memory UNet or pipeline (its configs; the weights are not touched)."""
    unet = getattr(model, "unet", model)
    if not hasattr(unet, "config"):
        raise bad_type("model", "a diffusers UNet or pipeline", model)
    spec = {"name": type(model).__name__, "unet": {**dict(unet.config), "_class_name": type(unet).__name__},
            "text_encoders": []}
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(model, name, None)
        if te is not None:
            spec["text_encoders"].append({**te.config.to_dict(), "_class_name": type(te).__name__})
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        spec["text_length"] = int(tok.model_max_length)
    vae = getattr(model, "vae", None)
    if vae is not None:
        spec["vae"] = {**dict(vae.config), "_class_name": type(vae).__name__}
    spec["vae_scale_factor"] = int(getattr(model, "vae_scale_factor", 8)) if vae is not None else 1
    te2 = getattr(model, "text_encoder_2", None)
    if te2 is not None:
        spec["pooled_dim"] = int(te2.config.projection_dim)
    return spec


def _unet_kind(spec) -> str:
    cls = spec["unet"].get("_class_name", "UNet2DConditionModel")
    if cls == "UNet2DConditionModel":
        return "text"
    if cls == "UNet2DModel":
        return "class" if spec["unet"].get("num_class_embeds") else "uncond"
    raise bad_value("model", "a UNet2DModel or UNet2DConditionModel config", cls)


def _build_unet(spec):
    import diffusers

    cfg = {k: v for k, v in spec["unet"].items() if not k.startswith("_")}
    cls = getattr(diffusers, spec["unet"].get("_class_name", "UNet2DConditionModel"))
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return cls.from_config(cfg)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _count_params(spec) -> dict:
    """Parameter counts of the pipeline parts besides the UNet (meta device: no memory)."""
    import transformers

    out = {"text_encoders": 0, "vae": 0}
    with torch.device("meta"):
        for cfg in spec.get("text_encoders") or []:
            c = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
            cls = getattr(transformers, cfg.get("_class_name", "CLIPTextModel"), transformers.CLIPTextModel)
            out["text_encoders"] += sum(p.numel() for p in cls(transformers.CLIPTextConfig(**c)).parameters())
        if spec.get("vae"):
            from diffusers import AutoencoderKL

            c = {k: v for k, v in spec["vae"].items() if not k.startswith("_")}
            out["vae"] = sum(p.numel() for p in AutoencoderKL.from_config(c).parameters())
    return out


# ============================================================================ the live-bytes tracker
class LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed (works on fake and on real tensors) and keeps
    the peak with its split by category. Storages made outside the mode are added with ``add``; tags move
    a storage between categories (e.g. a returned gradient from "activations" to "gradients")."""

    def __init__(self):
        super().__init__()
        self.live = {}            # storage id -> [nbytes, category]
        self.by_cat = Counter()
        self.current = 0
        self.peak = 0
        self.at_peak: dict = {}
        self.most = Counter()     # each category's own maximum over the step (gradients peak after the total)
        self.category = "activations"

    def _storage_key(self, t):
        try:
            s = t.untyped_storage()
        except Exception:  # tensors without storage (sparse, nested): ignore
            return None, None
        return s, s._cdata

    def add(self, t: torch.Tensor, category: str) -> None:
        s, key = self._storage_key(t)
        if s is None:
            return
        if key in self.live:
            self.retag(t, category)
            return
        n = s.nbytes()
        self.live[key] = [n, category]
        self.by_cat[category] += n
        self.most[category] = max(self.most[category], self.by_cat[category])
        self.current += n
        weakref.finalize(s, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_cat)

    def retag(self, t: torch.Tensor, category: str) -> None:
        s, key = self._storage_key(t)
        entry = self.live.get(key)
        if entry is None:
            self.add(t, category)
            return
        self.by_cat[entry[1]] -= entry[0]
        self.by_cat[category] += entry[0]
        self.most[category] = max(self.most[category], self.by_cat[category])
        entry[1] = category

    def _free(self, key):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.by_cat[entry[1]] -= entry[0]
            self.current -= entry[0]

    def reset_peak(self):
        self.peak = self.current
        self.at_peak = dict(self.by_cat)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s, key = self._storage_key(t)
                if s is not None and key not in self.live:
                    self.add(t, self.category)
        return out


# Rows of the one trace that serves every batch size (``trace_batches``). A prime that divides none of a
# model's dimensions: under FakeTensorMode a tensor's size costs nothing, so the step is traced once with
# this many rows, and a storage whose byte count is a multiple of it holds per-row data (latents,
# conditioning, activations) while every other one (weights, LoRA, gradients, optimizer state) does not
# depend on the batch. The bytes alive at each moment of the step are then ``const + B * per_row``.
TRACE_ROWS = 10007


class BatchLines(LiveBytes):
    """LiveBytes for several batch sizes at once, from one trace at ``rows`` rows (``TRACE_ROWS``).

    Every storage is split into a constant and a per-row part; at each allocation the live bytes of batch
    ``b`` are ``const + b * per_row``, and each ``(b, without_optimizer)`` keeps its own peak and split,
    as LiveBytes keeps one. ``without_optimizer`` leaves out the optimizer category: the step of the 8-bit
    optimizer, whose state the planner adds analytically, is the AdamW step without its state and without
    the temporaries of its update (which allocate nothing else)."""

    def __init__(self, rows: int, batches):
        super().__init__()
        self.rows, self.batches = int(rows), tuple(sorted(set(batches)))
        self.const, self.per_row = Counter(), Counter()
        self.c_total = self.r_total = 0
        self.views = {(b, o): [0, {}] for b in self.batches for o in (False, True)}
        self.gradients_most = {b: 0 for b in self.batches}

    def _split(self, n):
        return (0, n // self.rows) if n and n % self.rows == 0 else (n, 0)

    def _shift(self, category, c, r):
        self.const[category] += c
        self.per_row[category] += r
        self.c_total += c
        self.r_total += r

    def _gradients(self):
        c, r = self.const["gradients"], self.per_row["gradients"]
        for b in self.batches:
            v = c + b * r
            if v > self.gradients_most[b]:
                self.gradients_most[b] = v

    def _at(self, b, without_optimizer):
        at = {k: self.const[k] + b * self.per_row[k] for k in self.const}
        if without_optimizer:
            at["optimizer"] = 0
        return at

    def add(self, t: torch.Tensor, category: str) -> None:
        s, key = self._storage_key(t)
        if s is None:
            return
        if key in self.live:
            self.retag(t, category)
            return
        c, r = self._split(s.nbytes())
        self.live[key] = [c, r, category]
        self._shift(category, c, r)
        weakref.finalize(s, self._free, key)
        if category == "gradients":
            self._gradients()
        co, ro = self.const["optimizer"], self.per_row["optimizer"]
        for b in self.batches:
            total = self.c_total + b * self.r_total
            v = self.views[(b, False)]
            if total > v[0]:
                v[0], v[1] = total, self._at(b, False)
            total -= co + b * ro
            v = self.views[(b, True)]
            if total > v[0]:
                v[0], v[1] = total, self._at(b, True)

    def retag(self, t: torch.Tensor, category: str) -> None:
        s, key = self._storage_key(t)
        entry = self.live.get(key)
        if entry is None:
            self.add(t, category)
            return
        c, r, old = entry
        self._shift(old, -c, -r)
        self._shift(category, c, r)
        entry[2] = category
        if category == "gradients":
            self._gradients()

    def _free(self, key):
        entry = self.live.pop(key, None)
        if entry is not None:
            self._shift(entry[2], -entry[0], -entry[1])

    def reset_peak(self):  # pragma: no cover - the planner never resets a multi-batch trace
        raise NotImplementedError("BatchLines keeps one peak per batch size from the start of the trace")


# ============================================================================ CUDA's autocast policy for norms
@contextlib.contextmanager
def _cuda_norm_policy(active: bool):
    """CUDA autocast runs group_norm and layer_norm in fp32 (their outputs, saved by the next op, are
    fp32); CPU autocast keeps them in bf16. The trace runs on CPU and must plan for CUDA."""
    if not active:
        yield
        return
    import torch.nn.functional as F

    gn, ln = F.group_norm, F.layer_norm

    def _f32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return gn(_f32(input), num_groups, _f32(weight), _f32(bias), eps)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return ln(_f32(input), normalized_shape, _f32(weight), _f32(bias), eps)

    F.group_norm, F.layer_norm = group_norm, layer_norm
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = gn, ln


@contextlib.contextmanager
def _peft_in_place():
    """peft moves each new adapter to its base layer's device and dtype with ``Module.to``, which fake
    parameters refuse (they cannot be swapped); the trace builds everything on one device in fp32, where
    the move is a no-op, so it is skipped while the adapters are injected."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    orig_move, orig_to = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *a, **k: None
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to = orig_move, orig_to


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


# ============================================================================ one traced step
class _Step:
    """A fake (or real) UNet with the run's roles and switches, and the passes one method step makes."""

    def __init__(self, spec, *, method, resolution, batch, lora_rank, precision, checkpointing, optimizer,
                 tracker: LiveBytes, device="cpu"):
        from . import runtime
        from .lora import add_lora

        self.spec, self.method, self.B, self.tracker = spec, method, batch, tracker
        self.kind = _unet_kind(spec)
        self.precision, self.dtype = precision, runtime.PRECISIONS[precision]
        self.optimizer_name = optimizer
        self.lora = lora_rank is not None
        unet = _build_unet(spec)
        unet.train()
        self.subset = None
        if method == "esd" and self.kind == "text":
            self.subset = lambda n: ".attn2." in n  # ESD-x, the default with cross-attention (§6.2)
        if self.lora:
            with _peft_in_place(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft warns about a second adapter: SFD's roles are two
                add_lora(unet, lora_rank)
                if method == "sfd":
                    add_lora(unet, lora_rank, adapter_name="fake_score")
            if self.subset is not None:
                for n, p in unet.named_parameters():
                    p.requires_grad_("lora_" in n and self.subset(n))
            for n, p in unet.named_parameters():
                if ".fake_score." in n:
                    p.requires_grad_(True)
        else:
            unet.requires_grad_(False)
            for n, p in unet.named_parameters():
                p.requires_grad_(self.subset(n) if self.subset is not None else True)
        if checkpointing:
            runtime.enable_checkpointing(unet)
        runtime.cast_frozen(unet, self.dtype)
        self.unet = unet
        cfg = spec["unet"]
        self.in_ch = cfg.get("in_channels", 4)
        size = cfg.get("sample_size", 64)
        size = size if isinstance(size, int) else size[0]
        self.latent = resolution // spec.get("vae_scale_factor", 8) if self.kind == "text" else resolution
        self.theta = [p for n, p in unet.named_parameters() if p.requires_grad and ".fake_score." not in n]
        self.psi = [p for n, p in unet.named_parameters() if ".fake_score." in n]
        # Roles without LoRA: SFD's fake score and teacher are module copies; ESD keeps the trained subset.
        self.fake = self.teacher = None
        self.frozen_subset = None
        if not self.lora and method == "sfd":  # copies of the model (built again: fake tensors cannot be deep-copied)
            self.fake = _build_unet(spec).train()
            self.teacher = _build_unet(spec).requires_grad_(False)
            if checkpointing:
                runtime.enable_checkpointing(self.fake)
                runtime.enable_checkpointing(self.teacher)
            runtime.cast_frozen(self.fake, self.dtype)
            runtime.cast_frozen(self.teacher, self.dtype)
            self.psi = [p for p in self.fake.parameters() if p.requires_grad]
        if not self.lora and method == "esd":
            self.frozen_subset = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
        # Register what exists before the step.
        for m, role in ((unet, None), (self.fake, "fake"), (self.teacher, "teacher")):
            if m is None:
                continue
            for p in m.parameters():
                tracker.add(p, "trainable" if p.requires_grad else "weights")
            for b in m.buffers():
                tracker.add(b, "weights")
        for t in (self.frozen_subset or {}).values():
            tracker.add(t, "weights")
        # A parameter's gradient is a "gradient" from the moment the backward produces it (the peak often
        # falls inside a backward, with part of the gradients already there), not only once grads() returns.
        for prm in self.theta + self.psi:
            prm.register_hook(self._tag_gradient)
        self.opt = self._make_optimizer(self.theta)
        self.fake_opt = self._make_optimizer(self.psi) if method == "sfd" else None
        # Steady state: the optimizer's state exists from the first step on, so it is live during the
        # forward and backward of every later step. One warm-up update (zero gradients) creates it.
        for opt, params in ((self.opt, self.theta), (self.fake_opt, self.psi)):
            if opt is None:
                continue
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            for p in params:
                p.grad = None
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        tracker.add(v, "optimizer")

    # ------------------------------------------------------------------ pieces
    def _make_optimizer(self, params):
        if not params:
            return None
        if self.optimizer_name == "adamw8bit":
            return None  # state accounted analytically (bitsandbytes kernels have no fake implementation)
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def _bnb_state(self, params):
        """bitsandbytes AdamW8bit: uint8 state1/state2 + fp32 absmax per 256-element block for tensors of
        at least 4096 elements, fp32 states below that (``spec/performance.md`` §5: 2.031 B/param)."""
        n = 0
        for p in params:
            k = p.numel()
            n += 2 * k + 2 * 4 * math.ceil(k / 256) if k >= 4096 else 8 * k
        return n + 2 * 256 * 4

    def latents(self, n):
        return torch.randn(n, self.in_ch, self.latent, self.latent)

    def cond(self, n):
        if self.kind == "class":
            return {"class_labels": torch.zeros(n, dtype=torch.long)}
        if self.kind == "uncond":
            return {}
        cfg = self.spec["unet"]
        L = self.spec.get("text_length", 77)
        c = {"encoder_hidden_states": torch.randn(n, L, cfg["cross_attention_dim"])}
        if cfg.get("addition_embed_type") == "text_time":
            c["added_cond_kwargs"] = {"text_embeds": torch.randn(n, self.spec.get("pooled_dim", 1280)),
                                      "time_ids": torch.randn(n, self.spec.get("time_ids", 6))}
        return c

    def _run(self, module, x, cond):
        t = torch.full((x.shape[0],), 500, dtype=torch.long)
        ctx = torch.autocast("cpu", dtype=self.dtype) if self.precision != "fp32" else contextlib.nullcontext()
        with ctx:
            return module(x, t, **cond).sample

    def student(self, x, cond):
        self._roles("generator")
        return self._run(self.unet, x, cond)

    @torch.no_grad()
    def teacher_eval(self, x, cond):
        if self.teacher is not None:
            return self._run(self.teacher, x, cond)
        if self.lora:
            from .lora import adapters_off

            with adapters_off(self.unet):
                return self._run(self.unet, x, cond)
        if self.frozen_subset is not None:
            t = torch.full((x.shape[0],), 500, dtype=torch.long)
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.precision != "fp32"):
                return torch.func.functional_call(self.unet, self.frozen_subset, (x, t), cond).sample
        return self._run(self.unet, x, cond)

    def teacher_graph(self, x, cond):
        """The teacher with a graph to its input (SFD's θ step)."""
        if self.teacher is not None:
            return self._run(self.teacher, x, cond)
        from .lora import adapters_off

        with adapters_off(self.unet):
            return self._run(self.unet, x, cond)

    def fake_score(self, x, cond):
        if self.fake is not None:
            return self._run(self.fake, x, cond)
        self._roles("fake")
        try:
            return self._run(self.unet, x, cond)
        finally:
            self._roles("generator")

    def _roles(self, role):
        if self.method != "sfd" or not self.lora:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in self.unet.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter("default" if role == "generator" else "fake_score")
        for p in self.theta + self.psi:
            p.requires_grad_(True)

    def _tag_gradient(self, g):
        self.tracker.retag(g, "gradients")

    def grads(self, loss, params, retain=False):
        g = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        for gi in g:
            self.tracker.retag(gi, "gradients")
        return g

    def write_and_step(self, params, g, opt):
        for p, gi in zip(params, g):
            self.tracker.retag(gi, "gradients")
            p.grad = gi
        self.tracker.category = "optimizer"
        if opt is not None:
            opt.step()
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        self.tracker.retag(v, "optimizer")
        self.tracker.category = "activations"
        for p in params:
            p.grad = None

    @staticmethod
    def mse(pred, target):
        return ((pred.float() - target.float()) ** 2).flatten(1).sum(1).mean()

    # ------------------------------------------------------------------ the methods
    def run(self):
        getattr(self, "_" + self.method.replace("-", "_"))()

    def _siss(self):
        B = self.B
        keep, forget, noise = self.latents(B), self.latents(B), self.latents(B)
        m = 0.5 * keep + 0.5 * forget + noise
        pred = self.student(m, self.cond(B))
        loss_x, loss_a = self.mse(pred, noise), self.mse(pred, forget)
        del pred
        g_x = self.grads(loss_x, self.theta, retain=True)
        g_a = self.grads(loss_a, self.theta)
        g = [x - 0.5 * a for x, a in zip(g_x, g_a)]
        del g_x, g_a
        self.write_and_step(self.theta, g, self.opt)

    def _siss_nois(self):
        B = self.B
        noise = self.latents(B)
        lx = self.mse(self.student(self.latents(B), self.cond(B)), noise)
        la = self.mse(self.student(self.latents(B), self.cond(B)), noise)
        g_x = self.grads(lx, self.theta, retain=True)
        g_a = self.grads(la, self.theta)
        self.write_and_step(self.theta, [x - a for x, a in zip(g_x, g_a)], self.opt)

    def _naive(self):
        noise = self.latents(self.B)
        loss = self.mse(self.student(self.latents(self.B), self.cond(self.B)), noise)
        self.write_and_step(self.theta, self.grads(loss, self.theta), self.opt)

    _neggrad = _naive

    def _erasediff(self):
        # As methods/erasediff.py (default lambda_rule="fixed"): one forward of the retain and forget rows
        # concatenated (2B rows, with graph), the relabel target's no-grad forward of the forget rows while
        # that graph is alive, one VJP of L_r + λ L_f.
        B = self.B
        x, noise = self.latents(2 * B), self.latents(2 * B)
        pred = self.student(x, self.cond(2 * B))
        with torch.no_grad():
            target = self.student(x[B:], self.cond(B))
        loss = self.mse(pred[:B], noise[:B]) + 0.1 * self.mse(pred[B:], target)
        del pred, target
        self.write_and_step(self.theta, self.grads(loss, self.theta), self.opt)

    def _esd(self):
        B = self.B
        P = 4 * B  # trajectory pool: 4B trajectories (methods/esd.py's pool_size), CFG doubles the sampling rows
        pool = torch.stack([self.latents(P) for _ in range(50)])  # the pool: 50 DDIM states of P trajectories
        self.teacher_eval(self.latents(2 * P), self.cond(2 * P))
        x_t = self.latents(B)
        e = self.teacher_eval(torch.cat([x_t, x_t]), self.cond(2 * B))
        e_c, e_null = e.chunk(2)
        target = e_c - (e_c - e_null)
        del e
        loss = self.mse(self.student(x_t, self.cond(B)), target)
        self.write_and_step(self.theta, self.grads(loss, self.theta), self.opt)

    def _sfd(self):
        n = 2 * self.B  # remain + forget rows
        # ψ step
        with torch.no_grad():
            x_g = self.student(self.latents(n), self.cond(n))
        e = self.latents(n)
        loss = self.mse(self.fake_score(x_g + e, self.cond(n)), e)
        g = self.grads(loss, self.psi)
        self.write_and_step(self.psi, g, self.fake_opt)
        del x_g, loss, g
        # θ step
        x_g = self.student(self.latents(n), self.cond(n))
        x_t = x_g + e
        eps_phi = self.teacher_graph(x_t, self.cond(n))
        eps_psi = self.fake_score(x_t, self.cond(n))
        loss = ((eps_phi.float() - eps_psi.float()) * (eps_psi.float() - e)).flatten(1).sum(1).mean()
        del eps_phi, eps_psi
        self.write_and_step(self.theta, self.grads(loss, self.theta), self.opt)

    def trainable_counts(self):
        theta = sum(p.numel() for p in self.theta)
        psi = sum(p.numel() for p in self.psi)
        base = sum(p.numel() for n, p in self.unet.named_parameters() if "lora_" not in n)
        return {"unet": base, "trainable": theta + psi}


def trace(spec, *, method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer,
          fake: bool = True) -> dict:
    """Bytes by category at the peak of one step (``fake=False`` runs the same step on real tensors, for
    the planner's own check on small models)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveBytes()
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    with mode:
        step = _Step(spec, method=method, resolution=resolution, batch=batch_size, lora_rank=lora_rank,
                     precision=precision, checkpointing=gradient_checkpointing, optimizer=optimizer,
                     tracker=tracker)
        with tracker, _cuda_norm_policy(precision != "fp32"):  # also over the backward's recomputation
            step.run()
    parts = {k: int(tracker.at_peak.get(k, 0)) for k in ("weights", "trainable", "gradients", "optimizer",
                                                         "activations")}
    if optimizer == "adamw8bit":
        extra = step._bnb_state(step.theta) + (step._bnb_state(step.psi) if step.psi else 0)
        parts["optimizer"] += extra
    return {"parts": parts, "peak": sum(parts.values()), "counts": step.trainable_counts(),
            "gradients_most": int(tracker.most.get("gradients", 0))}


def trace_batches(spec, *, method, resolution, batches, lora_rank, precision, gradient_checkpointing) -> dict:
    """``trace()``'s answer for every batch in ``batches`` and both optimizer kinds, from one fake trace.

    The step is traced once with ``TRACE_ROWS`` rows and AdamW (``BatchLines``); returns
    ``{(batch, eight_bit): {"parts", "peak", "gradients_most"}, "counts": ..., "seconds": ...}`` where
    ``eight_bit`` is True for ``adamw8bit`` (its state added analytically, as ``trace()`` does). Equal to
    ``trace()`` at each batch byte for byte where the step's ops do not depend on the batch
    (``tests/test_planner.py`` checks it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    tracker = BatchLines(TRACE_ROWS, batches)
    with FakeTensorMode(allow_non_fake_inputs=False):
        step = _Step(spec, method=method, resolution=resolution, batch=TRACE_ROWS, lora_rank=lora_rank,
                     precision=precision, checkpointing=gradient_checkpointing, optimizer="adamw", tracker=tracker)
        with tracker, _cuda_norm_policy(precision != "fp32"):
            step.run()
    bnb = step._bnb_state(step.theta) + (step._bnb_state(step.psi) if step.psi else 0)
    out = {"counts": step.trainable_counts(), "seconds": time.perf_counter() - t0}
    for (b, eight), (_, at) in tracker.views.items():
        parts = {k: int(at.get(k, 0)) for k in ("weights", "trainable", "gradients", "optimizer", "activations")}
        if eight:
            parts["optimizer"] += bnb
        out[(b, eight)] = {"parts": parts, "peak": sum(parts.values()), "counts": out["counts"],
                           "gradients_most": int(tracker.gradients_most[b])}
    return out


def _cache_dir() -> Optional[Path]:
    """Where traces are kept between runs: ``$FASTUNLEARN_CACHE_DIR/plans`` (default
    ``~/.cache/fastunlearn/plans``); ``FASTUNLEARN_CACHE_DIR=off`` keeps none."""
    import os

    root = os.environ.get("FASTUNLEARN_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "0", "off", "none"):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastunlearn"
    return base / "plans"


def _trace_key(spec, **settings) -> str:
    """What a trace depends on: the model's config, the settings, the planner's own code and the versions of
    the libraries whose modules it runs (a new diffusers can change a UNet's activations)."""
    import hashlib

    import diffusers
    import peft

    here = Path(__file__).parent
    code = b"".join((here / f).read_bytes() for f in ("planner.py", "runtime.py", "lora.py"))
    blob = json.dumps({"spec": spec, "settings": settings, "rows": TRACE_ROWS, "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "peft": peft.__version__,
                       "code": hashlib.sha256(code).hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_TRACES: dict = {}  # this process's traces, by key


def cached_trace_batches(spec, **settings) -> dict:
    """``trace_batches`` through a cache (this process, then the cache folder): a trace is a pure function
    of its key, so the second ``plan --auto`` of a model answers without tracing (``seconds`` is then 0)."""
    key = _trace_key(spec, **settings)
    if key in _TRACES:
        return {**_TRACES[key], "seconds": 0.0}
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
    out = trace_batches(spec, **settings)
    _TRACES[key] = out
    if f is not None:
        from .files import write_json

        batches = {f"{b}:{'8bit' if eight else 'adamw'}": v for (b, eight), v in
                   ((k, v) for k, v in out.items() if isinstance(k, tuple))}
        try:
            write_json(f, {"counts": out["counts"], "batches": batches})
        except OSError:
            pass  # a read-only home: the plan is still right, only not remembered
    return out


# ============================================================================ plan() and --auto
def _validate(method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer, attention,
              vram):
    from .runtime import ATTENTIONS, PRECISIONS
    from .train import OPTIMIZERS

    if method not in METHODS:
        raise bad_value("method", " | ".join(METHODS), method)
    for name, v in (("resolution", resolution), ("batch_size", batch_size), ("lora_rank", lora_rank)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad_value(name, "a positive int", v)
    if resolution is not None and resolution % 8:
        raise bad_value("resolution", "a multiple of 8 (pixels)", resolution)
    if precision is not None and precision not in PRECISIONS:
        raise bad_value("precision", " | ".join(PRECISIONS), precision)
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise bad_value("optimizer", " | ".join(OPTIMIZERS), optimizer)
    if attention is not None and attention not in ATTENTIONS:
        raise bad_value("attention", " | ".join(ATTENTIONS), attention)
    if gradient_checkpointing is not None and not isinstance(gradient_checkpointing, bool):
        raise bad_type("gradient_checkpointing", "True, False or None", gradient_checkpointing)
    if vram is not None and (isinstance(vram, bool) or not isinstance(vram, (int, float)) or not vram > 0):
        raise bad_value("vram", "a positive number of GiB", vram)


def _evaluate(spec, name, method, resolution, batch, rank, precision, ckpt, optimizer, attention, extras_bytes,
              vram, auto) -> Plan:
    t0 = time.perf_counter()
    tr = trace(spec, method=method, resolution=resolution, batch_size=batch, lora_rank=rank, precision=precision,
               gradient_checkpointing=ckpt, optimizer=optimizer)
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
    _validate(method, resolution, batch_size, lora_rank, precision, gradient_checkpointing, optimizer, attention,
              vram)
    if auto is not None and not isinstance(auto, bool):
        raise bad_type("auto", "True, False or None", auto)
    if auto and vram is None:
        raise bad_value("vram", "the GPU memory in GiB (auto picks the settings that fit in it)", None)
    spec = load_spec(model)
    name = spec.get("name", str(model))
    kind = _unet_kind(spec)
    if resolution is None:
        size = spec["unet"].get("sample_size", 64)
        size = size if isinstance(size, int) else size[0]
        resolution = spec.get("resolution") or (size * spec.get("vae_scale_factor", 8) if kind == "text" else size)
    # The pipeline's text encoders and VAE, when they stay on the GPU, in the run's precision.
    counts = _count_params(spec) if text_encoders_on_gpu and kind == "text" else {"text_encoders": 0, "vae": 0}
    n_extra = counts["text_encoders"] + counts["vae"]
    d = _method_defaults(method)
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
                                            lora_rank=r, precision=p, gradient_checkpointing=c)
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


# ============================================================================ command line
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan the peak GPU memory of a run before loading any weight")
    p.add_argument("--model", default="sdxl", help="'sdxl', 'sd15' (configs ship with fastunlearn) or a diffusers "
                   "model/pipeline folder (only its configs are read)")
    p.add_argument("--method", default="siss", choices=METHODS)
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
    from .errors import FastUnlearnError

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

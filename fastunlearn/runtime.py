"""Runtime switches of a run: precision, attention, gradient checkpointing, compile, TF32.

The names follow diffusers' training scripts (``--mixed_precision``, ``--gradient_checkpointing``,
``--enable_xformers_memory_efficient_attention``); ``spec/performance.md`` §1, §4 and §5 say why each
exists and what it buys at SDXL scale.

* ``precision`` "fp32" | "bf16" | "fp16": the *frozen* weights are stored in the low precision (the
  base of a LoRA run is 4.78 GiB in bf16 instead of 9.56 GiB for SDXL), the *trainable* weights stay
  fp32 (the optimizer updates are below bf16's resolution otherwise), and every call of the network
  runs under ``torch.autocast`` (accelerate's mixed-precision recipe). The losses accumulate in fp32
  whatever the prediction's dtype. fp16 runs without loss scaling (the methods take their gradients
  themselves); bf16 is the recommended low precision (§5, "prefer bf16 autocast"). After training the
  frozen weights are put back at the input model's precision: they were never trained, so the result
  equals the input outside the trained parameters bit for bit.
* ``gradient_checkpointing``: diffusers' per-block checkpointing (every ResNet and transformer block
  recomputed in the backward), about −85% activation memory for +48% FLOPs at 1024 px (§6.1). The
  recomputation runs each block in the role it had in the forward (``checkpoint_in_role``): with the
  roles on one base (SFD's generator, fake score and teacher; ``fastunlearn.roles``) the active adapter or
  the bound weights change between a forward and its backward.
* ``attention`` "sdpa" (PyTorch scaled-dot-product attention, diffusers' default) | "xformers" (when
  installed; §4 explains why SDPA is as fast today).
* ``compile``: regional compilation (§4): only the repeated blocks (``BasicTransformerBlock`` for SD/SDXL,
  the ResNet blocks of attention-free UNets) go through ``torch.compile``, after the LoRA adapters exist
  (peft's guide). Off by default: on CPU the first compile costs minutes and gains nothing on tiny
  models; on GPU it is opt-in because adapter toggling (teacher = adapters off) recompiles per role.
* ``tf32``: TF32 tensor-core matmuls and convolutions for the fp32 parts (CUDA only; set for the run
  and restored afterwards).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint

from .config import PRECISIONS, RunConfig  # the valid values and their checks live in config.py
from .errors import bad_value


@dataclass(frozen=True)
class Runtime:
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    attention: Optional[str] = None   # None: leave the model's processors as they are (SDPA by default)
    compile: bool = False
    tf32: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def as_dict(self) -> dict:
        return {"precision": self.precision, "gradient_checkpointing": self.gradient_checkpointing,
                "attention": self.attention or "sdpa", "compile": self.compile, "tf32": self.tf32}


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve(precision=None, gradient_checkpointing=None, attention=None, compile=None, tf32=None,
            model: Optional[torch.nn.Module] = None) -> Runtime:
    """Validate the switches (errors name the argument) and fill the defaults for ``model``'s device:

    precision: the model's own dtype when it is already bf16/fp16, bf16 on a CUDA device that supports
    it, fp32 elsewhere; tf32: on for CUDA; everything else off."""
    # the checks of erase()'s settings, written once in config.py (a direct caller gets the same errors)
    RunConfig(precision=precision, gradient_checkpointing=gradient_checkpointing, attention=attention,
              compile=compile, tf32=tf32)
    param = next(model.parameters(), None) if model is not None else None
    cuda = param is not None and param.device.type == "cuda"
    if precision is None:
        if param is not None and param.dtype in (torch.bfloat16, torch.float16):
            precision = "bf16" if param.dtype == torch.bfloat16 else "fp16"
        elif cuda and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32"
    return Runtime(precision=precision, gradient_checkpointing=bool(gradient_checkpointing),
                   attention=attention, compile=bool(compile), tf32=cuda if tf32 is None else bool(tf32))


# ------------------------------------------------------------------------------------------ applying
def _is_adapter(name: str) -> bool:
    return "lora_" in name


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating-point weights to ``dtype``; trainable weights and every adapter weight to fp32."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.requires_grad or _is_adapter(name):
            if p.dtype != torch.float32:
                p.data = p.data.float()
        elif p.dtype != dtype:
            p.data = p.data.to(dtype)


class _AutocastHooks:
    """Every call of the module runs under ``torch.autocast`` (teacher, student, sampling, pipelines):
    a forward pre-hook enters the context and an always-called forward hook leaves it."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype):
        self.device_type, self.dtype, self._stack = device_type, dtype, []
        self.handles = [module.register_forward_pre_hook(self._enter),
                        module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args):
        ctx = torch.autocast(self.device_type, dtype=self.dtype)
        ctx.__enter__()
        self._stack.append(ctx)

    def _exit(self, module, args, output):
        if self._stack:
            self._stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def set_attention(model: torch.nn.Module, attention: Optional[str]) -> None:
    if attention is None or not hasattr(model, "attn_processors") or not model.attn_processors:
        return
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    procs = model.attn_processors
    if any(isinstance(p, (AttnProcessor, XFormersAttnProcessor)) for p in procs.values()):
        model.set_attn_processor({k: AttnProcessor2_0() if isinstance(p, (AttnProcessor, XFormersAttnProcessor))
                                  else p for k, p in procs.items()})


def _role_state(module: torch.nn.Module) -> list:
    """What decides a block's computation besides its inputs: each submodule's train/eval mode, the tensors
    bound as its parameters (a role's copies, bound by ``functional_call``, ``fastunlearn.roles``) and, for
    peft LoRA layers, whether adapters are on and which one is active."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(m, m.training, dict(m._parameters), m._disable_adapters, m._active_adapter)
            if isinstance(m, BaseTunerLayer) else (m, m.training, dict(m._parameters)) for m in module.modules()]


def _set_role_state(state: list) -> None:
    # Attributes set directly: peft's set_adapter/enable_adapters would also flip requires_grad.
    for m, training, params, *adapters in state:
        m.training = training
        m._parameters.update(params)
        if adapters:
            m._disable_adapters, m._active_adapter = adapters


def checkpoint_in_role(module, *args, **kwargs):
    """diffusers' checkpointing (non-reentrant ``torch.utils.checkpoint``), except that the backward's
    recomputation runs ``module`` in the state it had in the forward (``_role_state``). Without this, a
    role switched between the forward and the backward (SFD's fake score or teacher on the shared base,
    backpropagated after the generator's adapter or weights are back) is recomputed as another network: a
    checkpoint metadata error, or silently wrong gradients where the shapes agree."""
    state = _role_state(module)
    calls = [0]

    def run(*a, **k):
        calls[0] += 1
        if calls[0] == 1:  # the forward itself
            return module(*a, **k)
        now = _role_state(module)
        _set_role_state(state)
        try:
            return module(*a, **k)
        finally:
            _set_role_state(now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise bad_value("gradient_checkpointing", f"False ({type(model).__name__} does not support it)", True)
    model.enable_gradient_checkpointing(checkpoint_in_role)


def compile_regions(model: torch.nn.Module, **compile_kwargs) -> int:
    """Regional compilation: the model's ``_repeated_blocks`` (diffusers' list) or, for models without
    one, its ResNet blocks. Returns how many blocks were compiled."""
    names = list(getattr(model, "_repeated_blocks", None) or ["ResnetBlock2D"])
    n = 0
    for sub in model.modules():
        if sub.__class__.__name__ in names:
            sub.compile(**compile_kwargs)
            n += 1
    return n


class Applied:
    """What ``apply`` changed on a run, so that ``release`` can give back a plain model."""

    def __init__(self, run, rt: Runtime):
        self.run, self.rt = run, rt
        self.hooks: list = []
        self._tf32_prev = None

    def release(self) -> None:
        """Remove the autocast hooks, restore TF32 flags and put the frozen weights back at the input
        model's precision (from the untouched input: frozen weights were never trained). The roles' copies
        need nothing: results are built from them after this (``Roles.plain_module``)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self._tf32_prev is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_prev
            self._tf32_prev = None
        restore_dtypes(self.run.model, self.run.original)


def restore_dtypes(model: torch.nn.Module, original: torch.nn.Module) -> None:
    """Give ``model`` the dtypes of ``original`` again: frozen weights are the untouched original's again
    (exact; its own tensors, shared, where it is on the same device), trained ones are cast (a bf16 input model
    gets a bf16 result); LoRA adapters stay fp32 as peft keeps them. peft's ``base_layer`` names map onto the
    original names."""
    orig = dict(original.named_parameters())
    for name, p in model.named_parameters():
        if _is_adapter(name):
            continue
        src = orig.get(name.replace(".base_layer", ""))
        if src is None or src.dtype == p.dtype or src.shape != p.shape:
            continue
        if p.requires_grad:
            p.data = p.data.to(src.dtype)
        else:  # the original's own tensor where it is on the same device (frozen: never written), else a copy
            p.data = src.detach().to(p.device)


def cast_copies(roles, dtype: torch.dtype) -> None:
    """The roles' copies of the trained tensors (no LoRA) like the model's own: a frozen snapshot (the
    teacher) to ``dtype``, a trained copy (SFD's fake score) to fp32."""
    for role, tensors in roles.copies().items():
        want = torch.float32 if role in roles.trained else dtype
        for t in tensors.values():
            if t.is_floating_point() and t.dtype != want:
                t.data = t.data.to(want)


def apply(run, rt: Runtime, method=None) -> Applied:
    """Apply ``rt`` to ``run.model``, after the method declared its roles (``method.roles``): every adapter
    exists then, and every role runs on ``run.model``, its copies (no LoRA) cast like the model's own."""
    state = Applied(run, rt)
    model = run.model
    device = next(model.parameters()).device
    set_attention(model, rt.attention)
    if rt.gradient_checkpointing:
        enable_checkpointing(model)
    cast_frozen(model, rt.dtype)
    if method is not None:
        cast_copies(method.roles, rt.dtype)
    if rt.precision != "fp32":
        state.hooks.append(_AutocastHooks(model, device.type, rt.dtype))
    if rt.compile:
        compile_regions(model)
    run.dtype = torch.float32  # inputs in fp32; autocast picks the compute precision
    if rt.tf32:  # global flags, read by CUDA matmuls/convolutions only (harmless elsewhere)
        state._tf32_prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return state


@contextlib.contextmanager
def autocast(rt: Runtime, device: torch.device):
    """``torch.autocast`` for ``rt``'s precision (a no-op for fp32)."""
    if rt.precision == "fp32":
        yield
    else:
        with torch.autocast(device.type, dtype=rt.dtype):
            yield


class InputOffload:
    """Moves the caller's modules off the accelerator for the run and back at the end (``restore``).

    Without it, an input pipeline on a GPU keeps its UNet there next to the trained copy (a second full
    UNet: 5 GB for SDXL in fp16) and its text encoders and VAE, which the run needs only while the method
    sets up (prompts are encoded once and cached; images are generated once). The caller's modules are
    only moved, never changed, and go back to where they were even when the run fails."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.moved = []  # (module, device) in the order moved

    @staticmethod
    def _device(module):
        p = next(module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _move(self, module):
        if module is None or not self.enabled:
            return
        device = self._device(module)
        if device.type not in ("cpu", "meta"):
            module.to("cpu")
            self.moved.append((module, device))

    def move_unet(self, unet):
        """Offload ``unet`` before it is copied; returns the device the copy should train on (None: stay)."""
        device = self._device(unet)
        self._move(unet)
        return device if self.moved else None

    def move_encoders(self, pipe):
        """Offload a pipeline's text encoders and VAE (nothing for a bare model)."""
        for name in ("text_encoder", "text_encoder_2", "vae"):
            self._move(getattr(pipe, name, None) if not isinstance(pipe, torch.nn.Module) else None)

    def restore(self):
        for module, device in reversed(self.moved):
            module.to(device)
        self.moved.clear()

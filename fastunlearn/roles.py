"""Roles: the networks a method evaluates, held on one shared base.

Methods that distil from or guide against the model they train name its roles (spec §5.1, §6.5):

* ``teacher``: the frozen input model (SFD's ε_φ, ESD's θ*);
* the run's own trained role, the first of ``trained`` (``"student"``; SFD's generator G_θ), whose tensors
  the training loop's optimizer updates;
* further trained roles (SFD's fake score ψ), which the method updates itself.

There is one copy of the base weights, ``run.model`` (design: "hold one copy of the base weights"):

* with LoRA (``run.lora_rank``) each trained role is a peft adapter on it (the run's own is peft's
  ``"default"``, a further one is named after its role) and the teacher is the model with every adapter off;
* without LoRA the run's own role is the model itself, and every other role is the model with its own copy
  of the trained tensors bound in their place (``torch.func.functional_call``): the teacher keeps a frozen
  snapshot, a further trained role a trainable copy. Only the trained subset is copied (ESD-x on SD: the
  ~3% of the weights in ``attn2``; SFD, which trains everything, copies everything).

A method declares its roles in ``setup`` and evaluates them with ``eps``. Runtime (precision of the copies),
distributed data parallelism (what to broadcast and all-reduce), checkpoints (which tensors to save) and
results (SFD's generator and fake score) ask the ``Roles`` object for what they act on. ``set_trainable``
is the one place that marks tensors trainable.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable, Optional, Sequence

import torch

from .lora import add_lora, merge_in_place, merged_copy

TEACHER = "teacher"
STUDENT = "student"
OWN_ADAPTER = "default"  # peft's name for the first adapter: the one Run injects (fastunlearn.run)


def set_trainable(model: torch.nn.Module, keep: Callable[[str], bool]) -> None:
    """Exactly the parameters whose name passes ``keep`` are trainable; every other one is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))


class Roles:
    """The teacher and the trained roles of one run, on ``run.model`` (module docstring).

    ``trained``: the trained roles' names, the run's own first. Its tensors are the model's trainable ones
    when the roles are declared (``Run`` and the method chose them), and every further trained role trains
    the same tensors in its own adapter or copy. ``teacher``: whether the method evaluates the frozen base.
    """

    def __init__(self, run, trained: Sequence[str] = (STUDENT,), teacher: bool = True):
        self.run, self.model = run, run.model
        self.lora = run.lora_rank is not None
        self.trained = tuple(trained)
        self.own = self.trained[0]
        self.names = ((TEACHER,) if teacher else ()) + self.trained
        model = self.model
        self._params = {self.own: {n: p for n, p in model.named_parameters() if p.requires_grad}}  # what each trains
        self._copies: dict = {}  # role -> {name: tensor} bound over the model's own for its calls (no LoRA)
        self._adapters = {self.own: OWN_ADAPTER} if self.lora else {}
        if self.lora:
            for i, role in enumerate(self.trained[1:], start=1):
                self._add_adapter(role, seed=run.seed + i)
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        else:
            own = self._params[self.own]
            for role in self.trained[1:]:
                self._params[role] = self._copies[role] = {
                    n: torch.nn.Parameter(p.detach().clone()) for n, p in own.items()}
            if teacher:
                self._copies[TEACHER] = {n: p.detach().clone() for n, p in own.items()}
        trained_ids = {id(p) for params in self._params.values() for p in params.values()}
        # Set once for the whole run: adapter tensors outside every trained role (ESD-x: the adapters off
        # cross-attention) stay frozen, and switching roles leaves the flags alone (``_switch``).
        set_trainable(model, {n for n, p in model.named_parameters() if id(p) in trained_ids}.__contains__)
        if self.lora:
            self._switch(self.own)
        self._modules = list(model.modules())
        self._custom_train = any(type(m).train is not torch.nn.Module.train for m in self._modules)

    def _add_adapter(self, role: str, seed: int) -> None:
        """A further trained role's LoRA adapter, named after it and drawn from ``seed`` (like the run's own,
        which Run draws from the run's seed), so that the caller's random state does not matter."""
        run = self.run
        cuda = [run.device.index or 0] if run.device.type == "cuda" else []
        with warnings.catch_warnings(), torch.random.fork_rng(devices=cuda):
            warnings.simplefilter("ignore")  # peft warns that a second adapter is being added; that is the point
            torch.manual_seed(seed)
            add_lora(self.model, run.lora_rank, adapter_name=role)
        self._adapters[role] = role
        own = self._params[self.own]  # the same layers as the run's own adapter trains
        self._params[role] = {n: p for n, p in self.model.named_parameters()
                              if f".{role}." in n and n.replace(f".{role}.", f".{OWN_ADAPTER}.") in own}

    # ------------------------------------------------------------------ what the others query
    def parameters(self, role: Optional[str] = None) -> list:
        """The trained tensors of ``role`` (every trained role's when None)."""
        return list(self.named_parameters(role).values())

    def named_parameters(self, role: Optional[str] = None) -> dict:
        """Trained tensors by name: the run's own role under the model's parameter names, a further role's
        copies under ``role/name`` (its adapters already have names of their own)."""
        if role is not None:
            return dict(self._params[role])
        out = dict(self._params[self.own])
        for r in self.trained[1:]:
            out.update({(f"{r}/{n}" if r in self._copies else n): p for n, p in self._params[r].items()})
        return out

    def copies(self) -> dict:
        """role -> {name: tensor}: the tensors a role binds over the model's own (empty with LoRA)."""
        return dict(self._copies)

    def adapter(self, role: str) -> str:
        """The peft adapter name of a trained role (LoRA only)."""
        return self._adapters[role]

    # ------------------------------------------------------------------ evaluating a role
    def _switch(self, role: str) -> None:
        """LoRA: every layer to ``role``'s adapter, or off for the teacher. The layers' peft state is set directly
        (as ``runtime._set_role_state`` does): peft's ``set_adapter`` / ``enable_adapters`` would also flip every
        adapter's ``requires_grad``, which the roles keep fixed (every trained role's tensors trainable, the
        adapters no role trains frozen, ``__init__``): gradients are always taken explicitly w.r.t. one role's
        tensors, and the graph of either must stay usable. A switch is one attribute pair per layer, not a walk
        over every adapter tensor (100 switches took 3.6 s on SDXL's 2,240 LoRA layers; ESD switches twice per
        teacher call)."""
        off = role == TEACHER
        active = None if off else [self._adapters[role]]
        for layer in self._layers:
            layer._disable_adapters = off
            if active is not None:
                layer._active_adapter = active

    def _train(self, mode: bool) -> None:
        """``model.train(mode)`` over the modules listed at set-up, without ``Module.__setattr__``'s checks:
        SDXL with LoRA has ~7,500 modules, and ``train()`` twice per role call took 58 ms. Models with a module
        that overrides ``train`` take the plain call."""
        if self._custom_train:
            self.model.train(mode)
            return
        for m in self._modules:
            object.__setattr__(m, "training", mode)

    def eps(self, role: str, x_t: torch.Tensor, t: torch.Tensor, cond=None, train: bool = False) -> torch.Tensor:
        """ε of ``role`` at (x_t, t, cond). ``train`` puts a trained role in train mode (dropout, §5.3); the
        teacher always runs in eval mode. The model is left in the run's own role and mode afterwards."""
        if role not in self.names:
            raise KeyError(f"no role {role!r} here (roles: {', '.join(self.names)})")
        model = self.model
        was_training = model.training
        self._train(train and role != TEACHER)
        if self.lora:
            self._switch(role)
        try:
            tensors = self._copies.get(role)
            if tensors is None:
                return self.run.denoiser(x_t, t, cond)
            return torch.func.functional_call(model, tensors, (x_t, t), _model_kwargs(self.run.denoiser, cond)).sample
        finally:
            if self.lora:
                self._switch(self.own)
            self._train(was_training)

    def network(self, role: str) -> Callable:
        """``eps`` of one role as a function ε(x_t, t, cond)."""
        return functools.partial(self.eps, role)

    def plain_module(self, role: str, last: bool = False) -> torch.nn.Module:
        """``role`` as a standalone diffusers model: its adapter merged into a copy of the base whose layers without
        an adapter keep the base's tensors (LoRA: only the adapted layers' weights are new), its
        tensors written into a copy of the model, or the model itself for the run's own role without LoRA.
        ``last`` (LoRA): the run is over and no role is evaluated again, so the adapter is merged into the base
        itself instead of a copy (SFD's second role: one full model fewer at the end of the run, 4.8 GiB on
        SDXL); the roles are unusable afterwards."""
        if self.lora:
            self._switch(role)
            if last:
                self._layers = []
                return merge_in_place(self.model)
            try:
                return merged_copy(self.model, share=True)  # the unadapted layers stay the base's tensors
            finally:
                self._switch(self.own)
        if role not in self._copies:
            return self.model
        module = copy.deepcopy(self.model)
        named = dict(module.named_parameters())
        with torch.no_grad():
            for n, t in self._copies[role].items():
                named[n].copy_(t)
        return module


def _model_kwargs(den, cond) -> dict:
    """The model's keyword arguments for ``cond`` (``models.Denoiser``'s convention)."""
    if den.kind == "text":
        return dict(cond)
    if den.kind == "class":
        return {"class_labels": cond}
    return {}

"""The byte-counting dispatch modes of the planner's trace, and the switches that make a CPU trace plan a
CUDA run.

* ``LiveBytes`` follows every storage from allocation to release (fake or real tensors) and keeps the peak
  and what was live at that moment, by category; ``BatchLines`` does it for several batch sizes at once.
* ``HostValues`` gives the host values a step asks for (``.item()``, ``float(t)``, ``bool(t)``) where the
  tensor is fake: the bytes of a step do not depend on them. It is also the fake trace's one Python dispatch
  layer: it counts each op's outputs for the tracker (``counting``), and answers what needs no FakeTensorMode
  dispatch (metadata queries, views, value-only in-place ops, ops whose outputs' metadata it has seen: the
  memo), each exactly as FakeTensorMode would.
* ``cuda_norm_policy`` and ``cuda_optimizers``: what CUDA does differently from the CPU the trace runs on
  (autocast's fp32 norms, the foreach optimizer step).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._subclasses.fake_tensor import (_DISPATCH_META_HANDLERS, DynamicOutputShapeException, FakeTensor,
                                           in_kernel_invocation_manager)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

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

    def _claim(self, t: torch.Tensor, category: str):
        """(storage, key) of ``t`` when it is not counted yet, its release followed from now on; None when
        there is nothing to add (no storage, or already counted: then it is retagged)."""
        s, key = self._storage_key(t)
        if s is None:
            return None
        if key in self.live:
            self.retag(t, category)
            return None
        weakref.finalize(s, self._free, key)
        return s, key

    def add(self, t: torch.Tensor, category: str) -> None:
        claimed = self._claim(t, category)
        if claimed is None:
            return
        s, key = claimed
        n = s.nbytes()
        self.live[key] = [n, category]
        self.by_cat[category] += n
        self.most[category] = max(self.most[category], self.by_cat[category])
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_cat)

    def _entry(self, t: torch.Tensor, category: str):
        """The live entry of ``t``'s storage; one not counted yet is added as ``category`` (and None returned)."""
        _, key = self._storage_key(t)
        entry = self.live.get(key)
        if entry is None:
            self.add(t, category)
        return entry

    def retag(self, t: torch.Tensor, category: str) -> None:
        entry = self._entry(t, category)
        if entry is None:
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
        """Forget the peaks so far (the trace's set-up): from here on, the step's own."""
        self.peak = self.current
        self.at_peak = dict(self.by_cat)
        self.most = Counter(self.by_cat)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count(out, args, kwargs)
        return out

    def count(self, out, args, kwargs) -> None:
        """Add the storages ``out`` allocated (an op's outputs with ``args`` and ``kwargs`` as its inputs): those
        not counted yet, except views and aliases of an input, which allocate nothing (e.g. ``.data`` of a
        tensor made before the count)."""
        inputs = None
        for t in _tensors(out):
            s, key = self._storage_key(t)
            if s is None or key in self.live:
                continue
            if inputs is None:  # once per op: a foreach op has thousands of inputs and outputs
                inputs = {self._storage_key(a)[1] for a in _tensors((args, kwargs))}
            if key not in inputs:
                self.add(t, self.category)


def _tensors(tree, out=None) -> list:
    """The tensors in an op's arguments or outputs (nested lists, tuples and dicts), in order: what
    ``torch.utils._pytree.tree_flatten`` finds there, without its cost (it runs for every op of a trace)."""
    if out is None:
        out = []
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple, dict)):
                _tensors(x, out)
    elif isinstance(tree, dict):
        _tensors(tuple(tree.values()), out)
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
        claimed = self._claim(t, category)
        if claimed is None:
            return
        s, key = claimed
        c, r = self._split(s.nbytes())
        self.live[key] = [c, r, category]
        self._shift(category, c, r)
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
        entry = self._entry(t, category)
        if entry is None:
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

    def reset_peak(self):
        self.views = self._now()
        for b in self.batches:
            self.gradients_most[b] = self.const["gradients"] + b * self.per_row["gradients"]

    def _now(self) -> dict:
        out = {}
        for b, without_optimizer in self.views:
            at = self._at(b, without_optimizer)
            out[(b, without_optimizer)] = [sum(at.values()), at]
        return out

    @contextlib.contextmanager
    def rise(self, out: dict):
        """Record into ``out``, per view, the largest rise of the live bytes above those at entry during the
        block, and the change of the split at that moment (``replay`` applies it again)."""
        entry, kept = self._now(), self.views
        self.views = self._now()
        try:
            yield out
        finally:
            for k, (total, at) in self.views.items():
                out[k] = (total - entry[k][0], {c: at.get(c, 0) - entry[k][1].get(c, 0) for c in set(at) | set(entry[k][1])})
                if total > kept[k][0]:
                    kept[k] = [total, at]
            self.views = kept

    def replay(self, rise: dict) -> None:
        """A block that rises as a recorded one (``rise``) from the bytes live now."""
        for k, (total, at) in self._now().items():
            up, split = rise[k]
            if total + up > self.views[k][0]:
                self.views[k] = [total + up, {c: at.get(c, 0) + split.get(c, 0) for c in set(at) | set(split)}]


# ============================================================================ CUDA's autocast policy for norms
@contextlib.contextmanager
def cuda_norm_policy(active: bool):
    """CUDA autocast runs group_norm and layer_norm in fp32 (their outputs, saved by the next op, are
    fp32); CPU autocast keeps them in bf16. The trace runs on CPU and must plan for CUDA."""
    if not active:
        yield
        return
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
def peft_in_place():
    """peft moves each new adapter to its base layer's device and dtype with ``Module.to``, which fake
    parameters refuse (they cannot be swapped); the trace builds everything on one device in fp32, where
    the move is a no-op, so it is skipped while the adapters are injected."""
    orig_move, orig_to = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *a, **k: None
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to = orig_move, orig_to




# ============================================================================ host values of fake tensors
# Factory results of at most this many elements, of an integer, bool or float64 dtype, are made for real:
# class ids, timestep tables, indices, seeds and schedule constants, whose values a step reads on the host.
EXACT_ELEMENTS = 4096


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def _exact_dtype(dtype) -> bool:
    return dtype == torch.float64 or not (dtype.is_floating_point or dtype.is_complex)


def _stand_in(dtype):
    """The host value of a fake scalar: 1.0 for floats (a safe divisor), 0 for ints (a safe index), True for
    bools (a guard such as "all finite" passes)."""
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else 0


_SCALAR, _NONZERO = torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
_VALUE_ONLY = {}  # op -> writes values only, in place (``_value_only_in_place``)
_WRITES_VALUES = {"copy_", "zero_", "fill_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
                  "nan_to_num_", "clamp_", "clamp_min_", "clamp_max_", "masked_fill_", "index_put_", "index_add_",
                  "index_fill_", "scatter_", "scatter_add_", "lerp_", "addcdiv_", "addcmul_"}


def _value_only_in_place(func) -> bool:
    """``func`` writes into its first argument's elements and nothing else: an in-place op (its first argument
    the only one written, returned as is or not at all) that is pointwise, a foreach op or one of
    ``_WRITES_VALUES``; not one that changes the tensor's metadata (``resize_``, ``t_``, ``set_``, ...)."""
    known = _VALUE_ONLY.get(func)
    if known is None:
        known = False
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.arguments:
            name = schema.name.split("::")[-1]
            first, rest = schema.arguments[0], schema.arguments[1:]
            writes_first = first.alias_info is not None and first.alias_info.is_write
            writes_rest = any(a.alias_info is not None and a.alias_info.is_write for a in rest)
            returns_first = not schema.returns or (
                len(schema.returns) == 1 and schema.returns[0].alias_info is not None
                and schema.returns[0].alias_info.is_write)
            known = (name.endswith("_") and writes_first and not writes_rest and returns_first
                     and (torch.Tag.pointwise in func.tags or name.startswith("_foreach_") or name in _WRITES_VALUES))
        _VALUE_ONLY[func] = known
    return known


_SINGLE_VIEW = {}  # op -> returns one view of its first argument (``_single_view``)
_VIEWS = {"view", "_unsafe_view", "t", "detach", "transpose", "permute", "expand", "unsqueeze", "squeeze", "alias",
          "slice", "select", "as_strided", "_reshape_alias", "diagonal", "unfold"}


def _single_view(func) -> bool:
    """``func`` is one of ``_VIEWS`` (never a copy, unlike ``reshape``) returning one tensor that views its first
    argument (``_unsafe_view`` too: a view that autograd does not track as one)."""
    known = _SINGLE_VIEW.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = bool(schema is not None and schema.name.split("::")[-1] in _VIEWS and len(schema.returns) == 1
                     and str(schema.returns[0].type) == "Tensor" and schema.arguments
                     and str(schema.arguments[0].type) == "Tensor"
                     and (getattr(func, "is_view", False) or schema.name == "aten::_unsafe_view"))
        _SINGLE_VIEW[func] = known
    return known


# ---------------------------------------------------------------------------- ops answered from their metadata
# An op on fake tensors is a function of its inputs' metadata and its other arguments: FakeTensorMode caches its
# outputs' metadata by them (its dispatch cache) and makes new fake tensors from it. ``HostValues`` keeps the
# same memo with a cheaper key: the op, the global settings FakeTensorMode's key holds, every fake input's
# metadata (shape, strides, offset, storage size, dtype, device, ...) and the other arguments by value; inputs
# of any other kind (a real tensor, a generator, a constant-valued fake tensor) are not memoized. An entry is kept
# only for outputs that are all new storages of their minimal size at offset 0, which a fake tensor made from the
# metadata is byte for byte; views, in-place ops and anything else go to FakeTensorMode every time.
_NOT_MEMOIZED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _memo_key(func, args, kwargs):
    key = [func, torch.get_default_dtype(), torch._C._get_default_device(), torch.is_inference_mode_enabled()]
    n = len(key)
    if not (_key_into(key, args) and (not kwargs or _key_into(key, kwargs))) or len(key) == n:
        return None
    return tuple(key) if any(type(k) is _FakeMeta for k in key) else None


class _FakeMeta(tuple):
    """A fake input's metadata in a memo key."""


def _key_into(key: list, x) -> bool:
    if isinstance(x, (list, tuple)):
        key.append(len(x) if type(x) is list else -len(x) - 1)
        return all(_key_into(key, y) for y in x)
    if isinstance(x, dict):
        key.append(tuple(x))
        return all(_key_into(key, y) for y in x.values())
    if type(x) is FakeTensor:
        if x.constant is not None or x.layout != torch.strided:
            return False
        key.append(_FakeMeta((tuple(x.shape), x.stride(), x.storage_offset(), x.untyped_storage().nbytes(), x.dtype,
                              x.fake_device, x.requires_grad, x.is_conj(), x.is_neg(), x.is_inference())))
        return True
    if type(x) in _PLAIN:
        key.append((type(x), x))
        return True
    return False


def _made(out, args, kwargs):
    """The metadata ``_make`` makes ``out`` from again, or False where a fake tensor made from it would differ."""
    outs = out if type(out) in (tuple, list) else (out,)
    seen = set()
    for t in outs:
        if t is None:
            continue
        if type(t) is not FakeTensor or t.constant is not None or t.layout != torch.strided or t.is_conj() \
                or t.is_neg() or t.storage_offset() != 0:
            return False
        key = t.untyped_storage()._cdata
        if key in seen or t.untyped_storage().nbytes() != _dense_nbytes(t):
            return False
        seen.add(key)
    if seen & {a.untyped_storage()._cdata for a in _tensors((args, kwargs)) if type(a) is FakeTensor}:
        return False  # an output aliases an input
    meta = tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.fake_device, t.requires_grad)
                 for t in outs)
    return (type(out) if type(out) in (tuple, list) else None, meta)


def _dense_nbytes(t) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _make(made, mode):
    kind, meta = made
    with in_kernel_invocation_manager(mode):
        empties = [None if m is None else
                   torch.empty_strided(m[0], m[1], dtype=m[2], device="meta", requires_grad=m[4]) for m in meta]
    outs = [None if e is None else FakeTensor(mode, e, m[3]) for e, m in zip(empties, meta)]
    return kind(outs) if kind is not None else outs[0]


def _no_constant(x) -> bool:
    if isinstance(x, (list, tuple)):
        return all(t.constant is None for t in x)
    return x.constant is None


def _all_fake(x) -> bool:
    if isinstance(x, (list, tuple)):
        return all(_is_fake(t) for t in x)
    return _is_fake(x)


# Metadata queries FakeTensorMode answers before anything else (a fake tensor's device, sizes, strides, offset).
_QUERIES = dict(_DISPATCH_META_HANDLERS)


class HostValues(TorchDispatchMode):
    """A step's host values where the tensor has none (runs on top of ``FakeTensorMode``).

    A method's step reads values on the host: losses for the history (``.item()``), gradient-surgery norms as
    Python floats, guards (``bool(torch.isfinite(...).all())``), seeds and timesteps (``int(t)``). A fake
    tensor has no values; the bytes a step allocates do not depend on them, so:

    * ops whose tensor inputs are all real run for real, and small integer / float64 factory results
      (``EXACT_ELEMENTS``) are made for real: values derived from the schedule and from seeds are exact
      (SFD's timesteps, a DDIM timestep table, an index drawn from the step's generator);
    * a fake scalar read on the host gives a stand-in (``_stand_in``);
    * an op whose output shape depends on values (``nonzero``) gets its largest shape: an upper bound.
    """

    def __init__(self):
        super().__init__()
        self.tracker = None
        self.memo = {}  # op and its inputs' metadata -> its outputs' metadata, or False (``_memo_key``)

    @contextlib.contextmanager
    def counting(self, tracker: "LiveBytes"):
        """``tracker`` counts every op's outputs in this mode's own dispatch: what it counts as a mode of its own
        on top of this one, with one Python dispatch layer less per op (a trace dispatches about a million)."""
        self.tracker = tracker
        try:
            yield tracker
        finally:
            self.tracker = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        query = _QUERIES.get(func)
        if query is not None and len(args) == 1 and _is_fake(args[0]):
            # A fake tensor's device or sizes (``prim.device`` is asked for most often, by autograd and autocast
            # alike): FakeTensorMode's own answer, without the layers between; it allocates nothing.
            return query(args)
        if (_single_view(func) and type(args[0]) is FakeTensor and args[0].constant is None
                and not _tensors((args[1:], kwargs))):
            # A view (``view``, ``t``, ``detach``, ``_unsafe_view``: a third of a trace's ops) allocates nothing and
            # its metadata is the op's definition: the meta kernel on the fake tensor's meta self gives it, as
            # FakeTensorMode does, without its cache key (most of its cost).
            x = args[0]
            with in_kernel_invocation_manager(x.fake_mode):
                view = func(*args, **(kwargs or {}))
            return FakeTensor(x.fake_mode, view, x.fake_device)
        if _value_only_in_place(func) and _all_fake(args[0]) and _no_constant(args[0]):
            # An in-place op that writes values only (``add_``, ``copy_``, an optimizer's ``_foreach_mul_``): on a
            # fake tensor it allocates nothing and changes no metadata; its result is its first argument.
            return args[0] if func._schema.returns else None
        key = _memo_key(func, args, kwargs) if func not in _NOT_MEMOIZED else None
        made = self.memo.get(key) if key is not None else None
        if made:
            out = _make(made, next(t for t in _tensors((args, kwargs)) if type(t) is FakeTensor).fake_mode)
        else:
            out = self._value(func, args, kwargs or {})
            if made is None and key is not None:
                self.memo[key] = _made(out, args, kwargs)
        if self.tracker is not None:
            self.tracker.count(out, args, kwargs)
        return out

    def _value(self, func, args, kwargs):
        tensors = _tensors((args, kwargs))
        fake = any(_is_fake(t) for t in tensors)
        if func is _SCALAR and fake:
            return _stand_in(args[0].dtype)
        if func in _LIFTS:  # torch.tensor(...): a factory of a constant (an optimizer's step count is fake)
            tensors = ()
        elif tensors and not fake:
            with _disable_current_modes():
                return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            if func is not _NONZERO:
                raise
            x = args[0]
            return torch.empty((x.numel(), x.ndim), dtype=torch.long, device=x.device)
        if (not tensors and isinstance(out, torch.Tensor) and _exact_dtype(out.dtype)
                and out.numel() <= EXACT_ELEMENTS):
            with _disable_current_modes():
                return func(*args, **kwargs)
        return out


# ============================================================================ optimizers as on CUDA
@contextlib.contextmanager
def cuda_optimizers(made: list):
    """Every torch optimizer created inside (the training loop's and a method's own, such as SFD's fake-score
    Adam) is appended to ``made`` and takes the foreach (multi-tensor) step, the default on CUDA, whose
    temporaries the trace must see; on CPU torch's default is the per-tensor loop."""
    init = torch.optim.Optimizer.__init__

    def recording(self, params, defaults, *args, **kwargs):
        if "foreach" in defaults:
            defaults = {**defaults, "foreach": True}
        init(self, params, defaults, *args, **kwargs)
        made.append(self)

    torch.optim.Optimizer.__init__ = recording
    try:
        yield made
    finally:
        torch.optim.Optimizer.__init__ = init


# ============================================================================ no-grad calls traced once
@contextlib.contextmanager
def replay_no_grad_calls(model_cls, tracker: "BatchLines"):
    """Calls of a ``model_cls`` network without autograd are traced once per signature, then replayed.

    Without autograd a call keeps nothing: every tensor it allocates is freed when it returns, except its
    output. A second call of the same module, in the same state (train/eval, LoRA adapters on/off and which
    one, autocast) on inputs of the same shapes and dtypes, allocates the same bytes in the same order; only
    the values differ, and no byte depends on them. So the trace records the first call's rise above the
    bytes live at the call (``BatchLines.rise``) and answers the next ones with ``replay`` and a fresh output of
    the recorded shapes: ESD's 49 sampling steps of its trajectory pool, the relabel search's forwards, SFD's
    no-grad generator pass cost one forward's tracing, not one each. Calls that build a graph run as they are.
    """
    forward = model_cls.forward
    recorded: dict = {}
    listed: dict = {}  # id(module) -> (its modules, its peft layers): a trace does not add modules to a network

    def signature(module, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        shapes = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else
                       (type(x).__name__, x if isinstance(x, (int, float, str, bool, type(None))) else id(x))
                       for x in leaves)
        mods = listed.get(id(module))
        if mods is None:
            every = list(module.modules())
            mods = listed[id(module)] = (every, [m for m in every if isinstance(m, BaseTunerLayer)])
        state = (tuple([m.training for m in mods[0]]),
                 tuple([(m._disable_adapters, str(m._active_adapter)) for m in mods[1]]))
        return (id(module), str(spec), shapes, state, torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"))

    def traced(module, *args, **kwargs):
        if torch.is_grad_enabled():
            return forward(module, *args, **kwargs)
        key = signature(module, args, kwargs)
        if key in recorded:
            rise, shapes, spec = recorded[key]
            tracker.replay(rise)
            return tree_unflatten([torch.empty(s, dtype=d, device=dev) if s is not None else v
                                   for (s, d, dev, v) in shapes], spec)
        rise: dict = {}
        with tracker.rise(rise):
            out = forward(module, *args, **kwargs)
        leaves, spec = tree_flatten(out)
        if all(isinstance(x, torch.Tensor) or not hasattr(x, "__dict__") for x in leaves):
            recorded[key] = (rise, [(tuple(x.shape), x.dtype, x.device, None) if isinstance(x, torch.Tensor)
                                    else (None, None, None, x) for x in leaves], spec)
        return out

    model_cls.forward = traced
    try:
        yield recorded
    finally:
        model_cls.forward = forward

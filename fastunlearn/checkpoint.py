"""Checkpoints and exact resume: a run killed at any moment continues to the same weights.

Layout (``output_dir/checkpoints/step-00000040/``):

* ``weights.safetensors``: the trained tensors of every role (``fastunlearn.roles``) by parameter name:
  the ones the optimizer updates and a method's own further roles (SFD's fake score); the LoRA adapter
  weights when ``lora_rank`` is set (the frozen base is the user's model and is not copied).
* ``state.safetensors``: every tensor of the optimizer state, of the method's ``state_dict()`` and of
  the RNG states (torch CPU/CUDA, numpy).
* ``state.json``, written last: the step, the history, the run's settings (a fingerprint checked on
  resume), the non-tensor part of the optimizer / method / RNG states, and the byte size of the two
  tensor files.

Nothing is pickled. Nested state (an optimizer's ``{"state": {0: {"step": …, "exp_avg": …}},
"param_groups": […]}``) is flattened here: tensors go to safetensors under their path, the structure
and the ints/floats/tuples to JSON with tags that keep ``int`` keys, tuples and non-finite floats
exact, so ``load_state_dict`` gets back what ``state_dict`` gave (AdamW's step counts included).

Atomicity: a checkpoint is written into ``.step-N.tmp-PID`` (files fsynced), then renamed to ``step-N``
and the folder fsynced. A checkpoint is COMPLETE when its name has no temporary prefix, ``state.json``
parses and both tensor files have the recorded sizes; anything else (a kill mid-write, a truncated
file) is ignored on resume, with a warning, and the next older complete one is used. The last
``keep`` complete checkpoints are kept; older ones are renamed away before deletion so a kill during
clean-up never leaves a half-deleted folder under a valid name.

Exactness: every step's randomness comes from ``run.step_generator(seed, step)``, so restoring the
weights, the optimizer state, the method state and the history at step k and continuing replays steps
k, k+1, … exactly as an uninterrupted run would (bitwise on CPU with the same thread count).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .errors import CorruptResultError, NonFiniteError, bad_value, write_error
from .files import publish_dir, temp_name
from .validation import model_digest

CHECKPOINTS = "checkpoints"
STATE_JSON = "state.json"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.safetensors"
FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})$")

# Settings a resumed run must share with the checkpointed one to end at the same weights. ``steps``
# may grow (continue training), and progress/checkpoint frequency/guards do not change the numbers.
FINGERPRINT_KEYS = ("method", "options", "batch_size", "lr", "seed", "optimizer", "optimizer_hparams",
                    "lora_rank", "precision", "model", "forget", "retain")
# Method options that do not change the numbers either (a cache hit gives the same tensors bit for bit).
NEUTRAL_OPTIONS = ("cache_generated",)


# ---------------------------------------------------------------------------------------- flattening
def flatten(obj, tensors: dict, path: str = "x"):
    """A JSON tree for ``obj`` with every tensor moved into ``tensors`` (keyed by its path)."""
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if _is_ndarray(obj):
        key = path
        while key in tensors:
            key += "_"
        tensors[key] = torch.from_numpy(obj.astype("int64") if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if _is_np_scalar(obj):
        return flatten(obj.item(), tensors, path)
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__dict__": [[flatten(k, tensors, f"{path}.key{i}"), flatten(v, tensors, f"{path}.{k}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path} "
                    "(state_dict() must hold tensors, numbers, strings, lists, tuples and dicts)")


def unflatten(tree, tensors: dict):
    """Inverse of ``flatten``."""
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        import numpy as np

        return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["dtype"]))
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__tuple__" in tree:
        return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in tree["__dict__"]}
    if "__dtype__" in tree:
        return getattr(torch, tree["__dtype__"])
    return {k: unflatten(v, tensors) for k, v in tree.items()}


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _is_ndarray(x) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _is_np_scalar(x) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "item") and not _is_ndarray(x)


# ---------------------------------------------------------------------------------------- fingerprint
def data_digest(data) -> Optional[str]:
    """sha256 of the forget/retain tensors and conditioning (``(x0, cond)`` as ``erase`` prepares them)."""
    if data is None:
        return None
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(data)
    return h.hexdigest()


def run_fingerprint(*, method, options, batch_size, lr, seed, optimizer, defaults, lora_rank, precision, model,
                    forget, forget_data, retain, retain_data) -> dict:
    """What a resumed run must share with the checkpointed one (see ``FINGERPRINT_KEYS``)."""
    return {
        "method": method, "options": {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS},
        "batch_size": batch_size, "lr": lr, "seed": seed,
        "optimizer": optimizer, "lora_rank": lora_rank, "precision": precision,
        "optimizer_hparams": [defaults.get(k) for k in ("betas", "weight_decay", "eps")],
        "model": model_digest(model),
        "forget": data_digest(forget_data) if forget_data is not None else repr(forget),
        "retain": data_digest(retain_data) if retain_data is not None else repr(retain),
    }


def _canonical(x):
    return json.loads(json.dumps(x, sort_keys=True, default=repr))


# ---------------------------------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Rename away first, then delete: a kill mid-delete leaves only a hidden folder."""
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def step_of(folder: Path) -> Optional[int]:
    m = _NAME.match(folder.name)
    return int(m.group(1)) if m else None


def is_complete(folder: Path) -> bool:
    """Named ``step-N``, ``state.json`` parses, and the tensor files have the recorded sizes."""
    return _read_manifest(folder) is not None


def _read_manifest(folder: Path) -> Optional[dict]:
    if step_of(folder) is None or not folder.is_dir():
        return None
    try:
        state = json.loads((folder / STATE_JSON).read_text())
        sizes = state["files"]
        for name in (WEIGHTS_FILE, STATE_FILE):
            if (folder / name).stat().st_size != sizes[name]:
                return None
        if state.get("format") != FORMAT or state["step"] != step_of(folder):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def list_checkpoints(output_dir) -> list:
    """Complete checkpoints under ``output_dir``, newest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if step_of(p) is not None]
    return [p for _, p in sorted(found, reverse=True) if is_complete(p)]


def has_checkpoints(output_dir) -> bool:
    root = Path(output_dir) / CHECKPOINTS
    return root.is_dir() and any(step_of(p) is not None for p in root.iterdir())


# ---------------------------------------------------------------------------------------- the manager
class Checkpointer:
    """Writes checkpoints every ``every`` steps (and at the last step) and restores the newest one.

    Built by ``erase`` during validation (``prepare``), before any work: it refuses a folder holding
    another run's checkpoints unless ``resume=True``, and a resume whose settings differ from the
    checkpointed run's (naming the setting), because either would silently break exactness.
    """

    def __init__(self, output_dir, every: Optional[int], keep: int, fingerprint: dict, steps: int,
                 candidates: list):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS
        self.every = every
        self.keep = keep
        self.fingerprint = _canonical(fingerprint)
        self.steps = steps
        self.candidates = candidates  # complete checkpoints to resume from, newest first
        self.resumed_from: Optional[int] = None
        self._run = self._method = self._optimizer = None

    # -------------------------------------------------------------- validation phase (no work yet)
    @classmethod
    def prepare(cls, output_dir, *, every: Optional[int], keep: int, resume: bool, fingerprint: dict,
                steps: int) -> "Checkpointer":
        output_dir = Path(output_dir)
        candidates = list_checkpoints(output_dir) if resume else []
        if not resume and has_checkpoints(output_dir):
            raise bad_value("output_dir", "a folder without checkpoints of an earlier run (pass resume=True to "
                            "continue that run, or choose another folder)", str(output_dir))
        if candidates:
            state = _read_manifest(candidates[0])
            saved = state["fingerprint"]
            new = _canonical(fingerprint)
            diff = [k for k in FINGERPRINT_KEYS if saved.get(k) != new.get(k)]
            if diff:
                k = diff[0]
                raise bad_value("resume", f"the settings of the checkpointed run in {str(candidates[0])!r} "
                                f"({k}: {_short(saved.get(k))} there, {_short(new.get(k))} here; differing: "
                                f"{', '.join(diff)})", None)
            if state["step"] > steps:
                raise bad_value("steps", f"at least the checkpoint's step {state['step']} to resume "
                                f"{str(candidates[0])!r}", steps)
            if every is None:
                every = state.get("checkpoint_every")
        elif resume and has_checkpoints(output_dir):
            warnings.warn(f"resume: no complete checkpoint in {str(output_dir / CHECKPOINTS)!r}; starting from step 0",
                          stacklevel=3)
        return cls(output_dir, every, keep, fingerprint, steps, candidates)

    # -------------------------------------------------------------- restore
    def restore(self, run, method, optimizer):
        """Load the newest complete checkpoint into ``run``/``method``/``optimizer``; returns
        ``(start_step, history)`` (``(0, [])`` when there is none)."""
        self._run, self._method, self._optimizer = run, method, optimizer
        self._clean_stale()
        for folder in self.candidates:
            try:
                loaded = _read_checkpoint(folder)
            except CorruptResultError as e:
                warnings.warn(f"resume: skipping unreadable checkpoint ({e})", stacklevel=2)
                continue
            self._apply(folder, loaded)
            self.resumed_from = loaded["state"]["step"]
            return loaded["state"]["step"], loaded["history"]
        return 0, []

    def _apply(self, folder: Path, loaded: dict) -> None:
        named = self._named_trainable()
        weights = loaded["weights"]
        if set(weights) != set(named):
            extra, missing = sorted(set(weights) - set(named)), sorted(set(named) - set(weights))
            raise bad_value("resume", f"a checkpoint of this run's trainable parameters ({folder / WEIGHTS_FILE} "
                            f"lacks {missing[:3]} and has {extra[:3]})", None)
        for name, p in named.items():
            if weights[name].shape != p.shape:
                raise bad_value("resume", f"a checkpoint of this run's trainable parameters ({folder / WEIGHTS_FILE}:"
                                f" {name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)})", None)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(weights[name])
        self._optimizer.load_state_dict(loaded["optimizer"])
        self._method.load_state_dict(loaded["method"])
        _set_rng_state(loaded["rng"])

    # -------------------------------------------------------------- save
    def on_step_end(self, step_done: int, history: list) -> None:
        """``train``'s hook: checkpoint after every ``every``-th step and after the last one (the cap, or the step
        at which the method's stopping rule ended the run)."""
        if self.every is None:
            return
        if step_done % self.every == 0 or step_done == self.steps or (history and history[-1].get("stopped")):
            self.save(step_done, history)

    def save(self, step: int, history: list) -> Path:
        named = self._named_trainable()
        for name, p in named.items():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"checkpoint: parameter {name!r} is non-finite at step {step}; refusing to "
                                     f"write it (the last checkpoint in {str(self.root)!r} is intact)")
        tensors: dict = {}
        trees = {
            "optimizer": flatten(self._optimizer.state_dict(), tensors, "optimizer"),
            "method": flatten(self._method.state_dict(), tensors, "method"),
            "rng": flatten(_get_rng_state(), tensors, "rng"),
            "history": flatten(history, tensors, "history"),
        }
        weights = {n: p.detach().to("cpu").contiguous().clone() for n, p in named.items()}
        final = self.root / f"step-{step:08d}"
        tmp = temp_name(final)
        try:
            from safetensors.torch import save_file

            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "fastunlearn-checkpoint"})
            save_file(tensors, str(tmp / STATE_FILE), metadata={"format": "fastunlearn-checkpoint"})
            state = {
                "format": FORMAT, "step": step, "steps": self.steps, "checkpoint_every": self.every,
                "time": time.time(), "fingerprint": self.fingerprint, **trees,
                "files": {n: (tmp / n).stat().st_size for n in (WEIGHTS_FILE, STATE_FILE)},
            }
            (tmp / STATE_JSON).write_text(json.dumps(state, allow_nan=False) + "\n")
            for n in (WEIGHTS_FILE, STATE_FILE, STATE_JSON):
                _fsync_file(tmp / n)
            _fsync_dir(tmp)
            publish_dir(tmp, final)  # replaces an unreadable leftover of an earlier attempt at this step
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(final, e, "checkpoint") from e
        self._prune()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.output_dir)[self.keep:]:
            _remove_tree(old)

    def _clean_stale(self) -> None:
        """Temporary folders of killed writers (never a complete checkpoint)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".step-") and any(k in p.name for k in (".tmp-", ".del-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    def _named_trainable(self) -> dict:
        """Every trained role's tensors by name (``Roles.named_parameters``): the training loop's and the
        ones a method updates itself (SFD's fake score)."""
        return self._method.roles.named_parameters()


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def _read_checkpoint(folder: Path) -> dict:
    """Everything in a checkpoint, read fully before anything is applied."""
    from safetensors.torch import load_file

    state = _read_manifest(folder)
    if state is None:
        raise CorruptResultError(f"{folder}: incomplete checkpoint")
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:
        raise CorruptResultError(f"{folder / WEIGHTS_FILE}: corrupt or truncated safetensors file ({e})") from e
    try:
        tensors = load_file(str(folder / STATE_FILE))
    except Exception as e:
        raise CorruptResultError(f"{folder / STATE_FILE}: corrupt or truncated safetensors file ({e})") from e
    try:
        return {"state": state, "weights": weights,
                **{k: unflatten(state[k], tensors) for k in ("optimizer", "method", "rng", "history")}}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptResultError(f"{folder / STATE_JSON}: inconsistent checkpoint state ({e!r})") from e


def _get_rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Atomic writes: a file or folder is written under a hidden temporary name next to its destination, then
renamed into place, so that a reader (or a killed writer) never sees half of it.

Temporary names are ``.NAME.tmp-PID[SUFFIX]``: hidden, unique per process, and recognisable by the code that
cleans up after killed writers (``checkpoint``). A suffix keeps the extension that a writer reads the format
from (``savefig`` and PIL pick PNG from ``.png``).

``cache_dir`` is the one place fastunlearn's caches live (the planner's traces, generated data).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch


def cache_dir(name: str) -> Optional[Path]:
    """fastunlearn's cache folder ``name`` (``plans`` for the planner's traces, ``generated`` for the images and
    trajectories methods generate): ``$FASTUNLEARN_CACHE_DIR/name``, by default ``~/.cache/fastunlearn/name``
    (``$XDG_CACHE_HOME`` respected); None, no cache at all, with ``FASTUNLEARN_CACHE_DIR=off`` (or 0, none, empty)."""
    root = os.environ.get("FASTUNLEARN_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "0", "off", "none"):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastunlearn"
    return base / name


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary sibling that ``path`` is written as before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    ``suffix`` is appended to the temporary name for writers that infer the format from it (e.g. ``".png"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: Union[str, bytes]) -> Path:
    """Write ``text`` (str or bytes) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
    return path


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON atomically; tensors become lists, paths strings, anything else its repr."""
    return write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(x):
    """``json.dumps(default=...)`` for reports: tensors as lists, paths as strings, the rest as repr."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``. An existing ``path`` is moved aside first and put back if
    the rename fails, so that ``path`` is always either the old folder or the new one, never a mixture."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)

"""Conditioning as the methods carry it, one operation per function.

A batch's conditioning is one of: ``None`` (unconditional model), a class-id tensor ``[B]``, a text model's
prompt embeddings (a dict of ``[B, ...]`` tensors, nested for SDXL's ``added_cond_kwargs``), or, before
encoding, a list of B prompts. Every function here maps the same row operation over all of these, so that
methods never branch on the model type.
"""
from __future__ import annotations

from typing import Any

import torch


def _unsupported(cond) -> TypeError:
    return TypeError(f"unsupported conditioning {type(cond).__name__}")


def take_cond(cond: Any, idx: torch.Tensor):
    """Rows ``idx`` (a long tensor) of ``cond``."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {k: take_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, list):
        return [cond[int(i)] for i in idx]
    raise _unsupported(cond)


def slice_cond(cond: Any, start: int, stop: int):
    """Rows ``start:stop`` of ``cond``."""
    if cond is None:
        return None
    if isinstance(cond, (torch.Tensor, list)):
        return cond[start:stop]
    if isinstance(cond, dict):
        return {k: slice_cond(v, start, stop) for k, v in cond.items()}
    raise _unsupported(cond)


def cat_cond(*conds):
    """Concatenate conditionings of the same kind along the batch (None when the first is None)."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(conds)
    if isinstance(first, dict):
        return {k: cat_cond(*(c[k] for c in conds)) for k in first}
    if isinstance(first, list):
        return [p for c in conds for p in c]
    raise _unsupported(first)


def where_cond(mask: torch.Tensor, cond_x: Any, cond_a: Any):
    """Row i from ``cond_x`` where ``mask[i]``, else from ``cond_a`` (SISS's mixture picks each row's source)."""
    if cond_x is None:
        return None
    if isinstance(cond_x, torch.Tensor):  # per-row mask over labels [B] or embeddings [B, L, D]
        return torch.where(mask.view(-1, *[1] * (cond_x.ndim - 1)), cond_x, cond_a)
    if isinstance(cond_x, dict):
        return {k: where_cond(mask, cond_x[k], cond_a[k]) for k in cond_x}
    raise _unsupported(cond_x)


def cond_to(cond: Any, device):
    """``cond`` with its tensors on ``device`` (prompt lists and None as they are)."""
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: cond_to(v, device) for k, v in cond.items()}
    return cond


def cond_len(cond: Any) -> int:
    """Number of rows of a (non-None) conditioning."""
    if isinstance(cond, (torch.Tensor, list)):
        return len(cond)
    if isinstance(cond, dict):
        return cond_len(next(iter(cond.values())))
    raise _unsupported(cond)

"""Multi-tensor reduction for gradient surgery (methods.md §2.8 "parameter side", §4.8, §8).

``pair_stats(g1, g2)`` returns (‖g1‖², ‖g2‖², ⟨g1, g2⟩) over two lists of per-parameter tensors in one pass
over both, the inputs of SISS's norm fixing, EraseDiff's adaptive λ and the combined clip factor
(‖g1 − c g2‖² = ‖g1‖² − 2c⟨g1,g2⟩ + c²‖g2‖² needs no further pass). Reference: ``fastunlearn.ops.pair_stats``'s
PyTorch branch (per-tensor fp32 dots summed in fp64).

Multi-tensor apply as in Apex: the tensors' base addresses go into an int64 table, and a chunk table
(tensor index, start offset) splits them into CHUNK-element pieces. One launch per (dtype of g1, dtype of g2)
pair; each program grid-strides over chunks, turns the table entry back into a typed pointer, accumulates the
three sums in fp32 and writes one partial row; the partials are summed in fp64 on the device and read back
with a single sync. The tensors stay referenced until that sync, so the addresses stay valid.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _common as C

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


@triton.jit
def _pair_stats(addr1_ptr, addr2_ptr, numel_ptr, chunk_t_ptr, chunk_s_ptr, part_ptr, n_chunks, n_prog,
                DT1: tl.constexpr, DT2: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc11 = tl.zeros([BLOCK], dtype=tl.float32)
    acc22 = tl.zeros([BLOCK], dtype=tl.float32)
    acc12 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(pid, n_chunks, n_prog):
        t = tl.load(chunk_t_ptr + c)
        start = tl.load(chunk_s_ptr + c)
        n = tl.load(numel_ptr + t)
        p1 = tl.load(addr1_ptr + t).to(tl.pointer_type(DT1), bitcast=True)
        p2 = tl.load(addr2_ptr + t).to(tl.pointer_type(DT2), bitcast=True)
        for off in range(start, tl.minimum(start + CHUNK, n), BLOCK):
            offs = off + tl.arange(0, BLOCK)
            ok = offs < n
            u = tl.load(p1 + offs, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(p2 + offs, mask=ok, other=0.0).to(tl.float32)
            acc11 += u * u
            acc22 += v * v
            acc12 += u * v
    out = part_ptr + pid * 3
    tl.store(out, tl.sum(acc11, 0))
    tl.store(out + 1, tl.sum(acc22, 0))
    tl.store(out + 2, tl.sum(acc12, 0))


def _geometry(device: torch.device):
    """(CHUNK, BLOCK, max programs): one chunk per tensor and a handful of programs under the interpreter."""
    if not C.on_gpu(device):
        return 1 << 20, 4096, 8
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return 1 << 16, 1024, 4 * n_sm


def pair_stats(g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(‖g1‖², ‖g2‖², ⟨g1, g2⟩) as python floats, fp32 accumulation, one launch per dtype pair."""
    g1, g2 = list(g1), list(g2)
    if len(g1) != len(g2):
        raise ValueError(f"pair_stats: {len(g1)} tensors in g1 but {len(g2)} in g2")
    if not g1:
        return 0.0, 0.0, 0.0
    device = g1[0].device
    C.check_launchable(g1[0])
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, (u, v) in enumerate(zip(g1, g2)):
        if u.numel() != v.numel():
            raise ValueError(f"pair_stats: tensor {i} has {u.numel()} elements in g1 but {v.numel()} in g2")
        if u.device != device or v.device != device:
            raise ValueError(f"pair_stats: tensor {i} is on {u.device}/{v.device}, expected {device}")
        if u.dtype not in _TL_DTYPES or v.dtype not in _TL_DTYPES:
            raise TypeError(f"pair_stats: tensor {i} has dtype {u.dtype}/{v.dtype}; floating point expected")
        if u.numel():
            groups.setdefault((u.dtype, v.dtype), []).append((u.detach().contiguous(), v.detach().contiguous()))
    if not groups:
        return 0.0, 0.0, 0.0
    chunk, block, max_prog = _geometry(device)
    partials, alive = [], []
    for (dt1, dt2), pairs in groups.items():
        numel = torch.tensor([u.numel() for u, _ in pairs], dtype=torch.int64)
        counts = (numel + chunk - 1) // chunk
        chunk_t = torch.repeat_interleave(torch.arange(len(pairs), dtype=torch.int64), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        chunk_s = (torch.arange(int(counts.sum()), dtype=torch.int64) - first) * chunk
        addr1 = torch.tensor([u.data_ptr() for u, _ in pairs], dtype=torch.int64)
        addr2 = torch.tensor([v.data_ptr() for _, v in pairs], dtype=torch.int64)
        # one host→device copy for the five tables
        tables = torch.cat([addr1, addr2, numel, chunk_t, chunk_s]).to(device)
        T, n_chunks = len(pairs), chunk_t.numel()
        a1, a2, nl = tables[:T], tables[T:2 * T], tables[2 * T:3 * T]
        ct, cs = tables[3 * T:3 * T + n_chunks], tables[3 * T + n_chunks:]
        n_prog = min(n_chunks, max_prog)
        part = C.empty((n_prog, 3), torch.float32, device)
        _pair_stats[(n_prog,)](a1, a2, nl, ct, cs, part, n_chunks, n_prog, DT1=_TL_DTYPES[dt1],
                               DT2=_TL_DTYPES[dt2], CHUNK=chunk, BLOCK=block)
        C.count("pair_stats")
        partials.append(part)
        alive.append((pairs, tables))
    out = torch.cat(partials).double().sum(0).tolist()  # the one device→host sync; tensors still alive here
    del alive
    return out[0], out[1], out[2]

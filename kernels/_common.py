"""Launch geometry and bookkeeping shared by the fused-loss kernels (methods.md §8).

Every per-sample loss here has the same shape: one row per sample b, a reduction over the row's D elements,
per-row scalars (weights, normalisers), one batch-level sum, and an elementwise backward. The kernels use one
layout for all of them:

* pass 1, grid (B, SPLIT): program (b, j) grid-strides over row b's chunks j, j+SPLIT, … and writes its fp32
  partial sums to ``partials[b, j, :]`` (no atomics, so results are bitwise reproducible, which exact resume
  needs);
* finalize, one program: sums the SPLIT partials of each row, computes the per-row scalars and the loss;
* backward, grid (B, SPLIT): recomputes the targets from the inputs and writes the cotangents.

SPLIT is 1 under ``TRITON_INTERPRET=1`` (each interpreted program costs ~10 ms, so a test launches B
programs) and otherwise fills the GPU: about 4 programs per SM over the batch.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

# Number of kernel launches per kernel name: the tests read it to prove the Triton path really ran.
LAUNCHES: collections.Counter = collections.Counter()

# Tests set this: every output buffer the wrappers allocate starts as NaN, so an element a kernel fails to
# write shows up as a mismatch instead of passing on leftover memory.
POISON = False

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def load_f32(ptr, offs, ok):
    """One block of a row, loaded as stored and widened to fp32: the interpreter has no bf16 arithmetic, and
    every sum is fp32 anyway. Masked-off lanes read 0."""
    return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


def on_gpu(device: torch.device) -> bool:
    """Compiled kernels on a GPU (as opposed to the interpreter, where numpy runs each program)."""
    return device.type == "cuda" and not interpreter_ready()


def count(name: str) -> None:
    LAUNCHES[name] += 1


def empty(shape, dtype, device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype, t.device)


def interpreter_ready() -> bool:
    """True when Triton's interpreter is really in charge: TRITON_INTERPRET=1 was set before ``import triton``.
    triton decorates its own library (``tl.sum``, ``tl.sigmoid``, …) with ``@jit`` at import, so setting the
    variable later leaves those compiled-mode and interpreted kernels fail inside them."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.standard.sigmoid, InterpretedFunction)


def check_launchable(t: torch.Tensor) -> None:
    """A clear error instead of a failure deep inside Triton for a CPU tensor without the interpreter."""
    if t.is_cuda:
        return
    if not interpreter_ready():
        raise RuntimeError(
            f"fastunlearn's Triton kernels need CUDA tensors (got a {t.device.type} tensor). On CPU they run only "
            "under Triton's interpreter, which must be switched on before triton is imported: start the process "
            "with TRITON_INTERPRET=1 (slow, for tests), or use FASTUNLEARN_KERNELS=torch or auto.")


def rows(t: torch.Tensor, B: int) -> torch.Tensor:
    """[B, ...] -> contiguous [B, D] view (a copy only when the input is not contiguous)."""
    return t.reshape(B, -1).contiguous()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {t.dtype}")


def per_row(v, B: int, device) -> torch.Tensor:
    """Per-sample scalars ([B] tensor, or a python number) as a contiguous fp32 [B] tensor."""
    if not torch.is_tensor(v):
        return torch.full((B,), float(v), dtype=torch.float32, device=device)
    v = v.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if v.numel() == 1 and B != 1:
        v = v.expand(B)
    if v.numel() != B:
        raise ValueError(f"per-sample scalars need {B} values, got {v.numel()}")
    return v.contiguous()


def block_size(D: int, device: torch.device) -> int:
    """Elements per program iteration: large blocks under the interpreter (numpy runs each block as one array
    operation), 1024 on GPU (8 elements per thread at 4 warps)."""
    cap = 1024 if on_gpu(device) else 4096
    return max(16, min(cap, triton.next_power_of_2(max(D, 1))))


def split(B: int, D: int, block: int, device: torch.device) -> int:
    """Programs per row for pass 1 and backward: 1 under the interpreter, about 4 per SM over the batch on GPU."""
    if not on_gpu(device):
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(D, block), triton.cdiv(4 * n_sm, B), 1024))


def finalize_blocks(B: int, nsplit: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_S) of the one-program finalize: all SPLIT partials of up to 4096/SPLIT rows per
    iteration, looping over the rows in BLOCK_B groups."""
    block_s = triton.next_power_of_2(nsplit)
    return max(1, min(triton.next_power_of_2(B), 4096 // block_s)), block_s

"""Data-parallel ``erase()`` over several processes: ``accelerate launch -m fastunlearn erase ...``.

``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun --nproc_per_node N``) starts N copies
of the same command with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set; ``erase()`` then joins a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs) and splits the work of every step:

* Every process runs the method's step as written, on the *global* batch: the same per-step generator
  gives every process the same rows, timesteps and noise, so everything outside the network (targets,
  weights, per-row losses, gradient surgery, clipping, the optimizer) is the same computation everywhere.
* Each call of a role network (the student, SFD's fake score and teacher, ESD's sampling) is split by
  rows: process r evaluates rows [r·m, (r+1)·m) of the n rows (m = ⌈n/N⌉, the last slice padded with
  copies of row 0 whose outputs are dropped) and the outputs are all-gathered, so the method sees the
  whole batch. The network's forward and backward, where the time and the activation memory go, are
  divided by N.
* In the backward, each process sends the gradient of its own rows into its slice (``_GatherRows``), and
  a hook on every trainable parameter all-reduces (sums) its gradient the moment the backward produces
  it, before the method sees it. Every ``torch.autograd.grad`` a method takes therefore returns the
  global batch's gradient on every process: SISS's and EraseDiff's gradient surgery, SFD's two
  updates and the non-finite checks act on the same numbers as in one process, and the weights stay
  identical across processes (checked after training).

This equals the single-process run on the same global batch up to floating-point summation order.
Requirements, checked or enforced: every process runs the same command (same data, seed and options);
the weights are broadcast from process 0 once the roles exist (adapters initialised alike), and only
process 0 shows progress and writes the result. Checkpoint/resume is single-process for now (a clear
error). Each process's model lives on its own device: ``cuda:LOCAL_RANK`` for a model ``erase()`` loads
from a folder, as the CLI does.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import bad_value


def world_size() -> int:
    """Processes started by the launcher (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def init(on: Optional[torch.device] = None) -> bool:
    """Join the launcher's process group (once) for models on device ``on`` (NCCL for CUDA, gloo
    otherwise); False when running as a single process."""
    import torch.distributed as dist

    if world_size() < 2:
        return False
    if not dist.is_initialized():
        cuda = (on.type if on is not None else device().type) == "cuda"
        if cuda:
            torch.cuda.set_device(on if on is not None and on.index is not None else device())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


class _GatherRows(torch.autograd.Function):
    """Forward: every process's m rows, gathered into the first n rows. Backward: the gradient of this
    process's own rows only (every process computes the same loss on the gathered tensor, so the
    gradient of the other rows is theirs to send back through their own slice)."""

    @staticmethod
    def forward(ctx, local, n: int, r: int, size: int):
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous())
        ctx.m, ctx.r = local.shape[0], r
        return torch.cat(parts)[:n]

    @staticmethod
    def backward(ctx, grad):
        m, r = ctx.m, ctx.r
        g = grad[r * m:(r + 1) * m]
        if g.shape[0] < m:  # the padded rows of the last slice
            g = torch.cat([g, g.new_zeros(m - g.shape[0], *g.shape[1:])])
        return g, None, None, None


def _take_rows(x, n: int, idx: torch.Tensor):
    """Rows ``idx`` of every tensor (nested in dicts/lists) whose first dimension is the batch ``n``."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)] if x.dim() >= 1 and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: _take_rows(v, n, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take_rows(v, n, idx) for v in x)
    return x


class _RowSplit:
    """Replaces ``module.forward``: this process's rows in, all rows out (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, r: int, size: int):
        self.module, self.r, self.size = module, r, size
        self.own = "forward" in module.__dict__  # an instance attribute already (another wrapper)
        self.inner = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.dim() == 0:
            return self.inner(*args, **kwargs)
        n = sample.shape[0]
        m = -(-n // self.size)
        idx = torch.arange(self.r * m, (self.r + 1) * m)
        idx = torch.where(idx < n, idx, torch.zeros_like(idx))  # pad the last slice with row 0
        out = self.inner(*_take_rows(args, n, idx), **_take_rows(kwargs, n, idx))
        if isinstance(out, tuple):
            return (_GatherRows.apply(out[0], n, self.r, self.size), *out[1:])
        if hasattr(out, "sample"):
            out.sample = _GatherRows.apply(out.sample, n, self.r, self.size)
            return out
        return _GatherRows.apply(out, n, self.r, self.size)

    def remove(self):
        if self.own:
            self.module.forward = self.inner
        else:
            del self.module.__dict__["forward"]  # back to the class's forward


def _all_reduce_sum(g: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    g = g.contiguous().clone()
    dist.all_reduce(g)
    return g


class DataParallel:
    """What ``attach`` installed on a run; ``detach`` removes it and checks the processes agree."""

    def __init__(self, run, method):
        import torch.distributed as dist

        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # Every role runs on run.model (fastunlearn.roles): its adapters, or its copies bound over the weights.
        roles, model = method.roles, run.model
        copies = [t for tensors in roles.copies().values() for t in tensors.values()]
        self.weights = [*model.parameters(), *copies]
        with torch.no_grad():  # same starting weights everywhere (adapters drawn from each process's RNG)
            for t in [*self.weights, *model.buffers()]:
                if isinstance(t, torch.nn.Parameter) and not t.requires_grad and self.rank != 0:
                    # a frozen LoRA base may be the caller's own tensor (lora.shared_base_copy): received into a
                    # new one, taken only where process 0's differs, so the caller's model is never written
                    got = t.data.clone()
                    dist.broadcast(got, src=0)
                    if not torch.equal(got, t.data):
                        t.data = got
                else:
                    dist.broadcast(t.data, src=0)
        self.splits = [_RowSplit(model, self.rank, self.size)]
        self.hooks = [p.register_hook(_all_reduce_sum) for p in roles.parameters()]

    def agree(self, flag: bool) -> bool:
        """Process 0's value of ``flag`` on every process (a method's stopping decision: the same rule on losses
        that may differ across processes in the last bit must end every process at the same step)."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.weights[0].device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def detach(self) -> float:
        """Remove the row split and the hooks; returns the largest weight difference to process 0 (0.0
        when the processes stayed in sync, as they must)."""
        import torch.distributed as dist

        for s in self.splits:
            s.remove()
        for h in self.hooks:
            h.remove()
        worst = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for p in self.weights:
                ref = p.detach().clone()
                dist.broadcast(ref, src=0)
                worst = torch.maximum(worst, (ref.double() - p.detach().double()).abs().max().cpu())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)


def check_args(checkpoint_every=None, resume=False) -> None:
    """Refuse what multi-process runs do not support yet, before any work."""
    if world_size() < 2:
        return
    if checkpoint_every is not None or resume:
        raise bad_value("checkpoint_every" if checkpoint_every is not None else "resume",
                        f"None/False when running as {world_size()} processes (checkpoints are single-process "
                        "for now)", checkpoint_every if checkpoint_every is not None else resume)


def attach(run, method) -> Optional[DataParallel]:
    """Split the calls of ``run.model`` in every role of ``method`` across the launched processes (None for a
    single process)."""
    if world_size() < 2 or not init(run.device):
        return None
    return DataParallel(run, method)

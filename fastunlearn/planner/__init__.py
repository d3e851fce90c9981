"""Memory planner: will this unlearning run fit on this GPU? Answered before any weight is loaded.

``fu.plan(model="sdxl", method="esd", resolution=1024, vram=24)`` (CLI: ``fastunlearn plan``) runs one
training step of the registered method on a fake run: the UNet built from its config under
``torch._subclasses.FakeTensorMode`` (shapes and dtypes, no storage), the real ``Run``, the method's own
``setup()`` and ``step()``, the runtime switches and the optimizer step of ``erase()`` (``fakerun``). A
TorchDispatchMode follows every storage from allocation to release and records the peak and what was live
at that moment (``livebytes``). The parts of a plan:

* weights: the frozen base, in the run's precision (one copy: with LoRA the teacher is the base with
  adapters off), whatever else the method's set-up keeps (ESD's frozen subset, SFD's role copies without
  LoRA), plus the pipeline's resident text encoders and VAE;
* trainable weights (fp32), gradients, optimizer state (of every optimizer of the run);
* activations: saved tensors and transients of the step's forward and backward passes;
* workspace: what a trace cannot see, an estimate (``search``).

Not counted: the model object passed to ``erase()``, which trains a copy on the input's device and never
modifies the input (an input UNet already on the GPU adds one more copy of the weights there).

Modules: ``specs`` (model configs, the fake UNet), ``livebytes`` (the byte-counting dispatch modes and the CUDA
policies), ``fakerun`` (the fake run and its traced step), ``search`` (``plan()``, ``--auto``, the trace
cache), ``cli`` (``fastunlearn plan``).

Checked against real peaks measured on CPU for small configs (``tests/test_planner.py``): the same trace on
real tensors equals the fake one byte for byte, and ``erase()``'s own training steps measured with the
same counter agree with the plan. On CUDA the check is against ``torch.cuda.max_memory_allocated`` (a
gpu-marked test, ``benchmarks/gpu_check.py``).
"""
from .fakerun import run_defaults, trace, trace_batches
from .search import GiB, PARTS, Plan, cached_trace_batches, plan
from .specs import build_unet, load_spec
from .livebytes import TRACE_ROWS, BatchLines, LiveBytes

__all__ = ["plan", "Plan", "load_spec", "build_unet", "trace", "trace_batches", "cached_trace_batches",
           "run_defaults", "LiveBytes", "BatchLines", "TRACE_ROWS", "PARTS", "GiB"]

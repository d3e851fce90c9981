"""What the kernel tests share (as Liger-Kernel's test utilities): where the kernels run, tolerances per
dtype, and the comparison that also fails on an element the kernel never wrote (outputs start as NaN when
``_common.POISON`` is set, which the tests' ``poison_kernels`` fixture does)."""
from __future__ import annotations

import torch

from fastunlearn.kernels import _common as C

SKIP_REASON = ("Triton kernels need CUDA or TRITON_INTERPRET=1 before triton is imported; "
               "tests/test_kernels_interpreter.py reruns this file that way")
# Relative tolerance of a gradient written in the input dtype (half an ulp is 2^-12 in fp16, 2^-9 in bf16);
# losses and weights are fp32 whatever the input dtype.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
VALUE_RTOL = 2e-5


def kernels_can_run() -> bool:
    """Triton kernels launch here: on CUDA, or on CPU under the interpreter."""
    return C.interpreter_ready() or torch.cuda.is_available()


def device() -> str:
    return "cpu" if C.interpreter_ready() else "cuda"


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """|got − ref| ≤ rtol·(|ref| + max|ref|) in float64: relative per element, with a floor for elements near
    0; any non-finite element (an unwritten, poisoned one) fails."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite (unwritten?) output"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-30)

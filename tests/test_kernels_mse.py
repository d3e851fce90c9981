"""Fused target + MEAN-convention MSE (kernels/mse.py, methods.md §4.8, §6.5) for ESD and EraseDiff, against
the float64 formula and the references ``losses.esd_loss`` / ``losses.mse_loss``: the loss, the cotangent of
the prediction, of a plain target, and of per-row weights, over shapes and dtypes. Output buffers start as NaN.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); a plain
``pytest tests`` run gets there through tests/test_kernels_interpreter.py."""
import pytest
import torch

from fastunlearn import losses
from fastunlearn.kernels import _common as C
from helpers import kernels as T
from fastunlearn.kernels import mse as K

pytestmark = [pytest.mark.skipif(not T.kernels_can_run(), reason=T.SKIP_REASON),
              pytest.mark.usefixtures("poison_kernels")]
DEVICE = T.device()
GRAD_RTOL, VALUE_RTOL = T.GRAD_RTOL, T.VALUE_RTOL


close = T.assert_close


def _randn(B, shape, dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *shape, generator=g).to(dtype) for _ in range(n)]


def _weights(B, seed=0):
    return 0.1 + torch.rand(B, generator=torch.Generator().manual_seed(seed + 100))


def esd64(pred, e_from, e_c, e_null, eta, w=None):
    """§6.1 in float64: Σ_b w_b mean_d (ε̂ − (ε_from − η(ε_c − ε_null)))² / B."""
    target = (e_from.double() - eta * (e_c.double() - e_null.double())).detach()
    per = (pred - target).pow(2).flatten(1).mean(1)
    return (per if w is None else per * w).sum() / pred.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_esd_loss_matches_float64(dtype, weighted):
    pred, e_from, e_c, e_null = _randn(4, (4, 8, 8), dtype, 4)
    w = _weights(4) if weighted else None
    p_k = pred.to(DEVICE, copy=True).requires_grad_()
    w_k = w.to(DEVICE, copy=True).requires_grad_() if weighted else None
    got = K.esd_loss(p_k, e_from.to(DEVICE), e_c.to(DEVICE), e_null.to(DEVICE), 1.5, w_k)
    grads = torch.autograd.grad(got, [p_k] + ([w_k] if weighted else []))
    p_r = pred.double().requires_grad_()
    w_r = w.double().requires_grad_() if weighted else None
    ref = esd64(p_r, e_from, e_c, e_null, 1.5, w_r)
    ref_grads = torch.autograd.grad(ref, [p_r] + ([w_r] if weighted else []))
    assert got.dtype == torch.float32 and got.ndim == 0
    close(got, ref, VALUE_RTOL)
    close(got, losses.esd_loss(pred, e_from, e_c, e_null, 1.5, w), VALUE_RTOL)
    assert grads[0].dtype == dtype
    close(grads[0], ref_grads[0], GRAD_RTOL[dtype])
    if weighted:
        close(grads[1], ref_grads[1], VALUE_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mse_loss_with_target_and_weight_gradients(dtype):
    """EraseDiff passes a detached target, but the reference differentiates through one that is not, and so
    does the kernel (∂/∂target = −∂/∂ε̂)."""
    pred, target = _randn(3, (3, 5, 7), dtype, 2, seed=1)
    w = _weights(3, seed=1)
    ins = [pred.to(DEVICE, copy=True).requires_grad_(), target.to(DEVICE, copy=True).requires_grad_(), w.to(DEVICE, copy=True).requires_grad_()]
    got = K.mse_loss(*ins)
    grads = torch.autograd.grad(got, ins)
    ref_ins = [t.double().requires_grad_() for t in (pred, target, w)]
    ref = losses.mse_loss(*ref_ins)  # casts to fp32 internally; its autograd graph still checks the formula
    ref_grads = torch.autograd.grad(ref, ref_ins)
    close(got, ref, VALUE_RTOL)
    for gk, gr, dt in zip(grads, ref_grads, (dtype, dtype, torch.float32)):
        assert gk.dtype == dt
        close(gk, gr, GRAD_RTOL[dt])


@pytest.mark.parametrize("B,shape", [(1, (1, 8, 8)), (5, (17,)), (3, (3, 5, 7)), (2, (4, 64, 64))])
def test_shapes(B, shape):
    pred, e_from, e_c, e_null = _randn(B, shape, torch.float32, 4, seed=B)
    p_k = pred.to(DEVICE, copy=True).requires_grad_()
    got = K.esd_loss(p_k, e_from.to(DEVICE), e_c.to(DEVICE), e_null.to(DEVICE), 1.0)
    (g_k,) = torch.autograd.grad(got, p_k)
    p_r = pred.double().requires_grad_()
    ref = esd64(p_r, e_from, e_c, e_null, 1.0)
    (g_r,) = torch.autograd.grad(ref, p_r)
    close(got, ref, VALUE_RTOL)
    close(g_k, g_r, GRAD_RTOL[torch.float32])
    p_k = pred.to(DEVICE, copy=True).requires_grad_()
    got = K.mse_loss(p_k, e_from.to(DEVICE))
    (g_k,) = torch.autograd.grad(got, p_k)
    p_r = pred.double().requires_grad_()
    ref = (p_r - e_from.double()).pow(2).mean()
    (g_r,) = torch.autograd.grad(ref, p_r)
    close(got, ref, VALUE_RTOL)
    close(g_k, g_r, GRAD_RTOL[torch.float32])


@pytest.fixture
def gpu_geometry(monkeypatch):
    """A GPU's launch geometry on a small scale (under the interpreter SPLIT is otherwise 1): 3 programs per
    row, 16-element blocks, the finalize looping over rows 2 at a time."""
    monkeypatch.setattr(C, "split", lambda B, D, block, device: 3)
    monkeypatch.setattr(C, "block_size", lambda D, device: 16)
    monkeypatch.setattr(C, "finalize_blocks", lambda B, nsplit: (2, 4))


@pytest.mark.parametrize("B,shape", [(5, (17,)), (3, (5, 7, 29))])
def test_split_rows_as_on_gpu(gpu_geometry, B, shape):
    pred, e_from, e_c, e_null = _randn(B, shape, torch.float32, 4, seed=B)
    w = _weights(B, seed=B)
    p_k, w_k = pred.to(DEVICE, copy=True).requires_grad_(), w.to(DEVICE, copy=True).requires_grad_()
    got = K.esd_loss(p_k, e_from.to(DEVICE), e_c.to(DEVICE), e_null.to(DEVICE), 2.0, w_k)
    grads = torch.autograd.grad(got, [p_k, w_k])
    p_r, w_r = pred.double().requires_grad_(), w.double().requires_grad_()
    ref = esd64(p_r, e_from, e_c, e_null, 2.0, w_r)
    ref_grads = torch.autograd.grad(ref, [p_r, w_r])
    close(got, ref, VALUE_RTOL)
    close(grads[0], ref_grads[0], GRAD_RTOL[torch.float32])
    close(grads[1], ref_grads[1], VALUE_RTOL)


def test_rejects_bad_inputs():
    pred, target = _randn(2, (4, 4), torch.float32, 2)
    with pytest.raises(ValueError, match="target has shape"):
        K.mse_loss(pred.to(DEVICE), target[:, :3].to(DEVICE))
    with pytest.raises(ValueError, match="weights"):
        K.mse_loss(pred.to(DEVICE), target.to(DEVICE), torch.ones(3, device=DEVICE))

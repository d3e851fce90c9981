"""Fused SISS kernel (kernels/siss.py, methods.md §2.8) against the float64 official formula and the fp32
reference ``losses.siss_loss``: both losses, both weights, and the cotangent of ℓ_x, of ℓ_a and of a linear
combination, over shapes (B=1, odd D, D=16384), λ ∈ {0, 0.3, 1} and fp32/fp16/bf16 inputs. Every output
buffer starts as NaN, so an element the kernel does not write fails.

Runs on CUDA, or on CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before triton was imported;
a plain ``pytest tests`` run gets there through tests/test_kernels_interpreter.py, which reruns this file in
such a subprocess."""
import pytest
import torch

from fastunlearn import losses
from fastunlearn.kernels import _common as C
from helpers import kernels as T
from fastunlearn.kernels import siss as K
from fastunlearn.models import digits_scheduler

pytestmark = [pytest.mark.skipif(not T.kernels_can_run(), reason=T.SKIP_REASON),
              pytest.mark.usefixtures("poison_kernels")]
DEVICE = T.device()
GRAD_RTOL, VALUE_RTOL = T.GRAD_RTOL, T.VALUE_RTOL


def _dev(*ts):
    return tuple(t.to(DEVICE) for t in ts)


def kernel(pred, x, a, noise, mask, gamma, sigma, lambd):
    """The kernel on DEVICE copies; outputs come back to the CPU for comparison."""
    return tuple(t.cpu() for t in K.siss_loss(*_dev(pred, x, a, noise, mask, gamma, sigma), lambd))


close = T.assert_close


def _inputs(B, shape, dtype, t_lo, seed=0, pred_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x, a, noise, pred = (torch.randn(B, *shape, generator=g) for _ in range(4))
    mask = torch.rand(B, generator=g) > 0.5
    mask[0] = True
    if B > 1:
        mask[1] = False  # both components present
    t = torch.randint(t_lo, 1000, (B,), generator=g)
    ac = digits_scheduler().alphas_cumprod[t]
    return (pred.to(pred_dtype or dtype), x.to(dtype), a.to(dtype), noise.to(dtype), mask, ac.sqrt(),
            (1 - ac).sqrt())


def _check(B, shape, dtype, lambd, t_lo=600, pred_dtype=None, seed=0):
    pred, x, a, noise, mask, gamma, sigma = _inputs(B, shape, dtype, t_lo, seed, pred_dtype)
    ref = losses.siss_loss_float64_direct(pred, x, a, noise, mask, gamma, sigma, lambd)
    got = kernel(pred, x, a, noise, mask, gamma, sigma, lambd)
    for name, gv, rv in zip(("loss_x", "loss_a", "w_x", "w_a"), got, ref):
        assert gv.dtype == torch.float32, name
        close(gv, rv, VALUE_RTOL)
    # the spread of the weights shows the test is not in the trivial w ≡ 1 regime
    coefs = [(1.0, 0.0), (0.0, 1.0), (1.0, -0.37)]
    for cx, ca in coefs:
        p_k = pred.to(DEVICE, copy=True).requires_grad_()
        lx, la, _, _ = K.siss_loss(p_k, *_dev(x, a, noise, mask, gamma, sigma), lambd)
        (g_k,) = torch.autograd.grad(cx * lx + ca * la, p_k)
        g_k = g_k.cpu()
        p_r = pred.double().requires_grad_()
        rx, ra, _, _ = losses.siss_loss_float64_direct(p_r, x, a, noise, mask, gamma, sigma, lambd)
        (g_r,) = torch.autograd.grad(cx * rx + ca * ra, p_r)
        assert g_k.dtype == pred.dtype and g_k.shape == pred.shape
        close(g_k, g_r, GRAD_RTOL[pred.dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0])
def test_values_and_cotangents_match_float64(dtype, lambd):
    _check(4, (1, 8, 8), dtype, lambd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0])
def test_kernel_matches_the_fp32_reference_tightly(dtype, lambd):
    """Against the oracle the methods run on CPU (``losses.siss_loss``, fp32 whatever the input dtype): the
    losses and weights to fp32 accuracy in every input dtype, and the gradient to the rounding of the output
    dtype only (before the reference computed in fp32, bf16 inputs put it 4e-5 / 2e-3 away)."""
    pred, x, a, noise, mask, gamma, sigma = _inputs(4, (1, 8, 8), dtype, 600, seed=3)
    ref = losses.siss_loss(pred, x, a, noise, mask, gamma, sigma, lambd)
    got = kernel(pred, x, a, noise, mask, gamma, sigma, lambd)
    for gv, rv in zip(got, ref):
        close(gv, rv, VALUE_RTOL)
    p_k = pred.to(DEVICE, copy=True).requires_grad_()
    lx, la, _, _ = K.siss_loss(p_k, *_dev(x, a, noise, mask, gamma, sigma), lambd)
    (g_k,) = torch.autograd.grad(lx - 0.37 * la, p_k)
    p_r = pred.float().requires_grad_()  # the reference's fp32 cotangent, rounded once like the kernel's
    rx, ra, _, _ = losses.siss_loss(p_r, x, a, noise, mask, gamma, sigma, lambd)
    (g_r,) = torch.autograd.grad(rx - 0.37 * ra, p_r)
    close(g_k.cpu(), g_r.to(dtype), GRAD_RTOL[dtype])


@pytest.mark.parametrize("B,shape", [(1, (1, 8, 8)), (3, (3, 5, 7)), (5, (17,)), (2, (4, 13, 9))])
def test_odd_shapes_and_single_sample(B, shape):
    got = _check(B, shape, torch.float32, 0.5)
    if B > 1:
        assert got[2].max() - got[2].min() > 1e-3, "weights all equal: inputs too easy"


@pytest.fixture
def gpu_geometry(monkeypatch):
    """The launch geometry of a GPU on a small scale: 3 programs per row (pass 1 and backward), 16-element
    blocks and the finalize looping over rows 2 at a time. Under the interpreter SPLIT is otherwise 1, so
    these are the only tests of the partial-sum layout the GPU runs."""
    monkeypatch.setattr(C, "split", lambda B, D, block, device: 3)
    monkeypatch.setattr(C, "block_size", lambda D, device: 16)
    monkeypatch.setattr(C, "finalize_blocks", lambda B, nsplit: (2, 4))


@pytest.mark.parametrize("B,shape", [(5, (17,)), (3, (5, 7, 29))])
def test_split_rows_as_on_gpu(gpu_geometry, B, shape):
    """D = 17: two blocks for three programs (one writes an empty partial); D = 1015: each program strides
    over 21 blocks. B = 5 and 3 leave the finalize's last row group partly masked."""
    before = C.LAUNCHES["siss_partials"]
    _check(B, shape, torch.float32, 0.3, seed=B)
    assert C.LAUNCHES["siss_partials"] > before


def test_large_row_runs_several_blocks():
    """D = 16384 (one 64x64x4 latent) is four 4096-element blocks per row; at t ≥ 990 Δ stays O(1)."""
    _check(2, (4, 64, 64), torch.float32, 0.5, t_lo=990)


def test_bf16_prediction_with_fp32_latents():
    """The SD setting: the network output in bf16, the clean latents and noise in fp32."""
    _check(3, (4, 8, 8), torch.float32, 0.5, pred_dtype=torch.bfloat16)


def test_saturated_weights_stay_finite_and_match_fp32_reference():
    """At small t, Δ is in the thousands: the weights are 0 or 1/(1−λ), 1/λ, and λ ∈ {0,1} clamp at e^±80."""
    pred, x, a, noise, mask, _, _ = _inputs(4, (1, 8, 8), torch.float32, 0)
    t = torch.tensor([0, 5, 50, 100])
    ac = digits_scheduler().alphas_cumprod[t]
    gamma, sigma = ac.sqrt(), (1 - ac).sqrt()
    for lambd in (0.0, 0.5, 1.0):
        ref = losses.siss_loss(pred, x, a, noise, mask, gamma, sigma, lambd)
        p = pred.to(DEVICE, copy=True).requires_grad_()
        got = K.siss_loss(p, *_dev(x, a, noise, mask, gamma, sigma), lambd)
        (g,) = torch.autograd.grad(got[0] - got[1], p)
        got = tuple(v.detach().cpu() for v in got)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=0)
        assert torch.isfinite(g).all() and all(torch.isfinite(v).all() for v in got)
        if lambd == 0.5:
            assert set(got[2].tolist()) <= {0.0, 2.0} and set(got[3].tolist()) <= {0.0, 2.0}
        else:
            # e^80 as the GPU's exp computes it may be an ulp above torch's
            assert got[3 if lambd == 0.0 else 2].max() <= torch.exp(torch.tensor(80.0)) * (1 + 1e-6)
        # both use the cancellation-free closed forms in fp32, so they agree to fp32 accuracy even at σ ≈ 0.01
        close(got[0], ref[0], VALUE_RTOL)
        close(got[1], ref[1], VALUE_RTOL)


def test_non_contiguous_inputs():
    pred, x, a, noise, mask, gamma, sigma = _inputs(3, (5, 6), torch.float32, 600)
    pred_t = pred.to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided layout
    assert not pred_t.is_contiguous()
    got = kernel(pred_t, x, a, noise, mask, gamma, sigma, 0.5)
    ref = losses.siss_loss_float64_direct(pred, x, a, noise, mask, gamma, sigma, 0.5)
    close(got[0], ref[0], VALUE_RTOL)
    close(got[1], ref[1], VALUE_RTOL)


def test_rejects_mismatched_shapes():
    pred, x, a, noise, mask, gamma, sigma = _inputs(2, (4, 4), torch.float32, 600)
    with pytest.raises(ValueError, match="a has shape"):
        K.siss_loss(*_dev(pred, x, a[:, :3], noise, mask, gamma, sigma), 0.5)
    with pytest.raises(ValueError, match="mask"):
        K.siss_loss(*_dev(pred, x, a, noise, mask[:1], gamma, sigma), 0.5)

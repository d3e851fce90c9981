"""Fused SiD/SFD generator loss (kernels/sfd.py, methods.md §5.6, §5.9) against ``losses.sid_generator_loss``
evaluated in float64: the loss and the cotangents of ε_ψ, ε_φ and e, over shapes, dtypes, α and coef; rows
with NaN or inf dropped (zero cotangent, B unchanged); ω clamped at 1e-5. Every output buffer starts as NaN.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); a plain
``pytest tests`` run gets there through tests/test_kernels_interpreter.py."""
import pytest
import torch

from fastunlearn import losses
from fastunlearn.kernels import _common as C
from helpers import kernels as T
from fastunlearn.kernels import sfd as K

pytestmark = [pytest.mark.skipif(not T.kernels_can_run(), reason=T.SKIP_REASON),
              pytest.mark.usefixtures("poison_kernels")]
DEVICE = T.device()
GRAD_RTOL, VALUE_RTOL = T.GRAD_RTOL, T.VALUE_RTOL


close = T.assert_close


def _inputs(B, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, *shape, generator=g)
    psi = phi + 0.3 * torch.randn(B, *shape, generator=g)
    e = torch.randn(B, *shape, generator=g)
    s_t = 0.05 + 10 * torch.rand(B, generator=g)  # σ/γ spans 0.05 … 10 on a DDPM schedule
    return phi.to(dtype), psi.to(dtype), e.to(dtype), s_t


def _both(phi, psi, e, s_t, alpha, coef, need=(True, True, True)):
    """(kernel loss, its grads) and (float64 reference loss, its grads) on the same inputs."""
    ins = [t.to(DEVICE, copy=True).requires_grad_(n) for t, n in zip((phi, psi, e), need)]
    got = K.sid_generator_loss(*ins, s_t.to(DEVICE), alpha, coef)
    got_g = torch.autograd.grad(got, [t for t in ins if t.requires_grad])
    ref_ins = [t.double().requires_grad_(n) for t, n in zip((phi, psi, e), need)]
    ref = losses.sid_generator_loss(*ref_ins, s_t.double(), alpha, coef)
    ref_g = torch.autograd.grad(ref, [t for t in ref_ins if t.requires_grad])
    return got, got_g, ref, ref_g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha,coef", [(1.2, 1.0), (1.0, 0.01), (0.5, 3.0)])
def test_loss_and_cotangents_match_float64(dtype, alpha, coef):
    phi, psi, e, s_t = _inputs(4, (3, 8, 8), dtype)
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, alpha, coef)
    assert got.dtype == torch.float32 and got.ndim == 0
    close(got, ref, VALUE_RTOL)
    for name, gk, gr in zip(("eps_phi", "eps_psi", "e"), got_g, ref_g):
        assert gk.dtype == dtype, name
        close(gk, gr, GRAD_RTOL[dtype])


@pytest.mark.parametrize("B,shape", [(1, (1, 8, 8)), (3, (17,)), (5, (3, 5, 7)), (2, (4, 64, 64))])
def test_shapes(B, shape):
    phi, psi, e, s_t = _inputs(B, shape, torch.float32, seed=B)
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, 1.2, 1.0)
    close(got, ref, VALUE_RTOL)
    for gk, gr in zip(got_g, ref_g):
        close(gk, gr, GRAD_RTOL[torch.float32])


@pytest.fixture
def gpu_geometry(monkeypatch):
    """A GPU's launch geometry on a small scale (under the interpreter SPLIT is otherwise 1): 3 programs per
    row, 16-element blocks, the finalize looping over rows 2 at a time."""
    monkeypatch.setattr(C, "split", lambda B, D, block, device: 3)
    monkeypatch.setattr(C, "block_size", lambda D, device: 16)
    monkeypatch.setattr(C, "finalize_blocks", lambda B, nsplit: (2, 4))


@pytest.mark.parametrize("B,shape", [(5, (17,)), (3, (5, 7, 29))])
def test_split_rows_as_on_gpu(gpu_geometry, B, shape):
    phi, psi, e, s_t = _inputs(B, shape, torch.float32, seed=B)
    phi[1, 3] = float("nan")  # a dropped row inside a split row
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, 1.2, 0.5)
    close(got, ref, VALUE_RTOL)
    for gk, gr in zip(got_g, ref_g):
        assert gk[1].abs().max() == 0
        close(gk, gr, GRAD_RTOL[torch.float32])


def test_only_the_requested_cotangents():
    """The generator step needs ε_ψ and ε_φ; e is noise and gets no gradient."""
    phi, psi, e, s_t = _inputs(3, (2, 5, 5), torch.float32)
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, 1.2, 1.0, need=(True, True, False))
    assert len(got_g) == 2
    for gk, gr in zip(got_g, ref_g):
        close(gk, gr, GRAD_RTOL[torch.float32])


@pytest.mark.parametrize("bad", ["nan_psi", "inf_phi", "nan_e_one_element"])
def test_non_finite_rows_are_dropped(bad):
    phi, psi, e, s_t = _inputs(4, (3, 6, 6), torch.float32, seed=3)
    if bad == "nan_psi":
        psi[1] = float("nan")
    elif bad == "inf_phi":
        phi[1, 0, 2, 2] = float("inf")
    else:
        e[1, 2, 5, 0] = float("nan")
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, 1.2, 1.0)
    keep = torch.tensor([0, 2, 3])
    sub = losses.sid_generator_loss(phi[keep].double(), psi[keep].double(), e[keep].double(), s_t[keep].double(),
                                    1.2) * 3 / 4  # the dropped row adds 0 and B stays 4
    close(got, sub, VALUE_RTOL)
    close(got, ref, VALUE_RTOL)
    for gk, gr in zip(got_g, ref_g):
        assert torch.isfinite(gk).all()
        assert gk[1].abs().max() == 0
        close(gk, gr, GRAD_RTOL[torch.float32])


def test_omega_is_clamped():
    """A row where the teacher predicts the noise exactly has r = 0: ω = max(0, 1e-5), loss and cotangents
    stay finite (u·(−αu)·s²/1e-5 and C(−2αu))."""
    phi, psi, e, s_t = _inputs(3, (2, 4, 4), torch.float32, seed=4)
    e[0] = phi[0]
    got, got_g, ref, ref_g = _both(phi, psi, e, s_t, 1.2, 1.0)
    assert torch.isfinite(got)
    close(got, ref, VALUE_RTOL)
    for gk, gr in zip(got_g, ref_g):
        close(gk, gr, GRAD_RTOL[torch.float32])


def test_rejects_mismatched_shapes():
    phi, psi, e, s_t = _inputs(2, (4, 4), torch.float32)
    with pytest.raises(ValueError, match="eps_psi has shape"):
        K.sid_generator_loss(phi.to(DEVICE), psi[:, :3].to(DEVICE), e.to(DEVICE), s_t.to(DEVICE), 1.2)

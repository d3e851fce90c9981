"""The fused losses, each timed forward + the cotangents a method's step needs, side by side:

* ``eager``: the PyTorch reference in ``fastunlearn.losses`` (what every method runs on CPU);
* ``compile``: ``torch.compile`` of that same reference (Inductor fuses its elementwise/reduction chain);
* ``triton``: the hand-written kernels in ``fastunlearn.kernels`` (CUDA only: on CPU they run only under the
  interpreter, whose speed means nothing).

The references are imported from the library, not re-written here, so the benchmark and the kernel tests
measure and check the same formula. Losses: SISS (§2.8: ℓ_x, ℓ_a and two separate cotangents, as the step takes
two VJPs), the SFD generator loss (§5.6: cotangents of ε_φ and ε_ψ), the ESD/EraseDiff target + MSE (§6.5:
cotangent of ε̂) and the gradient-surgery reduction ``pair_stats`` (§2.8 parameter side). Two sizes: ``digits``,
the batch of the bundled 8x8 model's step benchmarks (B = 64, D = 64), so the loss can be set against a whole
step (benchmarks/test_bench_siss.py, test_bench_steps.py), and ``latent``, one SD-512 latent batch (B = 4,
D = 4·64·64 = 16384). pair_stats runs over the bundled model's own parameter list and over 8.4 M parameters.

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_kernels.py -p no:cacheprovider --benchmark-only -m "not gpu"
    pytest benchmarks/test_bench_kernels.py --benchmark-only -m "compile and not gpu"      # minutes to compile
    pytest benchmarks/test_bench_kernels.py --benchmark-only -m gpu                        # on a CUDA machine

Under ``--benchmark-disable`` (the default test run) each eager case runs once as a test.
"""
import math

import pytest
import torch

from fastunlearn import losses
from fastunlearn.models import build_digits_unet, digits_scheduler

SIZES = {"digits": (64, (1, 8, 8)), "latent": (4, (4, 64, 64))}
LAMBD, ALPHA, ETA = 0.5, 1.2, 1.0

IMPLS = [
    pytest.param("eager", "cpu", id="eager-cpu"),
    pytest.param("compile", "cpu", id="compile-cpu", marks=pytest.mark.compile),
    pytest.param("eager", "cuda", id="eager-cuda", marks=pytest.mark.gpu),
    pytest.param("compile", "cuda", id="compile-cuda", marks=[pytest.mark.gpu, pytest.mark.compile]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
]


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _fn(impl, name):
    """The loss function of ``impl``: the reference, its compiled version, or the fused kernel."""
    if impl == "triton":
        from fastunlearn.kernels import mse, sfd, siss, surgery
        return {"siss": siss.siss_loss, "sfd": sfd.sid_generator_loss, "esd": mse.esd_loss,
                "pair_stats": surgery.pair_stats}[name]
    ref = {"siss": losses.siss_loss, "sfd": losses.sid_generator_loss, "esd": losses.esd_loss,
           "pair_stats": losses.pair_stats}[name]
    # dynamic=False: one static graph per size, as a training loop with a fixed batch gets. (With the
    # automatic dynamic-shape recompile at the second size, torch 2.13 returned all-zero SISS cotangents
    # from the two retain_graph VJPs; the equality check below caught it.)
    return torch.compile(ref, dynamic=False) if impl == "compile" else ref


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ per-loss callables
def _siss_case(fn, B, shape, device):
    g = _gen()
    pred, x, a, noise = (torch.randn(B, *shape, generator=g).to(device) for _ in range(4))
    mask = (torch.rand(B, generator=g) > LAMBD).to(device)
    ac = digits_scheduler().alphas_cumprod[torch.randint(0, 1000, (B,), generator=g)]
    gamma, sigma = ac.sqrt().to(device), (1 - ac).sqrt().to(device)
    pred.requires_grad_()

    def step():
        lx, la, _, _ = fn(pred, x, a, noise, mask, gamma, sigma, LAMBD)
        gx = torch.autograd.grad(lx, pred, retain_graph=True)[0]  # two cotangents: the step's two VJPs
        ga = torch.autograd.grad(la, pred)[0]
        return lx.detach(), gx, ga
    return step


def _sfd_case(fn, B, shape, device):
    g = _gen(1)
    phi = torch.randn(B, *shape, generator=g)
    psi = phi + 0.3 * torch.randn(B, *shape, generator=g)
    e = torch.randn(B, *shape, generator=g)
    s_t = (0.05 + 10 * torch.rand(B, generator=g)).to(device)
    phi, psi, e = phi.to(device).requires_grad_(), psi.to(device).requires_grad_(), e.to(device)

    def step():
        loss = fn(phi, psi, e, s_t, ALPHA)
        return (loss.detach(), *torch.autograd.grad(loss, (phi, psi)))
    return step


def _esd_case(fn, B, shape, device):
    g = _gen(2)
    pred, e_from, e_c, e_null = (torch.randn(B, *shape, generator=g).to(device) for _ in range(4))
    pred.requires_grad_()

    def step():
        loss = fn(pred, e_from, e_c, e_null, ETA)
        return loss.detach(), torch.autograd.grad(loss, pred)[0]
    return step


def _param_shapes(size):
    if size == "digits":
        return [tuple(p.shape) for p in build_digits_unet().parameters()]
    return [(1 << 17,)] * 64  # 8.4 M parameters in 64 tensors


def _pair_stats_case(fn, size, device):
    g = _gen(3)
    g1 = [torch.randn(s, generator=g).to(device) for s in _param_shapes(size)]
    g2 = [torch.randn(s, generator=g).to(device) for s in _param_shapes(size)]
    return lambda: fn(g1, g2)


def _case(name, impl, size, device):
    fn = _fn(impl, name)
    if name == "pair_stats":
        return _pair_stats_case(fn, size, device)
    B, shape = SIZES[size]
    return {"siss": _siss_case, "sfd": _sfd_case, "esd": _esd_case}[name](fn, B, shape, device)


def _finite(out):
    vals = out if isinstance(out, (tuple, list)) else (out,)
    return all(math.isfinite(v) if isinstance(v, float) else bool(torch.isfinite(v).all()) for v in vals)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", ["siss", "sfd", "esd", "pair_stats"])
@pytest.mark.parametrize("impl,device", IMPLS)
def test_loss(benchmark, name, size, impl, device):
    _skip_without(device)
    # SISS takes two VJPs from one graph (retain_graph=True), which AOTAutograd's donated buffers forbid
    with torch._functorch.config.patch(donated_buffer=False):
        _time_loss(benchmark, name, size, impl, device)


def _time_loss(benchmark, name, size, impl, device):
    benchmark.group = f"{name}-{size}-{device}"
    step = _case(name, impl, size, device)

    def run():
        out = step()
        _sync(device)  # time the kernels, not their launch
        return out

    if impl == "compile":
        run()  # compile (and autotune) before timing
    out = benchmark(run)
    assert _finite(out)
    if impl != "eager":  # the timed path computes what the reference computes
        ref = _case(name, "eager", size, device)()
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(torch.as_tensor(o, dtype=torch.float64).cpu(),
                                       torch.as_tensor(r, dtype=torch.float64).cpu(), rtol=1e-4, atol=1e-6)

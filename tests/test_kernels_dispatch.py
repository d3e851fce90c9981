"""Kernel dispatch in ``fastunlearn.ops`` (FASTUNLEARN_KERNELS=triton|torch|auto) and the Triton path inside a
real run: ``erase(..., method="siss")`` with the kernels ends with the same weights as with the PyTorch
reference, and the kernels really ran (launch counters).

The tests that launch kernels on CPU need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported);
a plain ``pytest tests`` run gets them through tests/test_kernels_interpreter.py. The dispatch-rule tests run
everywhere."""
import pytest
import torch

import fastunlearn as fu
from fastunlearn import losses, ops
from fastunlearn.errors import InvalidArgumentError
from fastunlearn.kernels import _common as C

needs_interpreter = pytest.mark.skipif(
    not C.interpreter_ready(),
    reason="launches kernels on CPU: needs TRITON_INTERPRET=1 before triton is imported; "
           "tests/test_kernels_interpreter.py reruns this file that way")


def _siss_args(B=3, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    pred, x, a, noise = (torch.randn(B, *shape, generator=g) for _ in range(4))
    mask = torch.tensor([True, False, True])[:B]
    gamma, sigma = torch.full((B,), 0.1), torch.full((B,), 0.995)
    return pred, x, a, noise, mask, gamma, sigma, 0.5


def _launches():
    return sum(C.LAUNCHES.values())


def test_backend_choice_is_validated(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_KERNELS", "cuda")
    with pytest.raises(InvalidArgumentError, match="FASTUNLEARN_KERNELS"):
        ops.backend()
    for choice in ("triton", "torch", "auto"):
        monkeypatch.setenv("FASTUNLEARN_KERNELS", choice.upper())
        assert ops.backend() == choice


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_cpu_tensors_take_the_pytorch_path(monkeypatch, choice):
    monkeypatch.setenv("FASTUNLEARN_KERNELS", choice)
    before = _launches()
    args = _siss_args()
    got = ops.siss_loss(*args)
    assert _launches() == before
    for gv, rv in zip(got, losses.siss_loss(*args)):
        assert torch.equal(gv, rv)


@pytest.mark.skipif(C.interpreter_ready(), reason="this process runs the interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.siss_loss(*_siss_args())
    # set too late (triton already imported): the kernels refuse instead of failing inside Triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="before triton is imported"):
        ops.siss_loss(*_siss_args())
    with pytest.raises(RuntimeError, match="before triton is imported"):
        ops.pair_stats([torch.ones(3)], [torch.ones(3)])


@needs_interpreter
def test_every_op_dispatches_to_its_kernel(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    r = lambda: torch.randn(3, 2, 5, 5, generator=g)  # noqa: E731
    phi, psi, e, s_t = r(), r(), r(), torch.rand(3, generator=g) + 0.1
    pred, tgt, c, n = r(), r(), r(), r()
    g1, g2 = [r(), r()], [r(), r()]
    cases = [
        ("siss_partials", lambda: ops.siss_loss(*_siss_args())[0], lambda: losses.siss_loss(*_siss_args())[0]),
        ("sid_partials", lambda: ops.sid_generator_loss(phi, psi, e, s_t, 1.2),
         lambda: losses.sid_generator_loss(phi, psi, e, s_t, 1.2)),
        ("mse_partials", lambda: ops.esd_loss(pred, tgt, c, n, 1.0), lambda: losses.esd_loss(pred, tgt, c, n, 1.0)),
        ("mse_partials", lambda: ops.mse_loss(pred, tgt), lambda: losses.mse_loss(pred, tgt)),
        ("pair_stats", lambda: torch.tensor(ops.pair_stats(g1, g2)),
         lambda: torch.tensor([sum(float((a * b).sum()) for a, b in zip(u, v))
                               for u, v in ((g1, g1), (g2, g2), (g1, g2))])),
    ]
    for name, kernel_path, reference in cases:
        before = C.LAUNCHES[name]
        got = kernel_path()
        assert C.LAUNCHES[name] == before + 1, name
        torch.testing.assert_close(got.double(), reference().double(), rtol=1e-5, atol=1e-6)


def _erase(monkeypatch, backend, tiny, digits_split):
    monkeypatch.setenv("FASTUNLEARN_KERNELS", backend)
    unet, sched = tiny
    forget, retain = digits_split
    return fu.erase(unet, forget=forget, retain=retain, method="siss", scheduler=sched, steps=3, batch_size=4,
                    progress=False)


@needs_interpreter
def test_erase_siss_with_kernels_matches_pytorch(monkeypatch, tiny, digits_split):
    before = dict(C.LAUNCHES)
    with_kernels = _erase(monkeypatch, "triton", tiny, digits_split)
    ran = {k: C.LAUNCHES[k] - before.get(k, 0) for k in ("siss_partials", "siss_finalize", "siss_backward",
                                                          "pair_stats")}
    # per step: one forward (2 launches), ≥ 2 backward launches (ℓ_x and ℓ_a), ≥ 1 pair_stats
    assert ran["siss_partials"] == 3 and ran["siss_finalize"] == 3, ran
    assert ran["siss_backward"] >= 6 and ran["pair_stats"] >= 3, ran
    reference = _erase(monkeypatch, "torch", tiny, digits_split)
    init = tiny[0].state_dict()
    num = den = upd = 0.0
    for k, v in reference.model.state_dict().items():
        w = with_kernels.model.state_dict()[k]
        num += float((w.double() - v.double()).pow(2).sum())
        den += float(v.double().pow(2).sum())
        upd += float((v.double() - init[k].double()).pow(2).sum())
    assert upd > 0, "the run did not change the model"
    assert (num / den) ** 0.5 < 1e-4
    # and the difference is small next to the training update itself
    assert (num / upd) ** 0.5 < 1e-2
    for hk, ht in zip(with_kernels.history, reference.history):
        assert hk["loss_x"] == pytest.approx(ht["loss_x"], rel=1e-4)
        assert hk["loss_a"] == pytest.approx(ht["loss_a"], rel=1e-4)

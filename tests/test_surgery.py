"""surgery: the closed-form coefficients and the one-pass gradient writes against the plain torch versions."""
import math

import pytest
import torch

from fastunlearn.surgery import (clip_factor, clip_single, dense_grads, negation_scale, norm_fixed_negation,
                                 pair_stats, write_combination)


def _params(*shapes):
    return [torch.nn.Parameter(torch.randn(*s)) for s in shapes]


def test_dense_grads_fills_unreached_parameters_with_zeros():
    params = _params((2, 3), (4,))
    g = torch.randn(2, 3)
    out = dense_grads((g, None), params)
    assert out[0] is g  # autograd's tensor, not a copy
    assert torch.equal(out[1], torch.zeros(4))


def test_pair_stats_are_the_squared_norms_and_the_dot_product():
    g1, g2 = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    flat1, flat2 = torch.cat([g.flatten() for g in g1]).double(), torch.cat([g.flatten() for g in g2]).double()
    n1, n2, dot = pair_stats(g1, g2)
    assert n1 == pytest.approx(float(flat1 @ flat1), rel=1e-6)
    assert n2 == pytest.approx(float(flat2 @ flat2), rel=1e-6)
    assert dot == pytest.approx(float(flat1 @ flat2), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("norm", [0.5, 3.0])
def test_clip_single_matches_clip_grad_norm(norm):
    params, ref = _params((4, 4), (3,)), _params((4, 4), (3,))
    g = [torch.randn(4, 4), torch.randn(3)]
    for p, gi in zip(ref, g):
        p.grad = gi.clone()
    torch.nn.utils.clip_grad_norm_(ref, norm)
    stats = clip_single([gi.clone() for gi in g], params, norm)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(sum(float(gi.pow(2).sum()) for gi in g)), rel=1e-6)
    assert clip_factor(4.0, None) == 1.0  # clipping off


def test_write_combination_casts_to_the_parameter_dtype():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    write_combination([p], [torch.ones(3)], 2.0, [torch.full((3,), 0.5)], -1.0)
    assert p.grad.dtype == torch.float16 and torch.equal(p.grad, torch.full((3,), 1.5, dtype=torch.float16))


def test_negation_scale():
    assert negation_scale(4.0, 2.0) == 0.5
    assert negation_scale(1e-20, 2.0) == 2.0 / 1e-12  # the ε floor of §2.7
    for degenerate in (0.0, float("inf"), float("nan")):
        assert negation_scale(degenerate, 2.0) == 0.0  # nothing (or nothing usable) to scale


def test_norm_fixed_negation_against_the_materialised_direction():
    params = _params((6,), (2, 2))
    g_x, g_a = [torch.randn(6), torch.randn(2, 2)], [torch.randn(6), torch.randn(2, 2)]
    na = math.sqrt(sum(float(g.pow(2).sum()) for g in g_a))
    direction = [gx - (3.0 / na) * ga for gx, ga in zip(g_x, g_a)]
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
    expected = [d * min(1.0, 1.0 / (norm + 1e-6)) for d in direction]
    stats = norm_fixed_negation(g_x, g_a, params, 3.0, 1.0)
    assert stats["neggrad_scale"] == pytest.approx(3.0 / na, rel=1e-6)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)

"""Multi-tensor pair_stats (kernels/surgery.py, methods.md §2.8 parameter side) against float64 sums and the
PyTorch branch of ``ops.pair_stats``: mixed sizes (1, odd, several chunks), mixed dtypes (one launch per dtype
pair), empty tensors and lists, and grid-striding over more chunks than programs.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); a plain
``pytest tests`` run gets there through tests/test_kernels_interpreter.py."""
import pytest
import torch

from fastunlearn import ops
from fastunlearn.kernels import _common as C
from helpers import kernels as T
from fastunlearn.kernels import surgery as K

pytestmark = [pytest.mark.skipif(not T.kernels_can_run(), reason=T.SKIP_REASON),
              pytest.mark.usefixtures("poison_kernels")]
DEVICE = T.device()


def _lists(sizes_dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    g1 = [torch.randn(*s, generator=g).to(dt) for s, dt in sizes_dtypes]
    g2 = [(0.5 * a.float() + torch.randn(a.shape, generator=g)).to(a.dtype) for a in g1]  # correlated
    return g1, g2


def float64_stats(g1, g2):
    n1 = sum(float(a.double().pow(2).sum()) for a in g1)
    n2 = sum(float(b.double().pow(2).sum()) for b in g2)
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g1, g2))
    return n1, n2, dot


def _dev(ts):
    return [t.to(DEVICE) for t in ts]


def test_matches_float64_over_mixed_sizes_and_dtypes(monkeypatch):
    g1, g2 = _lists([((1,), torch.float32), ((16, 3, 3, 3), torch.float32), ((1001,), torch.float16),
                     ((7, 13), torch.bfloat16), ((5000,), torch.float32), ((3,), torch.float16)])
    before = C.LAUNCHES["pair_stats"]
    got = K.pair_stats(_dev(g1), _dev(g2))
    assert C.LAUNCHES["pair_stats"] - before == 3  # fp32, fp16, bf16
    ref = float64_stats(g1, g2)
    assert all(isinstance(v, float) for v in got)
    for gv, rv in zip(got, ref):
        assert gv == pytest.approx(rv, rel=1e-5, abs=1e-5 * ref[0])
    # and the PyTorch branch of the dispatcher agrees
    monkeypatch.setenv("FASTUNLEARN_KERNELS", "torch")
    torch_branch = ops.pair_stats(g1, g2)
    for gv, rv in zip(got, torch_branch):
        assert gv == pytest.approx(rv, rel=1e-5, abs=1e-5 * ref[0])


def test_many_chunks_grid_stride(monkeypatch):
    """Small chunks force tensors to span several chunks and each program to take several of them."""
    monkeypatch.setattr(K, "_geometry", lambda device: (256, 64, 3))
    g1, g2 = _lists([((1000,), torch.float32), ((257,), torch.float32), ((1,), torch.float32),
                     ((3, 300), torch.float32)], seed=1)
    got = K.pair_stats(_dev(g1), _dev(g2))
    for gv, rv in zip(got, float64_stats(g1, g2)):
        assert gv == pytest.approx(rv, rel=1e-5)


def test_non_contiguous_and_empty_tensors():
    g1, g2 = _lists([((6, 5), torch.float32), ((4, 9), torch.float32)], seed=2)
    g1 = [g1[0].t(), torch.zeros(0), g1[1]]  # a transposed view and an empty tensor
    g2 = [g2[0].t(), torch.zeros(0), g2[1]]
    got = K.pair_stats(_dev(g1), _dev(g2))
    for gv, rv in zip(got, float64_stats(g1, g2)):
        assert gv == pytest.approx(rv, rel=1e-5)
    assert K.pair_stats([], []) == (0.0, 0.0, 0.0)


def test_rejects_mismatched_lists():
    g1, g2 = _lists([((4,), torch.float32), ((5,), torch.float32)])
    with pytest.raises(ValueError, match="tensors in g1"):
        K.pair_stats(_dev(g1), _dev(g2[:1]))
    with pytest.raises(ValueError, match="elements"):
        K.pair_stats(_dev(g1), _dev([g2[1], g2[0]]))

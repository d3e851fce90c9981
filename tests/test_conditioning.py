"""conditioning: every row operation on every kind of conditioning (None, class ids, nested embedding dicts,
prompt lists) agrees with doing it on the rows one by one."""
import pytest
import torch

from fastunlearn.conditioning import cat_cond, cond_len, cond_to, slice_cond, take_cond, where_cond

N = 5


def _kinds():
    ids = torch.arange(N) * 10
    sdxl = {"encoder_hidden_states": torch.randn(N, 3, 4),
            "added_cond_kwargs": {"text_embeds": torch.randn(N, 4), "time_ids": torch.randn(N, 6)}}
    prompts = [f"p{i}" for i in range(N)]
    return {"ids": ids, "embeddings": sdxl, "prompts": prompts}


def _row(cond, i):
    """Row i, as a length-1 conditioning of the same kind (the reference the operations are checked against)."""
    if isinstance(cond, dict):
        return {k: _row(v, i) for k, v in cond.items()}
    return cond[i:i + 1]


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("kind", ["ids", "embeddings", "prompts"])
def test_row_operations_agree_with_rows(kind):
    cond = _kinds()[kind]
    idx = torch.tensor([3, 0, 3])
    assert cond_len(cond) == N
    assert _equal(take_cond(cond, idx), cat_cond(*(_row(cond, int(i)) for i in idx)))
    assert _equal(slice_cond(cond, 1, 4), cat_cond(*(_row(cond, i) for i in range(1, 4))))
    assert _equal(cat_cond(slice_cond(cond, 0, 2), slice_cond(cond, 2, N)), cond)
    assert cond_len(take_cond(cond, idx)) == 3
    assert _equal(cond_to(cond, "cpu"), cond)


@pytest.mark.parametrize("kind", ["ids", "embeddings"])
def test_where_picks_each_row_from_its_source(kind):
    a, b = _kinds()[kind], _kinds()[kind]  # two different draws of the same kind
    if kind == "ids":
        b = b + 1
    mask = torch.tensor([True, False, False, True, False])
    got = where_cond(mask, a, b)
    expected = cat_cond(*(_row(a if m else b, i) for i, m in enumerate(mask)))
    assert _equal(got, expected)


def test_none_is_the_unconditional_model():
    idx = torch.tensor([0, 1])
    assert take_cond(None, idx) is None and slice_cond(None, 0, 1) is None and cat_cond(None, None) is None
    assert where_cond(idx > 0, None, None) is None and cond_to(None, "cpu") is None


def test_unsupported_conditioning_is_a_type_error():
    for op in (lambda c: take_cond(c, torch.tensor([0])), lambda c: slice_cond(c, 0, 1), cat_cond, cond_len,
               lambda c: where_cond(torch.tensor([True]), c, c)):
        with pytest.raises(TypeError, match="unsupported conditioning"):
            op(3.5)

"""The compacted fast paths (sort only the finite scores of rows that are mostly -inf) against
the full-vocabulary paths they replace: the same tensor, bit for bit, on rows with many -inf
entries, ties included (values drawn from a small set, so many scores are equal)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from cfg_textgen.samplers import RepetitionPenalty, TailFree, TopP, Typical, _finite_rows, _sort

NEG_INF = float("-inf")


@st.composite
def sparse_rows(draw):
    """(batch, vocab) scores, each row with 1..vocab/8 finite entries at random places."""
    vocab = draw(st.sampled_from([24, 64, 257, 1024, 4096]))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((batch, vocab), NEG_INF)
    for r in range(batch):
        n = draw(st.integers(1, vocab // 8))
        where = torch.randperm(vocab, generator=gen)[:n]
        if draw(st.booleans()):  # few distinct values: ties everywhere
            levels = torch.tensor(draw(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0]),
                                                min_size=1, max_size=4)))
            vals = levels[torch.randint(len(levels), (n,), generator=gen)]
        else:
            vals = torch.randn(n, generator=gen) * draw(st.sampled_from([0.1, 1.0, 3.0, 30.0]))
        out[r, where] = vals
    return out


def _same(a, b):
    return a.dtype == b.dtype and torch.equal(a, b)  # same shape, same values, -inf where -inf


@settings(max_examples=300, deadline=None)
@given(sparse_rows(), st.floats(0.01, 0.999), st.integers(1, 4))
def test_top_p_fast_path_matches_full_sort(scores, p, keep):
    s = TopP(p, min_tokens_to_keep=keep)
    assert _same(s(None, scores), s._full(scores))


@settings(max_examples=300, deadline=None)
@given(sparse_rows(), st.floats(0.01, 0.999), st.integers(1, 4))
def test_typical_fast_path_matches_full_sort(scores, p, keep):
    s = Typical(p, min_tokens_to_keep=keep)
    assert _same(s(None, scores), s._full(scores))


@settings(max_examples=300, deadline=None)
@given(sparse_rows(), st.floats(0.01, 0.999), st.integers(1, 4))
def test_tfs_fast_path_matches_full_sort(scores, z, keep):
    s = TailFree(z, min_tokens_to_keep=keep)
    assert _same(s(None, scores), s._full(scores))


def test_finite_rows_takes_the_fast_path_only_for_mostly_removed_rows():
    row = torch.full((1, 800), NEG_INF)
    row[0, [3, 70, 500]] = torch.tensor([1.0, 2.0, 3.0])
    assert [ix.tolist() for ix in _finite_rows(row)] == [[3, 70, 500]]
    assert _finite_rows(torch.zeros(1, 800)) is None  # dense row: full path
    assert _finite_rows(torch.full((1, 800), NEG_INF)) is None  # nothing finite: full path
    nan = row.clone()
    nan[0, 9] = float("nan")
    assert _finite_rows(nan) is None


def test_fast_paths_fire_on_a_top_k_row_of_a_large_vocabulary(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(torch.randn(1, 49152, generator=gen) * 3, dim=-1)
    x = x.masked_fill(x < torch.topk(x, 400).values[:, -1:], NEG_INF)
    for cls, arg in ((TopP, 0.9), (Typical, 0.9), (TailFree, 0.95)):
        s = cls(arg)
        full = s._full(x)
        monkeypatch.setattr(s, "_full", None)  # calling the full path now fails
        fast = s(None, x)
        assert _same(fast, full)
        assert 0 < fast.isfinite().sum() < 400  # something was cut


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 0.5, 1.1, 1.3, 1e-30]), st.integers(0, 40),
       st.sampled_from([0.0, 0.5, 2.0]), st.sampled_from([0.0, 0.05]), st.sampled_from([0.0, 0.02, -1.0]),
       st.lists(st.integers(0, 70), max_size=4), st.booleans())
def test_repetition_penalty_window_tokens_match_full_vocabulary(seed, penalty, rng, slope, presence,
                                                               frequency, whitelist, with_inf):
    gen = torch.Generator().manual_seed(seed)
    batch, vocab = 2, 64
    ids = torch.randint(0, 80, (batch, 30), generator=gen)  # ids past the vocab are ignored
    scores = torch.randn(batch, vocab, generator=gen) * 5
    if with_inf:
        scores[scores < -3] = NEG_INF
        scores[0, 5] = 3e38
    s = RepetitionPenalty(penalty, rng or (12 if slope else 0), slope, presence, frequency, whitelist)
    rng = s.range
    window = ids[:, -rng:] if rng else ids
    full = s._full(window, scores)
    assert _same(s(ids, scores), full)  # on the CPU: the numpy path
    assert _same(s._sparse(window, scores), full)  # the torch path (other devices, half precision)
    as64 = scores.double()
    assert _same(s(ids, as64), s._full(window, as64))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1024, 3000, 49152]), st.booleans(),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.sampled_from([0.0, 0.5, 0.95]),
       st.booleans())
def test_sort_is_torch_stable_sort(seed, vocab, descending, dtype, removed, rounded):
    """samplers._sort (int64 keys sorted by numpy on the CPU) == torch.sort(stable=True): values and
    indices, with ties (rounded logits, half precision), -inf entries and signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, vocab, generator=gen) * 4
    if rounded:
        x = x.round()
    x[torch.rand(2, vocab, generator=gen) < removed] = NEG_INF
    x[0, :3] = torch.tensor([0.0, -0.0, 0.0])
    x = x.to(dtype)
    values, order = _sort(x, descending)
    ref_values, ref_order = torch.sort(x, dim=-1, descending=descending, stable=True)
    assert torch.equal(order, ref_order)
    assert torch.equal(values, ref_values) and values.dtype == dtype


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([7, 300, 4096, 49152]), st.sampled_from([0.3, 0.9, 0.98]),
       st.integers(1, 3), st.booleans(), st.sampled_from([0.0, 0.5]))
def test_top_p_value_cut_equals_the_stable_order_cut(seed, vocab, p, keep, rounded, removed):
    """TopP._full cuts by value when the cut is not inside tied scores; written out here with the
    stable sort and a scatter (the formulation it replaces), the two are equal bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, vocab, generator=gen) * 3
    if rounded:
        x = x.round()
    x[torch.rand(2, vocab, generator=gen) < removed] = NEG_INF
    x[:, 0] = 1.0
    s = TopP(p, keep)
    sorted_scores, order = torch.sort(x, dim=-1, stable=True)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -keep:] = False
    expected = x.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)
    assert _same(s._full(x), expected)


def test_repetition_penalty_kept_window_penalties_follow_the_window_and_settings():
    """One sampler over a growing history (window 5 .. 12, then 12 every token) and then with its
    penalty changed: every call equals the full-vocabulary path on that call's window."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (1, 20), generator=gen)
    scores = torch.randn(1, 64, generator=gen) * 5
    s = RepetitionPenalty(1.3, 12, 2.0, 0.05, 0.02)
    for n in [5, 9, 12, 13, 20]:
        assert _same(s(ids[:, :n], scores), s._full(ids[:, :n][:, -12:], scores))
    s.penalty = 0.7
    assert _same(s(ids, scores), s._full(ids[:, -12:], scores))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([3, 64, 4096, 49152]), st.sampled_from([torch.float32, torch.float64]),
       st.booleans(), st.sampled_from([0.0, 0.5, 0.99]), st.booleans())
def test_numpy_kernels_equal_their_torch_formulation(seed, vocab, dtype, rounded, removed, nan):
    """The CPU kernels read in numpy (k-th largest, cut below, the finite entries of each row)
    against the torch expressions they stand for: torch.topk, masked_fill, nonzero; with ties,
    removed tokens, signed zeros and NaN."""
    from cfg_textgen.samplers.kernels import _below, _kth_largest

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, vocab, generator=gen) * 4
    if rounded:
        x = x.round()
    x[torch.rand(2, vocab, generator=gen) < removed] = NEG_INF
    x[0, :2] = torch.tensor([0.0, -0.0])
    if nan:
        x[1, torch.randint(vocab, (3,), generator=gen)] = float("nan")
    x = x.to(dtype)
    for k in {1, 2, min(40, vocab), vocab}:
        kth = _kth_largest(x, k)
        ref = torch.topk(x, k, dim=-1).values[..., -1:]
        assert kth.dtype == dtype and torch.equal(kth.isnan(), ref.isnan())
        assert torch.equal(kth.nan_to_num(), ref.nan_to_num())
        cut = _below(x, ref)
        expected = x.masked_fill(x < ref, NEG_INF)
        assert cut.dtype == dtype and torch.equal(cut.isnan(), expected.isnan())
        assert torch.equal(cut.nan_to_num(), expected.nan_to_num())
        assert cut.data_ptr() != x.data_ptr()
    rows = _finite_rows(x, share=1)
    if nan or not torch.isfinite(x.amax(dim=-1)).all():
        assert rows is None
    else:
        assert [r.tolist() for r in rows] == [torch.isfinite(row).nonzero().squeeze(1).tolist() for row in x]
    few = _finite_rows(x)  # at most 1/8 of each row finite, else None
    alive = (x > NEG_INF).sum(dim=-1)
    if few is not None:
        assert (alive <= vocab // 8).all()
    elif not nan and torch.isfinite(x.amax(dim=-1)).all():
        assert (alive > vocab // 8).any()

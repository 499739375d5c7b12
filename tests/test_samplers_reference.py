"""Differential tests: our samplers against transformers' own processors where it has the same
sampler, on random logits (several vocab sizes, batch > 1, ties, rows with -inf entries, rows with
a single finite entry). The -inf masks must be identical, finite values equal within 1e-6."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import example, given, settings
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from cfg_textgen.samplers import SAMPLERS

EXAMPLES = settings(max_examples=120, deadline=None)
VOCABS = (2, 3, 7, 32, 257)


@st.composite
def score_rows(draw):
    """(batch, vocab) float32 logits: gaussian at several scales, sometimes rounded (ties),
    sometimes with -inf entries (up to all but one per row)."""
    batch = draw(st.integers(1, 4))
    vocab = draw(st.sampled_from(VOCABS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, vocab, generator=g) * draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    if draw(st.booleans()):
        x = x.round()
    removed = torch.rand(batch, vocab, generator=g) < draw(st.sampled_from([0.0, 0.0, 0.3, 0.8, 1.0]))
    removed[torch.arange(batch), torch.randint(vocab, (batch,), generator=g)] = False
    return x.masked_fill(removed, float("-inf"))


def token_ids(draw, batch, vocab, max_len=24, alphabet=None):
    length = draw(st.integers(0, max_len))
    high = vocab if alphabet is None else min(vocab, alphabet)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, high, (batch, length), generator=g)


def assert_same(ours, ref):
    ninf = lambda t: torch.isinf(t) & (t < 0)  # noqa: E731
    assert torch.equal(ninf(ours), ninf(ref)), (ours, ref)
    assert not ours.isnan().any() and not torch.isposinf(ours).any()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin], atol=1e-6, rtol=1e-6)


def check(ours, ref, ids, scores):
    before = scores.clone()
    out = ours(ids, scores)
    assert torch.equal(scores, before), "sampler changed its input in place"
    assert_same(out, ref(ids, scores.clone()))


def check_up_to_ties(ours, ref, scores):
    """As `check`, except where the cut falls inside a group of tied scores: we break ties by token
    index (a stable sort, the same on every device and for every vocabulary size), transformers by
    torch's unstable sort. There each row must keep as many tokens, and the tokens kept by only one
    side must all carry one tied score."""
    before = scores.clone()
    out = ours(None, scores)
    assert torch.equal(scores, before), "sampler changed its input in place"
    expected = ref(None, scores.clone())
    for r in range(scores.shape[0]):
        a, b = torch.isfinite(out[r]), torch.isfinite(expected[r])
        if torch.equal(a, b):
            assert_same(out[r:r + 1], expected[r:r + 1])
            continue
        assert a.sum() == b.sum(), (out[r], expected[r])
        differ = scores[r][a ^ b]
        assert (differ == differ[0]).all(), (scores[r], out[r], expected[r])


keep = st.integers(1, 3)


@EXAMPLES
@given(score_rows(), st.floats(0.05, 10.0))
def test_temperature_matches_transformers(scores, t):
    check(SAMPLERS["temperature"](temperature=t), TemperatureLogitsWarper(t), None, scores)


@EXAMPLES
@given(score_rows(), st.integers(1, 300), keep)
def test_top_k_matches_transformers(scores, k, m):
    check(SAMPLERS["top_k"](k=k, min_tokens_to_keep=m), TopKLogitsWarper(k, min_tokens_to_keep=m),
          None, scores)


@EXAMPLES
@given(score_rows(), st.floats(0.001, 0.999), keep)
@example(torch.zeros(2, 2), 0.5, 1)  # cumulative mass exactly 1 - p: removed
@example(torch.tensor([[0.0, 0.0, 0.0, 0.0]]).log_softmax(-1), 0.75, 1)
def test_top_p_matches_transformers(scores, p, m):
    check_up_to_ties(SAMPLERS["top_p"](p=p, min_tokens_to_keep=m), TopPLogitsWarper(p, min_tokens_to_keep=m),
                     scores)


@EXAMPLES
@given(score_rows(), st.floats(0.001, 0.999), keep)
def test_typical_matches_transformers(scores, p, m):
    check_up_to_ties(SAMPLERS["typical"](p=p, min_tokens_to_keep=m),
                     TypicalLogitsWarper(mass=p, min_tokens_to_keep=m), scores)


@EXAMPLES
@given(score_rows(), st.floats(0.0, 1.0), keep)
@example(torch.tensor([[float("-inf"), -29.3, -217.9]]), 1.0, 2)  # p(-217.9) underflows to 0
def test_min_p_matches_transformers(scores, p, m):
    ours = SAMPLERS["min_p"](p=p, min_tokens_to_keep=m)(None, scores)
    ref = MinPLogitsWarper(p, min_tokens_to_keep=m)(None, scores.clone())
    # transformers' top-k over probabilities can keep an already removed token instead of a finite
    # one whose probability underflowed; only there we differ: we keep the m highest scores
    want = torch.isfinite(scores).sum(-1).clamp(max=m)
    short = torch.isfinite(ref).sum(-1) < want
    assert_same(ours[~short], ref[~short])
    for row in short.nonzero().flatten().tolist():
        top = torch.topk(scores[row], int(want[row])).indices
        assert torch.isfinite(ours[row, top]).all()
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref[row]) | torch.isin(
            torch.arange(scores.shape[1]), top))


@EXAMPLES
@given(score_rows(), st.floats(1e-5, 0.999), keep)
def test_epsilon_matches_transformers(scores, eps, m):
    check(SAMPLERS["epsilon"](epsilon=eps, min_tokens_to_keep=m),
          EpsilonLogitsWarper(eps, min_tokens_to_keep=m), None, scores)


@EXAMPLES
@given(score_rows(), st.floats(1e-5, 0.999), keep)
def test_eta_matches_transformers(scores, eta, m):
    # transformers calls our `eta` its `epsilon` (the eta_cutoff of GenerationConfig)
    check(SAMPLERS["eta"](eta=eta, min_tokens_to_keep=m), EtaLogitsWarper(epsilon=eta, min_tokens_to_keep=m),
          None, scores)


@EXAMPLES
@given(st.data(), score_rows(), st.floats(0.05, 5.0))
def test_repetition_penalty_flat_whole_context_matches_transformers(data, scores, penalty):
    ids = token_ids(data.draw, *scores.shape)
    check(SAMPLERS["repetition_penalty"](penalty=penalty), RepetitionPenaltyLogitsProcessor(penalty),
          ids, scores)


@EXAMPLES
@given(st.data(), score_rows(), st.integers(1, 4), st.integers(2, 6))
def test_no_repeat_ngram_matches_transformers(data, scores, size, alphabet):
    ids = token_ids(data.draw, *scores.shape, max_len=30, alphabet=alphabet)
    ours = SAMPLERS["no_repeat_ngram"](size=size)(ids, scores)
    ref = NoRepeatNGramLogitsProcessor(size)(ids, scores.clone())
    emptied = ~torch.isfinite(ref).any(dim=-1)  # transformers may ban every token of a row
    assert_same(ours[~emptied], ref[~emptied])
    for row in emptied.nonzero().flatten().tolist():  # ours keeps that row's best token instead
        expected = torch.full_like(scores[row], float("-inf"))
        best = scores[row].argmax()
        expected[best] = scores[row, best]
        assert torch.equal(ours[row], expected)


def test_reference_strategy_covers_the_awkward_rows():
    """The differential strategies above do produce ties, -inf entries and single-token rows."""
    seen = {"ties": False, "partial_inf": False, "single": False}

    @settings(max_examples=150, deadline=None)
    @given(score_rows())
    def look(scores):
        fin = torch.isfinite(scores)
        n = fin.sum(-1)
        seen["single"] |= bool((n == 1).any())
        seen["partial_inf"] |= bool(((n > 1) & (n < scores.shape[1])).any())
        seen["ties"] |= any(len(set(r[f].tolist())) < int(f.sum()) for r, f in zip(scores, fin))

    look()
    assert all(seen.values()), seen

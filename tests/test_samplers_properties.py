"""Property tests over every registered sampler, with random valid parameters drawn from the
samplers' own `Param` declarations and random chains: no NaN, at least one token (and at least
`min_tokens_to_keep`) survives per row, removed tokens stay removed, the input is not mutated, and
a `LogitsProcessorList` gives exactly what folding the samplers by hand gives."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from transformers import LogitsProcessorList

from cfg_textgen.samplers import SAMPLERS, Param, pick_token

NAMES = sorted(SAMPLERS)


class ModTokenizer:
    """Any text -> ids: enough for DRY's sequence breakers and XTC's newline / EOS ids."""

    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 7 for c in text]


def param_values(p: Param):
    """A strategy over the valid values of one declared parameter (unbounded sides capped)."""
    if p.choices is not None:
        return st.sampled_from(p.choices)
    if p.kind is bool:
        return st.booleans()
    if p.kind is dict:  # token id -> bias
        return st.dictionaries(st.integers(0, 40), st.floats(-100, 100, allow_nan=False), max_size=5)
    if p.kind is list:
        if p.item_kind is int:
            return st.lists(st.integers(int(p.min or 0), 40), max_size=5)
        return st.lists(st.text(alphabet='ab:"*\n', min_size=1, max_size=2), max_size=4)
    if p.kind is int:
        lo = int(p.min) if p.min is not None else -10
        return st.integers(lo + p.min_exclusive, lo + 12)
    lo = p.min if p.min is not None else -5.0
    hi = p.max if p.max is not None else lo + 10.0
    return st.floats(lo, hi, exclude_min=p.min_exclusive, exclude_max=p.max_exclusive, allow_nan=False)


@st.composite
def sampler_specs(draw, names=st.sampled_from(NAMES)):
    """(name, params, min_tokens_to_keep, xtc seed)."""
    name = draw(names)
    params = {p.name: draw(param_values(p)) for p in SAMPLERS[name].params}
    if name == "repetition_penalty":  # the rules between parameters (see the sampler's docstring)
        if params["slope_mode"] == "halves":
            params["slope"] = draw(st.floats(0, 1, exclude_min=True))
        elif params["slope"] and not params["range"]:
            params["range"] = draw(st.integers(1, 12))
    return name, params, draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


def build(spec):
    name, params, keep, seed = spec
    extra = {}
    if name in ("dry", "xtc"):
        extra["tokenizer"] = ModTokenizer()
    if name == "xtc":
        extra["generator"] = torch.Generator().manual_seed(seed)
    return SAMPLERS[name](**params, min_tokens_to_keep=keep, **extra)


@st.composite
def inputs(draw):
    """(input_ids, scores): ids over a small alphabet (repeats), logits with -inf entries and ties."""
    batch = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([2, 3, 7, 32, 257]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(batch, vocab, generator=g) * draw(st.sampled_from([0.01, 1.0, 5.0, 100.0]))
    if draw(st.booleans()):
        scores = scores.round()
    removed = torch.rand(batch, vocab, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    removed[torch.arange(batch), torch.randint(vocab, (batch,), generator=g)] = False
    scores = scores.masked_fill(removed, float("-inf"))
    alphabet, length = min(vocab, draw(st.integers(2, 6))), draw(st.integers(0, 20))
    ids = torch.randint(0, alphabet, (batch, length), generator=g)
    return ids, scores


def assert_sane(out, scores, keep=1):
    assert out.shape == scores.shape and out.dtype == scores.dtype
    assert not out.isnan().any(), out
    assert not torch.isposinf(out).any(), out
    removed_before = ~torch.isfinite(scores)
    assert torch.isneginf(out[removed_before]).all(), "a removed token came back"
    finite_in = torch.isfinite(scores).sum(-1)
    finite_out = torch.isfinite(out).sum(-1)
    assert (finite_out >= torch.clamp(finite_in, max=keep)).all(), (finite_in, finite_out)
    assert (finite_out >= 1).all()
    assert not out.softmax(-1).isnan().any()


@settings(max_examples=160, deadline=None)
@given(sampler_specs(), inputs())
def test_every_sampler_keeps_tokens_returns_new_tensor_and_never_nan(spec, data):
    ids, scores = data
    sampler = build(spec)
    before_scores, before_ids = scores.clone(), ids.clone()
    out = sampler(ids, scores)
    assert out is not scores and out.data_ptr() != scores.data_ptr()
    assert torch.equal(scores, before_scores) and torch.equal(ids, before_ids), "input mutated"
    assert_sane(out, scores, keep=spec[2])
    # a second step (the picked token appended) exercises the stateful samplers' updates
    ids2 = torch.cat([ids, pick_token(out, do_sample=False)[:, None]], dim=1)
    assert_sane(sampler(ids2, scores), scores, keep=spec[2])


@settings(max_examples=80, deadline=None)
@given(st.lists(sampler_specs(), min_size=1, max_size=5), inputs())
def test_sampler_chain_list_equals_fold_and_keeps_a_token(specs, data):
    ids, scores = data
    listed = LogitsProcessorList([build(s) for s in specs])
    folded = [build(s) for s in specs]
    for _ in range(2):  # two decoding steps
        expected = scores
        for sampler in folded:
            nxt = sampler(ids, expected)
            assert_sane(nxt, expected, keep=1)
            expected = nxt
        before = scores.clone()
        got = listed(ids, scores)
        assert torch.equal(scores, before)
        assert torch.equal(got, expected)
        ids = torch.cat([ids, pick_token(got, do_sample=False)[:, None]], dim=1)


@settings(max_examples=60, deadline=None)
@given(sampler_specs(), st.sampled_from([1e-30, 1e4, 1e30]))
def test_every_sampler_survives_extreme_logits(spec, scale):
    torch.manual_seed(0)
    scores = torch.randn(2, 16) * scale
    scores[1, 3:] = float("-inf")  # a row with three candidates
    ids = torch.tensor([[0, 1, 0, 1, 2, 0, 1], [3, 3, 3, 3, 3, 3, 3]])
    assert_sane(build(spec)(ids, scores), scores, keep=spec[2])


def test_property_strategies_reach_every_sampler_and_edge_values():
    """The parameter strategy does produce each sampler and each declared bound that is allowed."""
    seen_names, seen_bounds = set(), set()

    @settings(max_examples=600, deadline=None, derandomize=True)  # deterministic coverage
    @given(sampler_specs())
    def look(spec):
        name, params, _, _ = spec
        seen_names.add(name)
        for p in SAMPLERS[name].params:
            if p.kind is float and p.min is not None and not p.min_exclusive and params[p.name] == p.min:
                seen_bounds.add((name, p.name))

    look()
    assert seen_names == set(SAMPLERS)
    assert len(seen_bounds) >= 5, seen_bounds

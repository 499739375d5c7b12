"""CFGLogitsProcessor against independent references: transformers' own CFG processor, and a
brute-force processor that re-runs the whole opposing sequence without a cache at every step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, UnbatchedClassifierFreeGuidanceLogitsProcessor

from cfg_textgen.guidance import CFGLogitsProcessor, cfg_combine, opposing_token_ids
from conftest import make_tiny_model

STEPS = 48


class BruteForceCFG(LogitsProcessor):
    """Reference: every step, run opposing prompt + generated tokens from scratch, row by row.

    It returns the guided scores on the story's scale, `scores + (s-1)(c-u)`, so
    that beam search, which sums the processed scores without renormalising them, ranks beams as
    ours does when an earlier processor (min_new_tokens) removed a token; the formula itself is
    checked against the paper's `u + s(c-u)` in the cfg_combine tests."""

    def __init__(self, model, scale, opposing_rows, rows_per_prompt=1):
        self.model, self.scale, self.rows, self.k = model, scale, opposing_rows, rows_per_prompt
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        u = []
        for b in range(input_ids.shape[0]):
            seq = self.rows[b // self.k] + input_ids[b, self.prompt_len:].tolist()
            with torch.no_grad():
                u.append(self.model(torch.tensor([seq])).logits[0, -1])
        u = F.log_softmax(torch.stack(u), -1)
        c = F.log_softmax(scores, -1)
        return torch.where(torch.isneginf(c), c, scores + (self.scale - 1) * (c - u))  # removed stay removed


def _generate(model, ids, processors, steps=STEPS, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("top_k", 0)  # transformers samples with top_k=50 unless told otherwise
    out = model.generate(ids, logits_processor=processors, max_new_tokens=steps, min_new_tokens=steps,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)  # (batch, len), (batch, steps, vocab)


def assert_scores_close(a, b, tol):
    """The same distributions: same -inf positions, finite log-probabilities within tol (removed
    tokens are -inf on both sides).

    Distributions, not raw scores: our CFG returns `c_raw + (s-1)(c-u)` on the story's raw-logit
    scale, transformers' processor and the brute-force reference `u + s(c-u)`;
    the two differ by the per-row constant logsumexp(c_raw), which log_softmax removes."""
    a, b = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    finite = torch.isfinite(a)
    assert finite.any() and (a[finite] - b[finite]).abs().max() < tol


def _prompt(tok, text="Once upon a time the knight"):
    return tok(text, return_tensors="pt").input_ids


# ---- the formula ------------------------------------------------------------------------------

def test_cfg_combine_matches_hand_computed_values():
    c = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    u = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]])
    got = cfg_combine(c, u, 2.0)
    want = [2 * math.log(0.7) - math.log(0.2), 2 * math.log(0.2) - math.log(0.5),
            2 * math.log(0.1) - math.log(0.3)]
    assert torch.allclose(got, torch.tensor([want]), atol=1e-6)
    # scale 0 is the opposing branch alone, scale 1 the story alone
    assert torch.allclose(cfg_combine(c, u, 0.0), u, atol=1e-6)
    # the result stays on the story's raw-logit scale: at scale 1 it is exactly the raw logits (a
    # shift included), at 2 it is c_raw + (c - u) (DESIGN: penalties keep their strength)
    assert torch.equal(cfg_combine(c + 3.0, u, 1.0), c + 3.0)
    assert torch.allclose(cfg_combine(c + 3.0, u, 2.0), torch.tensor([want]) + 3.0, atol=1e-6)


@pytest.mark.parametrize("scale", [-1.0, 0.0, 0.5, 1.5, 3.0])
def test_cfg_combine_is_the_paper_distribution_on_the_raw_logit_scale(scale):
    gen = torch.Generator().manual_seed(3)
    raw, opp = torch.randn(2, 50, generator=gen) * 4 + 7, torch.randn(2, 50, generator=gen) * 4 - 2
    c, u = F.log_softmax(raw, -1), F.log_softmax(opp, -1)
    got = cfg_combine(raw, opp, scale)
    paper = u + scale * (c - u)  # Sanchez et al. 2023, eq. 6 on log-probs
    torch.testing.assert_close(F.log_softmax(got, -1), F.log_softmax(paper, -1), atol=1e-5, rtol=0)
    # the constant between the two is logsumexp(raw) per row
    torch.testing.assert_close(got - paper, raw.logsumexp(-1, keepdim=True).expand_as(got), atol=1e-4, rtol=0)


def test_cfg_combine_is_continuous_in_the_scale():
    gen = torch.Generator().manual_seed(4)
    raw, opp = torch.randn(1, 50, generator=gen) * 4 + 7, torch.randn(1, 50, generator=gen) * 4
    assert (cfg_combine(raw, opp, 1.001) - raw).abs().max() < 0.05


@pytest.mark.parametrize("scale", [-1.0, 0.0, 0.5, 3.0])
def test_cfg_combine_keeps_tokens_removed_before_it_removed(scale):
    c = torch.tensor([[0.0, -1.0, float("-inf")]])
    u = torch.tensor([[0.0, 0.0, 0.0]])
    got = cfg_combine(c, u, scale)
    assert torch.isneginf(got[0, 2]) and torch.isfinite(got[0, :2]).all()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "1.5", None, True])
def test_cfg_processor_rejects_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        CFGLogitsProcessor(make_tiny_model("llama"), scale=scale)


def test_cfg_processor_does_not_mutate_scores(tiny_tokenizer):
    model = make_tiny_model("llama")
    proc = CFGLogitsProcessor(model, 2.0)
    ids = _prompt(tiny_tokenizer)
    scores = model(ids).logits[:, -1].detach()
    before = scores.clone()
    proc(ids, scores)
    assert torch.equal(scores, before)


def test_opposing_token_ids_blank_story_is_bos_and_text_follows_the_tokenizer(tiny_tokenizer):
    assert opposing_token_ids("", tiny_tokenizer, bos_token_id=1) == [[1]]
    assert opposing_token_ids(None, tiny_tokenizer, bos_token_id=1, batch_size=2) == [[1], [1]]
    text = "The dragon"
    assert opposing_token_ids(text, tiny_tokenizer, 1) == [tiny_tokenizer(text).input_ids]
    assert opposing_token_ids([[5, 6], [7]], None, 1) == [[5, 6], [7]]
    assert opposing_token_ids([5, 6], None, 1, batch_size=2) == [[5, 6], [5, 6]]


def test_opposing_token_ids_without_bos_says_to_give_a_prompt():
    with pytest.raises(ValueError, match="no BOS token.*opposing prompt"):
        opposing_token_ids("", None, bos_token_id=None)


def test_cfg_processor_last_token_mode_refuses_an_opposing_text():
    with pytest.raises(ValueError, match="last-token"):
        CFGLogitsProcessor(make_tiny_model("llama"), 1.5, opposing_prompt="x", mode="last-token")


# ---- acceptance 1: differential against transformers' own processor ---------------------------

@pytest.mark.parametrize("opposing", [[1, 50, 60], "last-token"])
def test_cfg_processor_equals_transformers_unbatched_cfg(tiny_model, tiny_tokenizer, opposing):
    ids = _prompt(tiny_tokenizer)
    if opposing == "last-token":
        ours = CFGLogitsProcessor(tiny_model, 1.5, mode="last-token")
        theirs = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, tiny_model)
    else:
        ours = CFGLogitsProcessor(tiny_model, 1.5, opposing_prompt=opposing)
        theirs = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, tiny_model,
                                                                unconditional_ids=torch.tensor([opposing]))
    seq_ours, scores_ours = _generate(tiny_model, ids, [ours])
    seq_theirs, scores_theirs = _generate(tiny_model, ids, [theirs])
    assert torch.equal(seq_ours, seq_theirs)
    assert_scores_close(scores_ours, scores_theirs, 1e-5)


def test_cfg_processor_equals_transformers_when_sampling(tiny_tokenizer):
    model = make_tiny_model("llama")
    ids = _prompt(tiny_tokenizer)
    torch.manual_seed(7)
    a, _ = _generate(model, ids, [CFGLogitsProcessor(model, 2.0, opposing_prompt=[1])], do_sample=True)
    torch.manual_seed(7)
    b, _ = _generate(model, ids, [UnbatchedClassifierFreeGuidanceLogitsProcessor(
        2.0, model, unconditional_ids=torch.tensor([[1]]))], do_sample=True)
    assert torch.equal(a, b)
    assert len(set(a[0, ids.shape[1]:].tolist())) > 5  # a real walk, not one repeated token


# ---- acceptance 2: KV cache against brute-force re-encoding -----------------------------------

@pytest.mark.parametrize("scale", [0.0, 0.5, 1.5, 3.0])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cfg_processor_kv_cache_equals_brute_force_reencoding(arch, scale, tiny_tokenizer):
    model = make_tiny_model(arch)
    ids = _prompt(tiny_tokenizer)
    opposing = tiny_tokenizer("The cold wind").input_ids
    torch.manual_seed(0)
    seq, scores = _generate(model, ids, [CFGLogitsProcessor(model, scale, opposing_prompt=opposing)],
                            do_sample=True)
    # teacher-force the same sequence through the reference, step by step
    ref = BruteForceCFG(model, scale, [opposing])
    for t in range(STEPS):
        prefix = seq[:, : ids.shape[1] + t]
        with torch.no_grad():
            cond = model(prefix).logits[:, -1]
        cond[:, model.config.eos_token_id] = float("-inf")  # what generate's min_new_tokens does first
        want = ref(prefix, cond)
        assert_scores_close(scores[:, t], want, 1e-4)


def test_cfg_processor_feeds_one_token_per_step(tiny_tokenizer):
    model = make_tiny_model("llama")
    lengths = []
    # the decoder runs in every forward pass, generate's and the opposing branch's (which may run
    # the decoder and the output layer itself: backends.transformers.split_head)
    model.base_model.register_forward_pre_hook(lambda m, args, kw: lengths.append(
        (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[1]), with_kwargs=True)
    proc = CFGLogitsProcessor(model, 1.5, opposing_prompt=[1, 40, 41, 42])
    ids = _prompt(tiny_tokenizer)
    _generate(model, ids, [proc], steps=10)
    # generate's own calls: prompt then 1 per step; ours: 4-token prefill then 1 per step
    assert sorted(lengths, reverse=True)[:2] == [ids.shape[1], 4]
    assert lengths.count(1) == 2 * 9
    assert proc.branch.calls == 10


# ---- acceptance 3: a batch of different lengths and opposing prompts ---------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cfg_processor_batch_rows_equal_rows_run_alone(arch, tiny_tokenizer):
    model = make_tiny_model(arch)
    stories = ["Once upon a time", "The knight rode through the rain, his sword", "She"]
    opposing = [[1], tiny_tokenizer("The dragon was awake").input_ids, tiny_tokenizer("cold").input_ids]
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(stories, return_tensors="pt", padding=True)
    seqs, batch_scores = _generate(model, batch.input_ids,
                                   [CFGLogitsProcessor(model, 1.5, opposing_prompt=opposing)],
                                   steps=24, attention_mask=batch.attention_mask)
    for row, (story, opp) in enumerate(zip(stories, opposing)):
        alone_seq, alone_scores = _generate(model, _prompt(tiny_tokenizer, story),
                                            [CFGLogitsProcessor(model, 1.5, opposing_prompt=opp)], steps=24)
        assert torch.equal(seqs[row, -24:], alone_seq[0, -24:])
        assert_scores_close(batch_scores[row], alone_scores[0], 1e-4)


# ---- identical stories with different opposing prompts ----------------------------------------
# Each row keeps its own opposing branch: the old `_source_rows` mapped every row to the FIRST row
# with the same history, so row 1 ran on row 0's opposing cache (the issue's repro is the first test).

SAME_STORY = [5, 9, 11, 13]
TWO_OPPOSING = [[7, 8, 9], [20, 21, 30]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identical_stories_greedy_each_row_equals_the_row_alone(arch):
    model = make_tiny_model(arch)
    ids = torch.tensor([SAME_STORY, SAME_STORY])
    seqs, scores = _generate(model, ids, [CFGLogitsProcessor(model, 3.0, opposing_prompt=TWO_OPPOSING)],
                             steps=16)
    for row, opp in enumerate(TWO_OPPOSING):
        alone, alone_scores = _generate(model, ids[:1], [CFGLogitsProcessor(model, 3.0, opposing_prompt=opp)],
                                        steps=16)
        assert torch.equal(seqs[row], alone[0])
        assert_scores_close(scores[row], alone_scores[0], 1e-4)
    assert not torch.equal(seqs[0], seqs[1])  # the two opposing prompts really lead apart


def test_identical_stories_sampling_equals_brute_force():
    model = make_tiny_model("llama")
    ids = torch.tensor([SAME_STORY] * 4)
    opposing = TWO_OPPOSING * 2  # rows 0 and 2 (1 and 3) share story AND opposing prompt
    torch.manual_seed(11)
    a, sa = _generate(model, ids, [CFGLogitsProcessor(model, 3.0, opposing_prompt=opposing)], steps=20,
                      do_sample=True)
    torch.manual_seed(11)
    b, sb = _generate(model, ids, [BruteForceCFG(model, 3.0, opposing)], steps=20, do_sample=True)
    assert torch.equal(a, b)
    assert_scores_close(sa, sb, 1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identical_stories_beam_search_equals_each_item_alone(arch):
    model = make_tiny_model(arch)
    ids = torch.tensor([SAME_STORY, SAME_STORY])
    kw = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, num_return_sequences=3, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ours = model.generate(ids, attention_mask=torch.ones_like(ids),
                          logits_processor=[CFGLogitsProcessor(model, 3.0, opposing_prompt=TWO_OPPOSING)], **kw)
    for i, opp in enumerate(TWO_OPPOSING):
        ref = model.generate(ids[:1], logits_processor=[BruteForceCFG(model, 3.0, [opp], rows_per_prompt=3)],
                             **kw)
        assert torch.equal(ours.sequences[3 * i: 3 * i + 3], ref.sequences)
        assert torch.allclose(ours.sequences_scores[3 * i: 3 * i + 3], ref.sequences_scores, atol=1e-4)


# ---- acceptance 4: beam search and several return sequences -----------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cfg_processor_beam_search_equals_brute_force(arch, tiny_tokenizer):
    model = make_tiny_model(arch)
    stories = ["Once upon a time", "The knight rode"]
    opposing = [[1], tiny_tokenizer("The cold wind").input_ids]
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(stories, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, num_return_sequences=3, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ours = model.generate(**batch, logits_processor=[CFGLogitsProcessor(model, 2.0, opposing_prompt=opposing)],
                          **kw)
    new_ours = ours.sequences[:, batch.input_ids.shape[1]:]
    for i, (story, opp) in enumerate(zip(stories, opposing)):
        ids = _prompt(tiny_tokenizer, story)
        ref = model.generate(ids, logits_processor=[BruteForceCFG(model, 2.0, [opp], rows_per_prompt=3)], **kw)
        assert torch.equal(new_ours[3 * i: 3 * i + 3], ref.sequences[:, ids.shape[1]:])
        assert torch.allclose(ours.sequences_scores[3 * i: 3 * i + 3], ref.sequences_scores, atol=1e-4)


def test_cfg_processor_beam_search_reorders_the_opposing_branch(tiny_tokenizer, monkeypatch):
    """The beam test above can only fail if beams really get reordered: check that they do."""
    from cfg_textgen.backends import transformers as hf

    model = make_tiny_model("llama")
    reorders = []
    real = hf.OpposingBranch.reorder

    def spy(self, index):
        reorders.append(index.tolist())
        return real(self, index)

    monkeypatch.setattr(hf.OpposingBranch, "reorder", spy)
    model.generate(_prompt(tiny_tokenizer), logits_processor=[CFGLogitsProcessor(model, 2.0)],
                   max_new_tokens=16, num_beams=3, do_sample=False, pad_token_id=0)
    assert any(r != sorted(r) or len(set(r)) < len(r) for r in reorders)


def test_cfg_processor_num_return_sequences_sampling_equals_brute_force(tiny_tokenizer):
    model = make_tiny_model("llama")
    ids = _prompt(tiny_tokenizer)
    opp = tiny_tokenizer("The cold wind").input_ids
    kw = dict(num_return_sequences=3, do_sample=True)
    torch.manual_seed(3)
    a, sa = _generate(model, ids, [CFGLogitsProcessor(model, 1.5, opposing_prompt=opp)], steps=20, **kw)
    torch.manual_seed(3)
    b, sb = _generate(model, ids, [BruteForceCFG(model, 1.5, [opp], rows_per_prompt=3)], steps=20, **kw)
    assert torch.equal(a, b)
    assert_scores_close(sa, sb, 1e-4)
    assert len({tuple(r) for r in a.tolist()}) > 1  # the rows really diverged


# ---- acceptance 5: scale 1 costs nothing ------------------------------------------------------

def test_cfg_processor_scale_one_never_runs_the_opposing_pass(tiny_tokenizer):
    model = make_tiny_model("llama")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    ids = _prompt(tiny_tokenizer)
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    n_plain = len(calls)
    calls.clear()
    proc = CFGLogitsProcessor(model, 1.0)
    ours = model.generate(ids, logits_processor=[proc], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert len(calls) == n_plain == 20
    assert proc.branch is None
    assert torch.equal(plain, ours)
    torch.manual_seed(1)
    plain = model.generate(ids, max_new_tokens=20, do_sample=True, pad_token_id=0)
    torch.manual_seed(1)
    ours = model.generate(ids, logits_processor=[CFGLogitsProcessor(model, 1.0)], max_new_tokens=20,
                          do_sample=True, pad_token_id=0)
    assert torch.equal(plain, ours)


# ---- acceptance 6: reuse ----------------------------------------------------------------------

def test_cfg_processor_reused_equals_two_fresh_processors(tiny_tokenizer):
    model = make_tiny_model("qwen2")
    first, second = _prompt(tiny_tokenizer, "Once upon a time"), _prompt(tiny_tokenizer, "The knight rode")
    reused = CFGLogitsProcessor(model, 2.0)
    a1, s1 = _generate(model, first, [reused], steps=12)
    a2, s2 = _generate(model, second, [reused], steps=12)
    # the same prompt again: same length as the first call, so only the history check can tell
    a3, s3 = _generate(model, first, [reused], steps=12)
    b1, t1 = _generate(model, first, [CFGLogitsProcessor(model, 2.0)], steps=12)
    b2, t2 = _generate(model, second, [CFGLogitsProcessor(model, 2.0)], steps=12)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(a3, b1)
    assert_scores_close(s1, t1, 1e-6)
    assert_scores_close(s2, t2, 1e-6)
    assert_scores_close(s3, t1, 1e-6)


def test_cfg_processor_reused_on_the_previous_output_is_a_continuation(tiny_tokenizer):
    """Documented (docstring, README): generate(previous_output) with the same processor continues
    the opposing branch, i.e. equals ONE generation of both lengths; new_generation() starts afresh,
    equal to a new processor."""
    model = make_tiny_model("llama")
    ids = _prompt(tiny_tokenizer)
    for mode, opp in (("text", [1, 40]), ("last-token", "")):
        cfg = CFGLogitsProcessor(model, 2.0, opp, mode=mode)
        first, _ = _generate(model, ids, [cfg], steps=8)
        cont, cont_scores = _generate(model, first, [cfg], steps=8)
        whole, whole_scores = _generate(model, ids, [CFGLogitsProcessor(model, 2.0, opp, mode=mode)], steps=16)
        assert torch.equal(cont, whole)
        assert_scores_close(cont_scores, whole_scores[:, 8:], 1e-5)
        fresh, fresh_scores = _generate(model, first, [cfg.new_generation()], steps=8)
        want, want_scores = _generate(model, first, [CFGLogitsProcessor(model, 2.0, opp, mode=mode)], steps=8)
        assert torch.equal(fresh, want)
        assert_scores_close(fresh_scores, want_scores, 1e-5)
        if mode == "last-token":  # the two readings really differ
            assert not torch.allclose(F.log_softmax(fresh_scores[:, 0], -1), F.log_softmax(cont_scores[:, 0], -1))


def test_transformers_processor_reuse_is_stale_but_ours_is_not(tiny_tokenizer):
    """Documents why we track generations: transformers' processor keeps its cache across calls."""
    model = make_tiny_model("llama")
    ids = _prompt(tiny_tokenizer)
    theirs = UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model, unconditional_ids=torch.tensor([[1]]))
    _, first = _generate(model, ids, [theirs], steps=8)
    _, again = _generate(model, ids, [theirs], steps=8)
    finite = torch.isfinite(first) & torch.isfinite(again)
    assert (first[finite] - again[finite]).abs().max() > 1e-3


def test_cfg_processor_follows_the_model_dtype(tiny_tokenizer):
    """A bfloat16 model: the opposing pass runs in bfloat16, the guided scores come back in the
    scores' dtype, and they equal the formula applied (in float32) to the two branches' logits."""
    model = make_tiny_model("llama").to(torch.bfloat16)
    ids = _prompt(tiny_tokenizer)
    with torch.no_grad():
        cond = model(ids).logits[:, -1]
        opp = model(torch.tensor([[1]])).logits[:, -1]
    assert cond.dtype == torch.bfloat16
    got = CFGLogitsProcessor(model, 2.0)(ids, cond)
    assert got.dtype == torch.bfloat16
    c, u = F.log_softmax(cond.float(), -1), F.log_softmax(opp.float(), -1)
    # the formula on the story's raw-logit scale (not u + 2(c - u))
    assert torch.allclose(got.float(), (cond.float() + (2.0 - 1) * (c - u)).bfloat16().float())

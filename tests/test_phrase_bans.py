"""Phrase bans with backtracking: the matcher, both backends' rewind against a fresh prefill of the
kept text, and the generation on tiny models (sampling state restored on a rewind).

The default model's checks (a phrase greedy decoding writes never appears, the length is kept,
the stream equals the text) are in test_phrase_bans_default.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfg_textgen.backends.transformers import TransformersBackend
from cfg_textgen.engine import generate_stream
from cfg_textgen.phrase_bans import MAX_REWINDS_PER_POSITION, PhraseBans, fold
from cfg_textgen.presets import parse_preset
from conftest import make_tiny_model
from llamacpp_reference import exact_pair, have_llama_cpp

STORY = "Once upon a time there was a little fox"
OPPOSING = "The knight"


# ---- the matcher ---------------------------------------------------------------------------

def test_phrase_bans_find_ignores_case_by_default_and_reports_the_earliest_start():
    bans = PhraseBans(["Red Fox", "fox", ""])
    assert bans.find("the red fox ran") == 4  # "red fox" starts before "fox"
    assert bans.find("the red fox ran", start=5) == 8
    assert bans.find("the wolf") == -1
    assert PhraseBans(["Red Fox"], case_sensitive=True).find("the red fox") == -1
    assert not PhraseBans(["", ""])


def test_phrase_bans_open_start_is_where_a_phrase_may_still_begin():
    bans = PhraseBans(["a shiver ran"])
    assert bans.open_start("and then A SHIV") == 9  # the tail "A SHIV" may become the phrase
    assert bans.open_start("and then a") == 9
    assert bans.open_start("and then") == 8  # "" is not a start; the "n" of "then" is not "a"
    assert bans.open_start("a shiver ran") == 12  # complete phrases are `find`'s business
    assert bans.open_start("xa shiver", start=2) == 9


def test_fold_keeps_every_position():
    text = "İstanbul ẞ ÀB"
    assert len(fold(text)) == len(text) and fold("ÀB") == "àb"


# ---- the backends' rewind against a fresh prefill --------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_rewind_equals_a_fresh_prefill_of_the_kept_tokens(tiny_tokenizer, arch):
    model = make_tiny_model(arch)
    backend = TransformersBackend(model, tiny_tokenizer)
    story, opposing = backend.tokenize(STORY), backend.tokenize(OPPOSING)  # different lengths: left padding
    [pair] = backend.prefill([(story, opposing)])
    steps = [17, 40, 5, 99]
    for tok in steps:
        backend.step([(pair, tok)])
    logits = backend.rewind(pair, 2)
    [fresh] = backend.prefill([(story + steps[:2], opposing + steps[:2])])
    assert torch.allclose(logits, fresh.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(pair.logits, logits)
    # the cache behind it too: the next token gives the fresh pair's next logits
    [after] = backend.step([(pair, 123)])
    [fresh_after] = backend.step([(fresh, 123)])
    assert torch.allclose(after, fresh_after, atol=1e-5, rtol=1e-5)
    assert torch.allclose(backend.rewind(pair, 0), fresh_after, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`n` has to be an integer"):
        backend.rewind(pair, len(opposing) + 3)


@pytest.mark.slow
@pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")
def test_llamacpp_rewind_equals_the_reference_prefill_of_the_kept_tokens_bit_for_bit():
    """With micro-batches of 32 tokens on both sides the backend's logits equal llama.cpp's own
    from-scratch decode exactly (test_llamacpp_cfg.py), so a rewind must too: both sequences of the
    pair, right after the rewind and one token later."""
    with exact_pair(threads=1) as (backend, ref):
        story, opposing = backend.tokenize(STORY), backend.tokenize(OPPOSING)
        [pair] = backend.prefill([(story, opposing)])
        steps = [int(pair.logits[0].argmax())]
        for _ in range(4):
            [logits] = backend.step([(pair, steps[-1])])
            steps.append(int(logits[0].argmax()))
        fed = steps[:-1]  # the last pick is not in the pair yet
        cells = backend.used_cells
        logits = backend.rewind(pair, 3).numpy().copy()
        kept = fed[:1]
        for row, prompt in ((0, story), (1, opposing)):
            assert np.array_equal(logits[row], ref.logits(prompt + kept, last_only=True).reshape(-1)), row
        assert backend.used_cells == cells - 3 * 2
        [after] = backend.step([(pair, 1000)])
        for row, prompt in ((0, story), (1, opposing)):
            assert np.array_equal(after[row].numpy(), ref.logits(prompt + kept + [1000], last_only=True).reshape(-1))
        backend.release(pair)
        assert backend.used_cells == 0


# ---- the generation on a tiny model ----------------------------------------------------------

def ban_at(position: int, token: int, prompt_len: int):
    """A chain entry that bans `token` at one generated position: the reference a rewind must
    equal (the text as if that token had been banned there from the start)."""
    def processor(ids, scores):
        if ids.shape[1] == prompt_len + position:
            scores = scores.clone()
            scores[:, token] = float("-inf")
        return scores
    return processor


def released_lengths(backend, prompt_ids, tokens) -> list[int]:
    """len(text) after each number of tokens, from the backend's own text decoder."""
    dec = backend.decoder(prompt_ids)
    out = [0]
    for tok in tokens:
        dec.add(tok)
        out.append(len(dec.released))
    return out


SAMPLING = parse_preset({"name": "stateful", "max_new_tokens": 24, "samplers": [
    {"sampler": "repetition_penalty", "penalty": 1.2},
    {"sampler": "adaptive_p", "target": 0.5, "decay": 0.9},
    {"sampler": "mirostat", "version": 2, "tau": 4.0, "eta": 0.2},
    {"sampler": "xtc", "threshold": 0.05, "probability": 0.5},
    {"sampler": "temperature", "temperature": 1.3}]})


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_generation_after_a_rewind_equals_banning_the_first_token_there_from_the_start(tiny_tokenizer, scale):
    """Sampling with stateful samplers (mirostat's mu, adaptive_p's history, XTC's and the pick's
    draws): the text with a phrase banned equals the text of a run that never wrote the phrase,
    because the ban's first token was banned at that position from the start, so the RNG and every
    sampler's state were restored on the rewind."""
    from cfg_textgen.chain import build_chain

    backend = TransformersBackend(make_tiny_model("llama"), tiny_tokenizer)
    prompt = backend.tokenize(STORY)
    n = SAMPLING.max_new_tokens

    def run(bans=(), extra=None):
        gen = torch.Generator().manual_seed(5)
        chain = build_chain(SAMPLING, backend.tokenizer, gen)
        if extra is not None:
            chain.insert(0, extra)
        s = generate_stream(backend, None, prompt, scale=scale, opposing_prompt=OPPOSING, chain=chain,
                            max_new_tokens=n, do_sample=True, generator=gen, ban_eos=True, banned_strings=bans)
        pieces = list(s)
        assert "".join(pieces) == s.text and len(s.token_ids) == n
        return s

    plain = run()
    ends = released_lengths(backend, prompt, plain.token_ids)
    checked = 0
    for k in range(3, n - 4, 3):  # phrases made of tokens k, k+1 of the plain text
        phrase = plain.text[ends[k]:ends[k + 2]]
        start = plain.text.lower().find(phrase.lower())
        if not phrase.strip() or len(phrase) < 3:
            continue
        first = max(j for j in range(n) if ends[j] <= start)  # the token whose text holds the start
        banned = run([phrase.upper()])  # case-insensitive by default
        assert phrase.lower() not in banned.text.lower()
        if banned.stats.rewinds != 1:  # the new text ran into the phrase again: a different reference
            continue
        reference = run(extra=ban_at(first, plain.token_ids[first], len(prompt)))
        assert banned.token_ids == reference.token_ids and banned.text == reference.text
        checked += 1
    assert checked >= 2


def test_generation_lets_a_phrase_through_after_the_bounded_rewinds(tiny_tokenizer):
    """Banning every character any token writes: each position is retried MAX_REWINDS_PER_POSITION
    times, then the text goes on (the tokens banned there stay banned), and the length is kept."""
    backend = TransformersBackend(make_tiny_model("llama"), tiny_tokenizer)
    phrases = sorted({c for t in range(len(tiny_tokenizer)) for c in tiny_tokenizer.decode([t])})
    s = generate_stream(backend, None, STORY, max_new_tokens=3, do_sample=False, ban_eos=True, banned_strings=phrases)
    pieces = list(s)
    assert len(s.token_ids) == 3 and "".join(pieces) == s.text
    assert s.stats.rewinds >= MAX_REWINDS_PER_POSITION


def test_stream_holds_back_only_text_that_may_become_a_banned_phrase(tiny_tokenizer):
    """A phrase that never starts changes nothing, piece for piece; a phrase that is only begun
    holds back the text from the token where it began until the text decides."""
    backend = TransformersBackend(make_tiny_model("llama"), tiny_tokenizer)
    settings = dict(max_new_tokens=20, do_sample=False, ban_eos=True)
    plain = list(generate_stream(backend, None, STORY, **settings))
    assert list(generate_stream(backend, None, STORY, banned_strings=["\x00never"], **settings)) == plain
    text = "".join(plain)
    begun = text[5:9] + "\x00"  # its first 4 characters appear, then the text goes elsewhere
    held = list(generate_stream(backend, None, STORY, banned_strings=[begun], **settings))
    assert "".join(held) == text and held != plain
    def ends(pieces):  # where each piece ends in the text
        return set(np.cumsum([len(p) for p in pieces]).tolist())

    assert any(5 < end < 9 for end in ends(plain))  # plainly streamed, the begun phrase is split
    assert not any(5 < end < 9 for end in ends(held))  # held back, it comes out whole
    token_start = max(end for end in ends(plain) | {0} if end <= 5)  # the token where it began
    assert ends(held) <= ends(plain)  # pieces still end where tokens end, and only the text from
    assert all(token_start < end <= 9 for end in ends(plain) - ends(held))  # that token waited


def test_model_generate_refuses_a_preset_with_phrase_bans():
    from cfg_textgen.chain import generate_kwargs
    from cfg_textgen.errors import CFGTextgenError

    preset = parse_preset({"name": "banning", "banned_strings": ["a testament to"]})
    with pytest.raises(CFGTextgenError, match="banned_strings: phrase bans go back in the text"):
        generate_kwargs(preset)

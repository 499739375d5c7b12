"""The rules engine, analysis and CLI share: the per-row context cut, the one EOS
rule, and analysis on its input's device. References: generate with our CFG processor on the kept
tokens (a different code path from the engine's batched rows), and ids counted by hand."""

from __future__ import annotations


import pytest
import torch
from transformers import LogitsProcessor

from cfg_textgen import analysis as A
from cfg_textgen.context import bos_id, eos_ids, fit_context, fit_with_memory
from cfg_textgen.engine import generate_stream
from cfg_textgen.errors import CFGTextgenError
from cfg_textgen.guidance import CFGLogitsProcessor
from conftest import make_tiny_model, make_tiny_tokenizer

WINDOW = 256  # the tiny models' max_position_embeddings
STORY = " ".join(["The knight rode through the rain."] * 40)
LONG_OPPOSING = " ".join(["She opened the door and the cold wind of the north came in."] * 6)


# ---- the cut --------------------------------------------------------------------------------------

def test_fit_context_by_hand():
    assert fit_context([1, 2, 3], None, 100) == [1, 2, 3]
    assert fit_context(list(range(10)), 8, 3) == [5, 6, 7, 8, 9]  # 8 - 3 = 5 most recent
    assert fit_context([1] + list(range(10, 20)), 8, 3, special_ids={1}) == [1, 16, 17, 18, 19]  # BOS kept
    with pytest.raises(Exception, match="context of 8 tokens"):
        fit_context([1, 2], 8, 8)


def test_fit_with_memory_by_hand_as_koboldcpp_cuts():
    memory, story = [1, 50, 51, 52], [1] + list(range(10, 30))  # both tokenized with BOS 1
    # window 16, 4 new: 12 prompt tokens = the whole memory + the 8 most recent story tokens, no 2nd BOS
    assert fit_with_memory(memory, story, 16, 4, special_ids={1}) == [1, 50, 51, 52] + list(range(22, 30))
    assert fit_with_memory(memory, [1, 10, 11], 16, 4, special_ids={1}) == [1, 50, 51, 52, 10, 11]  # fits
    # a memory that alone leaves fewer than 4 free tokens keeps its most recent ones, BOS in front
    # (KoboldCpp: 16 - 4 - 4 = 8 memory tokens), and the story the 4 tokens left
    long_memory = [1] + list(range(100, 120))
    assert fit_with_memory(long_memory, story, 16, 4, special_ids={1}) == \
        [1] + list(range(113, 120)) + list(range(26, 30))
    with pytest.raises(CFGTextgenError, match="the memory"):
        fit_with_memory(memory, story, 8, 8)


def test_server_cut_to_a_clients_window_is_the_engines_cut(tiny_model_dir):
    """Service.fit (a client's smaller context setting) keeps BOS in front and the most recent
    tokens; when one token fits it keeps the last story token (old code: BOS alone, no story)."""
    from cfg_textgen.server.scheduling import Service

    service = Service(str(tiny_model_dir), backend="transformers", parallel=1, log=lambda *a: None)
    try:
        ids = [1] + list(range(10, 30))  # <s> then story tokens
        assert service.fit(ids, 10, 4) == [1, 25, 26, 27, 28, 29]  # 10 - 4 = 6 tokens: BOS + last 5
        assert service.fit(ids, 30, 4) == ids  # fits: unchanged
        assert service.fit(ids, 5, 4) == [29]  # room for one token
    finally:
        service.close()


def test_engine_cut_counts_only_the_story_rows_own_length(tiny_tokenizer):
    """A long opposing prompt does not shorten the story: the rows are separate (old code: the story
    kept window - new tokens - opposing length)."""
    tok, model = tiny_tokenizer, make_tiny_model("llama")
    ids, opp = tok(STORY)["input_ids"], tok(LONG_OPPOSING)["input_ids"]
    assert len(ids) > WINDOW and 60 < len(opp) < WINDOW - 20
    cuts = []
    s = generate_stream(model, tok, STORY, scale=2.0, opposing_prompt=LONG_OPPOSING, max_new_tokens=20,
                        do_sample=False, on_cut=lambda kept, total: cuts.append((kept, total)))
    assert cuts == [(WINDOW - 20, len(ids))] and s.prompt_ids == ids[-(WINDOW - 20):]
    assert s.opposing == opp
    list(s)
    # reference: transformers' generate with our processor on the kept tokens, the whole opposing prompt
    kept = torch.tensor([ids[-(WINDOW - 20):]])
    out = model.generate(kept, logits_processor=[CFGLogitsProcessor(model, 2.0, opposing_prompt=opp)],
                         max_new_tokens=20, do_sample=False, pad_token_id=0, top_k=None)
    assert s.token_ids == out[0, kept.shape[1]:].tolist()[:len(s.token_ids)] and len(s.token_ids) == 20


def test_engine_cuts_an_opposing_prompt_longer_than_the_window_on_its_own(tiny_tokenizer):
    tok, model = tiny_tokenizer, make_tiny_model("llama")
    opp_text = " ".join(["The cold wind of the north came in."] * 40)
    opp = tok(opp_text)["input_ids"]
    assert len(opp) > WINDOW
    with pytest.warns(UserWarning, match="opposing prompt"):
        s = generate_stream(model, tok, "Once upon a time", scale=2.0, opposing_prompt=opp_text,
                            max_new_tokens=10, do_sample=False)
    assert s.opposing == opp[-(WINDOW - 10):] and s.prompt_ids == tok("Once upon a time")["input_ids"]
    list(s)
    assert 1 <= len(s.token_ids) <= 10


def test_analysis_cuts_the_prompt_by_the_engines_rule(tiny_tokenizer):
    """One rule: with a leading BOS (a special token), analysis keeps it in front as the engine does."""
    tok, model = tiny_tokenizer, make_tiny_model("llama")
    text = "<s>" + STORY  # the tiny tokenizer adds no BOS itself: write it
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and len(ids) > WINDOW
    logged = []
    got = A.encode_prompt(tok, text, model, reserve=20, log=logged.append)
    engine = generate_stream(model, tok, text, scale=2.0, opposing_prompt=LONG_OPPOSING, max_new_tokens=20,
                             on_cut=lambda *a: None)
    assert got == engine.prompt_ids == [1] + ids[-(WINDOW - 20 - 1):]
    assert f"kept the last {WINDOW - 20}" in logged[0]


# ---- one EOS rule -----------------------------------------------------------------------------------

class ForceTokens(LogitsProcessor):
    """The next token is `ids[i]` at step i (everything else -inf)."""

    def __init__(self, ids, prompt_len):
        self.ids, self.prompt_len = list(ids), prompt_len

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(input_ids.shape[1] - self.prompt_len, len(self.ids) - 1)]] = 0.0
        return out


@pytest.fixture(scope="module")
def endoftext_pair():
    """A tiny model whose generation_config ends at </s> (2) and whose tokenizer also has an
    end-of-document token <|endoftext|> (400), as SmolLM2-Instruct has <|im_end|> / <|endoftext|>."""
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    model = make_tiny_model("llama", vocab_size=len(tok))
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 400 and model.generation_config.eos_token_id == 2
    return model, tok


def test_eos_ids_include_the_end_of_document_token(endoftext_pair):
    model, tok = endoftext_pair
    assert eos_ids(model, tok) == {2, 400}


def test_engine_stops_at_the_end_of_document_token(endoftext_pair):
    model, tok = endoftext_pair
    prompt = tok("Once upon a time")["input_ids"]
    forced = tok(" the fox", add_special_tokens=False)["input_ids"] + [400, 5, 6]
    for scale in (1.0, 2.0):
        s = generate_stream(model, tok, prompt, scale=scale, chain=[ForceTokens(forced, len(prompt))],
                            max_new_tokens=len(forced), do_sample=False)
        text = "".join(s)
        assert s.stop_reason == "eos" and s.token_ids == forced[:-2] and text == " the fox"


def test_analysis_ends_a_continuation_at_the_end_of_document_token(endoftext_pair):
    model, tok = endoftext_pair
    assert A._strip_eos_padding([5, 6, 400, 7, 8], model, tok) == [5, 6, 400]
    # generate as analysis runs it stops there too: force the model through a preset-free generate fn
    prompt = tok("Once upon a time")["input_ids"]
    gen = A.make_generate_fn(model, tok, seed=0, max_new_tokens=6)
    forced = [5, 6, 400, 7, 8, 9]
    import cfg_textgen.chain as P  # where generate_kwargs finds build_processors

    real = P.build_processors

    def with_force(*a, **kw):
        procs = real(*a, **kw)
        procs.append(ForceTokens(forced, len(prompt)))
        return procs

    P.build_processors = with_force
    try:
        out = gen(prompt, 1.0)
    finally:
        P.build_processors = real
    assert out == [5, 6, 400]


@pytest.mark.slow
def test_default_model_ends_a_story_at_endoftext(default_model):
    model, tok = default_model
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    assert end not in {model.generation_config.eos_token_id} and end in eos_ids(model, tok)
    prompt = tok("The end of the tale.")["input_ids"]
    s = generate_stream(model, tok, prompt, chain=[ForceTokens([30, end, 31], len(prompt))], max_new_tokens=3,
                        do_sample=False)
    list(s)
    assert s.stop_reason == "eos" and s.token_ids == [30, end]


# ---- analysis on its input's device -------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_analysis_scores_on_the_device_of_the_model(tiny_tokenizer):
    model = make_tiny_model("llama").to("cuda")
    ids = tiny_tokenizer("Once upon a time")["input_ids"]
    gen = A.make_generate_fn(model, tiny_tokenizer, seed=0, max_new_tokens=4)
    new = gen(ids, 2.0)
    row = A.score_row(model, tiny_tokenizer, ids, new, 2.0, [1])
    assert row.fluency == row.fluency  # not NaN: the gather ran on the scores' device


# ---- BOS -----------------------------------------------------------------------------------------

def test_bos_id_takes_the_model_config_first_then_the_tokenizer(tiny_tokenizer):
    model = make_tiny_model("llama")
    assert tiny_tokenizer.bos_token_id == 1 and bos_id(model, tiny_tokenizer) == 1
    model.config.bos_token_id = 5  # the model's own word wins over the tokenizer's <s>
    assert bos_id(model, tiny_tokenizer) == 5
    model.config.bos_token_id = None
    assert bos_id(model, tiny_tokenizer) == 1 and bos_id(model) is None


def test_every_blank_opposing_story_starts_with_the_one_bos(tiny_tokenizer):
    """The plugin, the engine's backend and analysis all take BOS from context.bos_id: with a
    config BOS (5) that differs from the tokenizer's (1), every blank opposing story is [5]."""
    from cfg_textgen.backends.transformers import TransformersBackend

    model = make_tiny_model("llama")
    model.config.bos_token_id = 5
    assert CFGLogitsProcessor(model, 2.0, "", tiny_tokenizer).opposing_rows == [[5]]
    assert TransformersBackend(model, tiny_tokenizer).bos_id == 5
    assert A.Opposing().start_ids([1, 7, 8], model, tiny_tokenizer) == [5]

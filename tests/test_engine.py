"""The streaming engine against independent references: `model.generate` with our plugin
(CFGLogitsProcessor first, then the same sampler chain), the tokenizer's one-shot decode, and
forward-pass counts taken by a hook on the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cfg_textgen.engine import IncrementalDecoder, generate_stream, stream_preset
from cfg_textgen.errors import CFGTextgenError
from cfg_textgen.guidance import CFGLogitsProcessor
from cfg_textgen.presets import build_chain, generate_kwargs, load_preset
from conftest import make_tiny_model

STEPS = 24
PROMPT = "Once upon a time the knight rode"
LONG_OPPOSING = "She opened the door and the cold wind of the north came in. The dragon was awake."
TEXT = "Café, naïve, déjà vu: 🦊🐉✨ \"Run!\" he shouted.\n\nChapter two"


def _preset(scale, opposing="", mode="text", do_sample=True, name="balanced-story"):
    # balanced-story: repetition penalty (sees the history), temperature 0.8, top-p 0.95
    p = load_preset(name)
    return dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, scale=scale, opposing_prompt=opposing,
                                                          opposing_mode=mode),
                               do_sample=do_sample, max_new_tokens=STEPS, stop=())


def _plugin_tokens(model, tok, preset, seed):
    """Reference: model.generate with CFGLogitsProcessor first (also at scale 1, where it returns
    the raw scores without a second pass), then a fresh chain; transformers' own warpers neutralised."""
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kwargs = generate_kwargs(dataclasses.replace(preset, cfg=dataclasses.replace(preset.cfg, scale=1.0)))
    cfg = CFGLogitsProcessor(model, preset.cfg.scale, preset.cfg.opposing_prompt, tok,
                             mode=preset.cfg.opposing_mode)
    kwargs["logits_processor"] = LogitsProcessorList([cfg, *build_chain(preset, tok)])
    assert kwargs["top_k"] in (None, 0) and kwargs["top_p"] == 1.0 and kwargs["temperature"] == 1.0
    torch.manual_seed(seed)
    out = model.generate(ids, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _engine_tokens(model, tok, preset, seed):
    torch.manual_seed(seed)  # generator=None: the engine samples from the global RNG, like generate
    stream = stream_preset(model, tok, PROMPT, preset)
    text = "".join(stream)
    return stream, text


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("opposing", ["", LONG_OPPOSING], ids=["blank", "text"])
@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0])
def test_engine_matches_generate_plugin(tiny_model, tiny_tokenizer, scale, opposing, do_sample):
    preset = _preset(scale, opposing, do_sample=do_sample)
    want = _plugin_tokens(tiny_model, tiny_tokenizer, preset, seed=11)
    stream, _ = _engine_tokens(tiny_model, tiny_tokenizer, preset, seed=11)
    assert len(want) >= 5
    assert stream.token_ids == want


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_engine_matches_generate_plugin_last_token_mode(tiny_tokenizer, do_sample):
    model = make_tiny_model("llama")
    preset = _preset(2.0, "", mode="last-token", do_sample=do_sample)
    want = _plugin_tokens(model, tiny_tokenizer, preset, seed=5)
    stream, _ = _engine_tokens(model, tiny_tokenizer, preset, seed=5)
    assert stream.token_ids == want


def test_engine_with_seed_repeats_and_uses_its_own_generator(tiny_tokenizer):
    model = make_tiny_model("qwen2")
    runs = []
    for global_seed in (1, 2):  # the global RNG must not matter when a seed is given
        torch.manual_seed(global_seed)
        s = generate_stream(model, tiny_tokenizer, PROMPT, scale=1.5, max_new_tokens=16, seed=7)
        list(s)
        runs.append(s.token_ids)
    assert runs[0] == runs[1]


class _CountForwards:
    def __init__(self, model):
        self.batches = []
        # the decoder runs once per forward pass whether the engine calls the whole model or the
        # decoder and the output layer itself (backends.transformers.split_head)
        self.handle = model.base_model.register_forward_hook(lambda mod, args, kwargs, out: self.batches.append(
            (args[0] if args else kwargs["input_ids"]).shape), with_kwargs=True)


@pytest.mark.parametrize("scale,batch", [(1.0, 1), (1.5, 2), (0.0, 2)])
def test_engine_runs_one_forward_per_token(tiny_tokenizer, scale, batch):
    model = make_tiny_model("llama")
    counter = _CountForwards(model)
    try:
        s = generate_stream(model, tiny_tokenizer, PROMPT, scale=scale, opposing_prompt=LONG_OPPOSING,
                            max_new_tokens=10, do_sample=False)
        list(s)
    finally:
        counter.handle.remove()
    n = len(s.token_ids)
    assert len(counter.batches) == n == s.stats.forwards
    assert {shape[0] for shape in counter.batches} == {batch}
    assert all(shape[1] == 1 for shape in counter.batches[1:])  # KV cache: one new token per step
    assert s.stats.tokens == n and s.stats.seconds > 0 and s.stats.tokens_per_second > 0


class ForceTokens(LogitsProcessor):
    """Make the next token `ids[i]` at step i (everything else -inf)."""

    def __init__(self, ids, prompt_len):
        self.ids, self.prompt_len = list(ids), prompt_len

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.prompt_len
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(i, len(self.ids) - 1)]] = 0.0
        return out


def _forced(model, tok, text, stop=(), extra=(), **kw):
    prompt_ids = tok(PROMPT)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"] + list(extra)
    s = generate_stream(model, tok, PROMPT, chain=[ForceTokens(ids, len(prompt_ids))], do_sample=False,
                        max_new_tokens=len(ids), stop=stop, **kw)
    return s, list(s), ids


def test_stream_pieces_join_to_one_shot_decode(tiny_tokenizer):
    tok = tiny_tokenizer
    s, pieces, ids = _forced(make_tiny_model("llama"), tok, TEXT, scale=1.5)
    # the text really has characters split over several byte-level tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)
    assert s.token_ids == ids and s.stop_reason == "max_tokens"


def test_incremental_decoder_releases_each_character_once_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("🦊🐉✨ déjà", add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok, tok(PROMPT)["input_ids"])
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "🦊🐉✨ déjà"
    assert "" in pieces  # some tokens end inside a character and release nothing yet
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_flushes_an_unfinished_character(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("🦊", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(i) for i in ids[:-1]] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids[:-1]) and pieces[-1].endswith("\ufffd")


@pytest.mark.parametrize("stop,want", [
    (["\n\n"], "Café, naïve, déjà vu: 🦊🐉✨ \"Run!\" he shouted."),
    (["shout", "🐉"], "Café, naïve, déjà vu: 🦊"),
    (["Chapter three"], TEXT),  # a partial match is held back, then released at the end
    (["vu: 🦊🐉✨ \"Run!\" he shouted.\n\nChapter two and more"], TEXT),
])
def test_stream_stop_sequence_is_cut_and_not_shown(tiny_tokenizer, stop, want):
    s, pieces, _ = _forced(make_tiny_model("llama"), tiny_tokenizer, TEXT, stop=stop)
    assert "".join(pieces) == want == s.text
    assert s.stop_reason == ("max_tokens" if want == TEXT else "stop")


def test_stream_stops_at_eos_and_does_not_show_it(tiny_tokenizer):
    s, pieces, ids = _forced(make_tiny_model("llama"), tiny_tokenizer, "The end.", extra=[2, 5, 6])
    assert s.stop_reason == "eos"
    assert s.token_ids == ids[:-2] and s.token_ids[-1] == 2
    assert "".join(pieces) == "The end."


def test_stream_cuts_old_text_to_fit_the_context(tiny_tokenizer):
    tok, model = tiny_tokenizer, make_tiny_model("llama")  # max_position_embeddings 256
    story = " ".join(["The knight rode through the rain."] * 40)
    ids = tok(story)["input_ids"]
    assert len(ids) > 256
    cuts = []
    s = generate_stream(model, tok, story, scale=1.5, opposing_prompt="", max_new_tokens=20,
                        do_sample=False, on_cut=lambda kept, total: cuts.append((kept, total)))
    # window - new tokens: the opposing row is a row of its own (not counted in the story's room)
    assert cuts == [(256 - 20, len(ids))]
    assert s.prompt_ids == ids[-(256 - 20):]
    list(s)
    assert len(s.token_ids) == 20 and s.stats.kept_tokens == 236 and s.stats.prompt_tokens == len(ids)
    # the same as continuing the kept tokens directly
    ref = generate_stream(model, tok, ids[-236:], scale=1.5, max_new_tokens=20, do_sample=False)
    list(ref)
    assert ref.token_ids == s.token_ids


def test_stream_refuses_more_new_tokens_than_the_context(tiny_tokenizer):
    with pytest.raises(CFGTextgenError, match="context of 256 tokens"):
        # 256 new tokens fill the window (255 leave one story token now that the opposing row no
        # longer counts against the story)
        generate_stream(make_tiny_model("llama"), tiny_tokenizer, PROMPT, scale=1.5, max_new_tokens=256)


def test_stream_empty_story_starts_from_bos(tiny_tokenizer):
    s = generate_stream(make_tiny_model("llama"), tiny_tokenizer, "", max_new_tokens=4, do_sample=False)
    list(s)
    assert s.prompt_ids == [1] and len(s.token_ids) >= 1


@pytest.mark.parametrize("kwargs,word", [
    (dict(scale=float("nan")), "scale"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(opposing_mode="first-token"), "opposing_mode"),
    (dict(opposing_mode="last-token", opposing_prompt="x"), "opposing_prompt"),
])
def test_stream_rejects_bad_settings_naming_them(tiny_tokenizer, kwargs, word):
    with pytest.raises(ValueError, match=word):
        generate_stream(make_tiny_model("llama"), tiny_tokenizer, PROMPT, **kwargs)


# ---- the real default model (slow) -----------------------------------------------------------

@pytest.mark.slow
def test_stream_real_tokenizer_pieces_join_to_one_shot_decode(default_model):
    model, tok = default_model
    text = "Zoë's café served crème brûlée 🍮 and 🐉🔥 — «déjà vu» ñandú, 東京."
    s, pieces, ids = _forced(model, tok, text, scale=1.5)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters split over tokens
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_engine_matches_generate_plugin_on_the_default_model(default_model):
    model, tok = default_model
    preset = dataclasses.replace(_preset(1.5, "", do_sample=True), max_new_tokens=8)
    want = _plugin_tokens(model, tok, preset, seed=3)
    stream, text = _engine_tokens(model, tok, preset, seed=3)
    assert stream.token_ids == want
    assert text == tok.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_engine_split_head_gives_the_models_own_logits(arch, tiny_tokenizer):
    """The engine's own output layer (W @ h.T) equals the model's forward, up to float rounding."""
    from cfg_textgen.backends.transformers import head_logits, split_head

    model = make_tiny_model(arch)
    decoder, weight = split_head(model)
    ids = torch.tensor([tiny_tokenizer(PROMPT).input_ids, tiny_tokenizer(PROMPT[::-1]).input_ids[:len(
        tiny_tokenizer(PROMPT).input_ids)]])
    with torch.no_grad():
        want = model(ids).logits[:, -1]
        hidden = decoder(ids).last_hidden_state[:, -1]
        got = head_logits(weight, hidden)
        one = head_logits(weight, hidden[:1])  # a single row takes the zero-padded path
    assert torch.allclose(got, want, atol=1e-5)
    assert one.shape == (1, want.shape[1]) and torch.allclose(one, want[:1], atol=1e-5)


def test_engine_split_head_refuses_models_that_scale_their_logits():
    from transformers import CohereConfig, AutoModelForCausalLM

    from cfg_textgen.backends.transformers import head_logits, split_head

    cohere = AutoModelForCausalLM.from_config(CohereConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, logit_scale=0.5))
    assert split_head(cohere) is None
    assert split_head(make_tiny_model("llama")) is not None


def test_engine_scheduler_and_llama_backend_modules_import_no_transformers():
    """The llama.cpp path (engine, scheduler, decode loop, analysis, the server's service, the
    llama.cpp backend) never loads transformers: it costs a second or more at every start."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, cfg_textgen.engine, cfg_textgen.scheduler, cfg_textgen.analysis, "
            "cfg_textgen.server.scheduling, cfg_textgen.backends.llama_cpp\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

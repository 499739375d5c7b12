"""Streaming decode (backends/transformers.py): `StreamDecoder` (tokenizers' DecodeStream) for fast
tokenizers, `IncrementalDecoder` for slow ones. The reference is the tokenizer's own one-shot
decode of the whole story: the story's text followed by the streamed pieces must equal
`decode(prompt ids + new ids)`, on byte-level BPE (the tiny tokenizer and SmolLM2's), on a
SentencePiece-style tokenizer with byte fallback (its decoder drops the first token's leading
space: the prompt prefix decides the join), and on a slow SentencePiece tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from cfg_textgen.backends.transformers import (IncrementalDecoder, StreamDecoder, TransformersBackend,
                                               text_decoder)
from cfg_textgen.engine import generate_stream
from conftest import _CORPUS, make_tiny_model

PROMPT = "Once upon a time the knight rode"
TEXTS = [
    "Café, naïve, déjà vu: 🦊🐉✨ \"Run!\" he shouted.\n\nChapter two",
    " leading space, then  two spaces and a tab\there",
    "\n\nnew lines first\n",
    " rare: 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ Ω",  # byte-fallback pieces where the vocabulary lacks them
    ". the end.",
]


def make_sentencepiece_style_tokenizer():
    """A Llama-2-style fast tokenizer: Metaspace (▁), BPE with byte fallback (<0xE9>), and a
    decoder that strips the first token's leading space, trained on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_CORPUS, trainer)
    # byte fallback needs <0x00>..<0xFF> as ordinary vocabulary entries (a special token would be
    # skipped by skip_special_tokens): add them to the trained model
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_slow_sentencepiece_tokenizer(tmp_path):
    """A slow (Python) tokenizer over a SentencePiece model trained here: no DecodeStream."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import BertGenerationTokenizer

    model = tmp_path / "sp.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 5), model_writer=f, vocab_size=320,
                                       byte_fallback=True, character_coverage=1.0, minloglevel=3)
    return BertGenerationTokenizer(vocab_file=str(model))


@pytest.fixture(scope="module")
def sp_tokenizer():
    return make_sentencepiece_style_tokenizer()


def _stream(decoder_cls, tok, prompt_ids, ids):
    dec = decoder_cls(tok, prompt_ids)
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == dec.released
    return pieces


def _one_shot_continuation(tok, prompt_ids, ids):
    """What the new ids add to the story's text in one decode of everything."""
    story = tok.decode(prompt_ids, skip_special_tokens=True)
    whole = tok.decode(prompt_ids + ids, skip_special_tokens=True)
    assert whole.startswith(story)
    return whole[len(story):]


def _new_ids(tok, text):
    """The ids a model would generate for `text` after PROMPT (encoded with it, so that a leading
    space is part of the first new token as in a real story)."""
    story = tok(PROMPT + text, add_special_tokens=False)["input_ids"]
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert story[:len(prompt)] == prompt
    return story[len(prompt):]


def _check(tok, text, decoder_cls=StreamDecoder):
    prompt_ids = tok(PROMPT)["input_ids"]
    ids = _new_ids(tok, text)
    pieces = _stream(decoder_cls, tok, prompt_ids, ids)
    assert "".join(pieces) == _one_shot_continuation(tok, prompt_ids, ids)
    assert not any("\ufffd" in p for p in pieces)  # every character comes out whole
    return ids, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_equals_one_shot_decode_byte_level(tiny_tokenizer, text):
    ids, pieces = _check(tiny_tokenizer, text)
    assert "".join(pieces) == tiny_tokenizer.decode(ids)  # byte-level BPE: no join rule at all


def test_stream_decoder_holds_split_characters_back(tiny_tokenizer):
    ids, pieces = _check(tiny_tokenizer, "🦊🐉✨ déjà")
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)  # really split over tokens
    assert "" in pieces[:-1]  # some tokens end inside a character and release nothing yet


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_equals_one_shot_decode_sentencepiece_byte_fallback(sp_tokenizer, text):
    ids, pieces = _check(sp_tokenizer, text)
    if text.startswith(" rare"):
        assert any(sp_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte pieces


def test_stream_decoder_keeps_the_space_the_prompt_prefix_gives_the_first_token(sp_tokenizer):
    """A SentencePiece decoder strips the leading space of the first token it decodes: without the
    story's last tokens before it, "▁the" would come out as "the" glued to the story."""
    prompt_ids = sp_tokenizer(PROMPT)["input_ids"]
    ids = _new_ids(sp_tokenizer, " the end")
    assert sp_tokenizer.decode(ids) == "the end"  # alone, the space is lost
    assert "".join(_stream(StreamDecoder, sp_tokenizer, prompt_ids, ids)) == " the end"
    assert "".join(_stream(StreamDecoder, sp_tokenizer, [], ids)) == sp_tokenizer.decode(ids)  # no story


@pytest.mark.parametrize("which", ["tiny", "sentencepiece"])
def test_stream_decoder_random_ids_equal_one_shot_decode(tiny_tokenizer, sp_tokenizer, which):
    """Any id sequence a model could sample (specials, stray continuation bytes, a character cut off
    at the end: `flush` gives its U+FFFD as the one-shot decode does); both decoders agree."""
    tok = tiny_tokenizer if which == "tiny" else sp_tokenizer
    prompt_ids = tok(PROMPT)["input_ids"]
    ordinary = [i for t, i in tok.get_vocab().items() if not t.startswith("<0x")]
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randrange(1, 25)
        if which == "tiny":
            ids = [rng.randrange(len(tok)) for _ in range(n)]
        else:
            # ByteFallback turns every byte of an invalid run of byte tokens into U+FFFD, whole
            # characters in the run included, so a one-shot decode of random bytes (or of a run
            # ending in a cut-off character) blanks characters a stream has already shown (and
            # never retracts); a model emits the bytes of whole characters: draw ordinary tokens
            # and whole characters' byte pieces
            ids = []
            for _ in range(n):
                if rng.random() < 0.3:
                    ids += tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in chr(rng.randrange(0x80, 0x2FFFF))
                                                      .encode("utf-8", "surrogatepass")])
                else:
                    ids.append(rng.choice(ordinary))
        want = _one_shot_continuation(tok, prompt_ids, ids)
        assert "".join(_stream(StreamDecoder, tok, prompt_ids, ids)) == want, ids
        assert "".join(_stream(IncrementalDecoder, tok, prompt_ids, ids)) == want, ids


def test_stream_decoder_flushes_an_unfinished_character(tiny_tokenizer):
    ids = tiny_tokenizer("🦊", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    pieces = _stream(StreamDecoder, tiny_tokenizer, [], ids[:-1])
    assert "".join(pieces) == tiny_tokenizer.decode(ids[:-1]) and pieces[-1].endswith("\ufffd")


def test_fast_tokenizers_stream_through_decodestream_slow_ones_through_the_fallback(tiny_tokenizer, tmp_path):
    assert isinstance(TransformersBackend(make_tiny_model("llama"), tiny_tokenizer).decoder([1]), StreamDecoder)
    slow = make_slow_sentencepiece_tokenizer(tmp_path)
    assert not getattr(slow, "is_fast", True)
    assert isinstance(text_decoder(slow, [1]), IncrementalDecoder)
    for text in TEXTS:
        _check(slow, text, decoder_cls=IncrementalDecoder)


def test_engine_stream_pieces_join_to_the_one_shot_decode(tiny_tokenizer):
    """The engine's whole path (sampled tokens, no forcing) through the DecodeStream decoder."""
    s = generate_stream(make_tiny_model("llama"), tiny_tokenizer, PROMPT, scale=1.5, max_new_tokens=60,
                        do_sample=True, seed=3)
    pieces = list(s)
    assert isinstance(s._decoder, StreamDecoder)
    new = s.token_ids[:-1] if s.stop_reason == "eos" else s.token_ids
    assert "".join(pieces) == s.text == tiny_tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_on_the_default_models_tokenizer(default_model, text):
    """SmolLM2's byte-level BPE (its decoder is ByteLevel with add_prefix_space): the real stories'
    tokenizer."""
    _, tok = default_model
    ids, pieces = _check(tok, text)
    assert "".join(pieces) == tok.decode(ids)
    assert "".join(_stream(IncrementalDecoder, tok, tok(PROMPT)["input_ids"], ids)) == "".join(pieces)


@pytest.mark.slow
def test_stream_decoder_random_ids_on_the_default_models_tokenizer(default_model):
    _, tok = default_model
    prompt_ids = tok(PROMPT)["input_ids"]
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(StreamDecoder, tok, prompt_ids, ids)) == _one_shot_continuation(tok, prompt_ids, ids)


def test_stream_decoder_continues_with_the_fallback_when_decodestream_refuses(tiny_tokenizer):
    """DecodeStream raises when a window's text does not extend its previous text (a decoder that
    rewrites earlier characters); the story must go on, through IncrementalDecoder, unchanged."""
    tok = tiny_tokenizer
    prompt_ids, ids = tok(PROMPT)["input_ids"], _new_ids(tok, TEXTS[0])

    class Refuses:  # DecodeStream that fails from the 7th token on, as with an invalid prefix
        def __init__(self, real):
            self.real, self.calls = real, 0

        def step(self, rust, token_id):
            self.calls += 1
            if self.calls >= 7:
                raise Exception("Invalid prefix encountered")
            return self.real.step(rust, token_id)

    dec = StreamDecoder(tok, prompt_ids)
    dec._stream = Refuses(dec._stream)
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert dec._fallback is not None
    assert "".join(pieces) == tok.decode(ids) == TEXTS[0]

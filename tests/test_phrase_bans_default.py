"""Phrase bans on the real default model, both backends, CFG off and on: a phrase that greedy
decoding writes never appears, the text keeps its requested length, the stream equals the text,
and the text equals greedy decoding with the phrase's first token banned at that position from
the start (no rewind involved). Also `write --ban`: the story file equals what was streamed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.engine import generate_stream
from cfg_textgen.runtime import RuntimeSettings
from llamacpp_reference import default_gguf, have_llama_cpp

pytestmark = pytest.mark.slow

STORY = "The old lighthouse keeper climbed the stairs one last time. At the top, he found"
OPPOSING = "A dull, generic story."
TOKENS = 16


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def backend(request):
    if request.param == "llama.cpp":
        if not have_llama_cpp():
            pytest.skip("llama-cpp-python is not installed")
        from cfg_textgen.backends.llama_cpp import LlamaCppBackend

        b = LlamaCppBackend(default_gguf(), RuntimeSettings(deterministic=True))  # exact re-decodes
        yield b
        b.close()
    else:
        from cfg_textgen.backends.transformers import TransformersBackend
        from cfg_textgen.models import load_default

        yield TransformersBackend(*load_default())


def run(backend, scale, bans=(), chain=None):
    s = generate_stream(backend, None, STORY, scale=scale, opposing_prompt=OPPOSING, do_sample=False,
                        max_new_tokens=TOKENS, ban_eos=True, banned_strings=bans, chain=chain)
    pieces = list(s)
    assert "".join(pieces) == s.text
    return s


def first_token_of(backend, s, at: int) -> int:
    """The index of the generated token whose text holds character `at` of the text."""
    dec, k = backend.decoder(s.prompt_ids), 0
    for k, tok in enumerate(s.token_ids):
        dec.add(tok)
        if len(dec.released) > at:
            return k
    raise AssertionError(at)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_a_phrase_greedy_decoding_writes_never_appears_and_the_length_is_kept(backend, scale):
    plain = run(backend, scale)
    words = plain.text.split()
    phrase = " " + " ".join(words[3:5])  # two words from the middle of what greedy decoding writes
    assert phrase in plain.text
    banned = run(backend, scale, [phrase.upper()])  # case is ignored, as in KoboldCpp
    assert phrase.lower() not in banned.text.lower()
    assert len(banned.token_ids) == TOKENS and banned.stop_reason == "max_tokens"
    assert banned.stats.rewinds >= 1 and banned.text != plain.text
    # the same text as greedy decoding with the phrase's first token banned there from the start
    k = first_token_of(backend, plain, plain.text.find(phrase))
    prompt_len, token = len(plain.prompt_ids), plain.token_ids[k]

    def ban_there(ids, scores):
        if ids.shape[1] == prompt_len + k:
            scores = scores.clone()
            scores[:, token] = float("-inf")
        return scores

    assert banned.stats.rewinds == 1  # the new text did not run into the phrase again
    assert run(backend, scale, chain=[ban_there]).token_ids == banned.token_ids


@pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")
def test_write_ban_story_file_equals_what_was_streamed(tmp_path):
    path = tmp_path / "story.txt"
    args = ["--preset", "greedy", "--tokens", str(TOKENS), "--backend", "llama.cpp", "--deterministic"]
    path.write_text(STORY, encoding="utf-8")
    plain = CliRunner().invoke(main, ["generate", STORY, *args])
    assert plain.exit_code == 0, plain.output
    phrase = " " + " ".join(plain.stdout.split()[3:5])
    assert phrase in plain.stdout
    r = CliRunner().invoke(main, ["write", str(path), *args, "--ban", phrase.strip().title(), "--ban", "zebra"])
    assert r.exit_code == 0, r.output
    assert path.read_text(encoding="utf-8") == STORY + r.stdout
    assert phrase.lower() not in r.stdout.lower() and r.stdout != plain.stdout
    assert f"{TOKENS} tokens in" in r.stderr and "rewinds for banned phrases" in r.stderr
    bad = CliRunner().invoke(main, ["generate", STORY, *args, "--ban", ""])
    assert bad.exit_code == 2 and "--ban" in bad.stderr


def test_phrase_bans_with_a_grammar_take_the_grammar_back_too(backend):
    """A rewind inside a grammar restarts llama.cpp's grammar state from the kept tokens: the text
    still follows the grammar, and the banned choices are not taken."""
    if backend.name != "llama.cpp":
        pytest.skip("grammars need the llama.cpp backend")
    grammar = 'root ::= "The pet is a " ("cat" | "dog" | "cow") "."'
    for scale in (1.0, 1.5):
        def pet(bans):
            s = generate_stream(backend, None, "Question: which pet? Answer:", grammar=grammar, do_sample=False,
                                max_new_tokens=12, banned_strings=bans, scale=scale, opposing_prompt=OPPOSING)
            return "".join(s), s.stats.rewinds

        first, _ = pet(())
        assert first in ("The pet is a cat.", "The pet is a dog.", "The pet is a cow.")
        second, rewinds = pet([first[-4:-1]])
        assert second != first and rewinds >= 1
        third, _ = pet([first[-4:-1], second[-4:-1]])
        assert {first, second, third} == {"The pet is a cat.", "The pet is a dog.", "The pet is a cow."}

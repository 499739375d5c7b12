"""GBNF grammars: the preset key, the error on transformers naming the setting, and our use of
llama.cpp's grammar sampler (only the chain's survivors handed over) against llama.cpp's sampler on
the whole vocabulary, over a grammar-guided greedy walk on the default model."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.engine import Generation
from cfg_textgen.grammar import GrammarError, make_grammar
from cfg_textgen.presets import parse_preset

YES_NO = 'root ::= ("yes" | "no")'
NUMBER_LIST = 'root ::= "[" num ("," num)* "]"\nnum ::= [0-9]+'


def test_preset_grammar_key_round_trips_and_is_left_out_when_empty():
    p = parse_preset({"name": "g", "grammar": YES_NO})
    assert p.grammar == YES_NO and parse_preset(p.to_dict()) == p
    assert "grammar" not in parse_preset({"name": "g"}).to_dict()
    with pytest.raises(Exception, match=r"\$\.grammar: must be a string"):
        parse_preset({"name": "g", "grammar": 3})


def test_grammar_on_transformers_is_an_error_naming_llama_cpp(tiny_model, tiny_tokenizer):
    with pytest.raises(GrammarError, match="llama.cpp backend"):
        Generation(tiny_model, tiny_tokenizer, "Once upon", grammar=YES_NO)


def test_cli_grammar_on_transformers_names_the_flag(tiny_model_dir, tmp_path):
    grammar = tmp_path / "yes-no.gbnf"
    grammar.write_text(YES_NO)
    out = CliRunner().invoke(main, ["generate", "Once", "--model", str(tiny_model_dir), "--backend",
                                    "transformers", "--grammar", str(grammar), "--tokens", "2"])
    assert out.exit_code == 1, out.output
    assert f"--grammar {grammar}: GBNF grammars need the llama.cpp backend" in out.stderr


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llamacpp_reference import default_gguf

    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(default_gguf(), n_ctx=256)
    yield b
    b.close()


def full_vocab_reference(llama_cpp, smpl, logits: np.ndarray) -> np.ndarray:
    """llama.cpp's grammar sampler applied to every token of the row: the allowed ids."""
    data = np.zeros(len(logits), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    data["id"], data["logit"] = np.arange(len(logits)), logits
    arr = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                           size=len(data), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
    return np.flatnonzero(np.isfinite(data["logit"]))


@pytest.mark.parametrize("grammar", [YES_NO, NUMBER_LIST])
def test_grammar_allows_what_llamacpp_grammar_sampler_allows(backend, grammar):
    # a walk of greedy steps under the grammar: at each step our filter of the whole row, and of a
    # top-k 200 row, against llama.cpp's sampler on the whole vocabulary in the same state
    llama_cpp = backend.lib
    ours = make_grammar(backend, grammar)
    ref = llama_cpp.llama_sampler_init_grammar(backend.vocab, grammar.encode(), b"root")
    g = np.random.default_rng(0)
    try:
        for step in range(6):
            logits = g.standard_normal(backend.n_vocab).astype(np.float32) * 3
            allowed = full_vocab_reference(llama_cpp, ref, logits)
            full = ours.allowed(torch.from_numpy(logits)[None])[0]
            assert np.flatnonzero(torch.isfinite(full).numpy()).tolist() == allowed.tolist()
            assert torch.equal(full[allowed], torch.from_numpy(logits)[allowed])  # survivors unchanged
            top = torch.from_numpy(logits)[None]
            top = top.masked_fill(top < top.topk(200).values[:, -1:], float("-inf"))
            kept = np.flatnonzero(torch.isfinite(ours.allowed(top)[0]).numpy())
            assert kept.tolist() == sorted(set(allowed) & set(np.flatnonzero(np.isfinite(top[0].numpy()))))
            pick = int(allowed[np.argmax(logits[allowed])])
            if backend.lib.llama_vocab_is_eog(backend.vocab, pick):
                break
            ours.accept(pick)
            llama_cpp.llama_sampler_accept(ref, pick)
    finally:
        ours.close()
        llama_cpp.llama_sampler_free(ref)


def test_invalid_grammar_says_why(backend):
    with pytest.raises(GrammarError, match="not a valid GBNF grammar"):
        make_grammar(backend, 'root ::= ("yes" | ')
    with pytest.raises(GrammarError, match="empty"):
        make_grammar(backend, "  ")


def test_generate_kwargs_refuses_a_grammar_naming_it(tiny_model, tiny_tokenizer):
    from cfg_textgen.errors import CFGTextgenError
    from cfg_textgen.presets import generate_kwargs

    with pytest.raises(CFGTextgenError, match="preset g: grammar: GBNF grammars need the llama.cpp backend"):
        generate_kwargs(parse_preset({"name": "g", "grammar": YES_NO}), tiny_model, tiny_tokenizer)

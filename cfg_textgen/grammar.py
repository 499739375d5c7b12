"""GBNF grammars: the text of a generation must follow one, through llama.cpp's own grammar sampler.

Where it sits (engine.Generation.advance): after CFG and the sampler chain, before the pick.

    scores = chain(history, cfg_combine(c, u, scale))
    scores = grammar.allowed(scores)        # tokens that cannot continue the grammar -> -inf
    token  = pick_token(scores)
    grammar.accept(token)                    # the grammar's state moves past the token

`allowed` hands llama.cpp only the candidates the chain left (finite scores), so the grammar's
per-token check runs over a few hundred tokens instead of the whole vocabulary. When the chain left
nothing the grammar allows (top-k 1 picked a token the grammar forbids), it filters the guided
scores first and runs the chain again: llama.cpp's own rule (`common_sampler_sample`'s
resampling). End-of-generation tokens are allowed only where the grammar is complete.

Only the llama.cpp backend has a grammar engine (`llama_sampler_init_grammar` with the model's
vocabulary); on transformers a grammar is an error naming the setting (text-generation-webui has a
Python GBNF port of its own, transformers none).

Reference: llama.cpp grammars/README.md (GBNF), src/llama-grammar.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
import threading

import numpy as np
import torch

from .errors import CFGTextgenError

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class GrammarError(CFGTextgenError):
    """A grammar that cannot be used: it does not parse, or the backend has no grammar engine.
    The message does not name the setting: callers say which field or flag held the grammar."""


_REDIRECT = threading.Lock()  # one redirect of fd 2 at a time (requests parse grammars in threads)


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send file descriptor 2 (where llama.cpp's log callback writes its errors) to `path`."""
    with _REDIRECT, open(path, "wb") as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class LlamaGrammar:
    """One generation's grammar state over a llama.cpp model's vocabulary."""

    def __init__(self, lib, vocab, text: str):
        self._lib = lib
        self._smpl = None
        if not text.strip():
            raise GrammarError("the grammar is empty")
        # llama.cpp says why a grammar does not parse only in its log: catch that text for the message
        with tempfile.NamedTemporaryFile(suffix=".log") as log:
            with _stderr_to(log.name):
                smpl = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
            said = open(log.name, "rb").read().decode("utf-8", "replace")
        if not smpl:
            why = " ".join(line.strip() for line in said.splitlines() if line.strip())[:300]
            raise GrammarError("not a valid GBNF grammar with a `root` rule" + (f" (llama.cpp: {why})" if why else ""))
        self._smpl = smpl

    def allowed(self, scores: torch.Tensor) -> torch.Tensor:
        """(1, vocab) scores with every token the grammar does not allow next set to -inf (a new tensor)."""
        row = scores[0].detach().to(torch.float32)
        alive = torch.isfinite(row).nonzero().flatten()
        out = torch.full_like(scores, float("-inf"))
        if not len(alive):
            return out
        data = np.zeros(len(alive), dtype=TOKEN_DATA)
        data["id"], data["logit"] = alive.numpy(), row[alive].numpy()
        L = self._lib
        arr = L.llama_token_data_array(data=data.ctypes.data_as(L.llama_token_data_p), size=len(data),
                                       selected=-1, sorted=False)
        L.llama_sampler_apply(self._smpl, ctypes.byref(arr))  # rejects -> -INFINITY, order kept
        keep = np.isfinite(data["logit"])
        ids = torch.from_numpy(data["id"][keep].astype(np.int64))
        out[0, ids] = scores[0, ids]
        return out

    def accept(self, token: int) -> None:
        """Move past `token`, which `allowed` let through (llama.cpp aborts on any other)."""
        self._lib.llama_sampler_accept(self._smpl, int(token))

    def close(self) -> None:
        if self._smpl:
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _need_llamacpp(backend) -> None:
    if getattr(backend, "name", None) != "llama.cpp":
        raise GrammarError("GBNF grammars need the llama.cpp backend (a .gguf model with llama-cpp-python); "
                           f"the model runs on {getattr(backend, 'name', 'another backend')}")


def make_grammar(backend, text: str) -> LlamaGrammar:
    """The grammar state for one generation on `backend`; GrammarError if it cannot be had."""
    _need_llamacpp(backend)
    return LlamaGrammar(backend.lib, backend.vocab, text)


def grammar_of_json_schema(backend, schema: dict) -> str:
    """The GBNF grammar of the JSON texts a JSON schema allows, by llama.cpp's own converter (the
    Python port llama-cpp-python ships, llama_grammar.json_schema_to_gbnf, of llama.cpp's
    json_schema_to_grammar). As llama.cpp server, an empty schema means any JSON object."""
    _need_llamacpp(backend)
    if not isinstance(schema, dict):
        raise GrammarError(f"must be a JSON schema (an object), but is {json.dumps(schema)[:80]}")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema or {"type": "object"}))
    except Exception as err:  # the converter raises what the schema's shape makes it hit: say what it was
        raise GrammarError(f"not a JSON schema llama.cpp can turn into a grammar ({type(err).__name__}: {err})") \
            from None


def check_grammar(backend, text: str) -> None:
    """Raise GrammarError if `text` is not a grammar `backend` can use."""
    make_grammar(backend, text).close()

"""Backends: where the forward passes run. The engine drives one through this API.

    pairs = backend.prefill([(story_ids, opposing_ids or None), ...])   # -> list[Pair]
    pair.logits                      # (rows, vocab) float32 on the CPU/model device: row 0 the
                                     # story's next-token logits, row 1 the opposing prompt's (CFG)
    logits = backend.step([(pair, token), ...])   # one token per live pair, appended to every row
                                                  # of that pair; returns each pair's new logits
    steps_logits, new_pairs = backend.run(steps=[(pair, token)], new=[(story, opposing)])
                                     # both in ONE decode call (how the Scheduler joins a job
                                     # between steps without an extra pass)
    backend.release(pair)            # free its KV cache / sequence ids

A pair with `opposing_ids=None` has one row (scale 1: the story only). `pair.logits` may be a view
into the backend's own output buffer (llama.cpp: zero-copy); it is valid until the next
prefill/step/run call, so use it (cfg_combine makes new tensors) before decoding again.

Every backend also has: `name` ("transformers" | "llama.cpp"), `n_ctx` (the window of one
sequence in tokens, or None), `tokenize(text) -> ids` (the model's own special-token convention,
as a story is encoded), `eos_ids` (set), `bos_id` (int or None), `special_ids` (set),
`device`, `tokenizer` (an object with `encode`/`decode`/`__call__` for samplers that need text,
e.g. DRY's sequence breakers), `decoder(context_ids)` (an incremental text decoder: `add(token)`
returns text that became final, `flush()` the rest, `released` all of it), `forwards` (decode
calls so far) and `reserve(pairs)` (make room for that many live pairs at once).

Implementations: `transformers.TransformersBackend` (any Hugging Face causal LM; left-padded batch
of a pair's rows, one forward per pair) and `llama_cpp.LlamaCppBackend` (llama-cpp-python's
low-level API; one context, one sequence id per story and per opposing prompt, every live
sequence in one `llama_decode`).
"""

from __future__ import annotations

import importlib.util

from ..errors import CFGTextgenError

# One command a user can paste. PyPI has only the source of llama-cpp-python: the first install
# compiles llama.cpp (a few minutes); see the README for prebuilt CPU/CUDA/Metal wheels.
LLAMA_CPP_INSTALL = 'pip install "llama-cpp-python>=0.3.36"'

BACKENDS = ("transformers", "llama.cpp")


class BackendUnavailable(CFGTextgenError, ImportError):
    """The chosen backend's library is not installed; the message says the command that installs it."""


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported (checked without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp():
    """The `llama_cpp` module, or a `BackendUnavailable` naming the install command."""
    try:
        import llama_cpp
    except ImportError as err:
        raise BackendUnavailable(
            f"the llama.cpp backend needs llama-cpp-python, which is not installed ({err}); "
            f"install it with: {LLAMA_CPP_INSTALL}") from err
    return llama_cpp


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"`backend` has to be one of {BACKENDS}, but is {name!r}")
    return name

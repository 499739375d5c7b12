"""Backends: where the forward passes run. The engine's decode loop (lanes.py) drives one through
the typed protocol in base.py (`Backend`, `Pair`, `PairIds`): `run(steps, new)` decodes, `release`
frees a pair, plus the model's text facts (tokenize, EOS/BOS, window, a streaming decoder).

Implementations: `transformers.TransformersBackend` (any Hugging Face causal LM; left-padded batch
of a pair's rows, one forward per pair) and `llama_cpp.LlamaCppBackend` (llama-cpp-python's
low-level API; one context, one sequence id per story and per opposing prompt, every live
sequence in one `llama_decode`). This package imports neither: choosing a backend loads nothing.
"""

from __future__ import annotations

import importlib.util

from ..errors import CFGTextgenError, SettingError

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
        raise SettingError("backend", f"one of {BACKENDS}", name)
    return name


def as_backend(model, tokenizer=None):
    """`model` itself when it is a backend; else a transformers model (with its tokenizer, or as a
    (model, tokenizer) tuple) in the transformers backend."""
    from .base import is_backend

    if is_backend(model):
        return model
    if isinstance(model, tuple) and len(model) == 2 and tokenizer is None:
        model, tokenizer = model
    from .transformers import TransformersBackend

    return TransformersBackend(model, tokenizer)

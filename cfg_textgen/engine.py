"""The streaming engine: one generation streamed in the caller's thread, on any backend.

Three ways in, one `Generation` (generation.py: settings, history, text, stop rules) and one decode
loop (lanes.py), whatever the caller:
- `Stream` (the CLI's): one generation, iterated in the caller's thread;
- `Scheduler` + `Request` + `Job` (scheduler.py, the server's): a background thread decodes every
  active job together, one step for all; jobs join and leave between steps;
- `generate_stream` / `stream_preset`: a `Stream` from settings or from a preset.
Backends (backends/): transformers (any Hugging Face model) and llama.cpp (GGUF, many sequences
in one batch). Pass a backend, or a transformers (model, tokenizer) as before. Importing this
module loads neither backend (the llama.cpp path never imports transformers).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch

from .backends import as_backend  # noqa: F401  (API)
from .backends.text import REPLACEMENT, IncrementalDecoder  # noqa: F401  (API)
from .context import context_length, eos_ids, fit_context  # noqa: F401  (API)
from .generation import Generation, Stats, preset_settings, random_seed  # noqa: F401  (API)
from .lanes import DecodeLoop, Lane


class Stream(Generation):
    """One streaming generation in the caller's thread. Iterate it for text pieces; afterwards
    read `token_ids`, `text`, `stop_reason` and `stats` (see `Generation`). A failed decode
    raises from the iteration; the pair is released whatever happens (also when the caller stops
    iterating early)."""

    def __init__(self, model, tokenizer, prompt: str | Sequence[int], **settings):
        super().__init__(model, tokenizer, prompt, **settings)
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def _run(self) -> Iterator[str]:
        loop, lane = DecodeLoop(self.backend), _StreamLane(self)
        self._start = start = time.perf_counter()
        try:
            joining = [lane]
            while not lane.ended:
                loop.step(joining)
                joining = []
                if lane.error is not None:
                    raise lane.error
                if lane.piece:
                    yield lane.piece
        finally:
            loop.close()
            self.stats.seconds = time.perf_counter() - start


class _StreamLane(Lane):
    """The Stream's one lane: keeps the step's piece for the iterator to yield."""

    piece = ""

    def put(self, piece) -> None:
        self.piece = piece


def generate_stream(model, tokenizer, prompt: str | Sequence[int], **settings) -> Stream:
    """Stream a continuation of `prompt` (text or token ids); see `Generation` for the settings.
    `model` is a backend, or a transformers model with its `tokenizer`."""
    return Stream(model, tokenizer, prompt, **settings)


def stream_preset(model, tokenizer, prompt: str | Sequence[int], preset, *,
                  generator: torch.Generator | None = None, seed: int | None = None,
                  on_cut: Callable[[int, int], None] | None = None) -> Stream:
    """A `Stream` with a preset's settings and a fresh sampler chain from `chain.build_chain`."""
    backend = as_backend(model, tokenizer)
    if generator is None and seed is not None:
        generator = torch.Generator(device=backend.device).manual_seed(int(seed))
    return Stream(backend, None, prompt, on_cut=on_cut, **preset_settings(backend, preset, generator))


# the server's way in, importable from here as before (scheduler.py does not import this module)
from .scheduler import Job, Request, Scheduler  # noqa: E402,F401

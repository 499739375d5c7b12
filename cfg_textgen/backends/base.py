"""What every backend is: the typed protocol the decode loop (lanes.py) drives, and the pair.

    new_logits, new_pairs = backend.run(new=[PairIds(story, opposing or None), ...])
    step_logits, _ = backend.run(steps=[(pair, token), ...])   # one token per live pair
    backend.rewind(pair, n)                                    # take its last n tokens back
    backend.release(pair)                                      # its sequences are free again

A `Pair` is one generation's rows in the backend: row 0 the story, row 1 the opposing prompt
when the pair has CFG (`pair.cfg`; a pair without CFG has the story row only, and the opposing
branch is never run). `pair.logits` is (rows, vocab) float32 after the pair's last decode; it may
be a view into the backend's own output buffer (llama.cpp: zero-copy), valid until the next
`run`, so the caller reads it (cfg_combine makes new tensors) before decoding again.

Failure contract (the decode loop relies on it): when `run` raises, no pair of `new` is live
afterwards (whatever it allocated is released), and the pairs of `steps` are still live, for the
caller to release. So a failed decode never leaks a sequence slot.

Callers never see sequence ids, cells or caches: which slot a new pair takes and what its rows
hold is the backend's business. The decode loop starts a pair in two parts, so that a long prompt
is read between the other pairs' steps:

    pair = backend.open(PairIds(story, opposing), cache=True)  # slots taken; nothing decoded yet
    while pair.pending:                                        # prompt tokens still to decode
        backend.feed(pair, budget)                             # at most `budget` of them
    pair.logits                                                # set by the feed that finished

`open` failing holds nothing; `feed` failing leaves the pair live for the caller to release.
`pair.cached` is how many prompt tokens the backend already held (its prompt cache: llama.cpp
keeps a released pair's tokens and starts a new pair from the longest matching prefix, decoding
only the rest). A backend without a cache or chunks (`WholePrefill`: transformers) prefills the
whole prompt in `open`, so `pending` is 0 at once and `cached` is 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch


class PairIds(NamedTuple):
    """What a new pair starts from: the story's token ids and the opposing prompt's (None: no CFG)."""

    story: Sequence[int]
    opposing: Sequence[int] | None = None

    @property
    def cfg(self) -> bool:
        return self.opposing is not None

    def rows(self) -> list[list[int]]:
        return [list(self.story)] + ([list(self.opposing)] if self.opposing is not None else [])


class Pair:
    """One live (story, opposing) pair in a backend. Backends subclass it with their own state."""

    def __init__(self, rows: int):
        self.rows = rows  # 2 with CFG (story, opposing), 1 without
        self.logits: "torch.Tensor | None" = None  # (rows, vocab) after the last decode
        self.live = True
        self.cached = 0  # the story's prompt tokens the backend held already (its prompt cache)
        self.cached_rows: list[int] = []  # the same for each row (story, opposing)

    @property
    def pending(self) -> int:
        """Prompt tokens not yet decoded (`Backend.feed`); 0 once `logits` are the prompt's."""
        return 0

    @property
    def cfg(self) -> bool:
        """Whether the pair has an opposing row (guidance runs; scale != 1)."""
        return self.rows == 2


class TextDecoder(Protocol):
    """Streams text: `add(token)` returns the text that became final (often ""), `flush()` the rest
    at the end, `released` all of it so far."""

    released: str

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


# `--parallel auto`: the most live pairs a backend is sized for (llama.cpp takes fewer when its KV
# cache would not fit a writer's machine: LlamaCppBackend.auto_pairs; transformers' caches grow with
# each request and take this many)
AUTO_PAIRS = 4


@runtime_checkable
class Backend(Protocol):
    """A model behind the decode loop (transformers.TransformersBackend, llama_cpp.LlamaCppBackend).

    Besides decoding: `name` ("transformers" | "llama.cpp"), `n_ctx` (one sequence's window in
    tokens, or None), `tokenize(text)` (the model's own special-token convention, as a story is
    encoded), `eos_ids`, `bos_id`, `special_ids`, `device`, `tokenizer` (an object with
    `encode`/`decode`/`__call__`, for samplers that need text), `decoder(context_ids)`,
    `forwards` (decode calls so far), `token_draw` (how a sampled token is drawn: "multinomial" as
    `model.generate` does, "inverse-cdf" as llama.cpp does; samplers.base.pick_token)."""

    name: str
    token_draw: str
    n_ctx: int | None
    eos_ids: set
    bos_id: int | None
    special_ids: set
    forwards: int

    def tokenize(self, text: str) -> list[int]: ...

    def decoder(self, context_ids: Sequence[int] = ()) -> TextDecoder: ...

    def reserve(self, pairs: int) -> None:
        """Make room for that many live pairs at once (before any is live)."""

    def fits(self, rows: int) -> bool:
        """Whether new pairs with `rows` rows in all can start now."""

    def run(self, steps: Sequence[tuple[Pair, int]] = (), new: Sequence[PairIds] = ()
            ) -> tuple[list["torch.Tensor"], list[Pair]]:
        """Append one token to every row of each pair in `steps` and start the pairs of `new`;
        (each step pair's new logits, the new pairs). See the failure contract above."""

    def rewind(self, pair: Pair, n: int) -> "torch.Tensor":
        """Take the last `n` tokens (0 <= n < every row's length) back from every row of the pair,
        as if they had never been decoded; the logits at the new last position (rows, vocab;
        with n = 0 the last position's logits once more),
        also as `pair.logits`. Phrase bans (generation.py) rewind a pair this way. It may decode,
        so call it once every pair of a step has read its logits."""

    def release(self, pair: Pair) -> None:
        """Free the pair's sequences (idempotent)."""

    def open(self, ids: PairIds, cache: bool = True) -> Pair:
        """Start a pair: take its sequences, reuse what the cache holds (`cache=False`: nothing);
        `pair.pending` tokens are left to `feed`. Raises with nothing held."""

    def feed(self, pair: Pair, budget: int | None) -> int:
        """Decode up to `budget` (None: all) of the pair's pending prompt tokens; how many."""


class Shortcuts:
    """`prefill` and `step`: `run` with only new pairs or only steps (for tests and references
    that drive a backend by hand)."""

    def prefill(self, pairs) -> list[Pair]:
        return self.run(new=pairs)[1]

    def step(self, tokens) -> list:
        return self.run(steps=tokens)[0]


class WholePrefill:
    """`open` and `feed` for a backend without a prompt cache or chunked prefill: `open` prefills
    the whole prompt (`run(new=...)`), so there is never anything left to feed."""

    def open(self, ids, cache: bool = True):
        return self.run(new=[ids])[1][0]

    def feed(self, pair, budget) -> int:
        return 0


def is_backend(obj) -> bool:
    return isinstance(obj, Backend)

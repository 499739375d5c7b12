"""The transformers backend: a pair's story and opposing rows as one left-padded batch, KV-cached.

Per pair and step (what the engine did before backends existed):

    prefill: ids, mask = left_pad([story, opposing])   # (rows, width); positions count real tokens
    step:    the same token appended to every row; each row continues at its own position

Pairs are independent (own cache, mask, positions): `run` makes one forward per pair, so
several live pairs cost several forwards (the llama.cpp backend does them in one batch). The
output layer runs as `W @ h.T` where the architecture allows it (guidance.split_head).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..context import bos_id, context_length, eos_ids
from ..guidance import (forward_kwargs, left_pad, padding_id, positions_from_mask, run_model,
                        split_head)

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that do not form a whole character (yet)


class IncrementalDecoder:
    """Decode a growing list of new token ids and release only text that will not change.

    The text of the new tokens is `decode(tail + new)` minus `decode(tail)`, where `tail` is the last
    few context tokens: a SentencePiece decoder drops the leading space of the first token it sees,
    and the tail keeps the join to the story right. (For byte-level BPE this equals
    `decode(new)`.) Each call decodes the whole new list again and releases the new suffix, holding
    back trailing U+FFFD: the first bytes of a character whose last bytes are still to come.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), tail: int = 3):
        self.tokenizer = tokenizer
        context = list(context_ids)
        self.tail = context[-tail:] if tail else []
        # a tail that starts inside a multi-byte character would decode to U+FFFD: widen it
        while self.tail and REPLACEMENT in self._decode(self.tail)[:1] and len(self.tail) < len(context):
            self.tail = context[-(len(self.tail) + 1):]
        self.base = self._decode(self.tail)
        self.ids: list[int] = []
        self.released = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def text(self) -> str:
        """All the text of the new tokens so far, unstable end included."""
        full = self._decode(self.tail + self.ids)
        return full[len(self.base):] if full.startswith(self.base) else self._decode(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became stable (often "", never retracted)."""
        self.ids.append(int(token_id))
        return self._release(self.text().rstrip(REPLACEMENT))

    def flush(self) -> str:
        """The rest, unfinished characters included (U+FFFD), at the end of the generation."""
        return self._release(self.text())

    def _release(self, stable: str) -> str:
        if not stable.startswith(self.released):
            # the decoder changed text it already gave (rare; e.g. a normaliser): keep what was
            # shown and continue after its length
            stable = self.released + stable[len(self.released):]
        piece = stable[len(self.released):]
        self.released = stable
        return piece


class TransformersPair:
    """One (story, opposing) pair: its left-padded rows' cache, mask and next positions."""

    def __init__(self, rows: list[list[int]]):
        self.rows = len(rows)
        self.lengths = [len(r) for r in rows]
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # (rows, vocab) after the last forward
        self.live = True


class TransformersBackend:
    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.n_ctx = context_length(model)
        self.eos_ids = eos_ids(model, tokenizer)  # context.py: one EOS rule everywhere
        self.bos_id = bos_id(model, tokenizer)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._accepts = forward_kwargs(model)
        self._split = split_head(model)
        self._pad = padding_id(model, tokenizer)
        self.forwards = 0

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decoder(self, context_ids: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self.tokenizer, context_ids)

    def reserve(self, pairs: int) -> None:
        """Nothing to allocate: each pair owns its cache."""

    def _forward(self, pair: TransformersPair, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = dict(attention_mask=pair.mask, use_cache=True)
        if "position_ids" in self._accepts:
            kwargs["position_ids"] = positions
        logits, pair.cache = run_model(self.model, self._split, ids, cache=pair.cache, **kwargs)
        self.forwards += 1
        pair.logits = logits.to(dtype=torch.float32)  # (rows, vocab)
        return pair.logits

    def prefill(self, pairs) -> list[TransformersPair]:
        return self.run(new=pairs)[1]

    def step(self, tokens) -> list[torch.Tensor]:
        return self.run(steps=tokens)[0]

    def run(self, steps=(), new=()):
        """One forward per pair: `steps` [(pair, token)] continue, `new` [(story, opposing)] start."""
        out_steps = []
        for pair, token in steps:
            if not pair.live:
                raise ValueError("`step` got a released pair")
            ids = torch.full((pair.rows, 1), int(token), dtype=torch.long, device=self.device)
            pair.mask = torch.cat([pair.mask, torch.ones_like(pair.mask[:, :1])], dim=-1)
            positions, pair.next_pos = pair.next_pos, pair.next_pos + 1
            out_steps.append(self._forward(pair, ids, positions))
        out_new = []
        for story, opposing in new:
            rows = [list(story)] + ([list(opposing)] if opposing is not None else [])
            pair = TransformersPair(rows)
            ids, mask = left_pad(rows, self._pad)
            pair.mask = mask.to(self.device)
            pair.next_pos = pair.mask.sum(-1, keepdim=True)  # (rows, 1)
            self._forward(pair, ids.to(self.device), positions_from_mask(pair.mask))
            out_new.append(pair)
        return out_steps, out_new

    def release(self, pair: TransformersPair) -> None:
        pair.cache = pair.logits = pair.mask = None
        pair.live = False

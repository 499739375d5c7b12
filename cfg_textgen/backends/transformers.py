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


def text_decoder(tokenizer, context_ids: Sequence[int] = ()):
    """The streaming decoder for `tokenizer`: `StreamDecoder` (tokenizers' DecodeStream, constant
    cost per token) for a fast tokenizer, `IncrementalDecoder` for a slow (Python) one."""
    if StreamDecoder.supports(tokenizer):
        return StreamDecoder(tokenizer, context_ids)
    return IncrementalDecoder(tokenizer, context_ids)


def _context_tail(decode, context_ids: Sequence[int], tail: int) -> list[int]:
    """The last `tail` context ids, widened until their text does not start inside a multi-byte
    character (that would decode to U+FFFD)."""
    context = [int(t) for t in context_ids]
    ids = context[-tail:] if tail else []
    while ids and REPLACEMENT in decode(ids)[:1] and len(ids) < len(context):
        ids = context[-(len(ids) + 1):]
    return ids


class StreamDecoder:
    """Decode new token ids one at a time with `tokenizers.decoders.DecodeStream` and release only
    text that will not change; the same contract as `IncrementalDecoder` (`add`, `flush`,
    `released`) at a constant cost per token.

    DecodeStream decodes a short window of recent ids and gives the text past the window's
    previous text, holding a token back while the text ends in U+FFFD (the first bytes of a
    character whose last bytes are still to come). It is prefilled with the last context tokens,
    so the first new token joins the story as in a one-shot decode (a SentencePiece decoder drops
    the leading space of the first token it sees). `flush` gives the held-back rest at the end.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), tail: int = 3):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self._rust = tokenizer.backend_tokenizer
        self._tail = _context_tail(self._decode, context_ids, tail)
        try:
            self._stream = DecodeStream(ids=self._tail, skip_special_tokens=True)
        except TypeError:  # tokenizers < 0.22: no prefill; feed the tail and drop its text
            self._stream = DecodeStream(skip_special_tokens=True)
            for t in self._tail:
                self._stream.step(self._rust, t)
        self._done: list[int] = list(self._tail)  # ids whose text has been released (recent ones)
        self._pending: list[int] = []  # ids added since the last released chunk
        self._fallback: IncrementalDecoder | None = None
        self.released = ""

    @staticmethod
    def supports(tokenizer) -> bool:
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream  # noqa: F401  (tokenizers >= 0.21)
        except ImportError:
            return False
        return isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._rust.decode(list(ids), skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became stable (often "", never retracted)."""
        token_id = int(token_id)
        if self._fallback is not None:
            return self._take(self._fallback.add(token_id))
        try:
            chunk = self._stream.step(self._rust, token_id)
        except Exception:
            # DecodeStream refuses a window whose text does not extend its previous text (a
            # decoder that rewrites earlier characters): continue with the re-decoding decoder
            self._fallback = IncrementalDecoder(self.tokenizer, self._done)
            piece = "".join(self._fallback.add(t) for t in self._pending + [token_id])
            self._pending = []
            return self._take(piece)
        self._pending.append(token_id)
        if chunk is None:
            return ""
        self._done = (self._done + self._pending)[-8:]  # enough context for `flush`
        self._pending = []
        return self._take(chunk)

    def flush(self) -> str:
        """The rest, unfinished characters included (U+FFFD), at the end of the generation."""
        if self._fallback is not None:
            return self._take(self._fallback.flush())
        if not self._pending:
            return ""
        head = _context_tail(self._decode, self._done, 3)
        base, full = self._decode(head), self._decode(head + self._pending)
        piece = full[len(base):] if full.startswith(base) else self._decode(self._pending)
        self._done, self._pending = (self._done + self._pending)[-8:], []
        return self._take(piece)

    def _take(self, piece: str) -> str:
        self.released += piece
        return piece


class IncrementalDecoder:
    """Decode a growing list of new token ids and release only text that will not change: the
    fallback for slow (Python) tokenizers, which have no DecodeStream; cost grows with the text.

    The text of the new tokens is `decode(tail + new)` minus `decode(tail)`, where `tail` is the last
    few context tokens: a SentencePiece decoder drops the leading space of the first token it sees,
    and the tail keeps the join to the story right. (For byte-level BPE this equals
    `decode(new)`.) Each call decodes the whole new list again and releases the new suffix, holding
    back trailing U+FFFD: the first bytes of a character whose last bytes are still to come.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), tail: int = 3):
        self.tokenizer = tokenizer
        self.tail = _context_tail(self._decode, context_ids, tail)
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


def _cuda_device() -> torch.device:
    from ..runtime import RuntimeSettingsError

    if not torch.cuda.is_available():
        raise RuntimeSettingsError("n_gpu_layers", "no CUDA GPU is available to this torch build "
                                   f"(torch {torch.__version__}); install a CUDA build of torch from "
                                   "pytorch.org, or leave the model on the CPU")
    return torch.device("cuda")


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

    def __init__(self, model, tokenizer, runtime=None):
        """`runtime` (runtime.RuntimeSettings): `n_gpu_layers` != 0 moves the model to CUDA (all of
        it: transformers has no partial offload here) and `ctx_size` narrows the window; the
        threads are torch's, set at start-up (runtime.configure_process)."""
        if runtime is not None and runtime.n_gpu_layers != 0:
            model = model.to(_cuda_device())
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.n_ctx = context_length(model)
        if runtime is not None and runtime.ctx_size is not None:
            self.n_ctx = min(self.n_ctx, runtime.ctx_size) if self.n_ctx else runtime.ctx_size
        self.eos_ids = eos_ids(model, tokenizer)  # context.py: one EOS rule everywhere
        self.bos_id = bos_id(model, tokenizer)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._accepts = forward_kwargs(model)
        self._split = split_head(model)
        self._pad = padding_id(model, tokenizer)
        self.forwards = 0

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decoder(self, context_ids: Sequence[int] = ()):
        """StreamDecoder (DecodeStream) for a fast tokenizer, else IncrementalDecoder."""
        return text_decoder(self.tokenizer, context_ids)

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

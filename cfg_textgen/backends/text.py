"""Streaming text out of token ids: text that is final as soon as it is, never retracted.

`text_decoder(tokenizer, context_ids)` picks `StreamDecoder` (tokenizers' DecodeStream, constant
cost per token) for a fast tokenizer and `IncrementalDecoder` (re-decodes the new tokens) for a
slow one; both release only text that the next tokens cannot change. (The llama.cpp backend has
its own `ByteDecoder` over token bytes.) No transformers import: a tokenizer object is enough.
"""

from __future__ import annotations

from typing import Sequence

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

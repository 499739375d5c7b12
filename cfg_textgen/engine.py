"""The streaming decode loop behind the CLI: both CFG branches in ONE batched forward per token.

Per step (the same parts as the `model.generate` plugin, in the same order):

    logits (2, vocab) = model([story row, opposing row])   # left-padded batch of 2, KV-cached
    scores = cfg_combine(logits[0], logits[1], scale)        # guidance.py: the one formula
    scores = chain(story_ids, scores)                        # presets.build_chain: the samplers
    token  = pick_token(scores, do_sample, generator)        # samplers.py: argmax / multinomial
    append `token` to both rows

At scale 1 the opposing row is not run (batch 1) and the scores are the raw logits, which is what
`CFGLogitsProcessor(scale=1)` returns; with CFG the guided scores are on the same raw-logit scale
(guidance.cfg_combine), so a repetition penalty acts as in the reference apps.
`story_ids` is the prompt plus the generated tokens, exactly what `generate` gives its processors,
so repetition penalties see the same history. Text comes out as soon as it is decodable: the
pieces joined equal the one-shot decode of all new tokens (see `IncrementalDecoder`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .context import context_length, eos_ids, fit_context
from .errors import CFGTextgenError
from .guidance import (MODES, cfg_combine, check_scale, forward_kwargs, left_pad, opposing_token_ids,
                       padding_id, positions_from_mask, run_model, split_head)
from .samplers import pick_token

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that do not form a whole character (yet)


@dataclass
class Stats:
    """What one generation cost: generated tokens, wall seconds, forward passes, context cut."""

    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    prompt_tokens: int = 0  # story tokens before the cut
    kept_tokens: int = 0  # story tokens the model saw
    batch: int = 1  # rows per forward: 2 with CFG, 1 without

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


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


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop sequence (held back)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Stream:
    """One streaming generation. Iterate it for text pieces; afterwards read `token_ids` (every
    generated token, EOS included), `text` (what was yielded), `stop_reason` ("eos", "max_tokens",
    "stop") and `stats`. Setup (tokenizing, the context cut) happens in the constructor, so bad
    settings fail before the first forward pass."""

    def __init__(self, model, tokenizer, prompt: str | Sequence[int], *, scale: float = 1.0,
                 opposing_prompt: str = "", opposing_mode: str = "text", chain=None,
                 max_new_tokens: int = 200, stop: Sequence[str] = (), do_sample: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 on_cut: Callable[[int, int], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.scale = check_scale(scale)
        if opposing_mode not in MODES:
            raise ValueError(f"`opposing_mode` has to be one of {MODES}, but is {opposing_mode!r}")
        if opposing_mode == "last-token" and opposing_prompt:
            raise ValueError("`opposing_mode='last-token'` takes its opposing prompt from the story; "
                             f"leave `opposing_prompt` empty, but it is {opposing_prompt!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` has to be an integer >= 1, but is {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.chain = chain if chain is not None else []
        self.do_sample = do_sample
        if generator is None and seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(int(seed))
        self.generator = generator  # None: the global torch RNG, as `generate` uses
        self.eos = eos_ids(model, tokenizer)  # context.py: the one EOS rule
        bos = getattr(model.config, "bos_token_id", None)
        if bos is None:
            bos = tokenizer.bos_token_id

        ids = (list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if isinstance(prompt, str)
               else [int(t) for t in prompt])
        if not ids:
            if bos is None:
                raise CFGTextgenError("the story is empty and this model has no BOS token to start "
                                      "from: write a first line")
            ids = [int(bos)]
        cfg = self.scale != 1.0
        # each row is cut on its own (context.fit_context): the opposing row has its own positions
        self.prompt_ids = self._fit(ids, on_cut)
        if not cfg:
            self.opposing = None
        elif opposing_mode == "text":
            full = opposing_token_ids(opposing_prompt, tokenizer, bos)[0]
            self.opposing = fit_context(full, context_length(model), max_new_tokens, self._special(),
                                        "the opposing prompt")
            if len(self.opposing) < len(full):
                warnings.warn(f"the opposing prompt is {len(full)} tokens; only its last {len(self.opposing)} "
                              f"fit the context and were used", stacklevel=2)
        else:  # last-token: the story's last token after the cut
            self.opposing = [self.prompt_ids[-1]]
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.stats = Stats(prompt_tokens=len(ids), kept_tokens=len(self.prompt_ids),
                           batch=2 if cfg else 1)
        self._iter = self._run()

    def _special(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", ()) or ())

    def _fit(self, ids: list[int], on_cut) -> list[int]:
        """The most recent story tokens that fit the window with the new tokens (context.fit_context)."""
        kept = fit_context(ids, context_length(self.model), self.max_new_tokens, self._special())
        if len(kept) < len(ids):
            if on_cut is not None:
                on_cut(len(kept), len(ids))
            else:
                warnings.warn(f"the story is {len(ids)} tokens; only the last {len(kept)} fit the "
                              f"context and were used", stacklevel=3)
        return kept

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def _run(self) -> Iterator[str]:
        model = self.model
        device = model.device
        accepts = forward_kwargs(model)
        split = split_head(model)
        rows = [self.prompt_ids] + ([self.opposing] if self.stats.batch == 2 else [])
        ids, mask = left_pad(rows, padding_id(model, self.tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        positions = positions_from_mask(mask)
        next_pos = mask.sum(-1, keepdim=True)  # (batch, 1)
        history = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)  # story row
        decoder = IncrementalDecoder(self.tokenizer, self.prompt_ids)
        cache = None
        start = time.perf_counter()
        try:
            while True:
                kwargs = dict(attention_mask=mask, cache=cache, use_cache=True)
                if "position_ids" in accepts:
                    kwargs["position_ids"] = positions
                logits, cache = run_model(model, split, ids, **kwargs)
                self.stats.forwards += 1
                logits = logits.to(dtype=torch.float32)  # (batch, vocab)
                if self.stats.batch == 2:
                    scores = cfg_combine(logits[:1], logits[1:], self.scale)
                else:  # what CFGLogitsProcessor(scale=1) returns: the raw logits
                    scores = logits
                for processor in self.chain:
                    scores = processor(history, scores)
                token = pick_token(scores, self.do_sample, self.generator)  # (1,)
                history = torch.cat([history, token.view(1, 1)], dim=-1)
                tok = int(token)
                self.token_ids.append(tok)
                self.stats.tokens += 1
                if tok in self.eos:
                    self.stop_reason = "eos"
                    break
                decoder.add(tok)
                piece = self._emit(decoder.released, final=False)
                if piece:
                    yield piece
                if self.stop_reason:
                    return
                if len(self.token_ids) >= self.max_new_tokens:
                    self.stop_reason = "max_tokens"
                    break
                # the same token goes to both rows; each row continues at its own position
                ids = token.view(1, 1).expand(len(rows), 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions, next_pos = next_pos, next_pos + 1
            decoder.flush()
            piece = self._emit(decoder.released, final=True)
            if piece:
                yield piece
        finally:
            self.stats.seconds = time.perf_counter() - start

    def _emit(self, released: str, final: bool) -> str:
        """Text to yield now, from the decoder's stable text: a stop sequence is cut off (and ends
        the run); an end that may be the start of one is held back until the next tokens decide."""
        pending = released[len(self.text):]
        hits = [at for at in (pending.find(stop) for stop in self.stop) if at >= 0]
        if hits:
            pending = pending[:min(hits)]
            self.stop_reason = "stop"
        elif not final:
            pending = pending[:len(pending) - _stop_prefix_len(pending, self.stop)]
        self.text += pending
        return pending


def generate_stream(model, tokenizer, prompt: str | Sequence[int], **settings) -> Stream:
    """Stream a continuation of `prompt` (text or token ids); see `Stream` for the settings."""
    return Stream(model, tokenizer, prompt, **settings)


def stream_preset(model, tokenizer, prompt: str | Sequence[int], preset, *,
                  generator: torch.Generator | None = None, seed: int | None = None,
                  on_cut: Callable[[int, int], None] | None = None) -> Stream:
    """A `Stream` with a preset's settings and a fresh sampler chain from `presets.build_chain`."""
    from .presets import build_chain

    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    return Stream(model, tokenizer, prompt, scale=preset.cfg.scale,
                  opposing_prompt=preset.cfg.opposing_prompt, opposing_mode=preset.cfg.opposing_mode,
                  chain=build_chain(preset, tokenizer, generator), max_new_tokens=preset.max_new_tokens,
                  stop=preset.stop, do_sample=preset.do_sample, generator=generator, on_cut=on_cut)

"""One generation's state over a backend: settings, token history, text, stop rules.

Per step (the same parts as the `model.generate` plugin, in the same order), `advance` takes the
pair's logits from the decode loop (lanes.py):

    scores = cfg_combine(logits[0], logits[1], scale)        # guidance.py: the one formula
    scores = chain(story_ids, scores)                        # chain.build_chain: the samplers
    token  = pick_token(scores, do_sample, generator)        # samplers: argmax / a draw (backend.token_draw)

and the loop appends `token` to the pair's rows. A pair without CFG (scale 1) has the story row
only and the scores are the raw logits, which is what `CFGLogitsProcessor(scale=1)` returns; with
CFG the guided scores are on the same raw-logit scale (guidance.cfg_combine), so a repetition
penalty acts as in the reference apps. `story_ids` is the prompt plus the generated tokens,
exactly what `generate` gives its processors, so repetition penalties see the same history. Text
comes out as soon as it is final (the backend's decoder): the pieces joined equal the one-shot
decode of all new tokens.

Phrase bans (phrase_bans.py): when the text not given out yet contains a banned phrase, `advance`
takes back every token from the one whose text holds the phrase's first character, bans that token
at that position, restores the RNG and the stateful samplers as they were there, and sets
`rewind` for the decode loop, which rewinds the pair and hands back the logits at that position.
Until a phrase is decided, the text from the token where it may begin is held back.
"""

from __future__ import annotations

import bisect
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .backends import as_backend
from .context import fit_context
from .errors import ContextError, SettingError
from .grammar import make_grammar
from .guidance import cfg_combine, check_opposing, check_scale, opposing_token_ids
from .logprobs import TokenLogprob, token_logprob
from .phrase_bans import MAX_REWINDS_PER_POSITION, PhraseBans
from .samplers import pick_token


@dataclass
class Stats:
    """What one generation cost: generated tokens, wall seconds, decode calls, context cut."""

    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0  # backend decode calls this generation took part in
    prompt_tokens: int = 0  # story tokens before the cut
    kept_tokens: int = 0  # story tokens the model saw
    batch: int = 1  # rows of this generation per step: 2 with CFG, 1 without
    first_token_seconds: float | None = None  # from the start (or submit) to the first token
    rewinds: int = 0  # times a banned phrase was taken back

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def generated_tokens(self) -> int:
        return self.tokens

    @property
    def time_to_first_token(self) -> float | None:
        return self.first_token_seconds


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop sequence (held back)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Generation:
    """The state of one generation over a backend: settings, token history, text, stop rules.

    Setup (tokenizing, the context cut) happens in the constructor, so bad settings fail before
    any decoding, as typed errors naming the setting (errors.SettingError, ContextError). The
    decode loop (lanes.py) prefills `pair_ids()`, then per step hands the pair's logits to
    `advance`, which picks the token and returns the text that became final; when `done`, the
    loop releases the pair. Afterwards: `token_ids` (every
    generated token, EOS included), `text` (what was given out), `stop_reason` ("eos",
    "max_tokens", "stop"; the Scheduler adds "cancelled" and "error") and `stats`."""

    def __init__(self, model, tokenizer, prompt: str | Sequence[int], *, scale: float = 1.0,
                 opposing_prompt: str = "", opposing_mode: str = "text", chain=None,
                 max_new_tokens: int = 200, stop: Sequence[str] = (), do_sample: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 on_cut: Callable[[int, int], None] | None = None, ban_eos: bool = False,
                 truncate: bool = True, logprobs: int | None = None, grammar: str = "",
                 banned_strings: Sequence[str] = (), ban_case_sensitive: bool = False,
                 cache_prompt: bool = True):
        self.backend = backend = as_backend(model, tokenizer)
        if backend.tokenizer is None:
            raise ValueError("a transformers model needs its `tokenizer` (or pass a backend)")
        self.scale = check_scale(scale)
        check_opposing(opposing_mode, opposing_prompt)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SettingError("max_new_tokens", "an integer >= 1", max_new_tokens)
        self.max_new_tokens = max_new_tokens
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise SettingError("logprobs", "None or an integer >= 0", logprobs)
        self.logprobs = logprobs  # None: not recorded; n: each token's log-prob and n alternatives
        self.token_logprobs: list[TokenLogprob] = []  # logprobs.py: one per generated token
        self.stop = [s for s in stop if s]
        self.chain = chain if chain is not None else []
        self.do_sample = do_sample
        if generator is None and seed is not None:
            generator = torch.Generator(device=backend.device).manual_seed(int(seed))
        self.generator = generator  # None: the global torch RNG, as `generate` uses
        self.backend_draw = getattr(backend, "token_draw", "multinomial")  # samplers.base.pick_token
        self.eos = set(backend.eos_ids)
        self.ban_eos = bool(ban_eos)
        self.cache_prompt = bool(cache_prompt)  # False: the backend reads the whole prompt again
        bos = backend.bos_id

        ids = backend.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            if bos is None:
                raise ContextError("the story is empty and this model has no BOS token to start "
                                   "from: write a first line", field="prompt")
            ids = [int(bos)]
        cfg = self.scale != 1.0
        # each row is cut on its own (context.fit_context): the opposing row has its own positions
        self.prompt_ids = self._fit(ids, on_cut, truncate)
        if not cfg:
            self.opposing = None
        elif opposing_mode == "text":
            full = opposing_token_ids(opposing_prompt, backend.tokenizer, bos)[0]
            self.opposing = fit_context(full, backend.n_ctx, max_new_tokens, backend.special_ids,
                                        "the opposing prompt")
            if len(self.opposing) < len(full):
                warnings.warn(f"the opposing prompt is {len(full)} tokens; only its last {len(self.opposing)} "
                              f"fit the context and were used", stacklevel=3)
        else:  # last-token: the story's last token after the cut
            self.opposing = [self.prompt_ids[-1]]
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.done = False
        self.stats = Stats(prompt_tokens=len(ids), kept_tokens=len(self.prompt_ids),
                           batch=2 if cfg else 1)
        device = backend.device
        # story ids + room for every new token; the chain sees a view of the filled part
        self._history = torch.zeros((1, len(self.prompt_ids) + max_new_tokens), dtype=torch.long,
                                    device=device)
        self._history[0, :len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.long)
        self._filled = len(self.prompt_ids)
        self._eos_index = torch.tensor(sorted(self.eos), dtype=torch.long, device=device)
        self._decoder = backend.decoder(self.prompt_ids)
        self.grammar = make_grammar(backend, grammar) if grammar else None  # grammar.py
        self._grammar_text = grammar
        # phrase bans (phrase_bans.py): `rewind` = n asks the decode loop to take the pair's last n
        # tokens back and hand over the logits there (n = 0: the last fed token's logits again)
        self.bans = PhraseBans(banned_strings, ban_case_sensitive)
        self.rewind: int | None = None
        self._released_at = [0]  # len(decoder.released) after k generated tokens, k = 0, 1, ...
        self._position_bans: dict[int, set[int]] = {}  # generated position -> tokens banned there
        self._rewinds_at: dict[int, int] = {}  # generated position -> rewinds that went back to it
        self._snapshots: dict[int, tuple] = {}  # generated position -> state before its pick
        self._scan_from = 0  # phrases found before this text index were let through
        self._start = time.perf_counter()

    def _fit(self, ids: list[int], on_cut, truncate: bool) -> list[int]:
        """The most recent story tokens that fit the window with the new tokens (context.fit_context)."""
        kept = fit_context(ids, self.backend.n_ctx, self.max_new_tokens, self.backend.special_ids)
        if len(kept) < len(ids):
            if not truncate:
                raise ContextError(
                    f"the story is {len(ids)} tokens; with {self.max_new_tokens} new tokens at most "
                    f"{len(kept)} fit this model's context of {self.backend.n_ctx} tokens",
                    field="prompt", rule=f"at most {len(kept)} tokens", value=len(ids))
            if on_cut is not None:
                on_cut(len(kept), len(ids))
            else:
                warnings.warn(f"the story is {len(ids)} tokens; only the last {len(kept)} fit the "
                              f"context and were used", stacklevel=4)
        return kept

    def pair_ids(self) -> tuple[list[int], list[int] | None]:
        """What the backend prefills: (story ids, opposing ids or None at scale 1)."""
        return self.prompt_ids, self.opposing

    @property
    def rows(self) -> int:
        """Sequences the pair takes: 2 with CFG (story, opposing), 1 without."""
        return 1 if self.opposing is None else 2

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def advance(self, logits: torch.Tensor) -> str:
        """One step: the pair's logits (rows, vocab) -> pick a token; the text that became final."""
        logits = logits.to(dtype=torch.float32)
        if self.rewind is not None:  # the loop took the tokens back: the logits at the kept end
            self.rewind = None
        else:
            self.stats.forwards += 1
        position = len(self.token_ids)
        if self.bans:
            self._snapshot(position)
        if logits.shape[0] > 1:  # the pair has an opposing row: CFG
            scores = cfg_combine(logits[:1], logits[1:2], self.scale)  # a new tensor: ours to change
            fresh = True
        else:  # what CFGLogitsProcessor(scale=1) returns: the raw logits
            scores = logits[:1]  # the backend's (llama.cpp's output buffer, also read by logprobs)
            fresh = False
        if self.ban_eos and len(self._eos_index):
            if fresh:
                scores.index_fill_(-1, self._eos_index, float("-inf"))
            else:
                scores = scores.index_fill(-1, self._eos_index, float("-inf"))
        if position in self._position_bans:  # first tokens of banned phrases found here before
            banned = torch.tensor(sorted(self._position_bans[position]), dtype=torch.long, device=scores.device)
            scores = scores.index_fill(-1, banned, float("-inf"))
        history = self._history[:, :self._filled]
        guided = scores
        for processor in self.chain:
            scores = processor(history, scores)
        if self.grammar is not None:
            scores = self._grammar_allowed(history, guided, scores)
            if not torch.isfinite(scores).any():  # complete, and its end is banned: nothing may follow
                self.stop_reason = "stop"
                return self._finish()
        tok = int(pick_token(scores, self.do_sample, self.generator, self.backend_draw))
        if self.logprobs is not None:  # the distribution the token was drawn from (logprobs.py)
            self.token_logprobs.append(token_logprob(scores, logits[:1], tok, self.logprobs))
        if self.grammar is not None and tok not in self.eos:
            self.grammar.accept(tok)
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._start
        self._history[0, self._filled] = tok
        self._filled += 1
        self.stats.seconds = time.perf_counter() - self._start  # live: a summary after Ctrl-C is right
        self.token_ids.append(tok)
        self.stats.tokens += 1
        eos = tok in self.eos and not self.ban_eos
        if not eos:
            self._decoder.add(tok)
        ending = eos or len(self.token_ids) >= self.max_new_tokens
        if ending:
            self._decoder.flush()
        self._released_at.append(len(self._decoder.released))
        if self.bans and self._rewind_banned_phrase():
            return ""
        if eos:
            self.stop_reason = "eos"
        piece = self._emit(self._decoder.released, final=ending)
        if self.stop_reason or ending:  # a stop sequence, EOS or the length
            self.stop_reason = self.stop_reason or "max_tokens"
            self.done = True
        return piece

    # ---- phrase bans: find, take back, restore ----------------------------------------------

    def _snapshot(self, position: int) -> None:
        """The state the pick at `position` starts from: the RNG and the stateful samplers'
        fields (mirostat's mu, adaptive_p's history), so a rewind to here draws as if the
        rewound tokens had never been. Positions whose text is out are never rewound to: their
        snapshots go."""
        rng = self.generator.get_state() if self.generator is not None else None
        samplers = [dict(vars(p)) for p in self.chain if hasattr(p, "reset")]
        self._snapshots[position] = (rng, samplers)
        out = bisect.bisect_right(self._released_at, len(self.text)) - 1
        for old in [k for k in self._snapshots if k < out]:
            del self._snapshots[old]

    def _rewind_banned_phrase(self) -> bool:
        """If the text not given out yet contains a banned phrase: go back to the token whose text
        holds its first character, ban that token at that position, restore the state there and
        ask the loop to rewind (`self.rewind`). After MAX_REWINDS_PER_POSITION rewinds to one
        position (counted over the whole generation, so a generation rewinds at most that many
        times per token) the phrase found there stays (the tokens banned there stay banned)."""
        released = self._decoder.released
        at = self.bans.find(released, max(len(self.text), self._scan_from))
        if at < 0:
            return False
        k = bisect.bisect_right(self._released_at, at) - 1  # token k's text covers index `at`
        if self._rewinds_at.get(k, 0) >= MAX_REWINDS_PER_POSITION or self._released_at[k] < len(self.text):
            self._scan_from = at + 1  # let it through (or its token's start is already out)
            return False
        self._rewinds_at[k] = self._rewinds_at.get(k, 0) + 1
        self._position_bans.setdefault(k, set()).add(self.token_ids[k])
        for later in [p for p in self._position_bans if p > k]:  # bans of a text that is gone
            del self._position_bans[later]
        # the pair holds every generated token but the last pick, which is fed at the next step
        self.rewind = len(self.token_ids) - k - 1
        self._restore(k)
        self.stats.rewinds += 1
        return True

    def _restore(self, k: int) -> None:
        """The state after `k` generated tokens, as it was when the pick at k began."""
        del self.token_ids[k:]
        del self.token_logprobs[k:]
        del self._released_at[k + 1:]
        self._filled = len(self.prompt_ids) + k
        self.stats.tokens = k
        self.done, self.stop_reason = False, None
        self._decoder = self.backend.decoder(self.prompt_ids)
        for tok in self.token_ids:
            self._decoder.add(tok)
        if self.grammar is not None:  # llama.cpp's grammar state cannot go back: start it again
            self.grammar.close()
            self.grammar = make_grammar(self.backend, self._grammar_text)
            for tok in self.token_ids:
                self.grammar.accept(tok)
        rng, samplers = self._snapshots[k]
        if rng is not None:
            self.generator.set_state(rng)
        for p, saved in zip([p for p in self.chain if hasattr(p, "reset")], samplers):
            vars(p).clear()
            vars(p).update(saved)
        for later in [p for p in self._snapshots if p > k]:
            del self._snapshots[later]

    def _grammar_allowed(self, history, guided, scores):
        """The chain's scores limited to what the grammar allows; if that leaves nothing, the
        grammar filters the guided scores and the chain runs again (llama.cpp's resampling)."""
        allowed = self.grammar.allowed(scores)
        if torch.isfinite(allowed).any():
            return allowed
        scores = self.grammar.allowed(guided)
        for processor in self.chain:
            scores = processor(history, scores)
        return self.grammar.allowed(scores)

    def end_early(self) -> str:
        """The run was ended from outside (cancelled, aborted): what it held back (the start of a
        possible stop sequence, the bytes of an unfinished character) is final text now, as a
        run ending at its token limit gives it out; "" if the run had already finished."""
        return "" if self.done else self._finish()

    def _finish(self) -> str:
        self.done = True
        self._decoder.flush()
        return self._emit(self._decoder.released, final=True)

    def _emit(self, released: str, final: bool) -> str:
        """Text to give out now, from the decoder's stable text: a stop sequence is cut off (and
        ends the run); an end that may be the start of one is held back until the next tokens
        decide."""
        pending = released[len(self.text):]
        hits = [at for at in (pending.find(stop) for stop in self.stop) if at >= 0]
        if hits:
            pending = pending[:min(hits)]
            self.stop_reason = "stop"
        elif not final:
            pending = pending[:len(pending) - _stop_prefix_len(pending, self.stop)]
            if self.bans:  # from the token where a banned phrase may be starting, wait
                start = self.bans.open_start(released, max(len(self.text), self._scan_from))
                hold = self._released_at[bisect.bisect_right(self._released_at, start) - 1]
                pending = pending[:max(0, hold - len(self.text))]
        self.text += pending
        return pending


def preset_settings(backend, preset, generator) -> dict:
    """`Generation` keywords from a preset: its CFG and length settings and a fresh sampler chain
    (`chain.build_chain`, once per generation: samplers such as mirostat keep state)."""
    from .chain import build_chain

    return dict(scale=preset.cfg.scale, opposing_prompt=preset.cfg.opposing_prompt,
                opposing_mode=preset.cfg.opposing_mode,
                chain=build_chain(preset, backend.tokenizer, generator),
                max_new_tokens=preset.max_new_tokens, stop=preset.stop, do_sample=preset.do_sample,
                generator=generator, grammar=preset.grammar, banned_strings=preset.banned_strings,
                ban_case_sensitive=preset.ban_case_sensitive)


def random_seed() -> int:
    """The seed of a request that gives none (printable, so a user can repeat it; 31 bits fit
    every app's seed field)."""
    return secrets.randbelow(2**31)

"""Penalties on what the text already holds: repetition (with range, slope, presence, frequency),
no-repeat n-grams, DRY."""

from __future__ import annotations

import numpy as np
import torch

from .base import NEG_INF, Sampler, on_numpy, register
from .kernels import _guard, _keep_finite, _last_tokens


# ---- penalties -------------------------------------------------------------------------------


@register
class RepetitionPenalty(Sampler):
    r"""Repetition penalty with range, slope, presence and frequency (KoboldAI / KoboldCpp / NovelAI).

    Over the window `w` = the last `range` tokens of input_ids (0 = all), of length R:

    - multiplicative: a token present in `w` gets `score * pen` if score < 0, else `score / pen`
      (transformers' rule). `pen` is the penalty of the token's most recent position in `w`.
      Without a slope every position gets `penalty`. The two apps that fade the penalty towards
      older tokens read `slope` differently, so `slope_mode` says which rule applies:

      - `"curve"` (KoboldAI United, NovelAI; 0 = flat): a curve over the `range` positions
        (oldest first, j = 0 .. range-1) `x = 2j / (range - 1) - 1`,
        `f = s * x / (1 + |x| * (s - 1))`, `pen_j = 1 + ((f + 1) / 2) * (penalty - 1)`. A window
        shorter than `range` takes the newest R values of that curve (it is not stretched over
        the window), and the curve needs `range > 0` (KoboldAI applies the slope only then);
        range 1 gives its single position the full penalty (KoboldAI would divide by zero).
      - `"halves"` (KoboldCpp, Kobold Lite; 1 = flat): a token whose most recent occurrence is in
        the newer half of the window (positions R // 2 .. R-1) gets `penalty`, one seen only in
        the older half gets `1 + (penalty - 1) * slope` (`penalty` itself when penalty <= 1).
        slope must be in (0, 1].
    - additive (after it): `presence` is subtracted once from every token present in `w`,
      `frequency * count` where count is its number of occurrences in `w`.

    Tokens in `whitelist` are exempt from all three. penalty 1, presence 0 and frequency 0 is off.
    Without a slope and with range 0 this equals transformers' `RepetitionPenaltyLogitsProcessor`.

    Reference: Keskar et al. 2019, "CTRL" (the penalty); KoboldAI United `modeling/warpers.py`
    `RepetitionPenalty` (the curve); KoboldCpp `gpttype_adapter.cpp` `sample_rep_pen` (the halves);
    OpenAI's presence and frequency penalties.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "repetition_penalty"

    @property
    def flat(self) -> bool:
        """Every window position gets the same penalty."""
        if self.slope_mode == "halves":
            return self.slope == 1.0 or self.penalty <= 1.0
        return self.slope == 0.0

    def position_penalties(self, window: int, device=None) -> torch.Tensor:
        """The multiplicative penalty of every window position, oldest first, shape (window,), float64."""
        if self.flat:
            return torch.full((window,), self.penalty, dtype=torch.float64, device=device)
        if self.slope_mode == "halves":
            reduced = 1.0 + (self.penalty - 1.0) * self.slope
            pens = torch.full((window,), self.penalty, dtype=torch.float64, device=device)
            pens[: window // 2] = reduced  # the older half (KoboldCpp's tokens_far)
            return pens
        # the curve spans the whole range; the window is its newest end. Positions n - window ..
        # n - 1 in float64, exact up to 2**53; a longer range (a client's 1e30, past int64 and
        # float64's integers) is that: its newest end is x = 1 within float64's precision
        n = min(self.range, 2**53)
        if n == 1:
            x = torch.ones(1, dtype=torch.float64, device=device)
        else:
            x = (torch.arange(window, dtype=torch.float64, device=device) + float(n - window)) * 2 / float(n - 1) - 1
        f = self.slope * x / ((1 - x.abs()) + x.abs() * self.slope)  # = s x / (1 + |x| (s - 1))
        w = (f + 1) / 2  # 1 + w (penalty - 1), written so that it stays > 0 for a tiny penalty
        return (1 - w) + w * self.penalty

    def __call__(self, input_ids, scores):
        ids = _last_tokens(input_ids, self.range)
        batch, vocab = scores.shape
        window = ids.shape[1]
        if window == 0 or (self.penalty == 1.0 and self.presence == 0.0 and self.frequency == 0.0):
            return scores.clone()
        if ids.numel() and int(ids.min()) >= 0 and window < vocab:
            if on_numpy(scores) and not scores.requires_grad:
                return self._sparse_numpy(ids, scores)
            return self._sparse(ids, scores)
        return self._full(ids, scores)

    def _sparse(self, ids, scores):
        """The same values computed for the distinct tokens of the window only (at most `range`
        of them, not the whole vocabulary); every step is elementwise, so the results are equal."""
        vocab, window = scores.shape[-1], ids.shape[1]
        dev = scores.device
        ids = ids.to(dev)
        pens = self.position_penalties(window, dev)
        white = torch.tensor(self.whitelist, dtype=torch.long, device=dev)
        pos = torch.arange(window, device=dev)
        out = scores.clone()
        for r in range(scores.shape[0]):
            uniq, inv = torch.unique(ids[r], return_inverse=True)
            last = torch.full(uniq.shape, -1, dtype=torch.long, device=dev).scatter_reduce(
                0, inv, pos, reduce="amax")
            count = torch.zeros(uniq.shape, dtype=scores.dtype, device=dev).scatter_add(
                0, inv, torch.ones(window, dtype=scores.dtype, device=dev))
            sel = uniq < vocab
            if len(white):
                sel &= ~torch.isin(uniq, white)
            tok, last, count = uniq[sel], last[sel], count[sel]
            x = scores[r, tok]
            xd, pen = x.double(), pens[last]  # float64: 1e-300 > 0
            o = torch.where(xd < 0, xd * pen, xd / pen).to(scores.dtype)
            if self.presence or self.frequency:
                o = o - (self.presence + self.frequency * count)
            out[r, tok] = _keep_finite(o, x)
        return out

    def _sparse_numpy(self, ids, scores):
        """`_sparse` on the CPU, in numpy: the same IEEE operations on the same values in the same
        precision (float64 for the penalty, the scores' dtype after it), so the same floats. Its
        dozen small torch ops on a few hundred values cost 0.66 ms a token in dispatch on this
        project's 2-core test machine, these 0.25 ms (range 512, 49,152 tokens)."""
        vocab, window = scores.shape[-1], ids.shape[1]
        pens = self._window_penalties(window)
        out = scores.clone()
        rows, history = out.numpy(), ids.cpu().numpy()
        dtype = rows.dtype.type
        info = np.finfo(dtype)
        for r in range(history.shape[0]):
            # the most recent position of each token: its first in the reversed window
            tok, first, count = np.unique(history[r, ::-1], return_index=True, return_counts=True)
            sel = tok < vocab
            if self.whitelist:
                sel &= ~np.isin(tok, self.whitelist)
            tok, last, count = tok[sel], (window - 1) - first[sel], count[sel]
            x = rows[r, tok]
            xd, pen = x.astype(np.float64), pens[last]  # float64: 1e-300 > 0
            with np.errstate(all="ignore"):  # torch is silent where a float overflows: so are we
                o = np.where(xd < 0, xd * pen, xd / pen).astype(dtype)
                if self.presence or self.frequency:
                    o = o - (dtype(self.presence) + dtype(self.frequency) * count.astype(dtype))
            rows[r, tok] = np.where(np.isfinite(x), np.clip(o, info.min, info.max), o)  # _keep_finite
        return out

    def _window_penalties(self, window: int) -> np.ndarray:
        """position_penalties(window) as numpy, kept while the window and settings stay (a window of
        `range` tokens, once the history is that long: every later token)."""
        key = (window, self.penalty, self.range, self.slope, self.slope_mode)
        cached = getattr(self, "_pens", None)  # (key, penalties): one object, read and set whole
        if cached is None or cached[0] != key:
            cached = self._pens = (key, self.position_penalties(window).numpy())
        return cached[1]

    def _full(self, ids, scores):
        batch, vocab = scores.shape
        window = ids.shape[1]
        ids = ids.to(scores.device).clamp(max=vocab)  # ids beyond the output vocab go to a spare column
        pos = torch.arange(window, device=ids.device).expand(batch, window)
        last = torch.full((batch, vocab + 1), -1, dtype=torch.long, device=ids.device)
        last = last.scatter_reduce(1, ids, pos, reduce="amax")[:, :vocab]  # most recent position
        count = torch.zeros((batch, vocab + 1), dtype=scores.dtype, device=ids.device)
        count = count.scatter_add(1, ids, torch.ones_like(ids, dtype=scores.dtype))[:, :vocab]
        present = last >= 0
        if self.whitelist:
            white = torch.tensor([t for t in self.whitelist if t < vocab], dtype=torch.long,
                                 device=scores.device)
            present[:, white] = False
        pen = self.position_penalties(window, scores.device)[last.clamp(min=0)]  # float64: 1e-300 > 0
        x = scores.double()
        penalised = torch.where(x < 0, x * pen, x / pen)
        out = torch.where(present, penalised.to(scores.dtype), scores)
        if self.presence or self.frequency:
            out = out - present * (self.presence + self.frequency * count)
        return _keep_finite(out, scores)


@register
class NoRepeatNGram(Sampler):
    r"""No-repeat n-gram: ban every token that would complete an n-gram already in input_ids.

    Formula: with the last `size - 1` tokens as prefix, every earlier occurrence of that prefix
    bans the token that followed it (size 1 bans every token seen). size = 0 is off. Same
    semantics as transformers' `NoRepeatNGramLogitsProcessor`, except that a row never loses all
    its tokens: if fewer than `min_tokens_to_keep` would survive, the best banned ones stay.

    Reference: Paulus, Xiong & Socher 2018, "A Deep Reinforced Model for Abstractive
    Summarization"; fairseq's `no_repeat_ngram_size`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that always survive.
    """

    name = "no_repeat_ngram"

    def __call__(self, input_ids, scores):
        n, length = self.size, input_ids.shape[1]
        if n == 0 or length < n:
            return scores.clone()
        vocab = scores.shape[-1]
        input_ids = input_ids.to(scores.device)
        grams = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
        prefix = input_ids[:, length - n + 1:]  # the n - 1 most recent tokens
        hit = (grams[..., :-1] == prefix[:, None, :]).all(dim=-1)
        target = torch.where(hit, grams[..., -1].clamp(max=vocab), vocab)  # misses -> spare column
        banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        banned = banned.scatter(1, target, True)[:, :vocab]
        return scores.masked_fill(_guard(scores, banned, self.min_tokens_to_keep), NEG_INF)


@register
class DRY(Sampler):
    r"""DRY ("Don't Repeat Yourself"): penalise the tokens that would extend a repeated sequence.

    Formula, per row over the last `range` tokens (0 = all): for every earlier occurrence of the
    last token, the token that followed it is a candidate; its match length is the number of
    tokens, counted backwards from there, that equal the current suffix (stopping at a sequence
    breaker, at the start of the window, and at `allowed_length + 50` tokens to bound the cost).
    Each candidate with longest match length `m >= allowed_length` gets
    `scores -= multiplier * base ** (m - allowed_length)`. Nothing happens when the last token is
    a breaker, and a candidate that is itself a breaker is not penalised.

    Sequence breakers are strings; each becomes the last token id of `tokenizer.encode("a" + s)`
    (the 'a' prefix gives the id the string has in running text, as text-generation-webui does).

    Reference: p-e-w, text-generation-webui PR #5677 "DRY: A modern repetition penalty".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
        tokenizer: turns the breakers into token ids; needed when multiplier > 0.
    """

    name = "dry"
    needs_tokenizer = True

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker_ids: frozenset[int] = frozenset()
        if self.multiplier > 0 and self.sequence_breakers:
            if tokenizer is None:
                raise ValueError("`tokenizer` is required to turn `sequence_breakers` into token ids")
            self.breaker_ids = frozenset(
                tokenizer.encode("a" + s, add_special_tokens=False)[-1] for s in self.sequence_breakers)

    def match_lengths(self, ids: list[int]) -> dict[int, int]:
        """Candidate next token -> longest repeated suffix it would extend."""
        if not ids or ids[-1] in self.breaker_ids:
            return {}
        last, breakers, cap = ids[-1], self.breaker_ids, self.allowed_length + 50
        found: dict[int, int] = {}
        for i in range(len(ids) - 1):
            if ids[i] != last or ids[i + 1] in breakers:
                continue
            m = 1
            while m < cap and i - m >= 0:
                prev = ids[-(m + 1)]
                if ids[i - m] != prev or prev in breakers:
                    break
                m += 1
            nxt = ids[i + 1]
            found[nxt] = max(m, found.get(nxt, 0))
        return found

    def __call__(self, input_ids, scores):
        if self.multiplier == 0.0:
            return scores.clone()
        ids = _last_tokens(input_ids, self.range)
        out = scores.clone()
        for row, seq in enumerate(ids.tolist()):
            for token, m in self.match_lengths(seq).items():
                if m >= self.allowed_length and token < scores.shape[-1]:
                    out[row, token] -= self.penalty(m)
        return _keep_finite(out, scores)

    def penalty(self, match_length: int) -> float:
        """multiplier * base ** (match_length - allowed_length), capped at 1e30 (no overflow)."""
        try:
            return min(self.multiplier * self.base ** (match_length - self.allowed_length), 1e30)
        except OverflowError:
            return 1e30

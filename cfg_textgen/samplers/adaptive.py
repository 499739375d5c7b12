"""Adaptive samplers, with state that follows the text: Mirostat (steers the surprise towards tau) and
Adaptive-P (llama.cpp's: steers the picked tokens' probability towards a target)."""

from __future__ import annotations

import math

import torch

from .base import LN2, NEG_INF, Sampler, register
from .kernels import _continues, _sorted_values, _top_k_mask, _wide


@register
class Mirostat(Sampler):
    r"""Mirostat: steer the observed surprise (-log2 p of the picked token) towards `tau`.

    State: `mu` per batch row, `2 * tau` at first. A LogitsProcessor only sees the token it picked
    on its next call, so each call first updates `mu -= eta * (s - tau)`, with `s` = -log2 of the
    picked token (`input_ids[:, -1]`) under the distribution this sampler returned on the previous
    call (renormalised after its truncation); a token that distribution gave probability 0 leaves
    `mu` unchanged. If `input_ids` does not continue the sequence of the previous call (a new
    `generate` call, other rows), the state is reset. Then it truncates:

    - version 2: remove tokens with `-log2 p > mu` (the most likely token always stays).
    - version 1: estimate the Zipf exponent `s_hat` from the top m = 100 candidates,
      `s_hat = sum(t_i b_i) / sum(t_i^2)` with `t_i = log((i+2)/(i+1))`, `b_i = log(p_i/p_{i+1})`;
      `eps = s_hat - 1`; keep the top `k = floor((eps * 2^mu / (1 - N^-eps)) ** (1 / s_hat))`
      tokens, N = the vocabulary size (the limit `2^mu / ln N` at eps = 0), k clamped to
      [max(1, min_tokens_to_keep), finite candidates] (llama.cpp would keep all for k < 1).

    Create one object per generation; it is not meant to be shared between runs in parallel.

    Reference: Basu et al. 2021, "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
    Perplexity" (ICLR); llama.cpp `llama_sample_mirostat` / `_v2`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that always survive.
    """

    name = "mirostat"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mu: torch.Tensor | None = None  # (batch,) float64
        self._prev_ids: torch.Tensor | None = None
        self._prev_logp: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the state (the next call starts at mu = 2 * tau)."""
        self.mu = self._prev_ids = self._prev_logp = None

    def _update(self, input_ids: torch.Tensor) -> None:
        batch = input_ids.shape[0]
        fresh = torch.full((batch,), 2.0 * self.tau, dtype=torch.float64, device=input_ids.device)
        continues = _continues(self._prev_ids, input_ids) if self.mu is not None else None
        if continues is None:
            self.mu = fresh
            return
        picked = input_ids[:, -1:].clamp(max=self._prev_logp.shape[-1] - 1)
        surprise = -self._prev_logp.gather(-1, picked).squeeze(-1) / LN2
        step = torch.where(torch.isfinite(surprise), self.eta * (surprise - self.tau),
                           torch.zeros_like(surprise))
        self.mu = torch.where(continues, self.mu - step, fresh)

    def __call__(self, input_ids, scores):
        input_ids = input_ids.to(scores.device)  # mu and the previous log-probs live there too
        self._update(input_ids)
        logp = torch.log_softmax(scores.to(_wide(scores.dtype)), dim=-1)  # float32, as llama.cpp
        if self.version == 2:
            drop = -logp / LN2 > self.mu[:, None]
            drop &= ~_top_k_mask(scores, self.min_tokens_to_keep)
            out = scores.masked_fill(drop, NEG_INF)
        else:
            out = scores.masked_fill(scores < self._v1_cut(scores, logp), NEG_INF)
        self._prev_ids = input_ids.clone()
        self._prev_logp = torch.log_softmax(out.to(_wide(out.dtype)), dim=-1)
        return out

    def _v1_cut(self, scores: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """The k-th highest score of every row, k from the Zipf estimate (version 1)."""
        vocab = scores.shape[-1]
        m = min(100, vocab)
        top = torch.topk(logp, m, dim=-1).values  # (batch, m), descending log-probs
        n_finite = torch.isfinite(scores).sum(dim=-1)
        i = torch.arange(m - 1, dtype=torch.float64, device=scores.device)
        t = torch.log((i + 2) / (i + 1))
        b = top[:, :-1] - top[:, 1:]
        valid = (i[None, :] + 1) < n_finite[:, None]  # both p_i and p_{i+1} are candidates
        b = torch.where(valid, b, torch.zeros_like(b))
        t_sq = (t**2 * valid).sum(dim=-1)
        s_hat = (t * b).sum(dim=-1) / t_sq.clamp(min=1e-300)
        eps = s_hat - 1
        log_n = math.log(vocab)
        ratio = torch.where(eps.abs() > 1e-9, -torch.expm1(-eps * log_n) / eps.where(eps != 0, 1.0),
                            torch.full_like(eps, log_n))
        log_k = (self.mu * LN2 - torch.log(ratio)) / s_hat  # s_hat = 0 -> +inf -> keep all
        k = torch.floor(torch.exp(torch.clamp(log_k, max=60.0)))
        k = torch.where(s_hat > 0, k, n_finite.double())  # flat top: no Zipf tail, keep all
        k = torch.where(t_sq > 0, k, torch.ones_like(k))  # fewer than 2 candidates
        k = torch.maximum(k, torch.full_like(k, self.min_tokens_to_keep))
        k = torch.minimum(k, n_finite.clamp(min=1).double()).long()
        sorted_scores = _sorted_values(scores, descending=True)
        return sorted_scores.gather(-1, (k - 1)[:, None])


@register
class AdaptiveP(Sampler):
    r"""Adaptive-P: favour the tokens whose probability is near a target, and steer the average
    probability of the picked tokens towards that target over time.

    Formula, per row, with `p` = softmax(scores) (the *original* probabilities):
    `t' = clamp(2 * target - S / W, 0, 1)`, then every finite score becomes
    `5 - 10 * d**2 / (1 + d)` with `d = |p - t'| / 0.3` (quadratic near `t'`, linear far from it;
    removed tokens stay removed). The history starts "at equilibrium", `S = target / (1 - decay)`,
    `W = 1 / (1 - decay)` (so the first `t'` is the target), and each picked token with original
    probability `p_picked` updates it: `S = p_picked + decay * S`, `W = 1 + decay * W`. Picking a
    token above the target lowers the next `t'`, and the reverse.

    A negative target turns it off (scores unchanged, no history kept), as in llama.cpp; a target
    of 0 is on (it favours the least likely tokens). As with mirostat, the token picked after this
    sampler is only seen on the next call, as the last of `input_ids`; a call that does not continue
    the previous one (a new generation, other rows) starts the history afresh. llama.cpp draws the
    token inside the sampler and wants it last in the chain; here `pick_token` draws it from the
    returned scores, so samplers placed after it reshape the transformed distribution.

    Create one object per generation; it is not meant to be shared between runs in parallel.

    Reference: llama.cpp `llama_sampler_init_adaptive_p` (src/llama-sampler.cpp, PR #17927);
    text-generation-webui `AdaptivePLogitsWarper` (`adaptive_target` / `adaptive_decay`).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "adaptive_p"
    WIDTH, PEAK, SHARPNESS = 0.3, 5.0, 10.0  # llama.cpp's constants of the transform

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next call starts at equilibrium)."""
        self.weighted_sum: torch.Tensor | None = None  # (batch,) float64: S
        self.total_weight: torch.Tensor | None = None  # (batch,) float64: W
        self._prev_ids: torch.Tensor | None = None
        self._prev_probs: torch.Tensor | None = None  # the previous call's original probabilities

    def _update(self, input_ids: torch.Tensor) -> None:
        batch, dev = input_ids.shape[0], input_ids.device
        start_s = torch.full((batch,), self.target / (1.0 - self.decay), dtype=torch.float64, device=dev)
        start_w = torch.full((batch,), 1.0 / (1.0 - self.decay), dtype=torch.float64, device=dev)
        continues = _continues(self._prev_ids, input_ids) if self.weighted_sum is not None else None
        if continues is None:
            self.weighted_sum, self.total_weight = start_s, start_w
            return
        picked = input_ids[:, -1:].clamp(min=0, max=self._prev_probs.shape[-1] - 1)
        p = self._prev_probs.gather(-1, picked).squeeze(-1)
        self.weighted_sum = torch.where(continues, p + self.decay * self.weighted_sum, start_s)
        self.total_weight = torch.where(continues, 1.0 + self.decay * self.total_weight, start_w)

    def __call__(self, input_ids, scores):
        if self.target < 0:
            return scores.clone()
        input_ids = input_ids.to(scores.device)  # the history lives there too
        self._update(input_ids)
        probs = torch.softmax(scores.double(), dim=-1)
        adapted = (2.0 * self.target - self.weighted_sum / self.total_weight).clamp(0.0, 1.0)
        d = (probs - adapted[:, None]).abs() / self.WIDTH
        out = (self.PEAK - self.SHARPNESS * d * d / (1.0 + d)).to(scores.dtype)
        self._prev_ids = input_ids.clone()
        self._prev_probs = probs
        return torch.where(torch.isfinite(scores), out, scores)

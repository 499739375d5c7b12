"""Token log-probabilities: what a generation reports about each token it picked.

For every picked token we keep

    logprob        = log_softmax(scores)[token]        scores: CFG, then the whole sampler chain
    top            = the `n` largest entries of log_softmax(scores), removed tokens (-inf) left out
    story_logprob  = log_softmax(story_logits)[token]  the model's raw logits for the story alone

`scores` are exactly what `samplers.pick_token` draws from (a draw from softmax(scores), or argmax when
greedy), so `logprob` and `top` are the distribution the token was actually drawn from: after
guidance (`u + scale * (c - u)`) and after temperature, truncation and penalties. This is what
KoboldCpp and llama.cpp's `post_sampling_probs` report, and what a writer means by "how likely was
this word". Greedy decoding still reports the softmax of those scores (as llama.cpp does).

`story_logprob` is our extension: the same token under the story alone, without CFG and without
samplers (the model's own opinion), so the difference shows what guidance changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One picked token: its log-prob where it was drawn, the `n` best alternatives there (id,
    log-prob; best first), and its log-prob under the story alone (raw logits, no CFG)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    story_logprob: float


def token_logprob(scores: torch.Tensor, story_logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """`scores` (1, vocab): the scores the token was drawn from; `story_logits` (1, vocab): the
    story row's raw logits; `n` >= 0 alternatives. Ties keep the lower id first (torch.topk on CPU
    is not ordered among ties; a sort is)."""
    logp = torch.log_softmax(scores[0].to(torch.float32), dim=-1)
    top: list[tuple[int, float]] = []
    if n > 0:
        values, ids = torch.sort(logp, descending=True, stable=True)
        for i, v in zip(ids[:n].tolist(), values[:n].tolist()):
            if v == float("-inf"):
                break  # removed by a sampler: not a candidate
            top.append((i, v))
    story = torch.log_softmax(story_logits[0].to(torch.float32), dim=-1)
    return TokenLogprob(token, float(logp[token]), tuple(top), float(story[token]))

"""Token log-probabilities in each API's shape (the numbers: cfg_textgen/logprobs.py).

Every shape reports the distribution each token was drawn from (after CFG and the whole sampler
chain) and, as our extension, `story_logprob(s)`: the token's log-prob under the story alone (the
model's raw logits: no CFG, no samplers). A final end-of-text token has no text and is left out,
as the apps show only tokens that have text.

- OpenAI completions / text-generation-webui: {"tokens", "token_logprobs", "top_logprobs" (one
  {token: logprob} object per token), "text_offset", "story_logprobs"}.
- OpenAI chat completions: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": null}, items with "token_id" and "story_logprob" too.
- KoboldCpp: the same lists plus "token_ids" and OpenAI chat's "content" list ({"token",
  "token_id", "logprob", "bytes", "top_logprobs": [{"token", "token_id", "logprob", "bytes"}]}), as
  koboldcpp.py's parse_last_logprobs builds both in one object ("bytes": the text's UTF-8).
- llama.cpp server `completion_probabilities`: [{"id", "token", "bytes", "logprob", "top_logprobs":
  [{"id", "token", "bytes", "logprob"}]}]; with `post_sampling_probs` "prob" / "top_probs".
"""

from __future__ import annotations

import math
from typing import Sequence

from ..logprobs import TokenLogprob

KOBOLD_TOP = 10  # alternatives per token KoboldCpp reports (its logprob_item holds 10)


def shown(job, upto: int | None = None) -> list[TokenLogprob]:
    """The job's token log-probs up to `upto` generated tokens, without a closing end-of-text."""
    gen = job.generation
    entries = gen.token_logprobs
    end = len(gen.token_ids) - (1 if gen.stop_reason == "eos" and not gen.ban_eos else 0)
    return list(entries[:min(end, len(entries)) if upto is None else min(upto, end, len(entries))])


def openai(entries: Sequence[TokenLogprob], text_of, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object; `offset`: where the first token's text starts."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "story_logprobs": []}
    for e in entries:
        piece = text_of(e.token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(e.logprob)
        top: dict[str, float] = {}
        for i, lp in e.top:  # two ids with one text (e.g. lone bytes as U+FFFD): the likelier shows
            top.setdefault(text_of(i), lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        out["story_logprobs"].append(e.story_logprob)
        offset += len(piece)
    return out


def chat(entries: Sequence[TokenLogprob], text_of, bytes_of) -> dict:
    """OpenAI chat's `logprobs` object: {"content": [{"token", "logprob", "bytes", "top_logprobs":
    [{"token", "logprob", "bytes"}]}], "refusal": null}, each item also with our "token_id" and
    "story_logprob" (`bytes_of`: a token's own bytes, which U+FFFD in its text may hide)."""
    def item(token: int, lp: float) -> dict:
        return {"token": text_of(token), "token_id": token, "logprob": lp, "bytes": list(bytes_of(token))}

    return {"content": [{**item(e.token, e.logprob), "story_logprob": e.story_logprob,
                         "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries], "refusal": None}


def kobold(entries: Sequence[TokenLogprob], text_of) -> dict:
    """KoboldCpp's `logprobs` object (generate result and /api/extra/last_logprobs): the completions
    lists, the token ids and chat's `content` list, whose bytes are the UTF-8 of each token's text."""
    out = openai(entries, text_of)
    out["token_ids"] = [e.token for e in entries]
    out["content"] = chat(entries, text_of, lambda token: text_of(token).encode())["content"]
    return out


def llamacpp(entries: Sequence[TokenLogprob], text_of, bytes_of, post_sampling: bool) -> list[dict]:
    """llama.cpp server's `completion_probabilities`: log-probs, or probabilities (0-1) with
    `post_sampling_probs` (our numbers are post-sampling either way: see the module docstring)."""
    value, top_key = ("prob", "top_probs") if post_sampling else ("logprob", "top_logprobs")
    conv = math.exp if post_sampling else float

    def item(token: int, lp: float) -> dict:
        return {"id": token, "token": text_of(token), "bytes": list(bytes_of(token)), value: conv(lp)}

    return [{**item(e.token, e.logprob), "story_logprob": e.story_logprob,
             top_key: [item(i, lp) for i, lp in e.top]} for e in entries]

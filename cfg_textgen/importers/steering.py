"""Token steering fields of the apps' requests and settings: logit bias and token bans, read into
our `logit_bias` sampler, which goes first in the chain (right after CFG).

What each app means (read from their sources):
- OpenAI `logit_bias` `{"token id": bias}`, bias in [-100, 100]; "-100 should result in a ban".
  text-generation-webui forwards it (transformers: `LogitsBiasProcessor` adds it; llama.cpp: the
  server's logit-bias sampler adds it). We add it, and -100 bans the token (OpenAI's meaning).
- KoboldCpp `logit_bias` (koboldcpp.py `generate`): the same object shape; each value is clamped
  to [-100, 100] and added to the logit (`gpttype_adapter.cpp` `SampleLogits`), -100 included, at
  most 32 entries (the rest are skipped). We clamp and add, without the 32 limit.
- text-generation-webui `custom_token_bans`: comma-separated token ids, suppressed (-inf). KoboldCpp
  reads the same field and skips entries that are not digits; we refuse them (400 / error).
- TabbyAPI `banned_tokens`: token ids, a list of integers or one comma-separated string. KoboldCpp's
  `banned_tokens` are strings, phrases it bans by backtracking: integers among them are token ids
  here; phrases are reported as not carried over.
"""

from __future__ import annotations

import math

from ._common import Builder

OPENAI_BAN = -100.0  # OpenAI: -100 bans the token
BIAS_RANGE = (-100.0, 100.0)


def _token(b: Builder, key: str, raw, vocab_size: int | None) -> int:
    token = raw if isinstance(raw, int) and not isinstance(raw, bool) else (
        int(raw.strip()) if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit() else None)
    if token is None or token < 0:
        raise b.error(key, f"token ids must be integers >= 0, got {raw!r}")
    if vocab_size is not None and token >= vocab_size:
        raise b.error(key, f"token id {token} is not in this model's vocabulary [0, {vocab_size})")
    return token


def read_bias(b: Builder, key: str, *, openai: bool, vocab_size: int | None) -> tuple[dict, list]:
    """({token: bias}, [banned tokens]) from a `{"token id": number}` object; values are clamped to
    [-100, 100]; with `openai`, -100 is a ban."""
    raw = b.data[key]
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise b.error(key, f'must be an object of token ids to numbers, like {{"123": -100}}, got {raw!r}')
    bias, ban = {}, []
    for k, v in raw.items():
        token = _token(b, key, k, vocab_size)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise b.error(key, f"the bias of token {token} must be a finite number, got {v!r}")
        v = min(max(float(v), BIAS_RANGE[0]), BIAS_RANGE[1])
        if openai and v <= OPENAI_BAN:
            ban.append(token)
        elif v != 0:
            bias[token] = v
    return bias, ban


def read_ids(b: Builder, key: str, vocab_size: int | None, skip_bad: bool = False) -> tuple[list[int], list[str]]:
    """(token ids, phrases) from a comma-separated string of ids or a list of ids and strings
    (a string of digits in a list is a phrase: KoboldCpp bans it as text). `skip_bad`: parts of
    the string that are not digits are skipped (KoboldCpp), not refused."""
    raw = b.data[key]
    if raw is None or raw == "":
        return [], []
    if isinstance(raw, str):
        parts = [part.strip() for part in raw.split(",") if part.strip()]
        if skip_bad:
            parts = [part for part in parts if part.isascii() and part.isdigit()]
        return [_token(b, key, part, vocab_size) for part in parts], []
    if not isinstance(raw, list):
        raise b.error(key, f"must be a list of token ids or a comma-separated string of them, got {raw!r}")
    ids, phrases = [], []
    for item in raw:
        if isinstance(item, str):
            if item:
                phrases.append(item)
        else:
            ids.append(_token(b, key, item, vocab_size))
    return ids, phrases


def add_token_steering(b: Builder, *, bias_key: str | None = None, ban_keys=(), openai: bool = False,
                       vocab_size: int | None = None, skip_bad: bool = False) -> None:
    """Read the bias and ban keys present in `b.data`, report them, and put one `logit_bias` entry
    at the front of `b.samplers` when there is anything to do."""
    bias, ban = {}, []
    if bias_key is not None and b.has(bias_key):
        bias, ban = read_bias(b, bias_key, openai=openai, vocab_size=vocab_size)
        if bias or ban:
            rule = "; -100 bans the token (OpenAI)" if openai else " (clamped to [-100, 100], as KoboldCpp)"
            b.mapped(bias_key, f"logit_bias.bias{' and logit_bias.ban' if ban else ''}{rule}")
        else:
            b.neutral(bias_key, "empty")
    for key in ban_keys:
        if not b.has(key):
            continue
        ids, phrases = read_ids(b, key, vocab_size, skip_bad)
        ban += ids
        if phrases:
            b.dropped(key, f"phrase bans ({len(phrases)} strings) are not supported"
                           + ("; its token ids are banned (logit_bias.ban)" if ids else ""))
        elif ids:
            b.mapped(key, "logit_bias.ban")
        else:
            b.neutral(key, "empty")
    ban = sorted(set(ban))
    bias = {t: v for t, v in bias.items() if t not in ban}
    if bias or ban:
        entry = {"sampler": "logit_bias"}
        if bias:
            entry["bias"] = {str(t): v for t, v in bias.items()}
        if ban:
            entry["ban"] = ban
        b.samplers.insert(0, entry)

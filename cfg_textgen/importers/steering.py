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
  `banned_tokens` are strings, phrases it bans by backtracking (Kobold Lite sends its "Phrase /
  Token Ban" entries so; integers among them are token ids here): they become the preset's
  `banned_strings`.
- `banned_strings` (TabbyAPI, SillyTavern for every text-completion type): phrases, a list of
  strings (TabbyAPI also takes one string). KoboldCpp reads it only when `banned_tokens` is not
  sent (koboldcpp.py `generate`: `genparams.get('banned_tokens', banned_strings)`).
"""

from __future__ import annotations

import json
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


def read_phrases(b: Builder, key: str) -> list[str]:
    """Phrases from a list of strings or one string (empty ones skipped)."""
    raw = b.data[key]
    if raw is None or isinstance(raw, str):
        return [raw] if raw else []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise b.error(key, f'must be a list of strings (the phrases to ban), like ["a shiver ran down"], got {raw!r}')
    return [item for item in raw if item]


def add_phrases(b: Builder, key: str, phrases: list[str]) -> None:
    """Add phrases to the preset's `banned_strings` (each once, in order)."""
    b.extra["banned_strings"] = list(dict.fromkeys(b.extra.get("banned_strings", []) + phrases))


def add_token_steering(b: Builder, *, bias_key: str | None = None, ban_keys=(), openai: bool = False,
                       vocab_size: int | None = None, skip_bad: bool = False, phrase_key: str | None = None,
                       phrase_key_if_no: str | None = None) -> None:
    """Read the bias and ban keys present in `b.data`, report them, and put one `logit_bias` entry
    at the front of `b.samplers` when there is anything to do. Phrases (strings in a ban key's list,
    or the list of `phrase_key`) go to the preset's `banned_strings`; `phrase_key` is ignored when
    `phrase_key_if_no` is sent (KoboldCpp's rule for `banned_strings` beside `banned_tokens`)."""
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
            add_phrases(b, key, phrases)
            b.mapped(key, "banned_strings (phrases, undone by backtracking)"
                          + ("; its token ids: logit_bias.ban" if ids else ""))
        elif ids:
            b.mapped(key, "logit_bias.ban")
        else:
            b.neutral(key, "empty")
    if phrase_key is not None and b.has(phrase_key):
        if phrase_key_if_no is not None and b.has(phrase_key_if_no):
            b.dropped(phrase_key, f"`{phrase_key_if_no}` is sent, and KoboldCpp then reads only that")
        elif phrases := read_phrases(b, phrase_key):
            add_phrases(b, phrase_key, phrases)
            b.mapped(phrase_key, "banned_strings")
        else:
            b.neutral(phrase_key, "empty")
    _insert(b, bias, ban)


def llamacpp_bias_entries(raw) -> list[tuple[int | str, float]] | None:
    """llama.cpp server's `logit_bias` as (token id or text, bias) pairs, bias -inf for `false`; None
    when it is neither of llama.cpp's shapes. llama.cpp (tools/server, params_from_json) takes a list
    of `[token id or text, number or false]` or an object `{"token id or text": number or false}`
    and skips, without a word, any entry of another shape (true, null, a list of three, ...)."""
    if isinstance(raw, dict):
        pairs = [(int(k) if k.strip().isascii() and k.strip().isdigit() else k, v) for k, v in raw.items()]
    elif isinstance(raw, list):
        pairs = [tuple(el) for el in raw if isinstance(el, list) and len(el) == 2]
    else:
        return None
    out = []
    for key, value in pairs:
        if value is False:
            value = -math.inf
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if (isinstance(key, int) and not isinstance(key, bool)) or isinstance(key, str):
            out.append((key, float(value)))
    return out


def add_llamacpp_bias(b: Builder, key: str = "logit_bias", vocab_size: int | None = None) -> None:
    """llama.cpp's `logit_bias` (token ids; the server turns texts into ids before this, see
    server/llamacpp.py): each bias is added as given (no clamp, no -100 rule), `false` bans the
    token, and the biases of a token named twice add up, as llama.cpp's logit-bias sampler adds
    every entry. Entries llama.cpp skips (other shapes, ids outside the vocabulary) are skipped."""
    if not b.has(key):
        return
    entries = llamacpp_bias_entries(b.data[key])
    if entries is None:
        raise b.error(key, f'must be a list of [token id, bias] pairs or an object {{"token id": bias}}, '
                           f"got {b.data[key]!r}")
    bias: dict[int, float] = {}
    ban: list[int] = []
    texts = 0
    for token, value in entries:
        if isinstance(token, str):
            texts += 1
            continue
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            continue
        if value == -math.inf:
            ban.append(token)
        else:
            bias[token] = bias.get(token, 0.0) + value
    if bias or ban:
        b.mapped(key, "logit_bias.bias" + (" and logit_bias.ban (false)" if ban else "") + " (added as given, "
                      "as llama.cpp)")
    elif not texts:
        b.neutral(key, "empty")
    if texts:
        b.dropped(key, f"{texts} entries name a text, not a token id: a server request turns them into "
                       "token ids; a file cannot")
    _insert(b, bias, ban)


# ---- preset files: NovelAI and SillyTavern -------------------------------------------------------


def _id_list(value) -> list[int] | None:
    """A JSON list of token ids (ints >= 0), else None."""
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in value):
        return value
    return None


def _text_ids(text: str) -> list[int] | None:
    """SillyTavern writes token ids as a JSON list in a text line ("[123, 456]")."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        return _id_list(json.loads(text))
    except ValueError:
        return None


def _report_entries(b: Builder, key: str, kept: int, lost: list[str], target: str) -> None:
    if kept and not lost:
        b.mapped(key, target)
    elif kept:
        b.mapped(key, f"{target}; not carried: {'; '.join(lost)}")
    elif lost:
        b.dropped(key, "not carried: " + "; ".join(lost))
    else:
        b.neutral(key, "empty")


def novelai_steering(b: Builder) -> None:
    """NovelAI's `logit_bias_exp` ([{sequence, bias, ensure_sequence_finish, generate_once}]) and
    `bad_words_ids` ([[ids]]): a bias or ban of ONE token maps (bias added to its logit); a
    sequence of several tokens (NovelAI biases or bans the whole sequence as it is written) and
    `generate_once` entries do not. The ids are NovelAI's tokenizer's, carried unchanged."""
    bias: dict[int, float] = {}
    ban: list[int] = []
    if b.has("logit_bias_exp"):
        raw = b.data["logit_bias_exp"]
        lost = []
        for i, e in enumerate(raw if isinstance(raw, list) else []):
            seq = _id_list(e.get("sequence")) if isinstance(e, dict) else None
            value = e.get("bias") if isinstance(e, dict) else None
            if seq is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise b.error(f"logit_bias_exp[{i}]", f'must be {{"sequence": [token ids], "bias": number, ...}}, got {e!r}')
            if e.get("enabled", True) is False:
                continue
            if len(seq) > 1:
                lost.append(f"[{i}] biases a sequence of {len(seq)} tokens (no phrase bias here)")
            elif e.get("generate_once"):
                lost.append(f"[{i}] generate_once (the bias ends after the token is written once)")
            else:
                bias[seq[0]] = bias.get(seq[0], 0.0) + float(value)
        if raw not in (None, []) and not isinstance(raw, list):
            raise b.error("logit_bias_exp", f"must be a list of bias entries, got {raw!r}")
        _report_entries(b, "logit_bias_exp", len(bias), lost, "logit_bias.bias (one-token entries)")
    if b.has("bad_words_ids"):
        raw = b.data["bad_words_ids"]
        lost = []
        for i, seq in enumerate(raw if isinstance(raw, list) else []):
            ids = _id_list(seq)
            if ids is None:
                raise b.error(f"bad_words_ids[{i}]", f"must be a list of token ids, got {seq!r}")
            if len(ids) == 1:
                ban.append(ids[0])
            else:
                lost.append(f"[{i}] bans a sequence of {len(ids)} tokens (no phrase bans here)")
        if raw not in (None, []) and not isinstance(raw, list):
            raise b.error("bad_words_ids", f"must be a list of token-id lists, got {raw!r}")
        _report_entries(b, "bad_words_ids", len(ban), lost, "logit_bias.ban (one-token entries)")
    if bias or ban:
        b.note("NovelAI's logit_bias_exp / bad_words_ids hold token ids of NovelAI's tokenizer; they are carried "
               "unchanged and mean the same tokens only in a model with that tokenizer (Llama 3 for Erato).")
    _insert(b, bias, ban)


def sillytavern_steering(b: Builder) -> None:
    """SillyTavern's `banned_tokens` (lines: `[ids]` are token ids, other lines text it tokenizes
    with the model's tokenizer or, in quotes, phrases) and `logit_bias` ([{text, value}]: text as
    `[ids]`, or text it tokenizes). Token ids map; text needs SillyTavern's tokenizer at request
    time and is not carried."""
    bias: dict[int, float] = {}
    ban: list[int] = []
    if b.has("banned_tokens"):
        text = b.string("banned_tokens") or ""
        lost, phrases = 0, []
        for line in text.split("\n"):  # SillyTavern splits on "\n" and keeps the rest of each line
            ids = _text_ids(line)
            if ids is not None:
                ban += ids
            elif len(line) >= 2 and line.startswith('"') and line.endswith('"'):
                phrases.append(line[1:-1])  # a quoted line is a phrase (its banned_strings)
            elif line.strip():
                lost += 1
        if phrases:
            add_phrases(b, "banned_tokens", [p for p in phrases if p])
        _report_entries(b, "banned_tokens", len(ban) + len(phrases),
                        [f"{lost} text lines (SillyTavern tokenizes them with the model's tokenizer)"] if lost else [],
                        "logit_bias.ban ([id] lines) and banned_strings (quoted lines)")
    if b.has("logit_bias"):
        raw = b.list_("logit_bias") or []
        lost = 0
        for i, e in enumerate(raw):
            value = e.get("value") if isinstance(e, dict) else None
            ids = _text_ids(e.get("text", "")) if isinstance(e, dict) and isinstance(e.get("text"), str) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise b.error(f"logit_bias[{i}]", f'must be {{"text": ..., "value": number}}, got {e!r}')
            if ids is None:
                lost += 1
                continue
            for t in ids:
                bias[t] = float(value)
        _report_entries(b, "logit_bias", len(bias), [f"{lost} entries given as text (SillyTavern tokenizes them "
                                                     "with the model's tokenizer)"] if lost else [], "logit_bias.bias")
    _insert(b, bias, ban)


def _insert(b: Builder, bias: dict[int, float], ban: list[int]) -> None:
    ban = sorted(set(ban))
    bias = {t: v for t, v in bias.items() if t not in ban and v != 0}
    if bias or ban:
        entry = {"sampler": "logit_bias"}
        if bias:
            entry["bias"] = {str(t): v for t, v in bias.items()}
        if ban:
            entry["ban"] = ban
        b.samplers.insert(0, entry)


def export_entries(samplers: list[dict], report, fmt: str) -> tuple[dict[int, float], list[int]]:
    """The bias and bans of a preset's logit_bias entries (all of them, merged), reported."""
    bias: dict[int, float] = {}
    ban: list[int] = []
    for i, s in enumerate(samplers):
        if s["sampler"] == "logit_bias":
            for t, v in s["bias"].items():
                bias[int(t)] = bias.get(int(t), 0.0) + v
            ban += list(s["ban"])
            if i != 0:
                report.note(f"samplers[{i}]: {fmt} applies logit biases and bans before every sampler; "
                            "the position in our order is not carried.")
    return bias, sorted(set(ban))

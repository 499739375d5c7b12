"""LAMBADA last-word accuracy per scale (Table 1 of Sanchez et al. 2023), by lm-eval-harness' token
rule or the word rule (see the rules below)."""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..backends import as_backend
from ..errors import CFGTextgenError
from .generate import _strip_eos_padding
from .scoring import Opposing
from .side_by_side import LANES, MAX_WORD_TOKENS, Progress, run_side_by_side


# ---- LAMBADA --------------------------------------------------------------------------------
#
# Two rules; both zero-shot and greedy with CFG at the scale, on
#   target    = the last whitespace-separated word of `text` (after stripping trailing whitespace);
#   context   = the text before it, trailing whitespace removed.
#
# "tokens" (the default; lm-eval-harness' rule, which Sanchez et al. 2023 report in Table 1):
#   target ids = tokenizer(" " + target) without special tokens;
#   decoding   = exactly as many new tokens as the target has (EOS ends early);
#   correct    = the generated ids equal the target ids.
#
# "word" (reads a whole word, forgiving punctuation):
#   decoding  = at most MAX_WORD_TOKENS new tokens, stopping early once the first word is complete:
#               the generated text, after its leading whitespace, holds a whitespace character (or
#               EOS came);
#   predicted = the first whitespace-separated chunk of the generated text;
#   correct   = predicted == target after stripping leading/trailing punctuation (Unicode category
#               P*) from both; case-sensitive; an empty prediction is wrong.
# Stopping early never changes the word rule's prediction: the first chunk is fixed once whitespace
# follows it.

RULES = ("tokens", "word")


@dataclass(frozen=True)
class LambadaExample:
    context: str
    target: str
    line: int  # 1-based line number in the file


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target): the text before its last whitespace-separated word, and that word."""
    parts = text.rstrip().rsplit(None, 1)
    if len(parts) < 2:
        raise ValueError("needs at least two words (a context and the word to predict)")
    return parts[0].rstrip(), parts[1]


def strip_punctuation(word: str) -> str:
    """`word` without leading and trailing punctuation characters (Unicode category P*)."""
    def is_punct(ch):
        return unicodedata.category(ch).startswith("P")

    start, end = 0, len(word)
    while start < end and is_punct(word[start]):
        start += 1
    while end > start and is_punct(word[end - 1]):
        end -= 1
    return word[start:end]


def first_word(generated: str) -> str:
    """The first whitespace-separated chunk of the generated text ("" if there is none)."""
    parts = generated.split(None, 1)
    return parts[0] if parts else ""


def word_complete(generated: str) -> bool:
    """True once the first word of `generated` is followed by whitespace."""
    body = generated.lstrip()
    return any(ch.isspace() for ch in body)


def word_matches(predicted: str, target: str) -> bool:
    p = strip_punctuation(predicted)
    return bool(p) and p == strip_punctuation(target)


def read_lambada(path: str | Path, limit: int | None = None) -> list[LambadaExample]:
    """LAMBADA examples from a JSONL file (one object with a string `text` per line; blank lines are
    skipped). Every bad line (up to 10) is reported with the file and the line number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CFGTextgenError(f"{path}: cannot read: {err.strerror or err}") from err
    examples, problems = [], []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            problems.append(f"{path}:{number}: expected a JSON object with a string field \"text\"")
            continue
        try:
            context, target = split_last_word(obj["text"])
        except ValueError as err:
            problems.append(f"{path}:{number}: \"text\" {err}")
            continue
        examples.append(LambadaExample(context, target, number))
    if problems:
        more = f"\n... and {len(problems) - 10} more bad lines" if len(problems) > 10 else ""
        raise CFGTextgenError("bad LAMBADA lines:\n" + "\n".join(problems[:10]) + more)
    if not examples:
        raise CFGTextgenError(f"{path}: no examples (expected JSON lines like {{\"text\": \"...\"}})")
    return examples


def lambada_opposing(setting: str) -> Opposing:
    """`--opposing` of `eval`: "last-token" (the paper's / transformers' default) or "empty" (BOS)."""
    if setting == "last-token":
        return Opposing("", "last-token")
    if setting == "empty":
        return Opposing("", "text")
    raise ValueError(f"`opposing` has to be 'last-token' or 'empty', but is {setting!r}")


def target_token_ids(tokenizer, target: str) -> list:
    """The token rule's target: `tokenizer(" " + target)` without special tokens (lm-eval-harness)."""
    return list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])


def lambada_generation(backend, context: str, scale: float, opposing: Opposing, max_tokens: int):
    """An engine `Generation` for one example at one scale: greedy after `context` (cut to the
    window by the engine's rule) with CFG at `scale` and no samplers, ending at the backend's EOS
    set or after `max_tokens`."""
    from ..generation import Generation

    return Generation(backend, None, context, scale=scale, opposing_prompt=opposing.prompt,
                      opposing_mode=opposing.mode, chain=[], max_new_tokens=max_tokens, do_sample=False,
                      on_cut=lambda kept, total: None)


class UntilWord:
    """The word rule's job: a `Generation` that also ends once its first word is complete (the
    decoded new tokens, after leading whitespace, hold a whitespace character)."""

    def __init__(self, generation, decode: Callable[[list], str]):
        self.generation, self.decode = generation, decode
        self.max_new_tokens = generation.max_new_tokens
        self._word = False

    def pair_ids(self):
        return self.generation.pair_ids()

    def advance(self, logits) -> None:
        self.generation.advance(logits)
        if not self.generation.done and word_complete(self.decode(self.generation.token_ids)):
            self._word = True

    @property
    def done(self) -> bool:
        return self.generation.done or self._word

    @property
    def last_token(self) -> int:
        return self.generation.last_token

    @property
    def token_ids(self) -> list:
        return self.generation.token_ids


@dataclass
class LambadaPrediction:
    """One example at one scale, for `--out`."""

    line: int
    scale: float
    rule: str
    context: str
    target: str
    prediction: str
    correct: bool
    target_ids: list = field(default_factory=list)  # token rule only
    predicted_ids: list = field(default_factory=list)  # token rule only

    def to_dict(self) -> dict:
        d = {"line": self.line, "scale": self.scale, "rule": self.rule, "target": self.target,
             "prediction": self.prediction, "correct": self.correct}
        if self.rule == "tokens":
            d.update(target_ids=self.target_ids, predicted_ids=self.predicted_ids)
        d["context"] = self.context
        return d


@dataclass
class LambadaResult:
    scale: float
    correct: int = 0
    total: int = 0
    predictions: list = field(default_factory=list)  # predicted word (text of the predicted tokens)
    details: list = field(default_factory=list)  # LambadaPrediction per example

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


def eval_lambada(model, tokenizer, examples: Sequence[LambadaExample], scales: Iterable[float],
                 opposing: Opposing = Opposing("", "last-token"), max_tokens: int = MAX_WORD_TOKENS,
                 progress: Progress | None = None, rule: str = "tokens", lanes: int = LANES) -> list[LambadaResult]:
    """Last-word accuracy per scale by `rule` ("tokens" or "word"; see the top of this section).
    `max_tokens` bounds the word rule only (the token rule generates the target's length). Every
    (example, scale) is one greedy generation; `lanes` of them decode side by side. `model` is a
    backend, or a transformers model with its `tokenizer`."""
    if rule not in RULES:
        raise ValueError(f"`rule` has to be one of {RULES}, but is {rule!r}")
    backend = as_backend(model, tokenizer)
    tok = backend.tokenizer

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=True)

    results = [LambadaResult(float(s)) for s in scales]
    jobs, wants = [], []
    for ex in examples:
        want = target_token_ids(tok, ex.target) if rule == "tokens" else []
        wants.append(want)
        for res in results:
            if rule == "tokens":
                jobs.append(lambada_generation(backend, ex.context, res.scale, opposing, max(1, len(want))))
            else:
                jobs.append(UntilWord(lambada_generation(backend, ex.context, res.scale, opposing, max_tokens),
                                      decode))
    done = [0]

    def tick(_):
        done[0] += 1
        if progress:
            progress(done[0], len(jobs))

    run_side_by_side(backend, jobs, lanes, tick)
    jobs_iter = iter(jobs)
    for ex, want in zip(examples, wants):
        for res in results:
            got = _strip_eos_padding(list(next(jobs_iter).token_ids), backend)
            if rule == "tokens":
                text = decode(got)
                ok = got == want
            else:
                text = first_word(decode(got))
                got = []
                ok = word_matches(text, ex.target)
            res.predictions.append(text)
            res.details.append(LambadaPrediction(ex.line, res.scale, rule, ex.context, ex.target, text, ok,
                                                 want, got))
            res.correct += ok
            res.total += 1
    return results

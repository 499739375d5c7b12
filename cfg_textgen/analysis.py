"""See what the guidance scale does: text metrics, a sweep over scales, a per-token explanation of
what CFG changed, and LAMBADA last-word accuracy (Table 1 of Sanchez et al. 2023).

Generation is kept apart from measurement. A *generate function* `fn(prompt_ids, scale) -> new ids`
produces a continuation (`make_generate_fn` builds one on `model.generate` with a preset's sampler
chain; the engine can supply its own); the continuation is then scored by teacher forcing: one
forward pass of the story + continuation and one of the opposing prompt + continuation give, for
every generated token, the plain model's distribution `c` and the guided one `u + scale * (c - u)`
(`cfg_combine`, the same formula generation used).

Metric definitions (words = `text.split()`, i.e. whitespace-separated, case kept):

- fluency: mean over generated tokens of log p(token) under the plain model (scale 1, no samplers).
  Higher is more natural; it drops as the text "burns".
- entropy: mean over steps of the entropy (nats) of the guided distribution softmax(u + s(c - u)),
  before the preset's samplers. Guidance sharpens it; a collapse towards 0 means the model is forced.
- distinct-2: distinct word bigrams / word bigrams (Li et al. 2016). Lower = more repetitive.
- repeat-3: share of word 3-grams that already occurred earlier in the same text
  (= 1 - distinct-3). Higher = loops.
- diff-vs-1: word-level Levenshtein distance to the scale-1 text with the same seed, divided by the
  longer length: 0 = the same text, 1 = nothing in common position by position.
A metric over too few words (e.g. distinct-2 of one word) is NaN, shown as "n/a".
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import CFGTextgenError

GenerateFn = Callable[[list, float], list]  # (prompt ids, scale) -> generated ids
Progress = Callable[[int, int], None]  # (done, total)

DEFAULT_SCALES = (0.0, 1.0, 1.5, 3.0, 6.0, 12.0)
MAX_WORD_TOKENS = 10  # LAMBADA: a word longer than this many tokens is cut here


# ---- text metrics (pure functions on sequences) -----------------------------------------------


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    """The n-grams of `seq` in order (overlapping); empty when `seq` is shorter than n."""
    if n < 1:
        raise ValueError(f"`n` has to be an integer >= 1, but is {n!r}")
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence, n: int = 2) -> float:
    """Distinct n-grams / all n-grams; NaN when there is no n-gram."""
    grams = ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_rate(seq: Sequence, n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier in `seq`; NaN without n-grams."""
    grams = ngrams(seq, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else math.nan


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """Levenshtein distance / the longer length, in [0, 1]; 0 for two empty sequences."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def entropy(logits):
    """Shannon entropy (nats) of softmax(logits) along the last axis; -inf entries count as p = 0."""
    from .samplers import row_entropy

    return row_entropy(logits.float()).squeeze(-1)


# ---- prompt and opposing branch -------------------------------------------------------------


@dataclass(frozen=True)
class Opposing:
    """What the story is contrasted with: a text ("" = a blank story: BOS alone), or the last prompt
    token (mode "last-token", the CFG paper's and transformers' setting)."""

    prompt: str = ""
    mode: str = "text"

    def start_ids(self, prompt_ids: Sequence[int], model, tokenizer) -> list[int]:
        """The ids the opposing branch starts from, before the generated tokens."""
        from .guidance import opposing_token_ids

        if self.mode == "last-token":
            return [int(prompt_ids[-1])]
        from .context import bos_id

        return opposing_token_ids(self.prompt, tokenizer, bos_id(model, tokenizer))[0]


def encode_prompt(tokenizer, prompt: str, model=None, reserve: int = 0,
                  log: Callable[[str], None] | None = None) -> list[int]:
    """Token ids of the prompt; a prompt longer than the model's context (minus `reserve` tokens for
    the continuation) keeps its most recent tokens by the engine's rule (context.fit_context: the
    story row's own length only, leading special tokens kept), and says so through `log`."""
    from .context import context_length, fit_context

    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise CFGTextgenError("the prompt is empty: give some story text to continue")
    limit = context_length(model) if model is not None else None
    kept = fit_context(ids, limit, reserve, getattr(tokenizer, "all_special_ids", ()) or ())
    if len(kept) < len(ids) and log:
        log(f"warning: the prompt has {len(ids)} tokens; kept the last {len(kept)} "
            f"(context {limit}, {reserve} tokens for the continuation)")
    return kept


# ---- scoring a continuation by teacher forcing ----------------------------------------------


def _next_token_logits(model, ids: Sequence[int], count: int):
    """Logits (count, vocab) that predict the last `count` tokens of `ids`."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], device=model.device), use_cache=False).logits[0].float()
    n = len(ids)
    return logits[n - count - 1:n - 1]


def score_continuation(model, prompt_ids: Sequence[int], new_ids: Sequence[int], scale: float,
                       opposing_ids: Sequence[int]):
    """Per generated token, the plain and the guided log-probabilities over the vocabulary.

    Returns two (steps, vocab) float tensors: log_softmax of the story's logits (`c`), and
    log_softmax of `u + scale * (c - u)` (`u` from the opposing prompt followed by the same
    generated tokens). At scale 1 both are the plain distribution and the opposing pass is skipped.
    """
    import torch

    from .guidance import cfg_combine

    steps = len(new_ids)
    if steps == 0:
        empty = torch.zeros((0, 0))
        return empty, empty
    cond = _next_token_logits(model, list(prompt_ids) + list(new_ids), steps)
    plain = torch.log_softmax(cond, dim=-1)
    if scale == 1.0:
        return plain, plain
    opp = _next_token_logits(model, list(opposing_ids) + list(new_ids), steps)
    guided = torch.log_softmax(cfg_combine(cond, opp, scale), dim=-1)
    return plain, guided


# ---- generation -------------------------------------------------------------------------------


def make_generate_fn(model, tokenizer, preset=None, seed: int = 0, max_new_tokens: int = 60,
                     opposing: Opposing | None = None) -> GenerateFn:
    """A generate function on `model.generate`: CFG at the given scale first, then the preset's
    sampler chain (transformers' own warpers neutralised), seeded with `seed` before every call so
    that every scale starts from the same random state.

    `preset` is a `Preset` (default: the built-in "plain": sampling at temperature 1, no samplers);
    its scale is replaced by the call's scale and its opposing prompt by `opposing` when given.
    Stop sequences are not applied: every scale gets the same budget of tokens (EOS still ends).
    """
    import torch

    from .context import eos_ids
    from .guidance import padding_id
    from .presets import generate_kwargs, load_preset

    base = preset if preset is not None else load_preset("plain")
    cfg = base.cfg
    if opposing is not None:
        cfg = replace(cfg, opposing_prompt=opposing.prompt, opposing_mode=opposing.mode)

    def generate(prompt_ids: list, scale: float) -> list:
        p = replace(base, cfg=replace(cfg, scale=float(scale)), max_new_tokens=int(max_new_tokens), stop=())
        # the samplers' own draws (xtc) come from a generator on the scores' device
        generator = torch.Generator(device=model.device).manual_seed(seed)
        kwargs = generate_kwargs(p, model, tokenizer, generator=generator)
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        torch.manual_seed(seed)  # generate samples with the global RNG
        out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=sorted(eos_ids(model, tokenizer)),
                             pad_token_id=padding_id(model, tokenizer), **kwargs)
        return out[0, ids.shape[1]:].tolist()

    return generate


def _strip_eos_padding(ids: list, model, tokenizer) -> list:
    """Generated ids up to and including the first EOS (context.eos_ids, the engine's rule;
    generate pads after it in batches)."""
    from .context import eos_ids

    eos = eos_ids(model, tokenizer)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


# ---- the sweep ----------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One scale of a sweep: its continuation and the metrics of the module docstring."""

    scale: float
    text: str
    token_ids: list
    fluency: float
    entropy: float
    distinct2: float
    repeat3: float
    diff_vs_plain: float = math.nan

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in METRICS}


METRICS = ("fluency", "entropy", "distinct2", "repeat3", "diff_vs_plain")
METRIC_LABELS = {
    "fluency": "fluency (mean log p, plain model)",
    "entropy": "entropy of the guided distribution (nats)",
    "distinct2": "distinct-2 (word bigrams)",
    "repeat3": "repeated 3-gram rate (words)",
    "diff_vs_plain": "difference from the scale-1 text",
}


def parse_scales(text: str) -> list[float]:
    """"0,1,1.5" -> [0.0, 1.0, 1.5]; every scale finite; duplicates removed, order kept."""
    scales = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise CFGTextgenError(f"--scales: {part!r} is not a number (give e.g. 0,1,1.5,3)") from None
        if not math.isfinite(value):
            raise CFGTextgenError(f"--scales: every scale has to be a finite number, but one is {part!r}")
        if value not in scales:
            scales.append(value)
    return scales


def text_metrics(text: str) -> tuple[float, float]:
    """(distinct-2, repeated 3-gram rate) of a text, on whitespace-separated words."""
    w = text.split()
    return distinct_n(w, 2), repeated_ngram_rate(w, 3)


def score_row(model, tokenizer, prompt_ids, new_ids, scale, opposing_ids) -> SweepRow:
    """Decode and measure one continuation."""
    plain, guided = score_continuation(model, prompt_ids, new_ids, scale, opposing_ids)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if new_ids:
        import torch

        idx = torch.tensor(new_ids, device=plain.device).view(-1, 1)  # gather needs both on one device
        fluency = float(plain.gather(1, idx).mean())
        ent = float(entropy(guided).mean())
    else:
        fluency = ent = math.nan
    d2, r3 = text_metrics(text)
    return SweepRow(scale, text, list(new_ids), fluency, ent, d2, r3)


def sweep(model, tokenizer, prompt_ids: Sequence[int], scales: Iterable[float], generate_fn: GenerateFn,
          opposing: Opposing = Opposing(), progress: Progress | None = None) -> list[SweepRow]:
    """One continuation per scale (the generate function seeds itself), scored; rows in `scales`
    order. The scale-1 text is the reference for diff-vs-1: it is generated even when 1 is not
    among `scales` (and then not returned)."""
    scales = list(scales)
    todo = scales if 1.0 in scales else scales + [1.0]
    opposing_ids = opposing.start_ids(prompt_ids, model, tokenizer)
    rows = {}
    for i, scale in enumerate(todo):
        new_ids = _strip_eos_padding(list(generate_fn(list(prompt_ids), scale)), model, tokenizer)
        rows[scale] = score_row(model, tokenizer, prompt_ids, new_ids, scale, opposing_ids)
        if progress:
            progress(i + 1, len(todo))
    plain_words = rows[1.0].text.split()
    for row in rows.values():
        row.diff_vs_plain = normalized_edit_distance(row.text.split(), plain_words)
    return [rows[s] for s in scales]


# ---- explain: what CFG did to every token ---------------------------------------------------


@dataclass
class Candidate:
    token_id: int
    plain_p: float
    guided_p: float

    @property
    def log_change(self) -> float:
        """log p_guided - log p_plain (positive = CFG promoted it)."""
        return _log(self.guided_p) - _log(self.plain_p)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


@dataclass
class ExplainStep:
    """One generated token: the chosen one, the top candidates before and after guidance, and the
    candidates (among the union of both top lists) whose log-probability CFG raised / cut most."""

    index: int
    chosen: Candidate
    before: list[Candidate]  # top-k under the plain model, most likely first
    after: list[Candidate]  # top-k under the guided distribution
    promoted: Candidate
    demoted: Candidate


def explain_steps(plain_logp, guided_logp, new_ids: Sequence[int], top: int = 5) -> list[ExplainStep]:
    """Per generated token, the explanation from the (steps, vocab) plain and guided log-probs."""
    if top < 1:
        raise ValueError(f"`top` has to be an integer >= 1, but is {top!r}")
    plain_p, guided_p = plain_logp.exp(), guided_logp.exp()
    k = min(top, plain_logp.shape[-1]) if len(new_ids) else 0
    steps = []
    for i, tok in enumerate(new_ids):
        def cand(t):
            return Candidate(int(t), float(plain_p[i, t]), float(guided_p[i, t]))

        before = [cand(t) for t in plain_logp[i].topk(k).indices.tolist()]
        after = [cand(t) for t in guided_logp[i].topk(k).indices.tolist()]
        union = {c.token_id: c for c in before + after}.values()
        promoted = max(union, key=lambda c: c.log_change)
        demoted = min(union, key=lambda c: c.log_change)
        steps.append(ExplainStep(i, cand(tok), before, after, promoted, demoted))
    return steps


def explain(model, tokenizer, prompt_ids: Sequence[int], scale: float, generate_fn: GenerateFn,
            opposing: Opposing = Opposing(), top: int = 5) -> tuple[str, list[ExplainStep]]:
    """Generate at `scale` and explain every token: (the generated text, the steps)."""
    new_ids = _strip_eos_padding(list(generate_fn(list(prompt_ids), scale)), model, tokenizer)
    opposing_ids = opposing.start_ids(prompt_ids, model, tokenizer)
    plain, guided = score_continuation(model, prompt_ids, new_ids, scale, opposing_ids)
    return tokenizer.decode(new_ids, skip_special_tokens=True), explain_steps(plain, guided, new_ids, top)


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


class _WordComplete:
    """A stopping criterion for `generate`: stop once the first generated word is complete."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [word_complete(self.tokenizer.decode(row[self.prompt_len:], skip_special_tokens=True))
                for row in input_ids.tolist()]
        return torch.tensor(done, device=input_ids.device)


def lambada_opposing(setting: str) -> Opposing:
    """`--opposing` of `eval`: "last-token" (the paper's / transformers' default) or "empty" (BOS)."""
    if setting == "last-token":
        return Opposing("", "last-token")
    if setting == "empty":
        return Opposing("", "text")
    raise ValueError(f"`opposing` has to be 'last-token' or 'empty', but is {setting!r}")


def _lambada_generate(model, tokenizer, context: str, scale: float, opposing: Opposing, max_tokens: int,
                      stopping_criteria=None) -> list:
    """Greedy ids after `context` with CFG at `scale` through our `generate` plugin (a preset with
    no samplers: CFG alone), ending at the story EOS rule (context.eos_ids)."""
    import torch

    from .context import eos_ids
    from .guidance import padding_id
    from .presets import generate_kwargs, parse_preset

    preset = parse_preset({"name": "lambada", "do_sample": False, "max_new_tokens": max_tokens,
                           "cfg": {"scale": scale, "opposing_prompt": opposing.prompt,
                                   "opposing_mode": opposing.mode}}, source="eval lambada")
    ids = torch.tensor([encode_prompt(tokenizer, context, model, reserve=max_tokens)], device=model.device)
    extra = {} if stopping_criteria is None else {"stopping_criteria": stopping_criteria(ids.shape[1])}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=sorted(eos_ids(model, tokenizer)),
                         pad_token_id=padding_id(model, tokenizer), **extra,
                         **generate_kwargs(preset, model, tokenizer))
    return _strip_eos_padding(out[0, ids.shape[1]:].tolist(), model, tokenizer)


def target_token_ids(tokenizer, target: str) -> list:
    """The token rule's target: `tokenizer(" " + target)` without special tokens (lm-eval-harness)."""
    return list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])


def predict_tokens(model, tokenizer, context: str, target_ids: Sequence[int], scale: float,
                   opposing: Opposing) -> list:
    """The token rule: as many greedy tokens as the target has (fewer if EOS came)."""
    return _lambada_generate(model, tokenizer, context, scale, opposing, max(1, len(target_ids)))


def predict_word(model, tokenizer, context: str, scale: float, opposing: Opposing,
                 max_tokens: int = MAX_WORD_TOKENS) -> str:
    """The word rule: the first word the model generates after `context`, greedy with CFG."""
    from transformers import StoppingCriteriaList

    new = _lambada_generate(model, tokenizer, context, scale, opposing, max_tokens,
                            lambda n: StoppingCriteriaList([_WordComplete(tokenizer, n)]))
    return first_word(tokenizer.decode(new, skip_special_tokens=True))


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
                 progress: Progress | None = None, rule: str = "tokens") -> list[LambadaResult]:
    """Last-word accuracy per scale by `rule` ("tokens" or "word"; see the top of this section).
    `max_tokens` bounds the word rule only (the token rule generates the target's length)."""
    if rule not in RULES:
        raise ValueError(f"`rule` has to be one of {RULES}, but is {rule!r}")
    results = [LambadaResult(float(s)) for s in scales]
    total, done = len(examples) * len(results), 0
    for ex in examples:
        want = target_token_ids(tokenizer, ex.target) if rule == "tokens" else []
        for res in results:
            if rule == "tokens":
                got = predict_tokens(model, tokenizer, ex.context, want, res.scale, opposing)
                text = tokenizer.decode(got, skip_special_tokens=True)
                ok = got == want
            else:
                got, text = [], predict_word(model, tokenizer, ex.context, res.scale, opposing, max_tokens)
                ok = word_matches(text, ex.target)
            res.predictions.append(text)
            res.details.append(LambadaPrediction(ex.line, res.scale, rule, ex.context, ex.target, text, ok,
                                                 want, got))
            res.correct += ok
            res.total += 1
            done += 1
            if progress:
                progress(done, total)
    return results

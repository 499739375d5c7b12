"""See what the guidance scale does: text metrics, a sweep over scales, a per-token explanation of
what CFG changed, and LAMBADA last-word accuracy (Table 1 of Sanchez et al. 2023).

Everything runs on a backend (backends/: transformers, or llama.cpp for GGUF files) through its
`prefill` / `step` / `release` API, so the same code measures on both. A transformers model (with
its tokenizer) is wrapped in the transformers backend. Many (story, opposing) pairs run side by
side (`run_side_by_side`): a sweep's scales, and LAMBADA's examples, share each decode step on
llama.cpp (one `llama_decode` for every live sequence).

Generation is kept apart from measurement. A *generate function* `fn(prompt_ids, scale) -> new ids`
produces a continuation: `make_engine_generate_fn` is the engine's own loop on the backend (the
same `cfg_combine`, `chain.build_chain` and token pick as `write`; its `many` runs several
scales side by side); `make_generate_fn` is the `model.generate` plugin (transformers only). The
continuation is then scored by teacher forcing on the backend: the story and the opposing prompt
are prefilled as one pair and fed the generated tokens one step at a time, which gives, for every
generated token, the plain model's distribution `c` and the guided one `u + scale * (c - u)`
(`cfg_combine`, the formula generation used). On llama.cpp these are the very logits the engine
decoded while generating (a pair's logits do not depend on what else is in the batch).

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

import collections
import json
import math
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .backends import as_backend
from .backends.base import is_backend
from .errors import CFGTextgenError
from .lanes import DecodeLoop, Lane

GenerateFn = Callable[[list, float], list]  # (prompt ids, scale) -> generated ids
Progress = Callable[[int, int], None]  # (done, total)

DEFAULT_SCALES = (0.0, 1.0, 1.5, 3.0, 6.0, 12.0)
MAX_WORD_TOKENS = 10  # LAMBADA: a word longer than this many tokens is cut here
LANES = 8  # pairs decoded side by side (llama.cpp: 16 sequences, one decode per step with CFG)
MAX_LANES = 16  # llama.cpp's step decodes hold 32 tokens (backends/llama_cpp.py STEP_CHUNK)
WINDOW_STEP = 256  # llama.cpp windows are sized in these (its attention pads the cells it reads to 256)


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


# ---- the backend and the side-by-side decode loop -------------------------------------------


def _size_llama_window(backend, jobs, lanes: int) -> None:
    """llama.cpp keeps a full window of KV cells for every sequence of every lane (90 MiB per
    4096-token window on the default model, 512 MiB on a 7B): make each sequence's window just
    what these jobs need (their longest row plus their new tokens, rounded up to WINDOW_STEP so
    that attention reads the same cells as in a full window), never more than the model's."""
    need = max(len(ids) + job.max_new_tokens for job in jobs for ids in job.pair_ids() if ids is not None)
    window = min(backend.n_ctx, -(-need // WINDOW_STEP) * WINDOW_STEP)
    backend.reserve(lanes, window=window)


def run_side_by_side(backend, jobs: Sequence, lanes: int = LANES,
                     on_done: Callable[[int], None] | None = None) -> None:
    """Decode `jobs` to the end with up to `lanes` of them live at once, on the engine's decode
    loop (lanes.py): each step of every live job in one `backend.run` (on llama.cpp: one decode);
    a job joins as soon as another leaves. The first job that fails raises its error (every pair
    is released first).

    A job is an engine `Generation` or anything with its protocol: `pair_ids()` (story ids,
    opposing ids or None), `advance(logits)` with the pair's logits (rows, vocab), `done`,
    `last_token`, `max_new_tokens`. `on_done(index)` is called as each job ends."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"`lanes` has to be an integer >= 1, but is {lanes!r}")
    jobs = list(jobs)
    if not jobs:
        return
    lanes = min(lanes, len(jobs), MAX_LANES)
    if getattr(backend, "name", None) == "llama.cpp":
        _size_llama_window(backend, jobs, lanes)
    else:
        backend.reserve(lanes)
    loop = DecodeLoop(backend)
    pending = collections.deque(_SideLane(job, i, on_done) for i, job in enumerate(jobs))
    try:
        while pending or loop.live:
            joining = [pending.popleft() for _ in range(min(len(pending), lanes - len(loop.live)))]
            failed = [lane for lane in loop.step(joining) if lane.error is not None]
            if failed:
                raise failed[0].error
    finally:
        loop.close()  # every pair released, also after a failure


class _SideLane(Lane):
    """A side-by-side job in the decode loop; `on_done(index)` when it ends."""

    def __init__(self, job, index: int, on_done):
        super().__init__(job)
        self.index, self.on_done = index, on_done

    def end(self, reason, error) -> None:
        if self.on_done and error is None:
            self.on_done(self.index)


class Forced:
    """A teacher-forcing job for `run_side_by_side`: the pair (story, opposing or None) is fed
    `new_ids` one per step, and `values[i] = measure(logits)` is kept for the logits (rows, vocab)
    that predict `new_ids[i]` (they are a view valid for this step only: `measure` must copy)."""

    def __init__(self, story: Sequence[int], opposing: Sequence[int] | None, new_ids: Sequence[int],
                 measure: Callable):
        if not new_ids:
            raise ValueError("`new_ids` has to hold at least one token to score")
        self.story, self.opposing = list(story), (list(opposing) if opposing is not None else None)
        self.new_ids = [int(t) for t in new_ids]
        self.measure = measure
        self.max_new_tokens = len(self.new_ids)
        self.values: list = []

    def pair_ids(self):
        return self.story, self.opposing

    def advance(self, logits) -> None:
        self.values.append(self.measure(logits, self.new_ids[len(self.values)]))

    @property
    def done(self) -> bool:
        return len(self.values) >= len(self.new_ids)

    @property
    def last_token(self) -> int:
        return self.new_ids[len(self.values) - 1]


# ---- prompt and opposing branch -------------------------------------------------------------


@dataclass(frozen=True)
class Opposing:
    """What the story is contrasted with: a text ("" = a blank story: BOS alone), or the last prompt
    token (mode "last-token", the CFG paper's and transformers' setting)."""

    prompt: str = ""
    mode: str = "text"

    def start_ids(self, prompt_ids: Sequence[int], model, tokenizer=None) -> list[int]:
        """The ids the opposing branch starts from, before the generated tokens (`model`: a
        backend, or a transformers model and its tokenizer)."""
        from .guidance import opposing_token_ids

        if self.mode == "last-token":
            return [int(prompt_ids[-1])]
        backend = as_backend(model, tokenizer)
        return opposing_token_ids(self.prompt, backend.tokenizer, backend.bos_id)[0]


def encode_prompt(tokenizer, prompt: str, model=None, reserve: int = 0,
                  log: Callable[[str], None] | None = None) -> list[int]:
    """Token ids of the prompt; a prompt longer than the model's context (minus `reserve` tokens for
    the continuation) keeps its most recent tokens by the engine's rule (context.fit_context: the
    story row's own length only, leading special tokens kept), and says so through `log`. `model`
    may be a backend (its own tokenizer and window; `tokenizer` is then unused)."""
    from .context import context_length, fit_context

    if model is not None and is_backend(model):
        ids, limit, special = model.tokenize(prompt), model.n_ctx, model.special_ids
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        limit = context_length(model) if model is not None else None
        special = getattr(tokenizer, "all_special_ids", ()) or ()
    if not ids:
        raise CFGTextgenError("the prompt is empty: give some story text to continue")
    kept = fit_context(ids, limit, reserve, special)
    if len(kept) < len(ids) and log:
        log(f"warning: the prompt has {len(ids)} tokens; kept the last {len(kept)} "
            f"(context {limit}, {reserve} tokens for the continuation)")
    return kept


# ---- scoring a continuation by teacher forcing ----------------------------------------------


def _plain_and_guided(logits, scale: float):
    """(plain, guided) log-probs (1, vocab) from a pair's logits: row 0 the story's, row 1 (when
    there is one) the opposing prompt's."""
    import torch

    from .guidance import cfg_combine

    cond = logits[:1].float()
    plain = torch.log_softmax(cond, dim=-1)
    if logits.shape[0] < 2:
        return plain, plain
    return plain, torch.log_softmax(cfg_combine(cond, logits[1:2], scale), dim=-1)


def score_continuation(model, prompt_ids: Sequence[int], new_ids: Sequence[int], scale: float,
                       opposing_ids: Sequence[int], tokenizer=None):
    """Per generated token, the plain and the guided log-probabilities over the vocabulary.

    Returns two (steps, vocab) float tensors: log_softmax of the story's logits (`c`), and
    log_softmax of `u + scale * (c - u)` (`u` from the opposing prompt followed by the same
    generated tokens). At scale 1 both are the plain distribution and the opposing row is not run.
    `model` is a backend, or a transformers model (with its `tokenizer`).
    """
    import torch

    if not new_ids:
        empty = torch.zeros((0, 0))
        return empty, empty
    backend = as_backend(model, tokenizer)
    job = Forced(prompt_ids, None if scale == 1.0 else opposing_ids, new_ids,
                 lambda logits, token: _plain_and_guided(logits, scale))
    run_side_by_side(backend, [job], lanes=1)
    return torch.cat([p for p, _ in job.values]), torch.cat([g for _, g in job.values])


# ---- generation -------------------------------------------------------------------------------


def make_generate_fn(model, tokenizer, preset=None, seed: int = 0, max_new_tokens: int = 60,
                     opposing: Opposing | None = None) -> GenerateFn:
    """A generate function on `model.generate` (the transformers plugin): CFG at the given scale
    first, then the preset's sampler chain (transformers' own warpers neutralised), seeded with
    `seed` before every call so that every scale starts from the same random state.

    `preset` is a `Preset` (default: the built-in "plain": sampling at temperature 1, no samplers);
    its scale is replaced by the call's scale and its opposing prompt by `opposing` when given.
    Stop sequences are not applied: every scale gets the same budget of tokens (EOS still ends).
    """
    import torch

    from .context import eos_ids
    from .backends.transformers import padding_id
    from .chain import generate_kwargs
    from .presets import load_preset

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


class EngineGenerate:
    """The engine's generate function on a backend: `fn(prompt_ids, scale) -> new ids`, and
    `fn.many(prompt_ids, scales)` for several scales side by side. Every scale is an engine
    `Generation` with the preset's settings (generation.preset_settings: `chain.build_chain`, the
    preset's do_sample) and its own `torch.Generator` seeded with `seed`, so every scale starts
    from the same random state, alone or beside the others. Stop sequences are not applied: every
    scale gets the same budget of tokens (EOS still ends)."""

    def __init__(self, backend, preset=None, seed: int = 0, max_new_tokens: int = 60,
                 opposing: Opposing | None = None, lanes: int = MAX_LANES):
        from .presets import load_preset

        self.backend, self.seed, self.lanes = backend, int(seed), lanes
        self.max_new_tokens = int(max_new_tokens)
        base = preset if preset is not None else load_preset("plain")
        cfg = base.cfg
        if opposing is not None:
            cfg = replace(cfg, opposing_prompt=opposing.prompt, opposing_mode=opposing.mode)
        self.base = replace(base, cfg=cfg, max_new_tokens=self.max_new_tokens, stop=())

    def generation(self, prompt_ids: Sequence[int], scale: float):
        import torch

        from .generation import Generation, preset_settings

        preset = replace(self.base, cfg=replace(self.base.cfg, scale=float(scale)))
        generator = torch.Generator(device=self.backend.device).manual_seed(self.seed)
        return Generation(self.backend, None, [int(t) for t in prompt_ids], on_cut=lambda kept, total: None,
                          **preset_settings(self.backend, preset, generator))

    def many(self, prompt_ids: Sequence[int], scales: Sequence[float],
             on_done: Callable[[int], None] | None = None) -> list[list]:
        gens = [self.generation(prompt_ids, s) for s in scales]
        run_side_by_side(self.backend, gens, self.lanes, on_done)
        return [list(g.token_ids) for g in gens]

    def __call__(self, prompt_ids: list, scale: float) -> list:
        return self.many(prompt_ids, [scale])[0]


def make_engine_generate_fn(backend, preset=None, seed: int = 0, max_new_tokens: int = 60,
                            opposing: Opposing | None = None, lanes: int = MAX_LANES) -> EngineGenerate:
    """A generate function on the engine over `backend` (see `EngineGenerate`)."""
    return EngineGenerate(backend, preset, seed, max_new_tokens, opposing, lanes)


def _eos(model, tokenizer=None) -> set:
    if is_backend(model):
        return set(model.eos_ids)
    from .context import eos_ids

    return eos_ids(model, tokenizer)


def _strip_eos_padding(ids: list, model, tokenizer=None) -> list:
    """Generated ids up to and including the first EOS (the backend's EOS set: context.eos_ids
    on transformers; generate pads after it in batches)."""
    eos = _eos(model, tokenizer)
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


def _sweep_measure(scale: float):
    """Per step: (log p of the forced token under the plain model, entropy of the guided
    distribution), as floats (nothing of the step's logits is kept)."""
    def measure(logits, token):
        plain, guided = _plain_and_guided(logits, scale)
        return float(plain[0, token]), float(entropy(guided)[0])

    return measure


def score_rows(model, prompt_ids: Sequence[int], continuations: Sequence[tuple[float, list]],
               opposing_ids: Sequence[int], tokenizer=None, lanes: int = LANES,
               on_done: Callable[[int], None] | None = None) -> list[SweepRow]:
    """Decode and measure continuations [(scale, new ids)], all teacher-forced side by side."""
    backend = as_backend(model, tokenizer)
    jobs = {i: Forced(prompt_ids, None if scale == 1.0 else opposing_ids, ids, _sweep_measure(scale))
            for i, (scale, ids) in enumerate(continuations) if ids}
    order = list(jobs)
    run_side_by_side(backend, [jobs[i] for i in order], lanes,
                     None if on_done is None else (lambda k: on_done(order[k])))
    rows = []
    for i, (scale, ids) in enumerate(continuations):
        text = backend.tokenizer.decode(list(ids), skip_special_tokens=True)
        if i in jobs:
            values = jobs[i].values
            fluency = sum(v[0] for v in values) / len(values)
            ent = sum(v[1] for v in values) / len(values)
        else:
            fluency = ent = math.nan
        d2, r3 = text_metrics(text)
        rows.append(SweepRow(scale, text, list(ids), fluency, ent, d2, r3))
    return rows


def score_row(model, tokenizer, prompt_ids, new_ids, scale, opposing_ids) -> SweepRow:
    """Decode and measure one continuation (`model`: a backend, or a transformers model)."""
    return score_rows(model, prompt_ids, [(scale, list(new_ids))], opposing_ids, tokenizer)[0]


def sweep(model, tokenizer, prompt_ids: Sequence[int], scales: Iterable[float], generate_fn: GenerateFn,
          opposing: Opposing = Opposing(), progress: Progress | None = None,
          lanes: int = MAX_LANES) -> list[SweepRow]:
    """One continuation per scale (the generate function seeds itself), scored; rows in `scales`
    order. The scale-1 text is the reference for diff-vs-1: it is generated even when 1 is not
    among `scales` (and then not returned). A generate function with `many` (EngineGenerate)
    generates every scale side by side; the scoring always runs them side by side."""
    backend = as_backend(model, tokenizer)
    scales = list(scales)
    todo = scales if 1.0 in scales else scales + [1.0]
    # progress counts scales measured (generated and scored); side by side they finish together
    done = [0]

    def tick(_=None):
        done[0] += 1
        if progress:
            progress(done[0], len(todo))

    if progress:
        progress(0, len(todo))
    many = getattr(generate_fn, "many", None)
    if many is not None:
        outs = many(list(prompt_ids), todo)
    else:
        outs = [generate_fn(list(prompt_ids), scale) for scale in todo]
    new = [_strip_eos_padding(list(ids), backend) for ids in outs]
    opposing_ids = opposing.start_ids(prompt_ids, backend)
    scored = score_rows(backend, prompt_ids, list(zip(todo, new)), opposing_ids, lanes=lanes, on_done=tick)
    if done[0] < len(todo) and progress:  # a continuation without tokens has nothing to score
        progress(len(todo), len(todo))
    rows = dict(zip(todo, scored))
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
    """Generate at `scale` and explain every token: (the generated text, the steps). `model` is a
    backend, or a transformers model with its `tokenizer`."""
    backend = as_backend(model, tokenizer)
    new_ids = _strip_eos_padding(list(generate_fn(list(prompt_ids), scale)), backend)
    opposing_ids = opposing.start_ids(prompt_ids, backend)
    plain, guided = score_continuation(backend, prompt_ids, new_ids, scale, opposing_ids)
    text = backend.tokenizer.decode(new_ids, skip_special_tokens=True)
    return text, explain_steps(plain, guided, new_ids, top)


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
    from .generation import Generation

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

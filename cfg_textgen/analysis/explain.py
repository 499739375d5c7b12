"""explain: what CFG did to every generated token (top candidates before and after guidance)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..backends import as_backend
from .generate import _strip_eos_padding
from .scoring import Opposing, score_continuation
from .side_by_side import GenerateFn


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

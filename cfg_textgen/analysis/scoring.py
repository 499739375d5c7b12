"""The opposing branch of an analysis run and the prompt's context cut, and scoring a continuation by
teacher forcing: per generated token, the plain and the guided log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..backends import as_backend
from ..backends.base import is_backend
from ..errors import CFGTextgenError
from .side_by_side import Forced, run_side_by_side


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
        from ..guidance import opposing_token_ids

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
    from ..context import context_length, fit_context

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

    from ..guidance import cfg_combine

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

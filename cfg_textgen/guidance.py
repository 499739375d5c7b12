"""Classifier-free guidance: the combine formula and the opposing branch that feeds it.

    guided = c_raw + (scale - 1) * (c - u)     c, u = log_softmax of the story / opposing-prompt logits

This is the distribution of the paper's `u + scale * (c - u)` (the two differ by the per-row
constant logsumexp(c_raw), which softmax ignores), written on the story's raw-logit scale: at scale 1
it IS the model's raw logits, and it moves continuously with the scale. Samplers after CFG therefore
see what they see in every reference app without CFG (raw logits), and a multiplicative repetition
penalty keeps its tuned strength when the CFG slider moves off 1 (docs/preset-format.md, "Where
penalties act").

`cfg_combine` is the formula, used by both ways in: `CFGLogitsProcessor` (a logits processor that
runs the opposing branch itself, for `model.generate`; its forward passes are the transformers
backend's, backends/transformers.py) and the streaming engine (which runs both branches in one
batched decode). References: Sanchez et al. 2023, "Stay on
topic with Classifier-Free Guidance" (arXiv 2306.17806); NovelAI's CFG sampler (`cfg_scale`,
`cfg_uc`); transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` (same distribution).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .context import bos_id
from .errors import SettingError
from .presets import OPPOSING_MODES as MODES
from .processors import LogitsProcessor

OpposingPrompt = Union[None, str, Sequence[int], Sequence[str], Sequence[Sequence[int]], torch.Tensor]


def cfg_combine(cond_logits: torch.Tensor, opposing_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided scores `c_raw + (scale - 1) * (c - u)`, both inputs (batch, vocab) raw logits.

    softmax of the result is softmax(u + scale * (c - u)), the CFG distribution; its values are on
    the story's raw-logit scale (exactly `cond_logits` at scale 1). Computed in float32 (half
    precision loses the small differences CFG amplifies) and returned in the dtype of
    `cond_logits`. A token at -inf in the story's scores (removed by an earlier processor, e.g. a
    minimum length) stays at -inf.
    """
    raw = cond_logits.float()
    # in place on log_softmax's fresh output: the same operations in the same order as
    # `raw + (scale - 1) * (c - u)` (the same floats), without a new tensor for every step of it;
    # this runs on every token, and each pass over a ~50k vocabulary counts beside a decode step
    guided = F.log_softmax(raw, dim=-1)
    guided.sub_(F.log_softmax(opposing_logits.float(), dim=-1)).mul_(scale - 1.0).add_(raw)
    # a token that a processor before us removed from the story (-inf) stays removed at every scale
    # (the formula would give NaN at scale 1 or below, or where both rows removed it): one cheap
    # reduction finds out, the repair runs only when something was removed
    if bool(raw.min() == float("-inf")):
        guided = torch.where(torch.isneginf(raw), raw, guided)
    return guided.to(cond_logits.dtype)


def check_scale(scale) -> float:
    """A guidance scale must be a finite real number (0 and negatives are allowed)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise SettingError("scale", "a finite number", scale)
    return float(scale)


def check_opposing(mode: str, opposing_prompt, mode_name: str = "opposing_mode") -> str:
    """The opposing-branch mode (`MODES`): "last-token" takes the story's last token as the
    opposing prompt, so it takes no opposing prompt of its own (presets.CFGSettings says the same
    in a preset file's words)."""
    if mode not in MODES:
        raise SettingError(mode_name, f"one of {MODES}", mode)
    if mode == "last-token" and opposing_prompt not in (None, ""):
        raise SettingError("opposing_prompt", "empty", opposing_prompt, message=(
            f"`{mode_name}='last-token'` takes its opposing prompt from the story's last token; "
            f"leave `opposing_prompt` empty, but it is {opposing_prompt!r}"))
    return mode


def opposing_token_ids(opposing: OpposingPrompt, tokenizer=None, bos_token_id: int | None = None,
                       batch_size: int = 1) -> list[list[int]]:
    """Token ids of the opposing prompt, one list per row.

    `None` or "" means a blank story: the BOS token alone. A text is tokenized exactly as the
    tokenizer encodes a story (its own special-token convention); a text that encodes to nothing
    also becomes BOS alone. Ids may be given directly: one list for every row, or one per row.
    """
    def blank() -> list[int]:
        if bos_token_id is None:
            raise SettingError("opposing_prompt", "not empty for a model without BOS", "", message=(
                "this model has no BOS token, so an empty opposing prompt (a blank story) cannot be "
                "built: give an explicit opposing prompt (text or token ids), or use mode='last-token'"))
        return [int(bos_token_id)]

    def from_text(text: str) -> list[int]:
        if text == "":
            return blank()
        if tokenizer is None:
            raise ValueError("an opposing prompt given as text needs `tokenizer`")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids or blank()

    if opposing is None:
        rows = [blank()]
    elif isinstance(opposing, str):
        rows = [from_text(opposing)]
    elif isinstance(opposing, torch.Tensor):
        t = opposing.detach().to("cpu", torch.long)
        rows = [t.tolist()] if t.dim() == 1 else t.tolist()
    else:
        items = list(opposing)
        if not items:
            rows = [blank()]
        elif all(isinstance(x, str) for x in items):
            rows = [from_text(x) for x in items]
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            rows = [[int(x) for x in items]]
        else:
            rows = [[int(i) for i in row] for row in items]
            for r, row in enumerate(rows):
                if not row:
                    rows[r] = blank()
    if len(rows) == 1 and batch_size > 1:
        rows = rows * batch_size
    return rows


class CFGLogitsProcessor(LogitsProcessor):
    r"""Classifier-free guidance as a logits processor for `model.generate` (transformers'
    `LogitsProcessor` interface; processors.py says why it is not imported from transformers).

    For every step it runs the model a second time on the *opposing prompt* followed by the tokens
    generated so far (KV-cached: one new token per step) and returns the guided scores
    `c_raw + (scale - 1) * (c - u)`, where `c_raw` are the story's scores and `c`, `u` the
    log_softmax of the story's and the opposing branch's logits: the distribution of
    `u + scale * (c - u)` on the story's raw-logit scale. Put it first in `logits_processor`:
    everything after it sees guided scores.
    See Sanchez et al. 2023 (https://arxiv.org/abs/2306.17806).

    Args:
        model: the causal LM that `generate` runs (its device and dtype are followed).
        scale (`float`, defaults to 1.5): the guidance scale. 1 is plain generation and never runs
            the opposing pass; 0 ignores the story; above 1 follows it harder; below 0 is allowed.
        opposing_prompt (`str`, ids, one per row, or `None`, defaults to `""`): what the story is
            contrasted with. `""`/`None` is a blank story: the model's BOS token alone.
        tokenizer: needed when `opposing_prompt` is text.
        mode (`"text"` or `"last-token"`, defaults to `"text"`): `"last-token"` starts the opposing
            branch from the last prompt token, as transformers' own processor and the CFG paper's
            LAMBADA runs do; `opposing_prompt` must then be left empty.
        pad_token_id (`int`, optional): id used to left-pad opposing prompts of different lengths
            (masked out; defaults to the model's pad, EOS or 0).

    The opposing branch lives per generation. The processor cannot see where one `generate` call
    ends, only the `input_ids` of each call: a call whose rows are the previous call's rows plus one
    token continues the branch; any other call starts a fresh one. So reusing one processor for
    `model.generate(previous_output)` CONTINUES the previous generation (the opposing branch is the
    opposing prompt followed by every token generated so far, in both calls), which is what a
    "continue" button wants. For a fresh generation (e.g. the previous output as a new prompt in
    mode "last-token", or the same prompt again), start one explicitly:
    `logits_processor=[cfg.new_generation()]` (or call `reset()`), or build a new processor.
    Rows that beam search moves are followed by their history and opposing prompt; a row whose
    history did not change keeps its own branch. When `generate` expands the batch (`num_beams`,
    `num_return_sequences`), per-row opposing prompts are expanded with it.

    Example:

    ```python
    >>> from cfg_textgen import CFGLogitsProcessor
    >>> cfg = CFGLogitsProcessor(model, scale=1.5, tokenizer=tokenizer)
    >>> out = model.generate(**tokenizer("The dragon", return_tensors="pt"),
    ...                      logits_processor=[cfg], max_new_tokens=40, do_sample=False)
    ```
    """

    def __init__(self, model, scale: float = 1.5, opposing_prompt: OpposingPrompt = "",
                 tokenizer=None, mode: str = "text", pad_token_id: int | None = None):
        self.model = model
        self.scale = check_scale(scale)
        self.mode = check_opposing(mode, opposing_prompt, "mode")
        self.bos_token_id = bos_id(model, tokenizer)
        from .backends.transformers import padding_id

        self.pad_token_id = pad_token_id if pad_token_id is not None else padding_id(model, tokenizer)
        # resolve a text prompt now, so that a bad prompt fails before generation starts
        self.opposing_rows = (None if mode == "last-token"
                              else opposing_token_ids(opposing_prompt, tokenizer, self.bos_token_id))
        self.branch = None  # backends.transformers.OpposingBranch, from the first call
        self._history: torch.Tensor | None = None  # input_ids of the previous call
        # per row, which opposing prompt it started from (an index into the distinct start rows):
        # two rows are interchangeable only when both their history and this match
        self._row_prompt: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the opposing branch; the next call starts a new generation."""
        self.branch = None
        self._history = None
        self._row_prompt = None

    def new_generation(self) -> "CFGLogitsProcessor":
        """Start a new generation with the next call, whatever its input; returns the processor, for
        `model.generate(ids, logits_processor=[cfg.new_generation()])`."""
        self.reset()
        return self

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.scale == 1.0:  # plain generation: the raw scores, no second pass at all
            return scores
        source = self._source_rows(input_ids)
        if source is None:
            rows = self._start_rows(input_ids)
            distinct = {tuple(r): i for i, r in reversed(list(enumerate(rows)))}
            self._row_prompt = torch.tensor([distinct[tuple(r)] for r in rows], dtype=torch.long)
            from .backends.transformers import OpposingBranch

            self.branch = OpposingBranch(self.model, rows, self.pad_token_id)
        else:
            if not torch.equal(source, torch.arange(len(source), device=source.device)):
                self.branch.reorder(source)
                self._row_prompt = self._row_prompt.index_select(0, source.cpu())
            self.branch.step(input_ids[:, -1])
        self._history = input_ids.detach().clone()
        return cfg_combine(scores, self.branch.logits.to(scores.device), self.scale)

    def _start_rows(self, input_ids: torch.Tensor) -> list[list[int]]:
        batch = input_ids.shape[0]
        if self.mode == "last-token":
            return [[int(t)] for t in input_ids[:, -1]]
        rows = self.opposing_rows
        if batch % len(rows):
            raise ValueError(f"{len(rows)} opposing prompts do not fit a batch of {batch} rows")
        # generate expands each prompt into consecutive rows (beams / return sequences)
        return [row for row in rows for _ in range(batch // len(rows))]

    def _source_rows(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each row, the previous call's row it continues; None if this is a new generation.

        A row keeps its own branch when its history is the one that row had (greedy, sampling, and
        beams that stayed put): identical histories are no evidence of a move, and two rows of one
        batch may share a story but not their opposing prompt. Only a row whose history changed
        (beam search moved another beam there) looks for its source: an old row with that history
        AND the same opposing prompt, which then has exactly the same opposing state.
        """
        prev = self._history
        if self.branch is None or prev is None or input_ids.shape[1] != prev.shape[1] + 1:
            return None
        if input_ids.shape[0] != prev.shape[0]:
            return None
        body = input_ids[:, :-1].to(prev.device)
        own = (body == prev).all(-1)  # (rows,): row i continues old row i
        source = torch.arange(len(own), device=prev.device)
        if bool(own.all()):
            return source
        prompt = self._row_prompt.to(prev.device)
        for i in torch.nonzero(~own).flatten().tolist():
            match = (body[i] == prev).all(-1) & (prompt == prompt[i])
            if not bool(match.any()):
                return None  # no old row has this history: a new generation
            source[i] = int(match.int().argmax())
        return source

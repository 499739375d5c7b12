"""Classifier-free guidance: the combine formula and the opposing branch that feeds it.

    guided = c_raw + (scale - 1) * (c - u)     c, u = log_softmax of the story / opposing-prompt logits

This is the distribution of the paper's `u + scale * (c - u)` (the two differ by the per-row
constant logsumexp(c_raw), which softmax ignores), written on the story's raw-logit scale: at scale 1
it IS the model's raw logits, and it moves continuously with the scale. Samplers after CFG therefore
see what they see in every reference app without CFG (raw logits), and a multiplicative repetition
penalty keeps its tuned strength when the CFG slider moves off 1 (docs/preset-format.md, "Where
penalties act").

`cfg_combine` is the formula, used by both ways in: `CFGLogitsProcessor` (a transformers
LogitsProcessor that runs the opposing branch itself, for `model.generate`) and the streaming engine
(which runs both branches in one batched forward pass). References: Sanchez et al. 2023, "Stay on
topic with Classifier-Free Guidance" (arXiv 2306.17806); NovelAI's CFG sampler (`cfg_scale`,
`cfg_uc`); transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` (same distribution).
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from .context import bos_id

OpposingPrompt = Union[None, str, Sequence[int], Sequence[str], Sequence[Sequence[int]], torch.Tensor]

MODES = ("text", "last-token")


def cfg_combine(cond_logits: torch.Tensor, opposing_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided scores `c_raw + (scale - 1) * (c - u)`, both inputs (batch, vocab) raw logits.

    softmax of the result is softmax(u + scale * (c - u)), the CFG distribution; its values are on
    the story's raw-logit scale (exactly `cond_logits` at scale 1). Computed in float32 (half
    precision loses the small differences CFG amplifies) and returned in the dtype of
    `cond_logits`. A token at -inf in the story's scores (removed by an earlier processor, e.g. a
    minimum length) stays at -inf.
    """
    raw = cond_logits.float()
    c = F.log_softmax(raw, dim=-1)
    u = F.log_softmax(opposing_logits.float(), dim=-1)
    guided = raw + (scale - 1.0) * (c - u)
    # a token that a processor before us removed from the story (-inf) stays removed at every scale
    # (the formula would give NaN at scale 1 or below)
    guided = torch.where(torch.isneginf(c), c, guided)
    return guided.to(cond_logits.dtype)


def check_scale(scale) -> float:
    """A guidance scale must be a finite real number (0 and negatives are allowed)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"`scale` has to be a finite number, but is {scale!r}")
    return float(scale)


def opposing_token_ids(opposing: OpposingPrompt, tokenizer=None, bos_token_id: int | None = None,
                       batch_size: int = 1) -> list[list[int]]:
    """Token ids of the opposing prompt, one list per row.

    `None` or "" means a blank story: the BOS token alone. A text is tokenized exactly as the
    tokenizer encodes a story (its own special-token convention); a text that encodes to nothing
    also becomes BOS alone. Ids may be given directly: one list for every row, or one per row.
    """
    def blank() -> list[int]:
        if bos_token_id is None:
            raise ValueError(
                "this model has no BOS token, so an empty opposing prompt (a blank story) cannot be "
                "built: give an explicit opposing prompt (text or token ids), or use mode='last-token'"
            )
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


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (ids, attention_mask), both (batch, max_len) long tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def padding_id(model, tokenizer=None) -> int:
    """The id to left-pad rows with (masked out, so any id works): the model's pad, the tokenizer's,
    the model's EOS (first one of a list), the tokenizer's EOS, else 0."""
    for t in (getattr(model.config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
              getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(t, (list, tuple)) and t:
            t = t[0]
        if isinstance(t, int) and not isinstance(t, bool):
            return int(t)
    return 0


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens (0 for the first real token of each row)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_kwargs(model) -> set[str]:
    """Which optional arguments this model's forward accepts (position_ids, logits_to_keep)."""
    names = set(inspect.signature(model.forward).parameters)
    return names & {"position_ids", "logits_to_keep", "num_logits_to_keep"}


# Architectures whose logits are exactly `lm_head(last hidden state)`: a plain bias-free Linear,
# no soft-capping or logit scaling (Gemma, Cohere, Granite, ... have those and take the normal path).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo2"}


def split_head(model):
    """(decoder, head_weight) when we may run the model's output layer ourselves, else None.

    Why: MKL on a CPU multiplies one or two rows by a tall (vocab x hidden) output matrix far
    slower than it computes `W @ h.T` with at least two rows as columns (SmolLM2's 49152 x 576
    head: 12 ms for one row and 22-26 ms for two, against ~3-5 ms), and the head is a sixth to a
    quarter of a decode step. Same numbers up to float rounding (tested).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (getattr(model.config, "model_type", None) not in _PLAIN_HEAD_TYPES
            or type(head) is not torch.nn.Linear or head.bias is not None):
        return None
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        return None
    return decoder, head.weight


def head_logits(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` (batch, vocab) computed as `weight @ hidden.T`; a single row is paired
    with a zero row, since the one-column product takes MKL's much slower matrix-vector path."""
    rows = hidden.shape[0]
    cols = hidden if rows > 1 else torch.cat([hidden, torch.zeros_like(hidden)])
    return torch.mm(weight, cols.t()).t()[:rows].contiguous()


def cache_keyword(module) -> str:
    """The name under which `module.forward` takes the KV cache: `cache` (transformers >= 5.24,
    which still accepts `past_key_values` until 5.40 but warns on every call) or `past_key_values`
    (5.20-5.23, which know no `cache`)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward pass returned, from the field this transformers version has (5.24
    names it `cache`; reading the old `past_key_values` property there warns)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values


def run_model(model, split, ids: torch.Tensor, cache=None, **kwargs):
    """One forward pass with the KV cache `cache` (None: start one); (last-position logits
    (batch, vocab), the returned cache)."""
    with torch.no_grad():
        if split is None:
            if "logits_to_keep" in forward_kwargs(model):
                kwargs["logits_to_keep"] = 1
            out = model(ids, **{cache_keyword(model): cache}, **kwargs)
            return out.logits[:, -1], returned_cache(out)
        out = split[0](ids, **{cache_keyword(split[0]): cache}, **kwargs)
        return head_logits(split[1], out.last_hidden_state[:, -1]), returned_cache(out)


class OpposingBranch:
    """The opposing branch of one generation: its KV cache, attention mask, positions and the token
    history it has consumed. Created per generation; fed exactly one new token per step."""

    def __init__(self, model, rows: list[list[int]], pad_id: int):
        self.model = model
        self._accepts = forward_kwargs(model)
        ids, mask = left_pad(rows, pad_id)
        self.mask = mask.to(model.device)
        self.next_pos = self.mask.sum(-1, keepdim=True)  # (batch, 1): position of the next token
        self.cache = None
        self.calls = 0
        self.logits = self._forward(ids.to(model.device), positions_from_mask(self.mask))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = dict(attention_mask=self.mask, cache=self.cache, use_cache=True)
        if "position_ids" in self._accepts:
            kwargs["position_ids"] = positions
        # the model's own forward, so that our scores equal transformers' CFG to the last bits
        # (the engine's faster output layer, split_head, rounds differently by a few ulps)
        logits, self.cache = run_model(self.model, None, ids, **kwargs)
        self.calls += 1
        return logits  # (batch, vocab)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (batch,) and return the next-token logits (batch, vocab)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        positions = self.next_pos
        self.next_pos = self.next_pos + 1
        self.logits = self._forward(tokens.view(-1, 1).to(self.mask.device), positions)
        return self.logits

    def reorder(self, index: torch.Tensor) -> None:
        """Follow rows that beam search reordered or duplicated: row i now continues row index[i]."""
        index = index.to(self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.cache.reorder_cache(index)


class CFGLogitsProcessor(LogitsProcessor):
    r"""Classifier-free guidance as a `LogitsProcessor` for `model.generate`.

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
        if mode not in MODES:
            raise ValueError(f"`mode` has to be one of {MODES}, but is {mode!r}")
        if mode == "last-token" and opposing_prompt not in (None, ""):
            raise ValueError("`mode='last-token'` takes its opposing prompt from the input; "
                             f"leave `opposing_prompt` empty, but it is {opposing_prompt!r}")
        self.mode = mode
        self.bos_token_id = bos_id(model, tokenizer)
        self.pad_token_id = pad_token_id if pad_token_id is not None else padding_id(model, tokenizer)
        # resolve a text prompt now, so that a bad prompt fails before generation starts
        self.opposing_rows = (None if mode == "last-token"
                              else opposing_token_ids(opposing_prompt, tokenizer, self.bos_token_id))
        self.branch: OpposingBranch | None = None
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

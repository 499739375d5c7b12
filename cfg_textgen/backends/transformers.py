"""The transformers backend: a pair's story and opposing rows as one left-padded batch, KV-cached,
and the plumbing every transformers forward here shares (the `model.generate` plugin's opposing
branch too).

Per pair and step:

    prefill: ids, mask = left_pad([story, opposing])   # (rows, width); positions count real tokens
    step:    the same token appended to every row; each row continues at its own position

Pairs are independent (own cache, mask, positions): `run` makes one forward per pair, so
several live pairs cost several forwards (the llama.cpp backend does them in one batch).
No prompt cache and no chunked prefill here (`WholePrefill`): a pair's whole prompt is read when
it joins, and its cache is dropped when it is released. The
output layer runs as `W @ h.T` where the architecture allows it (`split_head`). No transformers
import: everything here works on the model object it is given.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..context import bos_id, context_length, eos_ids
from .base import Pair, PairIds, Shortcuts, WholePrefill
from .text import REPLACEMENT, IncrementalDecoder, StreamDecoder, text_decoder  # noqa: F401  (API)


class KVRows:
    """Left-padded rows run through a model with a KV cache: the mask, each row's next position, the
    cache and the last-position logits (rows, vocab). `step` appends one token to every row.

    `split` (from `split_head`) runs the output layer as `W @ h.T`; None runs the model's own
    forward (the plugin uses that, so its scores equal transformers' CFG to the last bits)."""

    def __init__(self, model, rows: Sequence[Sequence[int]], pad_id: int, split=None,
                 accepts: set[str] | None = None):
        self.model, self._split = model, split
        self._accepts = forward_kwargs(model) if accepts is None else accepts
        ids, mask = left_pad(rows, pad_id)
        self.mask = mask.to(model.device)
        self.next_pos = self.mask.sum(-1, keepdim=True)  # (rows, 1): position of the next token
        self.cache = None
        self.calls = 0
        self.logits = self._forward(ids.to(model.device), positions_from_mask(self.mask))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = dict(attention_mask=self.mask, use_cache=True)
        if "position_ids" in self._accepts:
            kwargs["position_ids"] = positions
        logits, self.cache = run_model(self.model, self._split, ids, cache=self.cache, **kwargs)
        self.calls += 1
        return logits  # (rows, vocab)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (rows,) and return the next-token logits (rows, vocab)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        positions, self.next_pos = self.next_pos, self.next_pos + 1
        self.logits = self._forward(tokens.view(-1, 1).to(self.mask.device), positions)
        return self.logits

    def cut(self, n: int) -> None:
        """Forget the last `n` columns (tokens) of every row: cache, mask and positions. Every
        step appended one column to all rows, so the last columns are the newest tokens."""
        if not getattr(self.cache, "is_croppable", True):
            raise ValueError("this model's KV cache cannot be cut back (sliding-window or "
                             "recurrent layers): phrase bans need one that can")
        self.cache.crop(-n)  # negative: remove n (every transformers version reads it so)
        self.mask = self.mask[:, :-n]
        self.next_pos = self.next_pos - n

    def reorder(self, index: torch.Tensor) -> None:
        """Follow rows that beam search reordered or duplicated: row i now continues row index[i]."""
        index = index.to(self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.cache.reorder_cache(index)


class OpposingBranch(KVRows):
    """The opposing branch of one `model.generate` call (guidance.CFGLogitsProcessor): its rows on
    the model's own forward, fed exactly one new token per step."""

    def __init__(self, model, rows: list[list[int]], pad_id: int):
        super().__init__(model, rows, pad_id, split=None)


def _cuda_device() -> torch.device:
    from ..runtime import RuntimeSettingsError

    if not torch.cuda.is_available():
        raise RuntimeSettingsError("n_gpu_layers", "no CUDA GPU is available to this torch build "
                                   f"(torch {torch.__version__}); install a CUDA build of torch from "
                                   "pytorch.org, or leave the model on the CPU")
    return torch.device("cuda")


class TransformersPair(Pair):
    """One (story, opposing) pair: its left-padded rows (`KVRows`) and the float32 logits."""

    def __init__(self, rows: KVRows, ids: list[list[int]]):
        super().__init__(len(ids))
        self.kv: KVRows | None = rows
        self.logits = rows.logits.to(dtype=torch.float32)
        self.tokens = [list(row) for row in ids]  # each row's tokens, for a rewind


class TransformersBackend(WholePrefill, Shortcuts):
    name = "transformers"
    # torch.multinomial, as model.generate draws: the same seed picks the same tokens as a
    # generate run with our processors (tests/test_engine.py checks it)
    token_draw = "multinomial"

    def __init__(self, model, tokenizer, runtime=None):
        """`runtime` (runtime.RuntimeSettings): `n_gpu_layers` != 0 moves the model to CUDA (all of
        it: transformers has no partial offload here) and `ctx_size` narrows the window; the
        threads are torch's, set at start-up (runtime.configure_process)."""
        if runtime is not None and runtime.n_gpu_layers != 0:
            model = model.to(_cuda_device())
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.n_ctx = context_length(model)
        if runtime is not None and runtime.ctx_size is not None:
            self.n_ctx = min(self.n_ctx, runtime.ctx_size) if self.n_ctx else runtime.ctx_size
        self.eos_ids = eos_ids(model, tokenizer)  # context.py: one EOS rule everywhere
        self.bos_id = bos_id(model, tokenizer)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._accepts = forward_kwargs(model)
        self._split = split_head(model)
        self._pad = padding_id(model, tokenizer)
        self.forwards = 0

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decoder(self, context_ids: Sequence[int] = ()):
        """StreamDecoder (DecodeStream) for a fast tokenizer, else IncrementalDecoder."""
        return text_decoder(self.tokenizer, context_ids)

    def reserve(self, pairs: int) -> None:
        """Nothing to allocate: each pair owns its cache."""

    def fits(self, rows: int = 2) -> bool:
        """Always: each pair owns its cache (memory is the limit, not slots)."""
        return True

    def run(self, steps=(), new=()):
        """One forward per pair: `steps` [(pair, token)] continue, `new` [(story, opposing)] start
        (base.py: the protocol and its failure contract)."""
        for pair, _ in steps:
            if not pair.live:
                raise ValueError("`step` got a released pair")
        out_steps = []
        for pair, token in steps:
            tokens = torch.full((pair.rows,), int(token), dtype=torch.long, device=self.device)
            pair.logits = pair.kv.step(tokens).to(dtype=torch.float32)
            for row in pair.tokens:
                row.append(int(token))
            self.forwards += 1
            out_steps.append(pair.logits)
        out_new = []
        for ids in new:
            rows = PairIds(*ids).rows()
            kv = KVRows(self.model, rows, self._pad, self._split, self._accepts)
            self.forwards += 1
            out_new.append(TransformersPair(kv, rows))
        return out_steps, out_new

    def rewind(self, pair: TransformersPair, n: int) -> torch.Tensor:
        """Take the last `n` tokens back from every row of the pair; the logits at the new last
        position, also as `pair.logits`. The cache is cut by `n + 1` tokens and the last kept
        token runs again (the model's forward keeps only the last position's logits)."""
        if not pair.live:
            raise ValueError("`rewind` got a released pair")
        shortest = min(len(row) for row in pair.tokens)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < shortest:
            raise ValueError(f"`n` has to be an integer in [0, {shortest - 1}], but is {n!r}")
        for row in pair.tokens:
            del row[len(row) - n:]
        pair.kv.cut(n + 1)
        last = torch.tensor([row[-1] for row in pair.tokens], dtype=torch.long, device=self.device)
        pair.logits = pair.kv.step(last).to(dtype=torch.float32)
        self.forwards += 1
        return pair.logits

    def release(self, pair: TransformersPair) -> None:
        pair.kv = pair.logits = None
        pair.live = False


# ---- the plumbing of a transformers forward ---------------------------------------------------


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

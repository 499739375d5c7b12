"""The samplers story writers tune: one small class per sampler, and the registry name -> class.

Every sampler is a logits processor (transformers' interface, processors.py): `__call__(input_ids,
scores) -> new scores`, shapes (batch, seq) and (batch, vocab). Removed tokens are set to -inf, the
input is never mutated, and at least `min_tokens_to_keep` tokens survive. Each class takes its preset
parameters from the settings model of its name (settings.py), which presets.py also builds the
preset model and its JSON Schema from.

Rows may already hold -inf entries (an earlier sampler removed them); every sampler treats those
as probability 0 and never turns them back into finite values. `pick_token` makes the final choice
exactly as `model.generate` does.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from pydantic import BaseModel, Field

from .processors import LogitsProcessor, ProcessorList
from .settings import SETTINGS, Int, Param, SamplerSettings, check, fields_of

NEG_INF = float("-inf")
LN2 = math.log(2.0)


class Sampler(LogitsProcessor):
    """Base class: a named LogitsProcessor whose constructor takes its preset parameters as keywords
    (or by position in declaration order, then `min_tokens_to_keep`), checked by its `Settings`
    model (settings.py) and stored as attributes of the same names."""

    name: ClassVar[str]
    Settings: ClassVar[type[SamplerSettings]]  # set by `register`, from settings.SETTINGS
    params: ClassVar[tuple[Param, ...]] = ()  # read-only views of the Settings fields
    needs_tokenizer: ClassVar[bool] = False  # e.g. DRY's sequence breakers are text

    def __init__(self, *args, **kwargs):
        names = [p.name for p in self.params] + ["min_tokens_to_keep"]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes at most {len(names)} positional arguments")
        for key, value in zip(names, args):
            if key in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {key!r}")
            kwargs[key] = value
        keep = check(_Keep, {"min_tokens_to_keep": kwargs.pop("min_tokens_to_keep", 1)})
        settings = check(self.Settings, {**kwargs, "sampler": self.name})
        for p in self.params:
            setattr(self, p.name, getattr(settings, p.name))
        self.min_tokens_to_keep = keep.min_tokens_to_keep

    @classmethod
    def from_params(cls, params: Mapping[str, Any], tokenizer=None) -> "Sampler":
        """Build from preset parameters (missing ones take their defaults)."""
        return cls(**params, **({"tokenizer": tokenizer} if cls.needs_tokenizer else {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{p.name}={getattr(self, p.name)!r}" for p in self.params)
        return f"{type(self).__name__}({args})"

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


class _Keep(BaseModel):
    min_tokens_to_keep: Int = Field(1, ge=1)


SAMPLERS: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: add a sampler to the registry under its `name`, with the settings model of
    that name; its signature and the Args of its docstring (help(), IDEs) list the model's fields."""
    if cls.name in SAMPLERS:
        raise ValueError(f"sampler name {cls.name!r} registered twice")
    cls.Settings = SETTINGS[cls.name]
    cls.params = tuple(v for k, v in fields_of(cls.Settings).items() if k != "sampler")
    args = "".join(f"        {p.name} ({p.rule()}, defaults to {p.default!r}): {p.doc}.\n" for p in cls.params)
    cls.__doc__ = cls.__doc__.replace("    Args:\n", "    Args:\n" + args, 1)  # the rest are not settings
    P = inspect.Parameter
    own = [q for q in inspect.signature(cls.__init__).parameters.values() if q.kind is P.KEYWORD_ONLY]
    cls.__signature__ = inspect.Signature(
        [P(p.name, P.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.kind) for p in cls.params]
        + [P("min_tokens_to_keep", P.POSITIONAL_OR_KEYWORD, default=1, annotation=int)] + own)
    SAMPLERS[cls.name] = cls
    return cls


class SamplerChain(ProcessorList):
    """A preset's samplers in order (what `chain.build_chain` returns): a processor list
    that runs them with one intra-op thread when the scores are on the CPU.

    A chain is ~20 short passes over one row of ~50k scores; threads gain nothing there, and torch
    splits every elementwise op above 32,768 elements across its threads, so each op waits for the
    slowest thread. With the other core busy (any shared machine) that wait is a scheduler time
    slice: measured here, `diff().diff().abs()` over 49,152 floats took 0.014 ms on one thread and
    48 ms on two. The thread count is restored afterwards; it is process-wide, so a model running a
    forward pass in another Python thread at the same moment would run it single-threaded too.
    """

    def __call__(self, input_ids, scores, **kwargs):
        threads = torch.get_num_threads()
        if scores.device.type != "cpu" or threads == 1:
            return super().__call__(input_ids, scores, **kwargs)
        torch.set_num_threads(1)
        try:
            return super().__call__(input_ids, scores, **kwargs)
        finally:
            torch.set_num_threads(threads)


def pick_token(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None
               ) -> torch.LongTensor:
    """The final choice after the chain: (batch, vocab) scores -> (batch,) token ids.

    Greedy is `argmax`; sampling is `torch.multinomial(softmax(scores), 1)`, the very call
    `model.generate` makes, so a run seeded with `torch.manual_seed` picks the same tokens.
    """
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---- shared helpers ------------------------------------------------------------------------


def log_probs_and_entropy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(scores) and the Shannon entropy (nats) of softmax(scores) per row, (batch, 1);
    -inf entries count as p = 0.

    `p * log p` is `0 * -inf = nan` exactly where a token is removed, and `nansum` drops those (as
    transformers' `TypicalLogitsWarper` does). p comes from `softmax`, not `logp.exp()`: on the CPU
    `exp` over a row that is mostly -inf (any row after a truncation sampler) takes ~0.11 ms for
    49,152 entries, softmax ~0.02 ms.
    """
    logp = torch.log_softmax(scores, dim=-1)
    return logp, -(scores.softmax(dim=-1) * logp).nansum(dim=-1, keepdim=True)


def row_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(scores) per row, (batch, 1); -inf entries count as p = 0.
    The one entropy of the package (samplers, analysis metrics); `log_probs_and_entropy` when the
    caller needs log_softmax(scores) too."""
    return log_probs_and_entropy(scores)[1]


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores of every row. For k = 1 (every sampler's default
    `min_tokens_to_keep`) a tie goes to the lowest index, as `argmax` and greedy decoding pick it;
    torch.topk picks among equal scores by its own algorithm (seen: the last of three tied -0.0).
    Wider ties are broken by torch.topk."""
    k = min(k, scores.shape[-1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    best = scores.argmax(dim=-1, keepdim=True) if k == 1 else torch.topk(scores, k, dim=-1).indices
    return mask.scatter(-1, best, True)


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th highest score of every row, (batch, 1)."""
    k = min(k, scores.shape[-1])
    return torch.topk(scores, k, dim=-1).values[..., -1:]


def _guard(scores: torch.Tensor, remove: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Un-remove the `min_keep` best tokens in rows where removal would leave fewer than that."""
    finite = torch.isfinite(scores)
    left = (finite & ~remove).sum(dim=-1, keepdim=True)
    short = left < torch.clamp(finite.sum(dim=-1, keepdim=True), max=min_keep)
    return remove & ~(short & _top_k_mask(scores, min_keep))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision scores, else their own dtype: the reductions over a whole
    vocabulary (softmax, entropy) need float32, not float64 (slow on CPUs, missing on some GPUs)."""
    return torch.promote_types(dtype, torch.float32)


def _keep_finite(out: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Penalties reshape, they never remove: clamp entries that were finite back into range."""
    info = torch.finfo(out.dtype)
    return torch.where(torch.isfinite(scores), out.clamp(min=info.min, max=info.max), out)


def _divide(scores: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """scores / t; if a tiny t overflows a finite logit, divide max-shifted logits instead
    (same distribution: the best token becomes 0, far-away ones the most negative float)."""
    out = scores / t
    if not isinstance(t, torch.Tensor) and t >= 1:
        return out  # |x / t| <= |x|: nothing can overflow
    if not isinstance(t, torch.Tensor):
        # only a finite |x| > t * max float can overflow; one cheap pass rules that out (two
        # isfinite passes over 49,152 scores cost ~0.1 ms on the CPU, this ~0.01 ms)
        biggest = torch.nan_to_num(scores, neginf=0.0).abs().amax()
        info = torch.finfo(scores.dtype)
        if t >= info.tiny and not bool(biggest > t * info.max):  # a t below tiny rounds to 0
            return out
    # a tiny t overflows (x / t = inf) or rounds to 0 in float32 (0 / 0 = nan)
    overflow = (~torch.isfinite(out) & torch.isfinite(scores)).any(dim=-1, keepdim=True)
    if overflow.any():
        shifted = scores - scores.amax(dim=-1, keepdim=True)
        safe = torch.where(shifted == 0, torch.zeros_like(shifted), shifted / t)
        out = _keep_finite(torch.where(overflow, safe, out), scores)
    return out


def _sort(x: torch.Tensor, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.sort(x, dim=-1, stable=True)`: ties keep their index order, so the result does not
    depend on the device or the sort algorithm.

    On the CPU torch's sort with indices takes ~7 ms for a 49,152-entry row (the cost of top-p,
    typical and tail-free sampling on a full vocabulary); sorting (orderable float bits << 32 |
    index) as int64 keys with numpy gives the same stable order in ~0.4 ms. Float32, float16 and
    bfloat16 convert to float32 exactly and in order; -0.0 counts as 0.0, as in torch. NaN rows
    are not supported here (the samplers never hold NaN).
    """
    if x.device.type != "cpu" or x.shape[-1] < 1024 or x.dtype not in (torch.float32, torch.float16,
                                                                       torch.bfloat16):
        return torch.sort(x, dim=-1, descending=descending, stable=True)
    v = x.detach().to(torch.float32)
    v = (-v if descending else v) + 0.0  # + 0.0 turns -0.0 into 0.0
    bits = v.contiguous().numpy().view(np.int32).astype(np.int64)
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed-integer order
    keys = (bits << 32) | np.arange(x.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    order = torch.from_numpy(keys & 0xFFFFFFFF)
    return x.gather(-1, order), order


def _sorted_values(x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """The values of `_sort(x, descending)` (ties are equal values, so any sort gives them; on the
    CPU numpy's float sort takes ~0.1 ms for a 49,152-entry row). A zero may come out as -0.0
    where the stable sort has 0.0 or the reverse; they compare and exponentiate alike."""
    if x.device.type != "cpu" or x.shape[-1] < 1024 or x.dtype not in (torch.float32, torch.float64):
        return _sort(x, descending)[0]
    v = x.detach().contiguous().numpy()
    out = -np.sort(-v, axis=-1) if descending else np.sort(v, axis=-1)
    return torch.from_numpy(out)


def _finite_rows(scores: torch.Tensor, share: int = 8) -> list[torch.Tensor] | None:
    """Indices of the finite entries of every row, when each row has at most 1/`share` of them
    finite and the rest -inf (no NaN, no +inf, no empty row); else None (use the full path).

    The truncation samplers after top_k see a few hundred finite scores out of ~50k: sorting only
    those is what makes them cheap. Their fast paths rebuild every full-row tensor whose reduction
    order could matter (softmax, sums), so they give bit-for-bit the full path's result.
    """
    if scores.dim() != 2 or scores.shape[-1] < 3:
        return None
    if not torch.isfinite(scores.amax(dim=-1)).all():  # amax is NaN/+inf/-inf for such rows
        return None
    alive = scores > NEG_INF
    if (alive.sum(dim=-1) > scores.shape[-1] // share).any():
        return None
    return [row.nonzero().squeeze(1) for row in alive]


def _rows_or_none(scores: torch.Tensor, row_fn) -> torch.Tensor | None:
    """Run `row_fn(row, scores_row, idx)` -> (vocab,) tensor or None on every row of a
    compactable batch; None if the batch is not compactable or any row asks for the full path."""
    idx = _finite_rows(scores)
    if idx is None:
        return None
    rows = []
    for r, ix in enumerate(idx):
        out = row_fn(r, scores[r], ix)
        if out is None:
            return None
        rows.append(out)
    return torch.stack(rows)


def _remove(row: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """A copy of `row` with the entries at `ix` set to -inf."""
    out = row.clone()
    out[ix] = NEG_INF
    return out


def _continues(prev_ids: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Which rows of `input_ids` are the previous call's rows plus one picked token, (batch,) bool;
    None when the call cannot continue the previous one at all (first call, other batch or length).
    The stateful samplers (mirostat, adaptive_p) learn the token they led to from this."""
    if prev_ids is None or prev_ids.shape[0] != input_ids.shape[0] \
            or input_ids.shape[1] != prev_ids.shape[1] + 1:
        return None
    return (input_ids[:, :-1] == prev_ids).all(dim=-1)


# ---- temperature -----------------------------------------------------------------------------


@register
class Temperature(Sampler):
    r"""Temperature scaling: logits / T. T < 1 sharpens the distribution, T > 1 flattens it.

    Formula: `scores / temperature` (as transformers' `TemperatureLogitsWarper`). Should the
    division overflow a finite logit (a vanishing T), the max-shifted logits are divided instead,
    which is the same distribution.

    Reference: Ackley, Hinton & Sejnowski 1985; transformers `TemperatureLogitsWarper`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "temperature"

    def __call__(self, input_ids, scores):
        return _divide(scores, self.temperature)


@register
class DynamicTemperature(Sampler):
    r"""Entropy-scaled temperature ("DynaTemp"): confident rows get `low`, uncertain rows `high`.

    Formula, per row: with `H` the entropy (nats) of softmax(scores) and `V` the number of finite
    candidates, `T = low + (high - low) * (H / log V) ** exponent`, then `scores / T`. A row with a
    single candidate has H / log V := 0 (T = low). `high < low` is allowed (T falls with entropy).
    T is clamped to at least 1e-6, so `low = 0` acts as (near-)greedy instead of dividing by zero.

    Reference: kalomaze's Dynamic Temperature, text-generation-webui `dynatemp_low/high/exponent`
    (the same normalised entropy H / log(number of finite logits)).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "dynamic_temperature"

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """The per-row temperature T, shape (batch, 1)."""
        h = row_entropy(scores.to(_wide(scores.dtype)))
        v = torch.isfinite(scores).sum(dim=-1, keepdim=True).double()
        log_v = torch.log(v.clamp(min=1))
        norm = torch.where(v > 1, h / log_v.clamp(min=1e-12), torch.zeros_like(h)).clamp(0, 1)
        t = self.low + (self.high - self.low) * norm.pow(self.exponent)
        return t.clamp(min=1e-6)

    def __call__(self, input_ids, scores):
        if self.low == self.high == 1.0:
            return scores.clone()
        return _divide(scores, self.temperatures(scores).to(scores.dtype))


# ---- truncation ------------------------------------------------------------------------------


@register
class TopK(Sampler):
    r"""Top-k: keep the `k` highest logits (and every logit tied with the k-th), remove the rest.

    Formula: remove `scores < kth_largest(scores, max(k, min_tokens_to_keep))`; k = 0 is off.
    Same semantics as transformers' `TopKLogitsWarper` (which rejects k = 0).

    Reference: Fan, Lewis & Dauphin 2018, "Hierarchical Neural Story Generation".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): lower bound on k.
    """

    name = "top_k"

    def __call__(self, input_ids, scores):
        if self.k == 0:
            return scores.clone()
        kth = _kth_largest(scores, max(self.k, self.min_tokens_to_keep))
        return scores.masked_fill(scores < kth, NEG_INF)


@register
class TopP(Sampler):
    r"""Top-p (nucleus): keep the most likely tokens whose cumulative probability reaches `p`.

    Formula: sort ascending, `c_i` = cumulative softmax; remove tokens with `c_i <= 1 - p`, never
    the `min_tokens_to_keep` most likely. p = 1 is off. Same semantics as transformers'
    `TopPLogitsWarper` (ascending cumulative sum, ties broken by the sort).

    Reference: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "top_p"

    def __call__(self, input_ids, scores):
        if self.p == 1.0:
            return scores.clone()
        fast = _rows_or_none(scores, self._row)
        return fast if fast is not None else self._full(scores)

    def _row(self, r, row, ix):
        """One row with n finite scores: sort only those (see _finite_rows); None if the cut
        splits tied scores (the full sort's tie order decides that case)."""
        vocab, n = row.shape[-1], ix.numel()
        sv, so = _sort(row[ix])
        padded = row.new_full((1, vocab), NEG_INF)  # the full sorted row: -inf first
        padded[0, vocab - n:] = sv
        cum = padded.softmax(dim=-1)[0, vocab - n:].cumsum(dim=-1)  # zeros before add nothing
        drop = cum <= 1 - self.p
        drop[-self.min_tokens_to_keep:] = False
        j = int(drop.sum())  # drop is a prefix: cum never decreases
        if 0 < j < n and sv[j - 1] == sv[j]:
            return None
        return _remove(row, ix[so[:j]])

    def _full(self, scores):
        # The dropped tokens are a prefix of the ascending order (cum never decreases). When the
        # first kept value is not tied with the last dropped one, "value < first kept" is that
        # prefix, and the sorted values alone (no indices: ~0.1 ms instead of ~0.4 ms on the CPU)
        # give it; with a tie at the cut the stable order decides, as below.
        sorted_scores = _sorted_values(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - self.p
        drop_sorted[..., -self.min_tokens_to_keep:] = False  # the most likely ones stay
        j = drop_sorted.sum(dim=-1, keepdim=True)  # how many go, < vocab
        first_kept = sorted_scores.gather(-1, j)
        last_dropped = sorted_scores.gather(-1, (j - 1).clamp(min=0))
        if not ((j > 0) & (last_dropped == first_kept)).any():
            return scores.masked_fill(scores < first_kept, NEG_INF)
        sorted_scores, order = _sort(scores, descending=False)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, NEG_INF)


@register
class Typical(Sampler):
    r"""Locally typical sampling: keep tokens whose surprise is closest to the row's entropy.

    Formula: with `l = log_softmax(scores)` and entropy `H`, sort tokens by `|-l - H|` ascending and
    keep the shortest prefix whose probability mass reaches `p` (the first token past the mass and
    every token tied with it included); the first `min_tokens_to_keep` in that order always stay.
    p = 1 is off. Same semantics as transformers' `TypicalLogitsWarper`.

    Reference: Meister, Pimentel, Wiher & Cotterell 2023, "Locally Typical Sampling" (TACL).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "typical"

    def __call__(self, input_ids, scores):
        if self.p == 1.0:
            return scores.clone()
        logp, h = self._surprise(scores)
        fast = _rows_or_none(scores, lambda r, row, ix: self._row(row, ix, logp[r], h[r]))
        return fast if fast is not None else self._full(scores, logp, h)

    _surprise = staticmethod(log_probs_and_entropy)  # log_softmax(scores) and H per row

    def _row(self, row, ix, logp, h):
        """One row with n finite scores: sort only their distances; None where the full sort's
        order among equal distances could change the result."""
        vocab, n, keep = row.shape[-1], ix.numel(), self.min_tokens_to_keep
        sd, so = _sort((-logp[ix] - h).abs())
        sc = row[ix][so]
        if ((sd[1:] == sd[:-1]) & (sc[1:] != sc[:-1])).any():  # tied distances, unequal scores
            return None
        padded = row.new_full((1, vocab), NEG_INF)  # scores in distance order, removed ones last
        padded[0, :n] = sc
        cum = padded.softmax(dim=-1)[0, :n].cumsum(dim=-1)
        last = int((cum < self.p).sum())
        if last >= n:  # the full path's threshold is a removed token's +inf: nothing goes
            return row.clone()
        drop = sd > sd[last]
        if keep < n and sd[keep - 1] == sd[keep] and sd[keep] > sd[last]:
            return None  # which tied token is protected depends on the full sort
        drop[:keep] = False
        return _remove(row, ix[so[drop]])

    def _full(self, scores, logp=None, h=None):
        if logp is None:
            logp, h = self._surprise(scores)
        distance = (-logp - h).abs()  # +inf for removed tokens: they sort last
        sorted_dist, order = _sort(distance, descending=False)
        cum = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < self.p).sum(dim=-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        drop_sorted = sorted_dist > sorted_dist.gather(-1, last)
        drop_sorted[..., : self.min_tokens_to_keep] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, NEG_INF)


@register
class MinP(Sampler):
    r"""Min-p: remove tokens less likely than `p` times the most likely token.

    Formula: remove `prob < p * max(prob)`; the `min_tokens_to_keep` most likely always stay.
    Same semantics as transformers' `MinPLogitsWarper`, except in rows where its top-k over
    probabilities keeps an already removed token instead of a finite one whose probability
    underflowed to 0: there the `min_tokens_to_keep` highest scores stay.

    Reference: Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent
    LLM Outputs" (arXiv 2407.01082).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "min_p"

    def __call__(self, input_ids, scores):
        probs = scores.softmax(dim=-1)
        drop = probs < self.p * probs.amax(dim=-1, keepdim=True)
        if self.min_tokens_to_keep == 1:  # the most likely token (p_max > 0) is never below p * p_max
            return scores.masked_fill(drop, NEG_INF)
        drop &= ~_top_k_mask(probs, self.min_tokens_to_keep)
        # top-k on probs may pick a -inf token over an underflowed one (p = 0 both): fix such rows
        return scores.masked_fill(_guard(scores, drop, self.min_tokens_to_keep), NEG_INF)


@register
class TopA(Sampler):
    r"""Top-a: remove tokens less likely than `a` times the square of the top probability.

    Formula: keep `prob >= a * max(prob)**2`; the `min_tokens_to_keep` most likely always stay.
    A confident row (large max) cuts hard; a flat row keeps almost everything.

    Reference: BlinkDL's top-a (RWKV-LM); KoboldAI `TopALogitsWarper`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "top_a"

    def __call__(self, input_ids, scores):
        probs = scores.softmax(dim=-1)
        drop = probs < self.a * probs.amax(dim=-1, keepdim=True) ** 2
        drop &= ~_top_k_mask(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, NEG_INF)


@register
class TailFree(Sampler):
    r"""Tail-free sampling: cut the flat tail of the sorted distribution, found by its curvature.

    Formula, per row: sort probabilities descending, `p_0 >= p_1 >= ...` (removed tokens count as
    0); `d_i = |p_i - 2 p_{i+1} + p_{i+2}|` (absolute second difference, i = 0..V-3); `c_i` = the
    cumulative sum of `d` divided by its total; `i*` = the first index with `c_i > z`. We keep the
    `i* + 1` most likely tokens (sorted positions 0..i*), plus every token tied with the last one.

    Implementations disagree on the cut: llama.cpp keeps `i*` tokens, KoboldAI's and
    text-generation-webui's torch versions keep `i* + 1`, Bricken's write-up (d_i is centred on
    token i+1) suggests `i* + 2`. We follow KoboldAI / text-generation-webui, the versions most
    story-writing presets were tuned on. Example: p = [.4,.2,.12,.08,.06,.05,.04,.03,.02], z = 0.9:
    d = [.12,.04,.02,.01,0,0,0], c = [.63,.84,.95,1,...], i* = 2, so 3 tokens survive. A row whose
    d is all 0 (uniform or linear; in practice: sum(d) <= 1e-6, float32 noise) has no tail and
    keeps everything; z = 1 is off.

    Reference: Trenton Bricken 2019, "Tail Free Sampling" (trentbrick.github.io);
    KoboldAI `TailFreeLogitsWarper`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "tfs"

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        if self.z == 1.0 or vocab < 3:
            return scores.clone()
        fast = _rows_or_none(scores, self._row)
        return fast if fast is not None else self._full(scores)

    def _row(self, r, row, ix):
        """One row with n finite scores: sort only those; the cut is by value, so ties are safe."""
        vocab, n = row.shape[-1], ix.numel()
        vals = row[ix]
        sv = _sorted_values(vals, descending=True)
        padded = row.new_full((1, vocab), NEG_INF)  # the full sorted row: -inf last
        padded[0, :n] = sv
        probs = padded.to(_wide(row.dtype)).softmax(dim=-1)[0, : n + 2]  # p_n = p_{n+1} = 0
        d = probs.diff().diff().abs()  # the full row's d is 0 past these n entries
        d_full = torch.zeros((1, vocab - 2), dtype=d.dtype, device=d.device)
        d_full[0, :n] = d
        total = d_full.sum(dim=-1)[0]
        c = d.cumsum(dim=-1) / total.clamp(min=1e-300)
        n_keep = int((c <= self.z).sum())
        if c[-1] <= self.z:  # the full row's c stays at c[-1] for its zero d entries
            n_keep += vocab - 2 - n
        n_keep = n_keep + 1 if total > 1e-6 else vocab
        n_keep = min(max(n_keep, self.min_tokens_to_keep), vocab)
        if n_keep > n:  # the cut is a removed token: nothing more goes
            return row.clone()
        return _remove(row, ix[vals < sv[n_keep - 1]])

    def _full(self, scores):
        vocab = scores.shape[-1]
        sorted_scores = _sorted_values(scores, descending=True)
        probs = sorted_scores.to(_wide(scores.dtype)).softmax(dim=-1)  # float32, as KoboldAI and the web UI
        d = probs.diff(dim=-1).diff(dim=-1).abs()
        total = d.sum(dim=-1, keepdim=True)
        c = d.cumsum(dim=-1) / total.clamp(min=1e-300)
        n_keep = (c <= self.z).sum(dim=-1, keepdim=True) + 1  # i* + 1
        n_keep = torch.where(total > 1e-6, n_keep, torch.full_like(n_keep, vocab))  # else float noise
        n_keep = n_keep.clamp(min=self.min_tokens_to_keep, max=vocab)
        cut = sorted_scores.gather(-1, n_keep - 1)
        return scores.masked_fill(scores < cut, NEG_INF)


@register
class Epsilon(Sampler):
    r"""Epsilon sampling: remove tokens whose probability is below a fixed `epsilon`.

    Formula: remove `prob < epsilon`, except tokens scoring at least the `min_tokens_to_keep`-th
    highest score. epsilon = 0 is off. Same semantics as transformers' `EpsilonLogitsWarper`.

    Reference: Hewitt, Manning & Liang 2022, "Truncation Sampling as Language Model Desmoothing".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "epsilon"

    def __call__(self, input_ids, scores):
        if self.epsilon == 0.0:
            return scores.clone()
        drop = scores.softmax(dim=-1) < self.epsilon
        drop &= scores < _kth_largest(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, NEG_INF)


@register
class Eta(Sampler):
    r"""Eta sampling: an epsilon cutoff that shrinks when the row is uncertain.

    Formula: with `H` the entropy (nats) of softmax(scores), remove
    `prob < min(eta, sqrt(eta) * exp(-H))`, except tokens scoring at least the
    `min_tokens_to_keep`-th highest score. eta = 0 is off. Same semantics as transformers'
    `EtaLogitsWarper` (whose `epsilon` argument is this `eta`).

    Reference: Hewitt, Manning & Liang 2022, "Truncation Sampling as Language Model Desmoothing".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "eta"

    def __call__(self, input_ids, scores):
        if self.eta == 0.0:
            return scores.clone()
        h = row_entropy(scores)
        eta = torch.tensor(self.eta, dtype=scores.dtype, device=scores.device)
        cutoff = torch.minimum(eta, torch.sqrt(eta) * torch.exp(-h))
        drop = scores.softmax(dim=-1) < cutoff
        drop &= scores < _kth_largest(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, NEG_INF)


@register
class TopNSigma(Sampler):
    r"""Top-nσ: keep the logits within `n` standard deviations of the maximum logit.

    Formula: with `σ` the population standard deviation (divide by the count) of the row's finite
    logits, keep `scores >= max(scores) - n * σ`. n = 0 is off (per the preset format; the limit
    n -> 0 would be greedy). Works on logits, so it ignores temperature.

    Reference: Tang et al. 2024, "Top-nσ: Not All Logits Are You Need" (arXiv 2411.07641);
    llama.cpp `top_n_sigma` (population σ over the finite candidates).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that are never removed.
    """

    name = "top_n_sigma"

    def __call__(self, input_ids, scores):
        if self.n == 0.0:
            return scores.clone()
        finite = torch.isfinite(scores)
        x = torch.where(finite, scores, torch.zeros_like(scores)).double()
        count = finite.sum(dim=-1, keepdim=True).clamp(min=1)
        mean = x.sum(dim=-1, keepdim=True) / count
        var = (torch.where(finite, x - mean, torch.zeros_like(x)) ** 2).sum(dim=-1, keepdim=True) / count
        cut = scores.amax(dim=-1, keepdim=True).double() - self.n * var.sqrt()
        drop = scores.double() < cut
        drop &= ~_top_k_mask(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, NEG_INF)


@register
class XTC(Sampler):
    r"""Exclude Top Choices: sometimes remove the most likely tokens to break clichés.

    Formula, per row: draw `r = torch.rand(batch, generator=generator)`; if `r < probability`,
    the candidates are the tokens with `prob >= threshold`; when at least two qualify, remove all
    of them except the least likely (every candidate tied with it stays too). The row is left
    alone when that would leave fewer than `min_tokens_to_keep` tokens, and, with
    `protect_newline_eos` (the default), when it would remove the newline token or the EOS token:
    without that, paragraphs and stories run on. probability = 0 is off and draws nothing. One
    random number per row is drawn on every call (when probability > 0), so a seeded
    `generator` makes runs reproducible.

    The apps differ on the protection: text-generation-webui (`XTCLogitsWarper`) leaves the scores
    alone when newline (`tokenizer.encode("\\n")[-1]`) or EOS (`tokenizer.eos_token_id`) would be
    removed; KoboldCpp (`sample_xtc`) and llama.cpp (`llama_sampler_xtc`) have no such rule
    (`protect_newline_eos: false` gives theirs). The web UI checks the whole batch at once; here
    each row decides for itself.

    Reference: p-e-w, text-generation-webui PR #6335 "XTC: Exclude Top Choices".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): rows keeping fewer are left alone.
        generator (`torch.Generator`, optional): source of the random draws; global RNG if None.
        tokenizer: gives the newline and EOS ids (`encode(text, add_special_tokens=False)`,
            `eos_token_id`); needed when probability > 0 and protect_newline_eos is on.
    """

    name = "xtc"
    needs_tokenizer = True

    def __init__(self, *args, generator: torch.Generator | None = None, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = generator
        self.protected_ids: tuple[int, ...] = ()
        if self.probability > 0 and self.protect_newline_eos:
            if tokenizer is None:
                raise ValueError("`tokenizer` is required to find the newline and EOS tokens that XTC "
                                 "protects (or set protect_newline_eos to false)")
            ids = [tokenizer.encode("\n", add_special_tokens=False)[-1]]
            if getattr(tokenizer, "eos_token_id", None) is not None:
                ids.append(int(tokenizer.eos_token_id))
            self.protected_ids = tuple(dict.fromkeys(ids))

    @classmethod
    def from_params(cls, params, tokenizer=None, generator=None):
        return cls(**params, tokenizer=tokenizer, generator=generator)

    def __call__(self, input_ids, scores):
        if self.probability == 0.0:
            return scores.clone()
        r = torch.rand(scores.shape[0], generator=self.generator, device=self.generator.device
                       if self.generator is not None else scores.device).to(scores.device)
        return scores.masked_fill(self.removal(scores, r), NEG_INF)

    def removal(self, scores: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The tokens XTC removes given the per-row draws `r` (batch,), as a boolean mask."""
        probs = scores.softmax(dim=-1)
        finite = torch.isfinite(scores)
        cand = finite & (probs >= self.threshold)
        least = torch.where(cand, probs, torch.full_like(probs, 2.0)).amin(dim=-1, keepdim=True)
        drop = cand & (probs > least)
        left = (finite & ~drop).sum(dim=-1, keepdim=True)
        apply = (r[:, None] < self.probability) & (cand.sum(dim=-1, keepdim=True) >= 2) \
            & (left >= torch.clamp(finite.sum(dim=-1, keepdim=True), max=self.min_tokens_to_keep))
        ids = [t for t in self.protected_ids if t < scores.shape[-1]]
        if ids:
            apply &= ~drop[:, ids].any(dim=-1, keepdim=True)
        return drop & apply


# ---- penalties -------------------------------------------------------------------------------


@register
class RepetitionPenalty(Sampler):
    r"""Repetition penalty with range, slope, presence and frequency (KoboldAI / KoboldCpp / NovelAI).

    Over the window `w` = the last `range` tokens of input_ids (0 = all), of length R:

    - multiplicative: a token present in `w` gets `score * pen` if score < 0, else `score / pen`
      (transformers' rule). `pen` is the penalty of the token's most recent position in `w`.
      Without a slope every position gets `penalty`. The two apps that fade the penalty towards
      older tokens read `slope` differently, so `slope_mode` says which rule applies:

      - `"curve"` (KoboldAI United, NovelAI; 0 = flat): a curve over the `range` positions
        (oldest first, j = 0 .. range-1) `x = 2j / (range - 1) - 1`,
        `f = s * x / (1 + |x| * (s - 1))`, `pen_j = 1 + ((f + 1) / 2) * (penalty - 1)`. A window
        shorter than `range` takes the newest R values of that curve (it is not stretched over
        the window), and the curve needs `range > 0` (KoboldAI applies the slope only then);
        range 1 gives its single position the full penalty (KoboldAI would divide by zero).
      - `"halves"` (KoboldCpp, Kobold Lite; 1 = flat): a token whose most recent occurrence is in
        the newer half of the window (positions R // 2 .. R-1) gets `penalty`, one seen only in
        the older half gets `1 + (penalty - 1) * slope` (`penalty` itself when penalty <= 1).
        slope must be in (0, 1].
    - additive (after it): `presence` is subtracted once from every token present in `w`,
      `frequency * count` where count is its number of occurrences in `w`.

    Tokens in `whitelist` are exempt from all three. penalty 1, presence 0 and frequency 0 is off.
    Without a slope and with range 0 this equals transformers' `RepetitionPenaltyLogitsProcessor`.

    Reference: Keskar et al. 2019, "CTRL" (the penalty); KoboldAI United `modeling/warpers.py`
    `RepetitionPenalty` (the curve); KoboldCpp `gpttype_adapter.cpp` `sample_rep_pen` (the halves);
    OpenAI's presence and frequency penalties.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "repetition_penalty"

    @property
    def flat(self) -> bool:
        """Every window position gets the same penalty."""
        if self.slope_mode == "halves":
            return self.slope == 1.0 or self.penalty <= 1.0
        return self.slope == 0.0

    def position_penalties(self, window: int, device=None) -> torch.Tensor:
        """The multiplicative penalty of every window position, oldest first, shape (window,), float64."""
        if self.flat:
            return torch.full((window,), self.penalty, dtype=torch.float64, device=device)
        if self.slope_mode == "halves":
            reduced = 1.0 + (self.penalty - 1.0) * self.slope
            pens = torch.full((window,), self.penalty, dtype=torch.float64, device=device)
            pens[: window // 2] = reduced  # the older half (KoboldCpp's tokens_far)
            return pens
        n = self.range  # the curve spans the whole range; the window is its newest end
        if n == 1:
            x = torch.ones(1, dtype=torch.float64, device=device)
        else:
            x = torch.arange(n - window, n, dtype=torch.float64, device=device) * 2 / (n - 1) - 1
        f = self.slope * x / ((1 - x.abs()) + x.abs() * self.slope)  # = s x / (1 + |x| (s - 1))
        w = (f + 1) / 2  # 1 + w (penalty - 1), written so that it stays > 0 for a tiny penalty
        return (1 - w) + w * self.penalty

    def __call__(self, input_ids, scores):
        ids = input_ids[:, -self.range:] if self.range > 0 else input_ids
        batch, vocab = scores.shape
        window = ids.shape[1]
        if window == 0 or (self.penalty == 1.0 and self.presence == 0.0 and self.frequency == 0.0):
            return scores.clone()
        if ids.numel() and int(ids.min()) >= 0 and window < vocab:
            return self._sparse(ids, scores)
        return self._full(ids, scores)

    def _sparse(self, ids, scores):
        """The same values computed for the distinct tokens of the window only (at most `range`
        of them, not the whole vocabulary); every step is elementwise, so the results are equal."""
        vocab, window = scores.shape[-1], ids.shape[1]
        dev = scores.device
        ids = ids.to(dev)
        pens = self.position_penalties(window, dev)
        white = torch.tensor(self.whitelist, dtype=torch.long, device=dev)
        pos = torch.arange(window, device=dev)
        out = scores.clone()
        for r in range(scores.shape[0]):
            uniq, inv = torch.unique(ids[r], return_inverse=True)
            last = torch.full(uniq.shape, -1, dtype=torch.long, device=dev).scatter_reduce(
                0, inv, pos, reduce="amax")
            count = torch.zeros(uniq.shape, dtype=scores.dtype, device=dev).scatter_add(
                0, inv, torch.ones(window, dtype=scores.dtype, device=dev))
            sel = uniq < vocab
            if len(white):
                sel &= ~torch.isin(uniq, white)
            tok, last, count = uniq[sel], last[sel], count[sel]
            x = scores[r, tok]
            xd, pen = x.double(), pens[last]  # float64: 1e-300 > 0
            o = torch.where(xd < 0, xd * pen, xd / pen).to(scores.dtype)
            if self.presence or self.frequency:
                o = o - (self.presence + self.frequency * count)
            out[r, tok] = _keep_finite(o, x)
        return out

    def _full(self, ids, scores):
        batch, vocab = scores.shape
        window = ids.shape[1]
        ids = ids.to(scores.device).clamp(max=vocab)  # ids beyond the output vocab go to a spare column
        pos = torch.arange(window, device=ids.device).expand(batch, window)
        last = torch.full((batch, vocab + 1), -1, dtype=torch.long, device=ids.device)
        last = last.scatter_reduce(1, ids, pos, reduce="amax")[:, :vocab]  # most recent position
        count = torch.zeros((batch, vocab + 1), dtype=scores.dtype, device=ids.device)
        count = count.scatter_add(1, ids, torch.ones_like(ids, dtype=scores.dtype))[:, :vocab]
        present = last >= 0
        if self.whitelist:
            white = torch.tensor([t for t in self.whitelist if t < vocab], dtype=torch.long,
                                 device=scores.device)
            present[:, white] = False
        pen = self.position_penalties(window, scores.device)[last.clamp(min=0)]  # float64: 1e-300 > 0
        x = scores.double()
        penalised = torch.where(x < 0, x * pen, x / pen)
        out = torch.where(present, penalised.to(scores.dtype), scores)
        if self.presence or self.frequency:
            out = out - present * (self.presence + self.frequency * count)
        return _keep_finite(out, scores)


@register
class NoRepeatNGram(Sampler):
    r"""No-repeat n-gram: ban every token that would complete an n-gram already in input_ids.

    Formula: with the last `size - 1` tokens as prefix, every earlier occurrence of that prefix
    bans the token that followed it (size 1 bans every token seen). size = 0 is off. Same
    semantics as transformers' `NoRepeatNGramLogitsProcessor`, except that a row never loses all
    its tokens: if fewer than `min_tokens_to_keep` would survive, the best banned ones stay.

    Reference: Paulus, Xiong & Socher 2018, "A Deep Reinforced Model for Abstractive
    Summarization"; fairseq's `no_repeat_ngram_size`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that always survive.
    """

    name = "no_repeat_ngram"

    def __call__(self, input_ids, scores):
        n, length = self.size, input_ids.shape[1]
        if n == 0 or length < n:
            return scores.clone()
        vocab = scores.shape[-1]
        input_ids = input_ids.to(scores.device)
        grams = input_ids.unfold(1, n, 1)  # (batch, length - n + 1, n)
        prefix = input_ids[:, length - n + 1:]  # the n - 1 most recent tokens
        hit = (grams[..., :-1] == prefix[:, None, :]).all(dim=-1)
        target = torch.where(hit, grams[..., -1].clamp(max=vocab), vocab)  # misses -> spare column
        banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        banned = banned.scatter(1, target, True)[:, :vocab]
        return scores.masked_fill(_guard(scores, banned, self.min_tokens_to_keep), NEG_INF)


@register
class DRY(Sampler):
    r"""DRY ("Don't Repeat Yourself"): penalise the tokens that would extend a repeated sequence.

    Formula, per row over the last `range` tokens (0 = all): for every earlier occurrence of the
    last token, the token that followed it is a candidate; its match length is the number of
    tokens, counted backwards from there, that equal the current suffix (stopping at a sequence
    breaker, at the start of the window, and at `allowed_length + 50` tokens to bound the cost).
    Each candidate with longest match length `m >= allowed_length` gets
    `scores -= multiplier * base ** (m - allowed_length)`. Nothing happens when the last token is
    a breaker, and a candidate that is itself a breaker is not penalised.

    Sequence breakers are strings; each becomes the last token id of `tokenizer.encode("a" + s)`
    (the 'a' prefix gives the id the string has in running text, as text-generation-webui does).

    Reference: p-e-w, text-generation-webui PR #5677 "DRY: A modern repetition penalty".

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
        tokenizer: turns the breakers into token ids; needed when multiplier > 0.
    """

    name = "dry"
    needs_tokenizer = True

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker_ids: frozenset[int] = frozenset()
        if self.multiplier > 0 and self.sequence_breakers:
            if tokenizer is None:
                raise ValueError("`tokenizer` is required to turn `sequence_breakers` into token ids")
            self.breaker_ids = frozenset(
                tokenizer.encode("a" + s, add_special_tokens=False)[-1] for s in self.sequence_breakers)

    def match_lengths(self, ids: list[int]) -> dict[int, int]:
        """Candidate next token -> longest repeated suffix it would extend."""
        if not ids or ids[-1] in self.breaker_ids:
            return {}
        last, breakers, cap = ids[-1], self.breaker_ids, self.allowed_length + 50
        found: dict[int, int] = {}
        for i in range(len(ids) - 1):
            if ids[i] != last or ids[i + 1] in breakers:
                continue
            m = 1
            while m < cap and i - m >= 0:
                prev = ids[-(m + 1)]
                if ids[i - m] != prev or prev in breakers:
                    break
                m += 1
            nxt = ids[i + 1]
            found[nxt] = max(m, found.get(nxt, 0))
        return found

    def __call__(self, input_ids, scores):
        if self.multiplier == 0.0:
            return scores.clone()
        ids = input_ids[:, -self.range:] if self.range > 0 else input_ids
        out = scores.clone()
        for row, seq in enumerate(ids.tolist()):
            for token, m in self.match_lengths(seq).items():
                if m >= self.allowed_length and token < scores.shape[-1]:
                    out[row, token] -= self.penalty(m)
        return _keep_finite(out, scores)

    def penalty(self, match_length: int) -> float:
        """multiplier * base ** (match_length - allowed_length), capped at 1e30 (no overflow)."""
        try:
            return min(self.multiplier * self.base ** (match_length - self.allowed_length), 1e30)
        except OverflowError:
            return 1e30


# ---- whole-distribution transforms and adaptive samplers -------------------------------------


@register
class Unified(Sampler):
    r"""NovelAI's unified sampler ("math1"): one curve that mixes temperature-like and
    entropy-dependent reshaping of the log-probabilities.

    Formula: `l = log_softmax(scores)`, `H` its entropy (nats);
    `raw = l * (linear + H * conf) - quad * l**2`, returned as logits. Removed (-inf) tokens stay
    -inf whatever the signs. linear 1, quad 0, conf 0 gives back log_softmax(scores), the same
    distribution (it is "off").

    Reference: NovelAI "Unified Sampling" (linear / quad / conf), docs.novelai.net.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "unified"

    def __call__(self, input_ids, scores):
        # float64: l**2 of a float32 never overflows; H from the one entropy, in float64 too
        logp, h = log_probs_and_entropy(scores.double())
        finite = torch.isfinite(logp)
        l = torch.where(finite, logp, torch.zeros_like(logp))  # noqa: E741
        raw = (l * (self.linear + h * self.conf) - self.quad * l**2).to(scores.dtype)
        return _keep_finite(torch.where(finite, raw, torch.full_like(raw, NEG_INF)), scores)


@register
class Mirostat(Sampler):
    r"""Mirostat: steer the observed surprise (-log2 p of the picked token) towards `tau`.

    State: `mu` per batch row, `2 * tau` at first. A LogitsProcessor only sees the token it picked
    on its next call, so each call first updates `mu -= eta * (s - tau)`, with `s` = -log2 of the
    picked token (`input_ids[:, -1]`) under the distribution this sampler returned on the previous
    call (renormalised after its truncation); a token that distribution gave probability 0 leaves
    `mu` unchanged. If `input_ids` does not continue the sequence of the previous call (a new
    `generate` call, other rows), the state is reset. Then it truncates:

    - version 2: remove tokens with `-log2 p > mu` (the most likely token always stays).
    - version 1: estimate the Zipf exponent `s_hat` from the top m = 100 candidates,
      `s_hat = sum(t_i b_i) / sum(t_i^2)` with `t_i = log((i+2)/(i+1))`, `b_i = log(p_i/p_{i+1})`;
      `eps = s_hat - 1`; keep the top `k = floor((eps * 2^mu / (1 - N^-eps)) ** (1 / s_hat))`
      tokens, N = the vocabulary size (the limit `2^mu / ln N` at eps = 0), k clamped to
      [max(1, min_tokens_to_keep), finite candidates] (llama.cpp would keep all for k < 1).

    Create one object per generation; it is not meant to be shared between runs in parallel.

    Reference: Basu et al. 2021, "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
    Perplexity" (ICLR); llama.cpp `llama_sample_mirostat` / `_v2`.

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that always survive.
    """

    name = "mirostat"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mu: torch.Tensor | None = None  # (batch,) float64
        self._prev_ids: torch.Tensor | None = None
        self._prev_logp: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the state (the next call starts at mu = 2 * tau)."""
        self.mu = self._prev_ids = self._prev_logp = None

    def _update(self, input_ids: torch.Tensor) -> None:
        batch = input_ids.shape[0]
        fresh = torch.full((batch,), 2.0 * self.tau, dtype=torch.float64, device=input_ids.device)
        continues = _continues(self._prev_ids, input_ids) if self.mu is not None else None
        if continues is None:
            self.mu = fresh
            return
        picked = input_ids[:, -1:].clamp(max=self._prev_logp.shape[-1] - 1)
        surprise = -self._prev_logp.gather(-1, picked).squeeze(-1) / LN2
        step = torch.where(torch.isfinite(surprise), self.eta * (surprise - self.tau),
                           torch.zeros_like(surprise))
        self.mu = torch.where(continues, self.mu - step, fresh)

    def __call__(self, input_ids, scores):
        input_ids = input_ids.to(scores.device)  # mu and the previous log-probs live there too
        self._update(input_ids)
        logp = torch.log_softmax(scores.to(_wide(scores.dtype)), dim=-1)  # float32, as llama.cpp
        if self.version == 2:
            drop = -logp / LN2 > self.mu[:, None]
            drop &= ~_top_k_mask(scores, self.min_tokens_to_keep)
            out = scores.masked_fill(drop, NEG_INF)
        else:
            out = scores.masked_fill(scores < self._v1_cut(scores, logp), NEG_INF)
        self._prev_ids = input_ids.clone()
        self._prev_logp = torch.log_softmax(out.to(_wide(out.dtype)), dim=-1)
        return out

    def _v1_cut(self, scores: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """The k-th highest score of every row, k from the Zipf estimate (version 1)."""
        vocab = scores.shape[-1]
        m = min(100, vocab)
        top = torch.topk(logp, m, dim=-1).values  # (batch, m), descending log-probs
        n_finite = torch.isfinite(scores).sum(dim=-1)
        i = torch.arange(m - 1, dtype=torch.float64, device=scores.device)
        t = torch.log((i + 2) / (i + 1))
        b = top[:, :-1] - top[:, 1:]
        valid = (i[None, :] + 1) < n_finite[:, None]  # both p_i and p_{i+1} are candidates
        b = torch.where(valid, b, torch.zeros_like(b))
        t_sq = (t**2 * valid).sum(dim=-1)
        s_hat = (t * b).sum(dim=-1) / t_sq.clamp(min=1e-300)
        eps = s_hat - 1
        log_n = math.log(vocab)
        ratio = torch.where(eps.abs() > 1e-9, -torch.expm1(-eps * log_n) / eps.where(eps != 0, 1.0),
                            torch.full_like(eps, log_n))
        log_k = (self.mu * LN2 - torch.log(ratio)) / s_hat  # s_hat = 0 -> +inf -> keep all
        k = torch.floor(torch.exp(torch.clamp(log_k, max=60.0)))
        k = torch.where(s_hat > 0, k, n_finite.double())  # flat top: no Zipf tail, keep all
        k = torch.where(t_sq > 0, k, torch.ones_like(k))  # fewer than 2 candidates
        k = torch.maximum(k, torch.full_like(k, self.min_tokens_to_keep))
        k = torch.minimum(k, n_finite.clamp(min=1).double()).long()
        sorted_scores = _sorted_values(scores, descending=True)
        return sorted_scores.gather(-1, (k - 1)[:, None])


@register
class AdaptiveP(Sampler):
    r"""Adaptive-P: favour the tokens whose probability is near a target, and steer the average
    probability of the picked tokens towards that target over time.

    Formula, per row, with `p` = softmax(scores) (the *original* probabilities):
    `t' = clamp(2 * target - S / W, 0, 1)`, then every finite score becomes
    `5 - 10 * d**2 / (1 + d)` with `d = |p - t'| / 0.3` (quadratic near `t'`, linear far from it;
    removed tokens stay removed). The history starts "at equilibrium", `S = target / (1 - decay)`,
    `W = 1 / (1 - decay)` (so the first `t'` is the target), and each picked token with original
    probability `p_picked` updates it: `S = p_picked + decay * S`, `W = 1 + decay * W`. Picking a
    token above the target lowers the next `t'`, and the reverse.

    A negative target turns it off (scores unchanged, no history kept), as in llama.cpp; a target
    of 0 is on (it favours the least likely tokens). As with mirostat, the token picked after this
    sampler is only seen on the next call, as the last of `input_ids`; a call that does not continue
    the previous one (a new generation, other rows) starts the history afresh. llama.cpp draws the
    token inside the sampler and wants it last in the chain; here `pick_token` draws it from the
    returned scores, so samplers placed after it reshape the transformed distribution.

    Create one object per generation; it is not meant to be shared between runs in parallel.

    Reference: llama.cpp `llama_sampler_init_adaptive_p` (src/llama-sampler.cpp, PR #17927);
    text-generation-webui `AdaptivePLogitsWarper` (`adaptive_target` / `adaptive_decay`).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "adaptive_p"
    WIDTH, PEAK, SHARPNESS = 0.3, 5.0, 10.0  # llama.cpp's constants of the transform

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next call starts at equilibrium)."""
        self.weighted_sum: torch.Tensor | None = None  # (batch,) float64: S
        self.total_weight: torch.Tensor | None = None  # (batch,) float64: W
        self._prev_ids: torch.Tensor | None = None
        self._prev_probs: torch.Tensor | None = None  # the previous call's original probabilities

    def _update(self, input_ids: torch.Tensor) -> None:
        batch, dev = input_ids.shape[0], input_ids.device
        start_s = torch.full((batch,), self.target / (1.0 - self.decay), dtype=torch.float64, device=dev)
        start_w = torch.full((batch,), 1.0 / (1.0 - self.decay), dtype=torch.float64, device=dev)
        continues = _continues(self._prev_ids, input_ids) if self.weighted_sum is not None else None
        if continues is None:
            self.weighted_sum, self.total_weight = start_s, start_w
            return
        picked = input_ids[:, -1:].clamp(min=0, max=self._prev_probs.shape[-1] - 1)
        p = self._prev_probs.gather(-1, picked).squeeze(-1)
        self.weighted_sum = torch.where(continues, p + self.decay * self.weighted_sum, start_s)
        self.total_weight = torch.where(continues, 1.0 + self.decay * self.total_weight, start_w)

    def __call__(self, input_ids, scores):
        if self.target < 0:
            return scores.clone()
        input_ids = input_ids.to(scores.device)  # the history lives there too
        self._update(input_ids)
        probs = torch.softmax(scores.double(), dim=-1)
        adapted = (2.0 * self.target - self.weighted_sum / self.total_weight).clamp(0.0, 1.0)
        d = (probs - adapted[:, None]).abs() / self.WIDTH
        out = (self.PEAK - self.SHARPNESS * d * d / (1.0 + d)).to(scores.dtype)
        self._prev_ids = input_ids.clone()
        self._prev_probs = probs
        return torch.where(torch.isfinite(scores), out, scores)


@register
class Quadratic(Sampler):
    r"""Quadratic sampling ("smoothing factor"): every logit is bent around the best one of its row.

    Formula, per row, with `h` the highest finite score and `d = scores - h` (<= 0):
    `h - k * factor * d**2 + s * factor * d**3`, `k = (3 - curve) / 2`, `s = (curve - 1) / 2`.
    curve 1 is the plain quadratic `h - factor * d**2` (KoboldCpp's rule, which has no curve).
    The best token keeps its score; a small factor flattens the top of the distribution, a large
    one sharpens it. Removed (-inf) tokens stay removed; computed in float64, results clamped to
    the finite range of the scores' dtype. factor 0 is off.

    Reference: kalomaze's quadratic sampling, text-generation-webui `QuadraticSamplingLogitsWarper`
    (`smoothing_factor`, `smoothing_curve`); KoboldCpp `sample_temperature` (`smoothing_factor`).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): unused (nothing is removed).
    """

    name = "quadratic"

    def __call__(self, input_ids, scores):
        if self.factor == 0.0:
            return scores.clone()
        x = scores.double()
        finite = torch.isfinite(x)
        h = torch.where(finite, x, torch.full_like(x, NEG_INF)).amax(dim=-1, keepdim=True)
        d = torch.where(finite, x - h, torch.zeros_like(x))
        k, s = (3.0 - self.curve) / 2.0, (self.curve - 1.0) / 2.0
        out = (h - k * self.factor * d * d + s * self.factor * d * d * d).to(scores.dtype)
        return _keep_finite(torch.where(finite, out, scores), scores)

"""Shared tensor helpers of the samplers: entropy, top-k masks, sorting, the minimum-tokens guard."""

from __future__ import annotations

import numpy as np
import torch

from .base import NEG_INF, on_numpy


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
    """The k-th highest score of every row, (batch, 1). A value, so any selection gives it: numpy's
    partition on the CPU (NaN counts as the highest in both, as in torch.topk)."""
    vocab = scores.shape[-1]
    k = min(k, vocab)
    if on_numpy(scores):
        at = vocab - k
        return torch.from_numpy(np.partition(scores.detach().numpy(), at, axis=-1)[..., at:at + 1])
    return torch.topk(scores, k, dim=-1).values[..., -1:]


def _below(scores: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """`scores.masked_fill(scores < cut, -inf)`: every entry below its row's `cut` (batch, 1) removed
    (a NaN score or cut compares false and stays), as a new tensor."""
    if on_numpy(scores) and on_numpy(cut) and not scores.requires_grad:
        v = scores.numpy()
        return torch.from_numpy(np.where(v < cut.numpy(), v.dtype.type(NEG_INF), v))
    return scores.masked_fill(scores < cut, NEG_INF)


def _last_tokens(input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` tokens of every row (n = 0: all of them); an `n` past the history (a client's
    range of 1e30) is all of it, without torch's warning for an out-of-range slice."""
    return input_ids[:, -min(n, input_ids.shape[1]):] if n > 0 else input_ids


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
        if t > torch.finfo(scores.dtype).max:  # t is inf in the scores' dtype: -inf / inf is nan
            return _removed_stay_removed(out, scores)
        return out  # |x / t| <= |x|: nothing can overflow
    if isinstance(t, torch.Tensor) and torch.isinf(t).any():
        out = _removed_stay_removed(out, scores)
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


def _removed_stay_removed(out: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`out` (scores / t for an infinite t: every finite score 0, a uniform choice among the tokens
    left, as llama.cpp and KoboldCpp divide) with the removed tokens' -inf kept, not -inf / inf = nan."""
    return torch.where(torch.isneginf(scores), scores, out)


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
    most = scores.shape[-1] // share
    if on_numpy(scores):  # the same tests and indices, ~0.1 ms instead of ~0.4 ms
        v = scores.detach().numpy()
        if not np.isfinite(v.max(axis=-1)).all():  # max is NaN/+inf/-inf for such rows
            return None
        alive = v > NEG_INF
        if (np.count_nonzero(alive, axis=-1) > most).any():
            return None
        return [torch.from_numpy(np.flatnonzero(row)) for row in alive]
    if not torch.isfinite(scores.amax(dim=-1)).all():  # amax is NaN/+inf/-inf for such rows
        return None
    alive = scores > NEG_INF
    if (alive.sum(dim=-1) > most).any():
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

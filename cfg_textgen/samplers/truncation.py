"""Truncation samplers: each removes tokens (sets them to -inf) by its own rule and keeps at least
`min_tokens_to_keep`."""

from __future__ import annotations

import torch

from .base import NEG_INF, Sampler, register
from .kernels import (_below, _guard, _kth_largest, _remove, _rows_or_none, _sort, _sorted_values,
                      _top_k_mask, _wide, log_probs_and_entropy, row_entropy)


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
        return _below(scores, kth)


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
            return _below(scores, first_kept)
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
        return _below(scores, cut)


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

"""Logit bias and token bans: fixed pushes and removals, applied first, right after CFG."""

from __future__ import annotations

import math

import torch

from .base import NEG_INF, Sampler, register
from .kernels import _guard


@register
class LogitBias(Sampler):
    r"""Logit bias and token bans: push chosen tokens up or down by a fixed amount, remove others.

    Formula: `scores[t] += bias[t]` for every biased token t, then `scores[t] = -inf` for every
    banned t (as llama.cpp's `llama_sampler_init_logit_bias`, which adds each bias to the logit,
    -INFINITY being a ban; text-generation-webui's `LogitsBiasProcessor` and KoboldCpp add them
    the same way). Ids beyond the scores' vocabulary are ignored (a preset may come from a model
    with a larger one). Already removed tokens stay removed, and if the bans would leave fewer
    than `min_tokens_to_keep` tokens the best banned ones survive. Put it first, right after CFG,
    where the importers put it: the bias then moves the guided scores before any truncation.

    Reference: OpenAI API `logit_bias`; llama.cpp `src/llama-sampling.cpp` (logit-bias sampler).

    Args:
        min_tokens_to_keep (`int`, >= 1, defaults to 1): tokens that always survive the bans.
    """

    name = "logit_bias"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ids = torch.tensor(list(self.bias), dtype=torch.long)
        self._values = torch.tensor(list(self.bias.values()), dtype=torch.float64)
        self._ban = torch.tensor(sorted(set(self.ban)), dtype=torch.long)
        self._columns = {}  # (vocab, device, dtype) -> the ids, values and bans that apply there

    def _for(self, vocab: int, dev, dtype):
        key = (vocab, dev, dtype)
        if key not in self._columns:
            inside = self._ids < vocab  # ids beyond this vocabulary are ignored
            self._columns[key] = (self._ids[inside].to(dev), self._values[inside].to(device=dev, dtype=dtype),
                                  self._ban[self._ban < vocab].to(dev))
        return self._columns[key]

    def __call__(self, input_ids, scores):
        # only the biased and banned columns change: the work is theirs (a few ids), not the
        # vocabulary's, except one min/max of the scores when there are bans. It runs on every
        # token of every request that sends a bias, beside a decode step.
        vocab, dev = scores.shape[-1], scores.device
        ids, values, ban = self._for(vocab, dev, scores.dtype)
        out = scores.clone()
        if len(ids):
            before = scores[:, ids]
            after = before + values  # -inf + bias stays -inf
            # a bias reshapes, it never removes: a finite score stays a finite float
            info = torch.finfo(scores.dtype)
            out[:, ids] = torch.where(torch.isfinite(before), after.clamp(min=info.min, max=info.max), after)
        if len(ban):
            lo, hi = (float(v) for v in torch.aminmax(out))  # NaN and +-inf carry into them
            if math.isfinite(lo) and math.isfinite(hi):  # all in play (a pass, not isfinite's two)
                in_play = torch.full((out.shape[0],), vocab, device=dev)
            else:
                in_play = torch.isfinite(out).sum(dim=-1)
            left = in_play - torch.isfinite(out[:, ban]).sum(dim=-1)
            if bool((left >= in_play.clamp(max=self.min_tokens_to_keep)).all()):
                out[:, ban] = NEG_INF  # the bans leave enough: remove them
            else:  # they would leave too few: the best banned tokens survive (_guard)
                remove = torch.zeros_like(out, dtype=torch.bool)
                remove[:, ban] = True
                out = out.masked_fill(_guard(out, remove, self.min_tokens_to_keep), NEG_INF)
        return out

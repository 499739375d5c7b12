"""Logit bias and token bans: fixed pushes and removals, applied first, right after CFG."""

from __future__ import annotations

import torch

from .base import NEG_INF, Sampler, register
from .kernels import _guard, _keep_finite


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

    def __call__(self, input_ids, scores):
        vocab, dev = scores.shape[-1], scores.device
        out = scores.clone()
        inside = self._ids < vocab
        if inside.any():
            ids = self._ids[inside].to(dev)
            values = self._values[inside].to(device=dev, dtype=scores.dtype)
            out[:, ids] = scores[:, ids] + values  # -inf + bias stays -inf
            out = _keep_finite(out, scores)
        ban = self._ban[self._ban < vocab].to(dev)
        if len(ban):
            remove = torch.zeros_like(out, dtype=torch.bool)
            remove[:, ban] = True
            out = out.masked_fill(_guard(out, remove, self.min_tokens_to_keep), NEG_INF)
        return out

"""Temperature samplers: a fixed divisor, and a divisor that follows the entropy."""

from __future__ import annotations

import torch

from .base import Sampler, register
from .kernels import _divide, _wide, row_entropy


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

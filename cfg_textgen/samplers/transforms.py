"""Whole-distribution transforms: NovelAI's unified sampler and quadratic sampling (smoothing)."""

from __future__ import annotations

import torch

from .base import NEG_INF, Sampler, register
from .kernels import _keep_finite, log_probs_and_entropy


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

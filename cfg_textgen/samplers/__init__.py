"""The samplers story writers tune: one small class per sampler, and the registry name -> class.

Every sampler is a logits processor (transformers' interface, processors.py): `__call__(input_ids,
scores) -> new scores`, shapes (batch, seq) and (batch, vocab). Removed tokens are set to -inf, the
input is never mutated, and at least `min_tokens_to_keep` tokens survive. Each class takes its preset
parameters from the settings model of its name (settings.py), which presets.py also builds the
preset model and its JSON Schema from.

Rows may already hold -inf entries (an earlier sampler removed them); every sampler treats those
as probability 0 and never turns them back into finite values. `pick_token` makes the final choice
exactly as `model.generate` does.

One file per kind: base.py (the `Sampler` base class, the registry, the chain, the pick),
kernels.py (shared tensor helpers), temperature.py, truncation.py, penalties.py, transforms.py
(unified, quadratic), adaptive.py (mirostat, adaptive_p), bias.py (logit bias and bans). Importing this package registers them all.
"""

from ..settings import Param  # noqa: F401  (the samplers' parameter views)
from .base import (  # noqa: F401
    NEG_INF, Sampler, SamplerChain, SAMPLERS, pick_token, register)
from .kernels import (  # noqa: F401
    _finite_rows, _sort, log_probs_and_entropy, row_entropy)
from .temperature import (  # noqa: F401
    DynamicTemperature, Temperature)
from .truncation import (  # noqa: F401
    Epsilon, Eta, MinP, TailFree, TopA, TopK, TopNSigma, TopP, Typical, XTC)
from .penalties import (  # noqa: F401
    DRY, NoRepeatNGram, RepetitionPenalty)
from .transforms import (  # noqa: F401
    Quadratic, Unified)
from .adaptive import (  # noqa: F401
    AdaptiveP, Mirostat)
from .bias import LogitBias  # noqa: F401

"""The samplers story writers tune: one small class per sampler, and the registry name -> class.

Every sampler is a `transformers.LogitsProcessor`: `__call__(input_ids, scores) -> new scores`,
shapes (batch, seq) and (batch, vocab). Removed tokens are set to -inf, the input is never
mutated, and at least `min_tokens_to_keep` tokens survive. Each class declares its preset
parameters as `Param`s; presets.py validates JSON against them and builds the JSON Schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Param:
    """One preset parameter of a sampler: its JSON type, default and allowed range."""

    name: str
    kind: type  # float, int, bool, str or list
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple | None = None
    item_kind: type | None = None  # element type when kind is list


class Sampler(LogitsProcessor):
    """Base class: a named LogitsProcessor whose constructor takes its `params` as keywords."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_tokenizer: ClassVar[bool] = False  # e.g. DRY's sequence breakers are text

    @classmethod
    def from_params(cls, params: dict[str, Any], tokenizer=None) -> "Sampler":
        """Build from validated preset parameters (missing ones take their defaults)."""
        kwargs = {p.name: params.get(p.name, p.default) for p in cls.params}
        if cls.needs_tokenizer:
            kwargs["tokenizer"] = tokenizer
        return cls(**kwargs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


SAMPLERS: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: add a sampler to the registry under its `name`."""
    if cls.name in SAMPLERS:
        raise ValueError(f"sampler name {cls.name!r} registered twice")
    SAMPLERS[cls.name] = cls
    return cls

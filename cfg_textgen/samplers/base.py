"""What every sampler is: the `Sampler` base class (preset parameters checked by its settings model),
the registry name -> class, the chain of a preset, and the final pick."""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from pydantic import BaseModel, Field

from ..processors import LogitsProcessor, ProcessorList
from ..settings import SETTINGS, Int, Param, SamplerSettings, check, fields_of


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


DRAWS = ("multinomial", "inverse-cdf")  # how `pick_token` samples: see there


def on_numpy(x: torch.Tensor) -> bool:
    """Whether `x` is read as a numpy array by the samplers: a float32/float64 CPU tensor. On the CPU
    one torch op on a vocabulary row costs ~0.05-0.25 ms on this project's 2-core machine, mostly
    dispatch and branchy scalar loops; numpy's argmax, selection, comparison and `where` do the same
    work in a third to a half (a sampler chain runs once per token, beside every decode step)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def pick_token(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None,
               draw: str = "multinomial") -> torch.LongTensor:
    """The final choice after the chain: (batch, vocab) scores -> (batch,) token ids.

    Greedy is `argmax`. Sampling draws from softmax(scores), in one of two ways (`draw`):
    - "multinomial": `torch.multinomial(softmax(scores), 1)`, the very call `model.generate`
      makes, so a run seeded with `torch.manual_seed` picks the same tokens. For one sample torch
      draws an exponential variate for every token of the vocabulary (argmax of p / q, q ~ Exp(1)):
      ~2 ms per token on a 49k vocabulary on a CPU, as much again for a 128k one.
    - "inverse-cdf": one uniform variate per row, walked along the cumulative probabilities of the
      tokens the chain left (a finite score; the running sum in float64, a token more than ~87
      below the best counts as 0): what llama.cpp's `dist` sampler and KoboldCpp do. The same
      distribution at a tenth of the cost; the engine uses it on the llama.cpp backend
      (`token_draw`), where no `model.generate` run is there to match.
    Both repeat exactly from the same generator state.
    """
    if not do_sample:
        if on_numpy(scores):
            # numpy's argmax, same answer (the first maximum; a NaN counts as the maximum, as in
            # torch), is ~7x faster than torch's on a CPU: it runs on every greedy token
            return torch.from_numpy(np.argmax(scores.detach().numpy(), axis=-1))
        return torch.argmax(scores, dim=-1)
    if draw == "inverse-cdf":
        picked = [_inverse_cdf(row, generator) for row in scores]
        if all(t is not None for t in picked):
            return torch.tensor(picked, dtype=torch.long, device=scores.device)
        # no finite score left, or one at +inf / NaN: torch.multinomial below says what is wrong
    elif draw != "multinomial":
        raise ValueError(f"`draw` has to be one of {DRAWS}, but is {draw!r}")
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _inverse_cdf(row: torch.Tensor, generator: torch.Generator | None) -> int | None:
    """A token drawn from softmax(row) with one uniform variate: the first candidate whose
    cumulative probability passes u * total. None if no score is finite or one is +inf or NaN.

    On a CPU the selections run in numpy and the exp and the running sum in torch: each is the
    faster of the two there (measured: a mask, nonzero and gather 4x faster in numpy, exp and
    cumsum 2-3x faster in torch)."""
    cpu = row.device.type == "cpu"
    total = float(row.sum())  # NaN if any score is NaN (or +inf beside -inf), +inf if one is +inf
    if math.isnan(total) or total == math.inf:
        return None
    left = None  # every token is a candidate (the sum is finite: no score is -inf)
    candidates = row.float()
    if total == -math.inf:  # some were removed: the candidates are the tokens left
        if cpu:
            values = candidates.detach().numpy()
            left = torch.from_numpy(np.flatnonzero(values > -np.inf))
            candidates = torch.from_numpy(values[left.numpy()])
        else:
            left = torch.nonzero(candidates > NEG_INF).squeeze(1)
            candidates = candidates[left]
        if not len(left):
            return None
    weights = torch.exp(candidates - candidates.max())  # softmax's numerators: the best token's is 1
    cdf = torch.cumsum(weights, dim=0, dtype=torch.float64)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=row.device)
    # right: the first cdf strictly above u * total, so a token of probability 0 is never taken
    j = int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True))
    if j >= len(cdf):  # u * total rounded up to the total: the last token that can be drawn
        j = int(torch.nonzero(weights > 0)[-1])
    return j if left is None else int(left[j])

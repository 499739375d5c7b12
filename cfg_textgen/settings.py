"""The sampler settings: one pydantic model per sampler, its parameters' defaults, ranges and docs
declared once. The sampler classes (samplers/) validate their keywords through it, presets.py
builds the preset model and its JSON Schema from it, the importers read source values with its types.

No torch here: presets, the importers and `cfg-textgen presets ...` check presets without loading
torch and transformers (0.3 s instead of 2.7 s to import).

Types are strict where pydantic's lax mode would guess: `true` is not a number, `"1.5"` is not a
float, NaN and infinities are refused. JSON has no int/float split, so under the `JSON` validation
context an integral float (`40.0`) is accepted for an integer and stored as an `int`, as JSON
Schema's "integer" does; Python callers pass ints.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

JSON = {"json": True}  # validation context for parsed JSON (or YAML) data


def _integral(value, info: ValidationInfo):
    if isinstance(value, float) and value.is_integer() and info.context and info.context.get("json"):
        return int(value)
    return value


def _choice(value, info: ValidationInfo):
    """Literal choices compare with ==, which would let `true` pass as 1 and 2.5 - 0.5 as 2."""
    value = _integral(value, info)
    if isinstance(value, (bool, float)):
        raise ValueError("not one of the choices")
    return value


Float = Annotated[float, Strict(), AllowInfNan(False)]  # an int is a float; a bool, a string, NaN are not
Int = Annotated[int, BeforeValidator(_integral), Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
DRY_BREAKERS = ("\n", ":", '"', "*")  # DRY's default sequence breakers (text-generation-webui's)


# ---- what a field allows, in words -----------------------------------------------------------


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("number", "boolean", ...)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def show(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Param:
    """A read-only view of one settings field: kind, default, range and choices, and its rule in
    words, for error messages (and tests) that need more than pydantic's own text."""

    name: str
    kind: type  # float, int, bool, str or list
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple | None = None
    item_kind: type | None = None  # element type when kind is list (value type for dict); min/max bound every element
    words: str = ""  # the rule in JSON's words where the kind's own are not the ones to say

    @classmethod
    def of(cls, name: str, field) -> "Param":
        kind, metadata, item = field.annotation, list(field.metadata), None
        if typing.get_origin(kind) is dict:  # dict[token id, float]: an object of numbers
            kind, item = dict, float
        elif typing.get_origin(kind) is tuple:  # tuple[Annotated[int, Ge(0), ...], ...]
            item = typing.get_args(kind)[0]
            if typing.get_origin(item) is Annotated:
                item, *more = typing.get_args(item)
                metadata += more
            kind = list
        bounds = {}
        for m in metadata:
            for attr, key, excl in (("gt", "min", True), ("ge", "min", False), ("lt", "max", True),
                                    ("le", "max", False)):
                if isinstance(m, (Gt, Ge, Lt, Le)) and hasattr(m, attr):
                    bounds[key], bounds[f"{key}_exclusive"] = getattr(m, attr), excl
        choices = None
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kind = type(choices[0])
        return cls(name, kind, field.default, field.description or "", choices=choices, item_kind=item,
                   **bounds)

    def item(self) -> "Param":
        """The view of one element of a list parameter."""
        return replace(self, kind=self.item_kind, item_kind=None)

    def rule(self, json: bool = False) -> str:
        """The allowed values in words: 'a float in (0, 1]', 'an integer >= 0' (Python), or in
        JSON's words with `json` ('a number in (0, 1]', 'true or false', 'an array')."""
        if json and self.words:
            return self.words
        if self.kind is dict:
            return ('an object of token ids ("123") to numbers' if json
                    else "a dict of token ids to finite floats")
        if self.kind is list:
            if json:
                return "an array"
            item = {int: "integers", str: "strings", float: "floats"}.get(self.item_kind, "values")
            return f"a list of {item}{self._range_words()}"
        if self.choices is not None:
            return "one of " + ", ".join(map(show if json else repr, self.choices))
        if self.kind is bool:
            return "true or false" if json else "a boolean"
        if self.kind is str:
            return "a string"
        if self.kind is float and not json and self.min is None and self.max is None:
            return "a finite float"
        noun = {float: "a number" if json else "a float", int: "an integer"}[self.kind]
        return f"{noun}{self._range_words()}"

    def _range_words(self) -> str:
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            left, right = "(" if self.min_exclusive else "[", ")" if self.max_exclusive else "]"
            return f" in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f" {'>' if self.min_exclusive else '>='} {_num(lo)}"
        if hi is not None:
            return f" {'<' if self.max_exclusive else '<='} {_num(hi)}"
        return ""

    def problem(self, error: dict) -> str:
        """'must be RULE, got VALUE' (JSON words) for one pydantic error about this field."""
        value, rule = error["input"], self.rule(json=True)
        if self.choices is not None:
            return f"must be {rule}, got {show(value)}"
        number = self.kind in (int, float)
        same = (isinstance(value, (int, float)) if number else isinstance(value, self.kind)) \
            and not (isinstance(value, bool) and self.kind is not bool)
        if not same:
            return f"must be {rule}, got {json_type(value)} {show(value)}"
        if number and not math.isfinite(value):
            rule += " (finite)"
        return f"must be {rule}, got {show(value)}"


def fields_of(model) -> dict[str, Param]:
    """name -> Param view of every field of a pydantic model or pydantic dataclass."""
    fields = getattr(model, "__pydantic_fields__", None) or model.model_fields
    return {name: Param.of(name, f) for name, f in fields.items()}


def check(model, values: dict, context=None):
    """`model(**values)` validated, or a ValueError in transformers' words naming the first bad
    parameter: "`p` has to be a float in (0, 1], but is 1.5" (TypeError for an unknown one)."""
    try:
        return model.model_validate(values, context=context)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        if not e["loc"]:  # a rule between parameters (a model validator)
            raise ValueError(str(e["ctx"]["error"])) from None
        name = e["loc"][0]
        if e["type"] == "extra_forbidden":
            raise TypeError(f"unexpected keyword argument {name!r}") from None
        rule = fields_of(model)[name].rule()
        raise ValueError(f"`{name}` has to be {rule}, but is {values[name]!r}") from None


# ---- one model per sampler -----------------------------------------------------------------


class SamplerSettings(BaseModel):
    """One entry of a preset's chain: `sampler` names it, the other fields are its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def name(self) -> str:
        return self.sampler

    @property
    def params(self) -> Mapping[str, Any]:
        """Only the parameters that were given (the rest are the sampler's defaults), read-only."""
        return MappingProxyType({k: getattr(self, k) for k in type(self).model_fields
                                 if k != "sampler" and k in self.model_fields_set})


SETTINGS: dict[str, type[SamplerSettings]] = {}


def _setting(cls):
    SETTINGS[typing.get_args(cls.model_fields["sampler"].annotation)[0]] = cls
    return cls


def _token_biases(value, info: ValidationInfo):
    """{token id: bias} with ids as JSON object keys ("123", as OpenAI's `logit_bias`) or Python ints;
    each bad entry is reported at its own key (`$.samplers[0].bias.abc`)."""
    if not isinstance(value, dict):
        return value  # the dict type reports it
    out = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else (
            int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None)
        if token is None or token < 0:
            raise PydanticCustomError("rule", "{message}", {"key": str(key), "message": (
                f"a key must be a token id (an integer >= 0 written as a string), got {show(key)}")})
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise PydanticCustomError("rule", "{message}", {"key": str(key), "message": (
                f"must be a finite number (the bias added to token {token}'s logit), got "
                f"{json_type(bias)} {show(bias)}")})
        out[token] = float(bias)
    return out


TokenId = Annotated[int, Ge(0), BeforeValidator(_integral), Strict()]


def _f(default, doc, **bounds):
    return Field(default, description=doc, **bounds)


@_setting
class Temperature(SamplerSettings):
    """Temperature: logits / T; below 1 sharpens, above 1 flattens."""
    sampler: Literal["temperature"]
    temperature: Float = _f(1.0, "the divisor; 1 leaves the scores unchanged", gt=0)


@_setting
class DynamicTemperature(SamplerSettings):
    """Entropy-scaled temperature: T = low + (high - low) * (H / log V) ** exponent."""
    sampler: Literal["dynamic_temperature"]
    low: Float = _f(1.0, "temperature at entropy 0", ge=0)
    high: Float = _f(1.0, "temperature at maximal entropy (uniform over V)", ge=0)
    exponent: Float = _f(1.0, "shape of the curve between them", gt=0)


@_setting
class TopK(SamplerSettings):
    """Top-k: keep the k highest logits; 0 is off."""
    sampler: Literal["top_k"]
    k: Int = _f(0, "how many tokens to keep; 0 keeps all", ge=0)


@_setting
class TopP(SamplerSettings):
    """Top-p (nucleus): keep the most likely tokens whose probability reaches p."""
    sampler: Literal["top_p"]
    p: Float = _f(1.0, "probability mass to keep", gt=0, le=1)


@_setting
class Typical(SamplerSettings):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy."""
    sampler: Literal["typical"]
    p: Float = _f(1.0, "probability mass to keep", gt=0, le=1)


@_setting
class MinP(SamplerSettings):
    """Min-p: remove tokens less likely than p times the most likely one."""
    sampler: Literal["min_p"]
    p: Float = _f(0.0, "relative threshold; 0 is off", ge=0, le=1)


@_setting
class TopA(SamplerSettings):
    """Top-a: remove tokens less likely than a * p_max ** 2."""
    sampler: Literal["top_a"]
    a: Float = _f(0.0, "threshold factor (keep p >= a * p_max^2); 0 is off", ge=0, le=1)


@_setting
class TailFree(SamplerSettings):
    """Tail-free sampling: cut the flat tail of the sorted distribution."""
    sampler: Literal["tfs"]
    z: Float = _f(1.0, "share of the total curvature to keep", gt=0, le=1)


@_setting
class Epsilon(SamplerSettings):
    """Epsilon sampling: remove tokens with probability below epsilon."""
    sampler: Literal["epsilon"]
    epsilon: Float = _f(0.0, "absolute probability cutoff", ge=0, lt=1)


@_setting
class Eta(SamplerSettings):
    """Eta sampling: an epsilon cutoff that shrinks when the row is uncertain."""
    sampler: Literal["eta"]
    eta: Float = _f(0.0, "the cutoff scale", ge=0, lt=1)


@_setting
class TopNSigma(SamplerSettings):
    """Top-n-sigma: keep the logits within n standard deviations of the maximum."""
    sampler: Literal["top_n_sigma"]
    n: Float = _f(0.0, "width of the kept band in standard deviations", ge=0)


@_setting
class XTC(SamplerSettings):
    """Exclude Top Choices: sometimes remove every likely token but the least likely of them."""
    sampler: Literal["xtc"]
    threshold: Float = _f(0.1, "probability a token needs to be a candidate", ge=0, le=1)
    probability: Float = _f(0.0, "chance per row and step to apply XTC", ge=0, le=1)
    protect_newline_eos: Bool = _f(
        True, "leave a row alone when XTC would remove its newline or EOS token (needs the tokenizer)")


@_setting
class RepetitionPenalty(SamplerSettings):
    """Repetition penalty with range, slope, presence and frequency (KoboldAI / KoboldCpp / NovelAI)."""
    sampler: Literal["repetition_penalty"]
    penalty: Float = _f(1.0, "multiplicative penalty; 1 is off, < 1 rewards repeats", gt=0)
    range: Int = _f(0, "window length in tokens; 0 = whole context", ge=0)
    slope: Float = _f(0.0, 'how the penalty fades for older tokens (see slope_mode); 0 with "curve" is flat',
                      ge=0)
    presence: Float = _f(0.0, "subtracted once per present token")
    frequency: Float = _f(0.0, "subtracted per occurrence")
    whitelist: tuple[Annotated[int, Ge(0), BeforeValidator(_integral), Strict()], ...] = _f(
        (), "token ids that are never penalised")
    slope_mode: Literal["curve", "halves"] = _f(
        "curve", "which app's slope rule: curve (KoboldAI United, NovelAI; 0 = flat), "
                 "halves (KoboldCpp; 1 = flat)")

    @model_validator(mode="after")
    def _slope_rules(self):
        if self.slope_mode == "curve" and self.slope != 0.0 and self.range == 0:
            raise ValueError(f"`slope` needs `range` > 0 with slope_mode 'curve' (the curve is built over "
                             f"the range, as in KoboldAI), but range is 0 and slope is {self.slope!r}")
        if self.slope_mode == "halves" and not 0.0 < self.slope <= 1.0:
            raise ValueError(f"`slope` has to be a float in (0, 1] with slope_mode 'halves' (1 = flat), "
                             f"but is {self.slope!r}")
        return self


@_setting
class NoRepeatNGram(SamplerSettings):
    """No-repeat n-gram: ban every token that would repeat an n-gram of the context."""
    sampler: Literal["no_repeat_ngram"]
    size: Int = _f(0, "n-gram length; 0 is off", ge=0)


@_setting
class DRY(SamplerSettings):
    """DRY: penalise the tokens that would extend a repeated sequence."""
    sampler: Literal["dry"]
    multiplier: Float = _f(0.0, "penalty scale; 0 is off", ge=0)
    base: Float = _f(1.75, "growth of the penalty per extra matched token", ge=1)
    allowed_length: Int = _f(2, "longest repeat that goes unpenalised", ge=1)
    range: Int = _f(0, "window of recent tokens; 0 = whole context", ge=0)
    sequence_breakers: tuple[Str, ...] = _f(DRY_BREAKERS, "strings across which a repeat is not extended")


@_setting
class Unified(SamplerSettings):
    """NovelAI's unified sampler: raw = l * (linear + H * conf) - quad * l ** 2."""
    sampler: Literal["unified"]
    linear: Float = _f(1.0, "inverse temperature")
    quad: Float = _f(0.0, "quadratic term; > 0 pushes unlikely tokens down harder")
    conf: Float = _f(0.0, "entropy-dependent part of the inverse temperature")


@_setting
class Mirostat(SamplerSettings):
    """Mirostat: steer the observed surprise towards tau."""
    sampler: Literal["mirostat"]
    version: Annotated[Literal[1, 2], BeforeValidator(_choice)] = _f(2, "the algorithm (Mirostat 1 or 2)")
    tau: Float = _f(5.0, "target surprise in bits", gt=0)
    eta: Float = _f(0.1, "learning rate of mu", gt=0)


@_setting
class LogitBias(SamplerSettings):
    """Logit bias and token bans: add a fixed bias to chosen tokens' logits, remove banned tokens."""
    sampler: Literal["logit_bias"]
    bias: Annotated[dict[int, Float], BeforeValidator(_token_biases)] = _f(
        {}, 'token id -> number added to its logit ({"123": -5}; OpenAI\'s logit_bias)')
    ban: tuple[TokenId, ...] = _f((), "token ids that are never produced")


@_setting
class AdaptiveP(SamplerSettings):
    """Adaptive-P: favour tokens near a target probability, steered by the picked tokens' history."""
    sampler: Literal["adaptive_p"]
    target: Float = _f(-1.0, "probability the picked tokens should average; negative is off", le=1)
    decay: Float = _f(0.9, "decay of the history of picked probabilities (about 1 / (1 - decay) tokens)",
                      ge=0, le=0.99)


@_setting
class Quadratic(SamplerSettings):
    """Quadratic sampling ("smoothing"): logits bent around the best one, h - k f d^2 + s f d^3."""
    sampler: Literal["quadratic"]
    factor: Float = _f(0.0, "smoothing factor; larger sharpens, small values flatten; 0 is off", ge=0)
    curve: Float = _f(1.0, "smoothing curve: 1 is the plain quadratic, above it the cubic term grows")

"""The field types of request bodies (webui.py and kobold.py declare the bodies as pydantic models
of them), and reading a body into its model with pydantic's errors as 400s naming the field.

The types are strict: pydantic's lax mode would take "5" or true for 5, which no client means.
An integral float (5.0) is an integer, as JSON does not tell them apart. Each type carries its
rule in words, said once for the whole value: a union's alternatives would each report their own.
Sampler fields are not here: the importers read them (translate.py), as in those apps' presets.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, TypeVar

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt,
                      StrictStr, ValidationError, ValidationInfo, WrapValidator)
from pydantic_core import PydanticCustomError

from .. import settings
from .errors import APIError, bad

_RULE = "request_rule"  # the pydantic error type of a broken rule, whose message is the rule


def _rule(words: str) -> WrapValidator:
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(_RULE, words) from None
    return WrapValidator(check)


def _in_vocabulary(value, info: ValidationInfo):
    """Token ids must be ids of the model (`read(..., vocab_size=N)`): the model fails on others."""
    vocab = (info.context or {}).get("vocab_size")
    if vocab is not None and isinstance(value, list) and not all(0 <= t < vocab for t in value):
        raise PydanticCustomError(_RULE, "must hold ids in [0, {vocab}) (this model's vocabulary)", {"vocab": vocab})
    return value


def _one_prompt(value):
    """SillyTavern may send the prompt as a list holding one text; several texts are a batch."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        if len(value) > 1:
            raise PydanticCustomError("prompt_batch", "a batch of {n} prompts is not supported; send one "
                                      "prompt per request (use `n` for several continuations)", {"n": len(value)})
        return value[0]
    return value


Int = Annotated[settings.Int, _rule("must be an integer")]  # the presets' JSON integer rule (5.0 is 5)
Count = Annotated[Int, Field(ge=1)]
Flag = Annotated[StrictBool, _rule("must be true or false")]
Text = Annotated[StrictStr, _rule("must be a string")]
Texts = Annotated[list[StrictStr], Field(min_length=1)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
# -1 (any < 0): random; torch's generators take 64-bit seeds
Seed = Annotated[Int, Field(le=2**64 - 1), AfterValidator(lambda seed: None if seed < 0 else seed)]
# stop sequences: one string or a list of them; empty strings are dropped
Stops = Annotated[StrictStr | list[StrictStr], _rule("must be a string or a list of strings"),
                  AfterValidator(lambda v: [s for s in ([v] if isinstance(v, str) else v) if s])]
# a text, a list holding one text, or (web UI) a list of token ids
Prompt = Annotated[Texts | TokenIds | Text, _rule("must be a string or a list of token ids"),
                   AfterValidator(_one_prompt), AfterValidator(_in_vocabulary)]
TextPrompt = Annotated[Texts | Text, _rule("must be a string"), AfterValidator(_one_prompt)]
TokenList = Annotated[list[StrictInt], _rule("must be a list of integers (token ids)"), AfterValidator(_in_vocabulary)]

class Envelope(BaseModel):
    """A generate request's envelope (webui.py, kobold.py): unknown keys are ignored (the apps send
    many we do not use); after translation it also carries the sampler-order entries that were
    skipped, for the X-Skipped-Samplers header and the request log."""

    model_config = ConfigDict(extra="ignore")
    _skipped: list[str] = PrivateAttr(default_factory=list)

    @property
    def skipped_samplers(self) -> list[str]:
        return self._skipped


class GenerateBody(Envelope):
    """What the OpenAI-style and llama.cpp-style generate envelopes share: a seed, stop strings,
    streaming, and several names for the length, of which the first one sent wins."""

    LENGTH_FIELDS: ClassVar[tuple[str, ...]] = ()
    seed: Seed = None
    stop: Stops = []
    stream: Flag = False

    @property
    def length_field(self) -> str:
        """The field that set the length (for errors about it): the first of LENGTH_FIELDS sent."""
        return next((f for f in self.LENGTH_FIELDS if getattr(self, f) is not None), self.LENGTH_FIELDS[-1])


Body = TypeVar("Body", bound=BaseModel)


def read(model: type[Body], body: dict, **context) -> Body:
    """`body` as a `model`, or its first error as the 400 today's clients know."""
    try:
        return model.model_validate(body, context={**settings.JSON, **context})
    except ValidationError as err:
        raise _api_error(err.errors()[0], model, body) from None


def _api_error(error: dict, model: type[BaseModel], body: dict) -> APIError:
    """"`field` RULE, but is VALUE" (bad()), "`field` is required", or "`field`: what is wrong"."""
    field = error["loc"][0]
    value = body.get(field)
    if error["type"] == "missing" or (value is None and model.model_fields[field].is_required()):
        return APIError(400, f"`{field}` is required", field)
    if value is None:  # a field typed without None: absent is allowed, null is not
        return bad(field, "must not be null", value)
    bound = {"greater_than_equal": "must be >= {ge}", "less_than_equal": "must be <= {le}"}.get(error["type"])
    if bound is not None:
        return bad(field, bound.format(**error["ctx"]), value)
    if error["type"] == _RULE:
        return bad(field, error["msg"], value)
    return APIError(400, f"`{field}`: {error['msg']}", field)

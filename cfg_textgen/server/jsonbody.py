"""A request body as JSON, refused with a 400 naming its top-level field when its shape would hurt
the server instead of meaning anything.

`json.loads` alone lets through what later breaks as a 500:
- nesting deep enough to exhaust Python's recursion (in the parser, or in any walk after it);
- integers past the range of a float (`temperature` of 5,000 digits: Python's int-digit limit
  inside the parser, an OverflowError in whatever converts it later);
- NaN / Infinity (Python's parser accepts them; JSON has no such numbers; 1e400 parses as inf);
- lone surrogates ("\\ud800" is valid JSON, but not a Unicode character): no tokenizer can encode
  them and no response can echo them.
Depth is measured before parsing (a scan of the brackets outside strings); the rest in one walk
of the parsed body, which the depth bound keeps shallow.
"""

from __future__ import annotations

import json
import math
import re

from .errors import APIError

MAX_DEPTH = 32  # objects/lists inside each other; real clients send 3 at most (logit_bias, lists)

# a JSON string (escapes included) or one bracket: the brackets inside strings are not nesting
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_SURROGATE = re.compile("[\ud800-\udfff]")
_FLOAT_DIGITS = 309  # an integer of more digits is beyond any float (1.8e308)


class _TooLarge:
    """Stands in for an integer no setting can hold, so that the walk can name its field."""

    def __init__(self, digits: int):
        self.digits = digits


def _integer(text: str):
    if len(text.lstrip("-")) < _FLOAT_DIGITS:
        return int(text)
    return _TooLarge(len(text.lstrip("-")))  # int() itself refuses beyond 4,300 digits


def parse(raw: bytes) -> dict:
    """The body as a JSON object, or an APIError (400) that says what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not UTF-8 (byte {err.start})") from None
    _check_depth(text)
    try:
        body = json.loads(text, parse_int=_integer)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} "
                            f"column {err.colno}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, but is {type(body).__name__}")
    for key, value in body.items():
        field = _shown(key)
        if field != key:
            raise APIError(400, f"`{field}`: a key with a lone surrogate, which is not a Unicode character",
                           field)
        problem = _problem(value)
        if problem is not None:
            raise APIError(400, f"`{field}` {problem}", field)
    return body


def _check_depth(text: str) -> None:
    """Nesting beyond MAX_DEPTH is refused before the parser recurses into it; the field is the
    last string seen at the top level of the object (a key comes before its value)."""
    depth, field = 0, None
    for m in _TOKEN.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                name = _key(field) if field else None
                raise APIError(400, f"`{name}` is nested more than {MAX_DEPTH} levels deep" if name else
                               f"the request body is nested more than {MAX_DEPTH} levels deep", name)
        elif token in "]}":
            depth -= 1
        elif depth == 1:
            field = token


def _problem(value) -> str | None:
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return None if m is None else (f"holds a lone surrogate {ascii(m.group())[1:-1]} (at character "
                                       f"{m.start()}), which is not a Unicode character")
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number (NaN and Infinity are not JSON)"
    if isinstance(value, _TooLarge):
        return f"holds an integer of {value.digits} digits, too large for any setting"
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    return next((p for p in (_problem(v) for v in items) if p is not None), None)


def _key(token: str) -> str:
    try:
        return _shown(json.loads(token))
    except ValueError:  # a bad escape: the parser will say so, here it only names the field
        return token[1:-1]


def _shown(text: str) -> str:
    """A key as it can be printed: lone surrogates escaped."""
    return text if _SURROGATE.search(text) is None else ascii(text)[1:-1]

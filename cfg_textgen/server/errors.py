"""Request errors in the shape each API uses (bodies.py reads the bodies).

text-generation-webui (modules/api/script.py) answers an OpenAIError as
    {"error": {"message": ..., "type": "invalid_request_error", "param": FIELD, "code": null}}
KoboldCpp (koboldcpp.py) answers bad input as {"detail": {"msg": ..., "type": "bad_input"}}; we
add the field there too. Every error names the field it is about where there is one.
"""

from __future__ import annotations

from typing import Any

WEBUI, KOBOLD = "webui", "kobold"


class APIError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.code = status, message, field, code
        self.headers = headers


def error_body(api: str, err: APIError) -> dict:
    if api == KOBOLD:
        detail = {"msg": err.message, "type": err.code or ("bad_input" if err.status < 500 else "server_error")}
        if err.field is not None:
            detail["field"] = err.field
        return {"detail": detail}
    return {"error": {"message": err.message,
                      "type": "invalid_request_error" if err.status < 500 else "server_error",
                      "param": err.field, "code": err.code}}


def api_of_path(path: str) -> str:
    return KOBOLD if path.startswith("/api/") else WEBUI


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def bad(field: str, rule: str, value: Any) -> APIError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return APIError(400, f"`{field}` {rule}, but is {_kind(value)} {shown}", field)


# ---- library errors as request errors: by their typed `field`, never by their words ------------

_CFG_FIELD = {"scale": "guidance_scale", "opposing_prompt": "negative_prompt"}


def from_preset_error(err: Exception, preset: dict | None, report, renames: dict[str, str] | None = None
                      ) -> APIError:
    """A PresetError from translating a request, as a 400 naming the request field.

    An importer's error is about one source key (`err.field`: the request key itself); a
    validation error of the translated preset holds JSON paths (`err.problems`:
    `("samplers", 1, "k")`), traced back to the request key through the import report (which says
    what each key was mapped to)."""
    text = (str(err).splitlines() or [""])[0]
    renames = renames or {}
    problems = getattr(err, "problems", ())
    if not problems:
        field = getattr(err, "field", None)
        if field is None:
            return APIError(400, text, None)
        field = renames.get(field, field)
        return APIError(400, f"`{field}`: {err.rule}", field)
    path, why = problems[0].path, problems[0].message
    field = None
    if len(path) >= 2 and path[0] == "samplers" and isinstance(path[1], int) and preset is not None:
        spec = preset["samplers"][path[1]]
        target = f"{spec['sampler']}.{path[2]}" if len(path) > 2 else spec["sampler"]
        field = _report_key(report, target) or _report_key(report, spec["sampler"]) or spec["sampler"]
    elif len(path) >= 2 and path[0] == "cfg":
        field = _CFG_FIELD.get(path[1], path[1])
    elif path:
        field = _report_key(report, str(path[0])) or str(path[0])
    field = renames.get(field, field)
    return APIError(400, f"`{field}`: {why}" if field else text, field)


def from_engine_error(err: Exception, length_field: str) -> APIError:
    """The engine's refusal of a request (a setting out of range, a story too long for the window
    with truncation off, no room for the new tokens) as a 400 naming the request field: the
    engine's typed `field` in the API's words (`length_field` is the request's length field:
    `max_tokens`, `max_new_tokens` or Kobold's `max_length`). An error without a field is about
    the prompt, the one input left."""
    field = getattr(err, "field", None) or "prompt"
    field = length_field if field == "max_new_tokens" else _CFG_FIELD.get(field, field)
    text = str(err)
    return APIError(400, text if f"`{field}`" in text else f"`{field}`: {text}", field)


def _report_key(report, target: str) -> str | None:
    if report is None:
        return None
    for key, entry in report.entries.items():
        if entry.status == "mapped" and (entry.detail == target or entry.detail.startswith(target + " ")
                                         or entry.detail.startswith(target + ",")):
            return key
    for key, entry in report.entries.items():
        if entry.status == "mapped" and entry.detail.startswith(target):
            return key
    return None

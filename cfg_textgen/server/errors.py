"""Request errors in the shape each API uses (bodies.py reads the bodies).

text-generation-webui (modules/api/script.py) answers an OpenAIError as
    {"error": {"message": ..., "type": "invalid_request_error", "param": FIELD, "code": null}}
KoboldCpp (koboldcpp.py) answers bad input as {"detail": {"msg": ..., "type": "bad_input"}}; we
add the field there too. Every error names the field it is about where there is one.
"""

from __future__ import annotations

import re
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


# ---- errors from the preset translation (importers/ and presets.parse_preset) ----------------

_BUILDER = re.compile(r"^[^:]*: ([A-Za-z_][\w.]*(?:\[\d+\])?): (.*)$", re.S)
_PRESET_PATH = re.compile(r"\$\.(samplers\[(\d+)\](?:\.(\w+))?|cfg\.(\w+)|(\w+))")
_CFG_FIELD = {"scale": "guidance_scale", "opposing_prompt": "negative_prompt"}


def from_preset_error(err: Exception, preset: dict | None, report, renames: dict[str, str] | None = None
                      ) -> APIError:
    """A PresetError from translating a request, as a 400 naming the request field.

    An importer's error names the source key itself (`SOURCE: key: what`); a validation error of
    the translated preset names a JSON path (`$.samplers[1].k`), traced back to the request key
    through the import report (which says what each key was mapped to)."""
    text = str(err).splitlines()[0]
    renames = renames or {}
    if "the imported preset is invalid" not in text and preset is None:
        m = _BUILDER.match(text)
        if m:
            return APIError(400, f"`{m.group(1)}`: {m.group(2)}", m.group(1))
        return APIError(400, text, None)
    m = _PRESET_PATH.search(text)
    why = text.split(": ", 1)[-1] if m is None else text[m.end():].lstrip(": ")
    field = None
    if m and m.group(2) is not None and preset is not None:
        spec = preset["samplers"][int(m.group(2))]
        target = f"{spec['sampler']}.{m.group(3)}" if m.group(3) else spec["sampler"]
        field = _report_key(report, target) or _report_key(report, spec["sampler"]) or spec["sampler"]
    elif m and m.group(4) is not None:
        field = _CFG_FIELD.get(m.group(4), m.group(4))
    elif m and m.group(5) is not None:
        field = _report_key(report, m.group(5)) or m.group(5)
    field = renames.get(field, field)
    return APIError(400, f"`{field}`: {why}" if field else text, field)


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

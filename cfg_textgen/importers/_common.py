"""Shared parts of the importers: safe reading and parsing, typed access to source keys, and the
builder that collects our preset dict and the report side by side and builds the preset model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Strict, TypeAdapter, ValidationError

from ..errors import PresetError
from ..presets import parse_preset
from ..settings import JSON, Bool, Float, Int, Param, Str, json_type
from .report import Report

FORMAT_TAG = "cfg-textgen-preset/1"
MAX_BYTES = 1_000_000  # community presets are a few KB; refuse anything near this before reading it
MAX_DEPTH = 32  # presets nest 3 levels deep at most
# source values are read with the preset model's own strict types (settings.py), not a twin of them
_READERS = {kind: (TypeAdapter(t), Param(kind.__name__, kind, None, words=words)) for kind, t, words in (
    (float, Float, ""), (int, Int, "a whole number"), (str, Str, ""), (bool, Bool, ""),
    (list, Annotated[list, Strict()], "a list"))}


# ---- reading and parsing --------------------------------------------------------------------


def read_source(path_or_text) -> tuple[str, str, str | None]:
    """Return (text, source label for messages, file stem or None) for a path or literal text."""
    if isinstance(path_or_text, Path) or (
        isinstance(path_or_text, str)
        and "\n" not in path_or_text
        and not path_or_text.lstrip().startswith(("{", "["))
        and len(path_or_text) < 4096
        and (os.path.exists(path_or_text) or Path(path_or_text).suffix.lower() in _SUFFIXES)
    ):
        path = Path(path_or_text)
        return _read_file(path), str(path), path.stem
    if isinstance(path_or_text, bytes):
        path_or_text = _decode(path_or_text, "<text>")
    if not isinstance(path_or_text, str):
        raise PresetError(f"<input>: expected a file path or preset text, got {type(path_or_text).__name__}")
    if len(path_or_text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise PresetError(f"<text>: preset text is larger than {MAX_BYTES} bytes; refusing to parse it")
    return path_or_text, "<text>", None


_SUFFIXES = {".json", ".yaml", ".yml", ".preset", ".presets", ".settings"}


def _read_file(path: Path) -> str:
    if not path.exists():
        raise PresetError(f"{path}: no such file")
    if not path.is_file():
        raise PresetError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise PresetError(f"{path}: file is {size} bytes, larger than the {MAX_BYTES}-byte limit for presets")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_BYTES + 1)  # a file that grows while we read is still bounded
    if len(raw) > MAX_BYTES:
        raise PresetError(f"{path}: file is larger than the {MAX_BYTES}-byte limit for presets")
    return _decode(raw, str(path))


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PresetError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases: presets never need them, and they are
    how a "billion laughs" file expands a few bytes into gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases are not allowed in presets", event.start_mark
            )
        return super().compose_node(parent, index)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a valid number in a preset")


def parse_text(text: str, source: str) -> Any:
    """Parse JSON (text starting with { or [) or else YAML, with size, alias and depth guards."""
    stripped = text.lstrip()
    if not stripped:
        raise PresetError(f"{source}: the file is empty")
    try:
        if stripped[0] in "{[":
            try:
                data = json.loads(text.lstrip("\ufeff"), parse_constant=_refuse_constant)
            except json.JSONDecodeError as err:
                hint = " (truncated?)" if err.pos >= len(text.rstrip()) else ""
                raise PresetError(
                    f"{source}: invalid JSON{hint}: {err.msg} at line {err.lineno} column {err.colno}"
                ) from None
            except ValueError as err:
                raise PresetError(f"{source}: invalid JSON: {err}") from None
        else:
            try:
                data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
            except yaml.YAMLError as err:
                raise PresetError(f"{source}: invalid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise PresetError(f"{source}: nested too deeply to be a preset") from None
    _check_depth(data, source)
    return data


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _check_depth(data: Any, source: str) -> None:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PresetError(f"{source}: nested more than {MAX_DEPTH} levels deep; not a preset")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


# ---- the builder ----------------------------------------------------------------------------


def fmt_num(x: float) -> str:
    return f"{x:g}"


class Builder:
    """Typed reads of source keys (errors name the file and the key), the samplers in order, and
    the report. Every read key must be reported once; `finish` reports the rest as unknown."""

    def __init__(self, source: str, fmt: str, data: dict, prefix: str = ""):
        if not isinstance(data, dict):
            raise PresetError(f"{source}: {prefix.rstrip('.') or 'preset'} must be an object, got {json_type(data)}")
        self.source = source
        self.data = data
        self.prefix = prefix
        self.report = Report(source, fmt)
        self.samplers: list[dict] = []
        self.cfg = {"scale": 1.0, "opposing_prompt": ""}
        self.extra: dict[str, Any] = {}  # max_new_tokens, stop, do_sample, grammar, banned_strings

    # -- reading
    def k(self, key: str) -> str:
        return self.prefix + key

    def error(self, key: str, message: str) -> PresetError:
        """The error about source key `key`: the key (as written, prefix included) is its `field`."""
        return PresetError(f"{self.source}: {self.k(key)}: {message}", field=self.k(key), rule=message)

    def has(self, key: str) -> bool:
        return key in self.data

    def _read(self, key: str, kind: type, default):
        """The value of `key` as `kind` (the preset model's strict types), else `default` when absent."""
        if key not in self.data:
            return default
        adapter, view = _READERS[kind]
        try:
            return adapter.validate_python(self.data[key], context=JSON)
        except ValidationError as err:
            raise self.error(key, view.problem(err.errors(include_url=False)[0])) from None

    def num(self, key: str, default: float | None = None, integer: bool = False):
        return self._read(key, int if integer else float, default)

    def string(self, key: str, default: str | None = None):
        return self._read(key, str, default)

    def boolean(self, key: str, default: bool | None = None):
        return self._read(key, bool, default)

    def list_(self, key: str, default: list | None = None):
        return self._read(key, list, default)

    # -- reporting (only keys that are present in the source)
    def mapped(self, key: str, detail: str) -> None:
        if key in self.data:
            self.report.mapped(self.k(key), detail, self.data[key])

    def neutral(self, key: str, detail: str) -> None:
        if key in self.data:
            self.report.neutral(self.k(key), detail, self.data[key])

    def dropped(self, key: str, detail: str) -> None:
        if key in self.data:
            self.report.dropped(self.k(key), detail, self.data[key])

    def reported(self, key: str) -> bool:
        return self.k(key) in self.report.entries

    def note(self, text: str) -> None:
        self.report.note(text)

    # -- building
    def add(self, sampler: dict) -> None:
        self.samplers.append(sampler)

    def greedy(self, key: str, value) -> None:
        self.extra["do_sample"] = False
        self.mapped(key, f"do_sample false (temperature {fmt_num(value)} means greedy decoding)")

    def finish(self, name: str | None, fallback_name: str | None, description: str, skip=()) -> dict:
        for key in self.data:
            if key not in skip and not self.reported(key):
                self.dropped(key, "unknown key: no cfg-textgen equivalent")
        preset = {
            "format": FORMAT_TAG,
            "name": name or fallback_name or "imported",
            "description": description,
            "cfg": dict(self.cfg),
            "samplers": self.samplers,
        }
        for key in ("max_new_tokens", "stop", "do_sample", "grammar", "banned_strings"):
            if key in self.extra:
                preset[key] = self.extra[key]
        return preset


def build(preset: dict, source: str):
    """The `Preset` model of an importer's dict (the one validation it gets), errors naming the source.

    Not done in `Builder.finish`: the server maps a validation error of a request's preset back to
    the request key through the import report, so `import_request` returns the dict unchecked."""
    try:
        return parse_preset(preset, source)
    except PresetError as err:
        raise err.within(f"{source}: the imported preset is invalid") from None


# ---- small helpers shared by several formats ------------------------------------------------


def grammar_key(b: Builder, key: str) -> None:
    """A GBNF grammar text (KoboldCpp `grammar`, the web UI's `grammar_string`) -> the preset's grammar."""
    text = b.string(key)
    if text is None:
        return
    if text.strip():
        b.extra["grammar"] = text
        b.mapped(key, "grammar")
    else:
        b.neutral(key, "empty: no grammar")


def repetition_penalty_entry(penalty, range=0, slope=0, presence=0, frequency=0) -> dict:
    """Our `repetition_penalty` sampler entry, holding only the parameters that are not off."""
    entry = {"sampler": "repetition_penalty", "penalty": penalty}
    for key, value in (("range", range), ("slope", slope), ("presence", presence), ("frequency", frequency)):
        if value:
            entry[key] = value
    return entry


def simple_sampler(b: Builder, key: str, sampler: str, param: str, neutral, label: str | None = None,
                   integer: bool = False) -> None:
    """Map one single-parameter sampler value (present and applied) or report it neutral."""
    value = b.num(key, integer=integer)
    if value is None:
        return
    if value == neutral:
        b.neutral(key, f"{label or sampler} {fmt_num(neutral)} is off")
        return
    b.add({"sampler": sampler, param: value})
    b.mapped(key, f"{sampler}.{param}")


def top_p_sampler(b: Builder, key: str, sampler: str = "top_p") -> None:
    """top_p / typical: 1 is off; 0 keeps only the most likely token, i.e. top_k 1."""
    value = b.num(key)
    if value is None:
        return
    if value > 1:
        raise b.error(key, f"must be in the [0, 1] interval, but is {value!r}")
    if value == 1:
        b.neutral(key, f"{key} 1 keeps every token (off)")
    elif value <= 0:
        if {"sampler": "top_k", "k": 1} not in b.samplers:
            b.add({"sampler": "top_k", "k": 1})
        b.mapped(key, f"top_k.k = 1 ({key} {fmt_num(value)} keeps only the most likely token)")
    else:
        b.add({"sampler": sampler, "p": value})
        b.mapped(key, f"{sampler}.p")


def temperature_sampler(b: Builder, key: str) -> None:
    value = b.num(key)
    if value is None:
        return
    if value == 1:
        b.neutral(key, "temperature 1 is off")
    elif value <= 0:
        b.greedy(key, value)
    else:
        b.add({"sampler": "temperature", "temperature": value})
        b.mapped(key, "temperature.temperature")

"""The preset model: load and validate preset JSON, describe it as a JSON Schema (chain.py turns a
preset into sampler objects).

A preset (docs/preset-format.md) is immutable data, one pydantic model: `Preset` with its
`CFGSettings` and its chain of sampler settings (settings.py, one model per sampler, a union
discriminated by `"sampler"`). Validation is strict and collects *every* problem of a preset before
raising one `PresetError` whose lines, formatted from pydantic's errors, each name the source and
the JSON path:

    presets/x.json: $.samplers[2].p: must be a number in (0, 1], got 1.5

`preset_schema()` is pydantic's JSON Schema of the same model.

Choices made where the format is silent:
- An integer is accepted where a number is expected; a number with an integral value (`40.0`) is
  accepted where an integer is expected and stored as an `int`, as JSON Schema's "integer" does.
  `true`/`false` are never numbers.
- Non-finite numbers (`NaN`, `Infinity`, which Python's json accepts) are refused everywhere.
- A duplicate key in one JSON object is an error (the second value would silently win).
- For list parameters (`whitelist`), the range applies to each element.
- `{"sampler": "cfg"}` is refused with a pointer to `$.cfg`: CFG is not part of the chain.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from annotated_types import MinLen
from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from .errors import PresetError, PresetProblem
from .settings import JSON, SETTINGS, Bool, Float, Int, SamplerSettings, Str, fields_of, json_type, show

FORMAT = "cfg-textgen-preset/1"
OpposingMode = Literal["text", "last-token"]
OPPOSING_MODES = get_args(OpposingMode)
MAX_PRESET_BYTES = 1024 * 1024  # a preset is a few hundred bytes; anything above 1 MiB is a mistake
BUILTIN_PACKAGE = "cfg_textgen.presets_data"


# ---- the immutable preset model -------------------------------------------------------------

SamplerEntry = Annotated[Union[tuple(SETTINGS.values())], Field(discriminator="sampler")]


def SamplerSpec(name: str, params: dict | None = None) -> SamplerSettings:  # noqa: N802 - was a class
    """One chain entry by hand: the settings model of sampler `name` with `params`."""
    if name not in SETTINGS:
        raise PresetError(f"unknown sampler {name!r}; valid samplers: {_choices(sorted(SETTINGS))}")
    return SETTINGS[name].model_validate({**(params or {}), "sampler": name})


# |scale| bound: far past where text burns (from about 6 on the default model), and small enough
# that scale * (c - u) stays finite in float32 (log-probability gaps are at most a few thousand);
# at 1e38 the combine overflows to inf and inf - inf leaves NaN probabilities
MAX_SCALE = 1000.0

# last-token mode takes the opposing branch from the prompt: no opposing text
_LAST_TOKEN = {"if": {"properties": {"opposing_mode": {"const": "last-token"}}, "required": ["opposing_mode"]},
               "then": {"properties": {"opposing_prompt": {"const": ""}}}}


@dataclass(frozen=True, config=ConfigDict(extra="forbid", json_schema_extra=_LAST_TOKEN))
class CFGSettings:
    """Guidance settings: `guided = u + scale * (c - u)`; scale 1 means no opposing pass."""

    scale: Float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE,
                         description="guidance scale in u + scale*(c - u); 1 = off (no opposing pass)")
    opposing_prompt: Str = Field("", description='the opposing prompt; "" = a blank story')
    opposing_mode: OpposingMode = Field(
        "text", description='"last-token": the opposing branch starts from the last prompt token '
                            '(the CFG paper\'s); opposing_prompt must then be ""')

    @model_validator(mode="after")
    def _last_token_takes_no_prompt(self):
        if self.opposing_mode == "last-token" and self.opposing_prompt:
            raise PydanticCustomError("rule", "{message}", {"key": "opposing_prompt", "message": (
                'must be "" when opposing_mode is "last-token" (that mode takes the opposing branch from '
                f"the last prompt token), got {show(self.opposing_prompt)}")})
        return self

    @property
    def active(self) -> bool:
        return self.scale != 1.0


@dataclass(frozen=True, kw_only=True,
           config=ConfigDict(extra="forbid", title=f"cfg-textgen preset (format {FORMAT})"))
class Preset:
    """A validated preset, from `parse_preset` / `load_preset` (built by hand, it is validated the
    same way; `dataclasses.replace` validates too). Each of `samplers` has `.name` and `.params`
    (only the parameters the preset gave)."""

    format: Literal["cfg-textgen-preset/1"] = Field(FORMAT, description="format tag; only this value")
    name: Annotated[Str, StringConstraints(pattern=r"\S")] = Field(description="the preset's name")
    description: Str = Field("", description="one line: what it is for")
    cfg: CFGSettings = Field(CFGSettings(), description="classifier-free guidance; runs before the samplers")
    samplers: tuple[SamplerEntry, ...] = Field((), description="applied in this order after CFG")
    max_new_tokens: Int = Field(200, ge=1, description="continuation length")
    stop: tuple[Annotated[Str, MinLen(1)], ...] = Field((), description="stop sequences (not kept)")
    do_sample: Bool = Field(True, description="false = greedy pick after the chain")
    grammar: Str = Field("", description='a GBNF grammar (llama.cpp\'s, rule "root") the text must follow, '
                                         'applied after the samplers; "" = none; needs the llama.cpp backend')
    banned_strings: tuple[Annotated[Str, MinLen(1)], ...] = Field(
        (), description="phrases the text must never contain: when one appears, generation goes back to where it "
                        "began, bans the token that started it there and picks again (KoboldCpp's anti-slop)")
    ban_case_sensitive: Bool = Field(False, description="compare banned_strings as written (default: ignoring "
                                                        "case, as KoboldCpp and TabbyAPI do)")

    def to_dict(self) -> dict:
        """The JSON form: every top-level key, and per sampler only the parameters the preset gave
        (in the sampler's declaration order), so `parse_preset(p.to_dict(), ...) == p`."""
        samplers = [{"sampler": s.name, **{k: _json_value(v) for k, v in s.params.items()}} for s in self.samplers]
        return {"format": FORMAT, "name": self.name, "description": self.description,
                "cfg": dataclasses.asdict(self.cfg), "samplers": samplers, "max_new_tokens": self.max_new_tokens,
                "stop": list(self.stop), "do_sample": self.do_sample, **({"grammar": self.grammar} if self.grammar else {}),
                **({"banned_strings": list(self.banned_strings)} if self.banned_strings else {}),
                **({"ban_case_sensitive": True} if self.ban_case_sensitive else {})}


def _json_value(value):
    """A parameter as JSON holds it: tuples as arrays, {token id: bias} with string keys."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return value


# ---- validation: pydantic's errors in the CLI's words ----------------------------------------

_PRESET = TypeAdapter(Preset)


def _choices(names) -> str:
    return ", ".join(str(n) for n in names)


def _did_you_mean(word: str, names) -> str:
    names = list(names)
    close = (difflib.get_close_matches(word, names, n=1)
             or [n for n in names if word and n.startswith(word)][:1])
    return f" (did you mean {close[0]!r}?)" if close else ""


def _path(loc) -> str:
    return "$" + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc)


def _model_at(loc, data) -> tuple[Any, str]:
    """The model (and its name in messages) of the object at `loc`, or (None, "")."""
    if not loc:
        return Preset, "top-level"
    if loc == ["cfg"]:
        return CFGSettings, "cfg"
    if len(loc) == 2 and loc[0] == "samplers":
        tag = data["samplers"][loc[1]]["sampler"]
        return SETTINGS[tag], repr(tag)
    return None, ""


def _field_at(loc, data):
    """The Param view of the number, string, boolean or array at `loc` (an element's view for an
    element of an array parameter), or None for an object."""
    *parent, last = loc
    if isinstance(last, int):
        view = _field_at(parent, data) if parent else None
        return view.item() if view is not None and view.item_kind in (int, float, str, bool) else None
    model, _ = _model_at(parent, data)
    view = fields_of(model).get(last) if model is not None else None
    return view if view is not None and view.kind in (int, float, str, bool, list, dict) else None


def _problem(e: dict, data: dict) -> PresetProblem:
    """One pydantic error as a problem at a JSON path: what is wrong, got VALUE."""
    loc, kind, value, ctx = list(e["loc"]), e["type"], e["input"], e.get("ctx") or {}
    if len(loc) > 2 and loc[0] == "samplers":
        del loc[2]  # the union's tag: samplers[i].top_p.p is $.samplers[i].p
    if kind == "rule":  # a rule between fields, reported at the field it names
        return PresetProblem((*loc, ctx["key"]), ctx["message"])
    at, samplers = tuple(loc), _choices(sorted(SETTINGS))
    if kind == "missing":
        return PresetProblem(at[:-1], f"missing required key {show(loc[-1])}")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        model, what = _model_at(loc[:-1], data)
        keys = list(fields_of(model))
        return PresetProblem(at, f"unknown key{_did_you_mean(loc[-1], keys)}; valid {what} keys: {_choices(keys)}")
    if kind == "union_tag_not_found":
        return PresetProblem(at, f'missing key "sampler"; valid samplers: {samplers}')
    if kind == "union_tag_invalid":
        tag = value["sampler"]
        if not isinstance(tag, str):
            return PresetProblem((*at, "sampler"), f"must be a string naming a sampler, got {json_type(tag)} "
                                                   f"{show(tag)}; valid samplers: {samplers}")
        if tag == "cfg":
            return PresetProblem((*at, "sampler"), "CFG is not a chain sampler: set it under $.cfg (it always runs first)")
        return PresetProblem((*at, "sampler"), f"unknown sampler {show(tag)}{_did_you_mean(tag, SETTINGS)}; "
                                               f"valid samplers: {samplers}")
    field = _field_at(loc, data)
    if field is None:
        if kind == "value_error":  # a sampler's rule between its parameters
            return PresetProblem(at, ctx["error"])
        like = ' like {"sampler": "temperature", ...}' if loc[:1] == ["samplers"] else ""
        return PresetProblem(at, f"must be {'a sampler ' if like else 'an '}object{like}, "
                                 f"got {json_type(value)} {show(value)}")
    if field.kind is dict:
        return PresetProblem(at, f"must be {field.rule(json=True)}, got {json_type(value)} {show(value)}")
    if field.kind is list and not isinstance(loc[-1], int):
        words = {"samplers": "an array of sampler objects", "stop": "an array of strings"}.get(loc[-1])
        return PresetProblem(at, f"must be {words if len(loc) == 1 else 'an array'}, got {json_type(value)} "
                                 f"{show(value)}")
    if kind == "string_too_short":
        return PresetProblem(at, f"must be a non-empty string, got {show(value)}")
    if kind == "string_pattern_mismatch":
        return PresetProblem(at, f"must be a non-empty string (not only spaces), got {show(value)}")
    return PresetProblem(at, field.problem(e))


def _duplicates(node, path: tuple = ()):
    """JSON paths of the keys the loader saw twice in one object."""
    if isinstance(node, dict):
        yield from ((*path, key) for key in getattr(node, "duplicates", ()))
        for key, value in node.items():
            yield from _duplicates(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _duplicates(value, (*path, i))


def parse_preset(data: Any, source: str = "<preset>") -> Preset:
    """Validate preset JSON data (already parsed) and return the immutable `Preset`.

    All problems are collected; one `PresetError` lists them, one line each, as
    `SOURCE: $.json.path: what is wrong, got VALUE` (with the valid choices where there are some).
    The error's `errors` attribute holds the lines as a tuple, `problems` the same as data
    (`errors.PresetProblem`: the JSON path as keys and indexes, and the message).
    """
    if not isinstance(data, dict):
        _raise(source, [PresetProblem((), f"must be an object, got {json_type(data)} {show(data)}")])
    problems = [PresetProblem(path, "duplicate key (the second value would silently win)")
                for path in _duplicates(data)]
    try:
        preset = _PRESET.validate_python(data, context=JSON)
    except ValidationError as err:
        problems += [_problem(e, data) for e in err.errors(include_url=False)]
    if problems:
        _raise(source, problems)
    return preset


def _raise(source: str, problems: list[PresetProblem]):
    lines = tuple(f"{source}: {_path(p.path)}: {p.message}" for p in problems)
    err = PresetError("\n".join(lines), problems=problems)
    err.errors = lines
    raise err


# ---- loading --------------------------------------------------------------------------------


class _ObjectWithDuplicates(dict):
    """A JSON object that remembers keys given twice, so validation can report them by path."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs):
    obj = _ObjectWithDuplicates()
    dupes = []
    for key, value in pairs:
        if key in obj:
            dupes.append(key)
        obj[key] = value
    obj.duplicates = tuple(dupes)
    return obj


def parse_preset_text(raw: bytes, source: str) -> Preset:
    """Decode and validate the bytes of a preset file (at most `MAX_PRESET_BYTES`)."""
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f"{source}: file is {len(raw)} bytes; a preset may be at most "
                          f"{MAX_PRESET_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PresetError(f"{source}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as err:
        raise PresetError(f"{source}: not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    return parse_preset(data, source)


def load_preset_file(path: str | os.PathLike) -> Preset:
    """Load and validate one preset file. Files above 1 MiB are refused unread."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise PresetError(f"{source}: not a file")
        if size > MAX_PRESET_BYTES:
            raise PresetError(f"{source}: file is {size} bytes; a preset may be at most "
                              f"{MAX_PRESET_BYTES} bytes (1 MiB)")
        with path.open("rb") as f:
            raw = f.read(MAX_PRESET_BYTES + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise PresetError(f"{source}: no such preset file") from None
    except OSError as err:
        raise PresetError(f"{source}: cannot read: {err.strerror or err}") from None
    return parse_preset_text(raw, source)


def _builtin_dir():
    """The built-in presets: the installed package data, or presets/ in a source checkout."""
    from importlib import resources

    try:
        root = resources.files(BUILTIN_PACKAGE)
        if any(entry.name.endswith(".json") for entry in root.iterdir()):
            return root
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "presets"


def _builtin_files() -> dict:
    root = _builtin_dir()
    return {entry.name[:-5]: entry for entry in root.iterdir()
            if entry.name.endswith(".json") and entry.is_file()}


def builtin_names() -> list[str]:
    """Names of the presets shipped with cfg-textgen, sorted."""
    return sorted(_builtin_files())


def _looks_like_path(name_or_path) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    return text.endswith(".json") or "/" in text or os.sep in text


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """A preset from a `.json` file path or by the name of a built-in preset.

    An unknown name is an error listing the built-in names.
    """
    if _looks_like_path(name_or_path):
        return load_preset_file(name_or_path)
    files = _builtin_files()
    name = str(name_or_path)
    if name not in files and os.path.isfile(name):  # a file without .json; built-in names win
        return load_preset_file(name)
    if name not in files:
        raise PresetError(f"unknown preset {name!r}{_did_you_mean(name, files)}; built-in presets: "
                          f"{_choices(sorted(files))} (or give a path to a .json file)")
    entry = files[name]
    source = f"built-in preset {name} ({entry})"
    return parse_preset_text(entry.read_bytes(), source)


def list_presets() -> list[Preset]:
    """The built-in presets, sorted by name."""
    return [load_preset(name) for name in builtin_names()]


# ---- JSON Schema ----------------------------------------------------------------------------


def preset_schema() -> dict:
    """The preset format as a JSON Schema (draft 2020-12): pydantic's schema of `Preset`.

    It cannot express two rules that `parse_preset` also checks: numbers must be finite, and a
    sampler's rules between its parameters (repetition_penalty's slope).
    """
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://cfg-textgen.invalid/schema/cfg-textgen-preset-1.json", **_PRESET.json_schema(),
            "description": "CFG settings, the samplers in order of application, length, stop sequences "
                           "(docs/preset-format.md)"}


# the chain assembly (chain.py) is importable from here, as before
from .chain import build_chain, build_processors, generate_kwargs  # noqa: E402,F401

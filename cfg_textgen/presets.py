"""The preset model: load and validate preset JSON, describe it as a JSON Schema, build the chain.

A preset (docs/preset-format.md) is immutable data: `Preset`, `CFGSettings`, `SamplerSpec`.
Validation is strict and collects *every* problem of a preset before raising one `PresetError`
whose lines each name the source and the JSON path:

    presets/x.json: $.samplers[2].p: must be a number in (0, 1], got 1.5

The sampler parameters (types, defaults, ranges) come from the `Param` declarations of the
sampler classes in `cfg_textgen.samplers`; the JSON Schema is generated from the same declarations.

Choices made where the format is silent:
- An integer is accepted where a number is expected; a number with an integral value (`40.0`) is
  accepted where an integer is expected and stored as an `int`, as JSON Schema's "integer" does.
  `true`/`false` are never numbers.
- Non-finite numbers (`NaN`, `Infinity`, which Python's json accepts) are refused everywhere.
- A duplicate key in one JSON object is an error (the second value would silently win).
- For list parameters (`whitelist`), `min`/`max` of the `Param` apply to each element.
- `{"sampler": "cfg"}` is refused with a pointer to `$.cfg`: CFG is not part of the chain.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .errors import CFGTextgenError, PresetError

FORMAT = "cfg-textgen-preset/1"
OPPOSING_MODES = ("text", "last-token")
MAX_PRESET_BYTES = 1024 * 1024  # a preset is a few hundred bytes; anything above 1 MiB is a mistake
TOP_KEYS = ("format", "name", "description", "cfg", "samplers", "max_new_tokens", "stop", "do_sample")
CFG_KEYS = ("scale", "opposing_prompt", "opposing_mode")
BUILTIN_PACKAGE = "cfg_textgen.presets_data"


# ---- the immutable preset model -------------------------------------------------------------


@dataclass(frozen=True)
class CFGSettings:
    """Guidance settings: `guided = u + scale * (c - u)`; scale 1 means no opposing pass."""

    scale: float = 1.0
    opposing_prompt: str = ""
    opposing_mode: str = "text"  # "text" or "last-token"

    @property
    def active(self) -> bool:
        return self.scale != 1.0


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the chain: a registered sampler name and the parameters the preset gave.

    `params` holds only the parameters written in the preset (defaults are the sampler's); list
    values are stored as tuples so that a preset cannot be changed after validation.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.params).items()}
        object.__setattr__(self, "params", MappingProxyType(frozen))


@dataclass(frozen=True)
class Preset:
    """A validated preset. Build it with `parse_preset` / `load_preset`, not by hand."""

    name: str
    description: str = ""
    cfg: CFGSettings = CFGSettings()
    samplers: tuple[SamplerSpec, ...] = ()
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()
    do_sample: bool = True

    def to_dict(self) -> dict:
        """The JSON form: every top-level key, and per sampler only the parameters the preset gave
        (in the sampler's declaration order), so `parse_preset(p.to_dict(), ...) == p`."""
        registry = _registry()
        samplers = []
        for spec in self.samplers:
            order = [p.name for p in registry[spec.name].params] if spec.name in registry else []
            keys = [k for k in order if k in spec.params] + sorted(set(spec.params) - set(order))
            entry = {"sampler": spec.name}
            for k in keys:
                v = spec.params[k]
                entry[k] = list(v) if isinstance(v, tuple) else v
            samplers.append(entry)
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "cfg": {"scale": self.cfg.scale, "opposing_prompt": self.cfg.opposing_prompt,
                    "opposing_mode": self.cfg.opposing_mode},
            "samplers": samplers,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "do_sample": self.do_sample,
        }


# ---- validation -----------------------------------------------------------------------------


def _registry() -> dict:
    from .samplers import SAMPLERS

    return SAMPLERS


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _choices(names) -> str:
    return ", ".join(str(n) for n in names)


def _did_you_mean(word: str, names) -> str:
    names = list(names)
    close = (difflib.get_close_matches(word, names, n=1)
             or [n for n in names if word and n.startswith(word)][:1])
    return f" (did you mean {close[0]!r}?)" if close else ""


def _range_text(lo, hi, lo_excl, hi_excl) -> str:
    def num(x):
        return str(int(x)) if float(x).is_integer() else str(x)

    if lo is not None and hi is not None:
        return f" in {'(' if lo_excl else '['}{num(lo)}, {num(hi)}{')' if hi_excl else ']'}"
    if lo is not None:
        return f" {'>' if lo_excl else '>='} {num(lo)}"
    if hi is not None:
        return f" {'<' if hi_excl else '<='} {num(hi)}"
    return ""


def _in_range(x, lo, hi, lo_excl, hi_excl) -> bool:
    if lo is not None and (x <= lo if lo_excl else x < lo):
        return False
    if hi is not None and (x >= hi if hi_excl else x > hi):
        return False
    return True


class _Checker:
    """Collects (path, message) pairs for one preset."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(f"{self.source}: {path}: {message}")

    def obj(self, value, path: str, allowed: tuple[str, ...], what: str) -> bool:
        """Check that `value` is an object with only `allowed` keys (reported with the choices)."""
        if not isinstance(value, dict):
            self.add(path, f"must be an object, got {_json_type(value)} {_show(value)}")
            return False
        for key in getattr(value, "duplicates", ()):
            self.add(f"{path}.{key}", "duplicate key (the second value would silently win)")
        for key in value:
            if key not in allowed:
                self.add(f"{path}.{key}", f"unknown key{_did_you_mean(key, allowed)}; "
                                          f"valid {what} keys: {_choices(allowed)}")
        return True

    def number(self, value, path: str, *, integer=False, lo=None, hi=None, lo_excl=False,
               hi_excl=False, what=None):
        """Return the checked number (int for integers) or None after recording an error."""
        what = what or ("an integer" if integer else "a number")
        rule = f"must be {what}{_range_text(lo, hi, lo_excl, hi_excl)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(path, f"{rule}, got {_json_type(value)} {_show(value)}")
            return None
        if not math.isfinite(value):
            self.add(path, f"{rule} (finite), got {_show(value)}")
            return None
        if integer:
            if isinstance(value, float) and not value.is_integer():
                self.add(path, f"{rule}, got {_show(value)}")
                return None
            value = int(value)
        if not _in_range(value, lo, hi, lo_excl, hi_excl):
            self.add(path, f"{rule}, got {_show(value)}")
            return None
        return value

    def string(self, value, path: str, *, non_empty=False, non_blank=False, choices=None):
        if not isinstance(value, str):
            self.add(path, f"must be a string, got {_json_type(value)} {_show(value)}")
            return None
        if choices is not None and value not in choices:
            self.add(path, f"must be one of {_choices(_show(c) for c in choices)}, got {_show(value)}")
            return None
        if non_empty and not value:
            self.add(path, f"must be a non-empty string, got {_show(value)}")
            return None
        if non_blank and not value.strip():
            self.add(path, f"must be a non-empty string (not only spaces), got {_show(value)}")
            return None
        return value

    def param(self, p, value, path: str):
        """Check one sampler parameter against its `Param` declaration."""
        if p.kind is list:
            if not isinstance(value, list):
                self.add(path, f"must be an array, got {_json_type(value)} {_show(value)}")
                return None
            items = [self.scalar(p, p.item_kind, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return None if any(v is None for v in items) else items
        return self.scalar(p, p.kind, value, path)

    def scalar(self, p, kind, value, path: str):
        if p.choices is not None:
            # `true == 1` in Python: a boolean only matches the choices of a boolean parameter
            same_kind = isinstance(value, bool) == (kind is bool) and not isinstance(value, (list, dict))
            if not same_kind or value not in p.choices:
                choices = _choices(_show(c) for c in p.choices)
                self.add(path, f"must be one of {choices}, got {_show(value)}")
                return None
            return int(value) if kind is int else value
        if kind in (int, float):
            return self.number(value, path, integer=kind is int, lo=p.min, hi=p.max,
                               lo_excl=p.min_exclusive, hi_excl=p.max_exclusive)
        if kind is bool:
            if not isinstance(value, bool):
                self.add(path, f"must be true or false, got {_json_type(value)} {_show(value)}")
                return None
            return value
        if kind is str:
            return self.string(value, path)
        if kind is None:  # untyped list item: any JSON scalar
            return value
        self.add(path, f"has an unsupported parameter type {kind.__name__} (a bug in samplers.py)")
        return None


def _parse_sampler(check: _Checker, entry, path: str) -> SamplerSpec | None:
    registry = _registry()
    if not isinstance(entry, dict):
        check.add(path, f"must be a sampler object like {{\"sampler\": \"temperature\", ...}}, "
                        f"got {_json_type(entry)} {_show(entry)}")
        return None
    if "sampler" not in entry:
        check.add(path, f"missing key \"sampler\"; valid samplers: {_choices(sorted(registry))}")
        return None
    name = entry["sampler"]
    if not isinstance(name, str):
        check.add(f"{path}.sampler", f"must be a string naming a sampler, got {_json_type(name)} "
                                     f"{_show(name)}; valid samplers: {_choices(sorted(registry))}")
        return None
    if name == "cfg":
        check.add(f"{path}.sampler", "CFG is not a chain sampler: set it under $.cfg "
                                     "(it always runs first)")
        return None
    if name not in registry:
        check.add(f"{path}.sampler", f"unknown sampler {_show(name)}{_did_you_mean(name, registry)}; "
                                     f"valid samplers: {_choices(sorted(registry))}")
        return None
    cls = registry[name]
    declared = {p.name: p for p in cls.params}
    before = len(check.errors)
    check.obj(entry, path, ("sampler", *declared), f"{name!r}")
    params = {}
    for key, value in entry.items():
        if key in declared:
            checked = check.param(declared[key], value, f"{path}.{key}")
            if checked is not None:
                params[key] = checked
    if len(check.errors) > before:
        return None
    if not cls.needs_tokenizer:
        # rules between parameters (if any) live in the sampler's constructor: ask it
        try:
            cls.from_params(dict(params))
        except (ValueError, TypeError) as err:
            check.add(path, str(err))
            return None
    return SamplerSpec(name, params)


def parse_preset(data: Any, source: str = "<preset>") -> Preset:
    """Validate preset JSON data (already parsed) and return the immutable `Preset`.

    All problems are collected; one `PresetError` lists them, one line each, as
    `SOURCE: $.json.path: what is wrong, got VALUE` (with the valid choices where there are some).
    The error's `errors` attribute holds the lines as a tuple.
    """
    check = _Checker(source)
    if not check.obj(data, "$", TOP_KEYS, "top-level"):
        _raise(check)
    kw: dict[str, Any] = {}

    if "format" in data:
        check.string(data["format"], "$.format", choices=(FORMAT,))
    if "name" not in data:
        check.add("$", "missing required key \"name\"")
    else:
        kw["name"] = check.string(data["name"], "$.name", non_blank=True)
    if "description" in data:
        kw["description"] = check.string(data["description"], "$.description")

    if "cfg" in data and check.obj(data["cfg"], "$.cfg", CFG_KEYS, "cfg"):
        cfg = data["cfg"]
        ckw = {}
        if "scale" in cfg:
            scale = check.number(cfg["scale"], "$.cfg.scale")
            ckw["scale"] = float(scale) if scale is not None else None
        if "opposing_prompt" in cfg:
            ckw["opposing_prompt"] = check.string(cfg["opposing_prompt"], "$.cfg.opposing_prompt")
        if "opposing_mode" in cfg:
            ckw["opposing_mode"] = check.string(cfg["opposing_mode"], "$.cfg.opposing_mode",
                                                choices=OPPOSING_MODES)
        if ckw.get("opposing_mode") == "last-token" and ckw.get("opposing_prompt"):
            check.add("$.cfg.opposing_prompt",
                      "must be \"\" when opposing_mode is \"last-token\" (that mode takes the "
                      "opposing branch from the last prompt token), "
                      f"got {_show(ckw['opposing_prompt'])}")
        if None not in ckw.values():
            kw["cfg"] = CFGSettings(**ckw)

    if "samplers" in data:
        samplers = data["samplers"]
        if not isinstance(samplers, list):
            check.add("$.samplers", f"must be an array of sampler objects, got "
                                    f"{_json_type(samplers)} {_show(samplers)}")
        else:
            specs = [_parse_sampler(check, e, f"$.samplers[{i}]") for i, e in enumerate(samplers)]
            kw["samplers"] = tuple(specs)

    if "max_new_tokens" in data:
        kw["max_new_tokens"] = check.number(data["max_new_tokens"], "$.max_new_tokens",
                                            integer=True, lo=1)
    if "stop" in data:
        stop = data["stop"]
        if not isinstance(stop, list):
            check.add("$.stop", f"must be an array of strings, got {_json_type(stop)} {_show(stop)}")
        else:
            kw["stop"] = tuple(check.string(s, f"$.stop[{i}]", non_empty=True)
                               for i, s in enumerate(stop))
    if "do_sample" in data:
        value = data["do_sample"]
        if not isinstance(value, bool):
            check.add("$.do_sample", f"must be true or false, got {_json_type(value)} {_show(value)}")
        kw["do_sample"] = value

    if check.errors:
        _raise(check)
    return Preset(**kw)


def _raise(check: _Checker):
    err = PresetError("\n".join(check.errors))
    err.errors = tuple(check.errors)
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


def _param_schema(p) -> dict:
    def scalar(kind) -> dict:
        if p.choices is not None:
            return {"enum": list(p.choices)}
        if kind in (int, float):
            s: dict[str, Any] = {"type": "integer" if kind is int else "number"}
            if p.min is not None:
                s["exclusiveMinimum" if p.min_exclusive else "minimum"] = p.min
            if p.max is not None:
                s["exclusiveMaximum" if p.max_exclusive else "maximum"] = p.max
            return s
        return {bool: {"type": "boolean"}, str: {"type": "string"}}.get(kind, {})

    schema = ({"type": "array", "items": scalar(p.item_kind)} if p.kind is list else scalar(p.kind))
    if p.doc:
        schema["description"] = p.doc
    schema["default"] = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
    return schema


def preset_schema() -> dict:
    """The preset format as a JSON Schema (draft 2020-12), generated from the `Param` declarations.

    It cannot express two rules that `parse_preset` also checks: numbers must be finite, and a
    sampler's cross-parameter rules (its constructor's checks).
    """
    registry = _registry()
    defs = {}
    for name in sorted(registry):
        cls = registry[name]
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        defs[f"sampler.{name}"] = {
            "type": "object",
            **({"description": doc} if doc else {}),
            "properties": {"sampler": {"const": name},
                           **{p.name: _param_schema(p) for p in cls.params}},
            "required": ["sampler"],
            "additionalProperties": False,
        }
    items = {"oneOf": [{"$ref": f"#/$defs/{key}"} for key in defs]} if defs else False
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfg-textgen.invalid/schema/cfg-textgen-preset-1.json",
        "title": "cfg-textgen preset (format cfg-textgen-preset/1)",
        "type": "object",
        "properties": {
            "format": {"const": FORMAT, "default": FORMAT},
            "name": {"type": "string", "minLength": 1, "pattern": r"\S"},
            "description": {"type": "string", "default": ""},
            "cfg": {
                "type": "object",
                "properties": {
                    "scale": {"type": "number", "default": 1.0,
                              "description": "guidance scale in u + scale*(c - u); 1 = off"},
                    "opposing_prompt": {"type": "string", "default": ""},
                    "opposing_mode": {"enum": list(OPPOSING_MODES), "default": "text"},
                },
                "additionalProperties": False,
                # last-token mode takes the opposing branch from the prompt: no opposing text
                "if": {"properties": {"opposing_mode": {"const": "last-token"}},
                       "required": ["opposing_mode"]},
                "then": {"properties": {"opposing_prompt": {"const": ""}}},
            },
            "samplers": {"type": "array", "items": items, "default": []},
            "max_new_tokens": {"type": "integer", "minimum": 1, "default": 200},
            "stop": {"type": "array", "items": {"type": "string", "minLength": 1}, "default": []},
            "do_sample": {"type": "boolean", "default": True},
        },
        "required": ["name"],
        "additionalProperties": False,
        "$defs": defs,
    }


# ---- from a preset to logits processors -----------------------------------------------------


def build_chain(preset: Preset, tokenizer=None, generator=None):
    """Fresh sampler objects in the preset's order, as a `LogitsProcessorList`.

    Call it once per generation: samplers such as mirostat keep state while generating.
    `generator` (a `torch.Generator`) goes to samplers whose `from_params` accepts it.
    """
    from transformers import LogitsProcessorList

    registry = _registry()
    chain = LogitsProcessorList()
    for i, spec in enumerate(preset.samplers):
        if spec.name not in registry:
            raise PresetError(f"preset {preset.name}: samplers[{i}]: unknown sampler {spec.name!r}; "
                              f"valid samplers: {_choices(sorted(registry))}")
        cls = registry[spec.name]
        if cls.needs_tokenizer and tokenizer is None:
            raise CFGTextgenError(f"preset {preset.name}: sampler {spec.name!r} needs a tokenizer")
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.params.items()}
        if generator is not None and "generator" in inspect.signature(cls.from_params).parameters:
            sampler = cls.from_params(params, tokenizer=tokenizer, generator=generator)
        else:
            sampler = cls.from_params(params, tokenizer=tokenizer)
            if generator is not None and "generator" in inspect.signature(cls).parameters:
                sampler.generator = generator  # random samplers (xtc) draw from it
        chain.append(sampler)
    return chain


def build_processors(preset: Preset, model=None, tokenizer=None, generator=None):
    """`CFGLogitsProcessor` first (scale != 1; needs the model), then a fresh `build_chain`: the
    samplers see the story's raw logits without CFG and the guided scores on that scale with it,
    as in the engine."""
    from transformers import LogitsProcessorList

    from .guidance import CFGLogitsProcessor

    processors = LogitsProcessorList()
    if preset.cfg.active:
        if model is None:
            raise CFGTextgenError(f"preset {preset.name}: CFG (scale {preset.cfg.scale}) needs the model "
                                  "for its opposing branch: generate_kwargs(preset, model, tokenizer)")
        processors.append(CFGLogitsProcessor(
            model, scale=preset.cfg.scale, opposing_prompt=preset.cfg.opposing_prompt,
            tokenizer=tokenizer, mode=preset.cfg.opposing_mode))
    processors.extend(build_chain(preset, tokenizer, generator))
    return processors


# Every GenerationConfig field that makes `generate` add a logits processor or warper of its own
# (transformers 5 `_get_logits_processor`), or change the decoding mode, with its neutral value.
# A model's generation_config.json may set any of them (top_k 50, temperature 0.6, ...), and the
# global default top_k is 50: without these, a sampler would run twice or a foreign one would run.
_NEUTRAL = {
    "temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": None, "top_h": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": None, "sequence_bias": None, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None,
    "watermarking_config": None, "renormalize_logits": False,
    # one sequence, no beams, no contrastive / constrained / assisted decoding
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "constraints": None,
    "force_words_ids": None, "prompt_lookup_num_tokens": None,
}


def generate_kwargs(preset: Preset, model=None, tokenizer=None, generator=None) -> dict:
    """Keyword arguments for `model.generate(input_ids, **kwargs)` that apply the preset exactly once.

    transformers' own warpers and penalties are neutralised (whatever the model's
    generation_config says) and the preset's processors are passed as `logits_processor`.
    A preset with CFG (scale != 1) needs the `model`; text stop sequences need the `tokenizer`
    (`generate` keeps the stop text in its output; trim it).
    """
    from transformers import GenerationConfig

    known = GenerationConfig()
    kwargs = {k: v for k, v in _NEUTRAL.items() if hasattr(known, k)}  # older transformers lack some
    kwargs["do_sample"] = preset.do_sample
    kwargs["max_new_tokens"] = preset.max_new_tokens
    if preset.stop and tokenizer is not None:
        kwargs["stop_strings"] = list(preset.stop)
        kwargs["tokenizer"] = tokenizer
    kwargs["logits_processor"] = build_processors(preset, model, tokenizer, generator)
    return kwargs

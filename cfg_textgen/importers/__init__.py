"""Foreign sampler presets in, ours out (and back): NovelAI, SillyTavern, KoboldAI/KoboldCpp and
text-generation-webui. The format is recognised by content, never by file name.

    preset, report = import_preset("Golden Arrow.preset")
    print(report.render())                     # every source key: mapped, neutral or not carried over
    data, report = export_preset(preset, "novelai")

See docs/importing.md for the decisions taken where a format leaves semantics open.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import PresetError
from ..presets import Preset, parse_preset
from . import kobold, novelai, sillytavern, textgen_webui
from ._common import build, parse_text, read_source
from .report import DROPPED, MAPPED, NEUTRAL, Report

__all__ = ["import_preset", "import_bundle", "export_preset", "detect_format", "Report", "EXPORT_FORMATS",
           "MAPPED", "NEUTRAL", "DROPPED"]

EXPORT_FORMATS = ("sillytavern-textgen", "novelai")


def detect_format(data: Any) -> str:
    """Name the format of already-parsed preset data, by its keys."""
    if isinstance(data, list):
        if kobold.looks_like_bundle(data):
            return "koboldai-bundle"
        raise PresetError("a JSON array, but not a KoboldAI bundle of preset objects")
    if not isinstance(data, dict):
        raise PresetError(f"expected a preset object, got {type(data).__name__}")
    if "samplers" in data and "format" in data:
        return "cfg-textgen"
    if novelai.looks_official(data):
        return "novelai"
    if novelai.looks_flat(data):
        return "novelai-sillytavern"
    if sillytavern.looks_like(data):
        return "sillytavern-textgen"
    if kobold.looks_like(data):
        return "koboldai"
    if textgen_webui.looks_like(data):
        return "textgen-webui"
    raise PresetError(
        "unrecognised preset format (known: NovelAI .preset, SillyTavern NovelAI / Text Completion / "
        f"KoboldAI presets, KoboldAI United bundles, KoboldCpp settings, text-generation-webui YAML); "
        f"keys: {', '.join(sorted(map(str, data))[:12])}")


def _load(path_or_text) -> tuple[Any, str, str | None]:
    if isinstance(path_or_text, (dict, list)):
        return copy.deepcopy(path_or_text), "<data>", None
    text, source, stem = read_source(path_or_text)
    return parse_text(text, source), source, stem


def import_preset(path_or_text, name: str | None = None) -> tuple[dict, Report]:
    """Translate one foreign preset (a path, the file's text, or parsed data) into our preset dict.

    Returns the preset dict (the JSON form of a valid `Preset`) and the Report. For a KoboldAI
    bundle, `name` picks the entry; a bundle of one needs no name. Raises PresetError naming the
    source on any problem.
    """
    data, source, stem = _load(path_or_text)
    try:
        fmt = detect_format(data)
    except PresetError as err:
        raise err.within(source) from None
    if fmt == "koboldai-bundle":
        if name is None and len(data) > 1:
            raise PresetError(f"{source}: a KoboldAI bundle of {len(data)} presets "
                              f"({', '.join(kobold.bundle_names(data))}); choose one with a name")
        i, entry = kobold.pick(data, name, source) if name else (0, data[0])
        preset, report = kobold.import_preset(entry, source, None, stem, prefix=f"[{i}].",
                                              fmt="KoboldAI United preset bundle")
        report.note(f"Entry {i} of the bundle ({len(data)} presets).")
    elif fmt == "cfg-textgen":
        raise PresetError(f"{source}: already a cfg-textgen preset; use it directly")
    else:
        importer = {
            "novelai": novelai.import_official, "novelai-sillytavern": novelai.import_flat,
            "sillytavern-textgen": sillytavern.import_preset, "koboldai": kobold.import_preset,
            "textgen-webui": textgen_webui.import_yaml,
        }[fmt]
        preset, report = importer(data, source, name, stem)
    build(preset, source)
    return preset, report


def import_bundle(path_or_text) -> list[tuple[dict, Report]]:
    """Import every entry of a KoboldAI United bundle (any other file gives a list of one)."""
    data, source, stem = _load(path_or_text)
    if not kobold.looks_like_bundle(data):
        return [import_preset(data if source == "<data>" else path_or_text)]
    out = []
    for i, entry in enumerate(data):
        preset, report = kobold.import_preset(entry, source, None, f"{stem or 'preset'}-{i}", prefix=f"[{i}].",
                                              fmt="KoboldAI United preset bundle")
        build(preset, source)
        out.append((preset, report))
    return out


def export_preset(preset, fmt: str) -> tuple[dict, Report]:
    """Write our preset (a Preset or its dict) out as `fmt`; keys with no equivalent are reported."""
    if fmt not in EXPORT_FORMATS:
        raise PresetError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(preset, Preset):
        preset = dict(preset)
        preset = parse_preset(preset, f"preset {preset.get('name', 'preset')!r}")
    data = preset.to_dict()  # every sampler with all its parameters, the defaults from the model:
    data["samplers"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in s} for s in preset.samplers]
    report = Report(f"preset {data['name']!r}", f"export to {fmt}")
    out = (sillytavern.export if fmt == "sillytavern-textgen" else novelai.export)(data, report)
    return out, report

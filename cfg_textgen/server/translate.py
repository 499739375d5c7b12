"""A request's sampler fields -> the one Preset model, by the importers that read the same app's
preset files (importers/textgen_webui.py, importers/kobold.py): import and API cannot drift."""

from __future__ import annotations

from ..errors import PresetError
from ..importers import kobold, textgen_webui
from ..presets import builtin_names, load_preset, parse_preset
from .errors import APIError, from_preset_error

WEBUI_FLAVOUR, KOBOLD_FLAVOUR = "webui", "kobold"


def flavour_of_completion(body: dict) -> str:
    """SillyTavern's "KoboldCpp" text-completion type posts to /v1/completions too, with KoboldCpp's
    field names (`sampler_order`, `rep_pen`); its "Text Generation WebUI" type sends
    `sampler_priority`. Both send `api_type`."""
    if body.get("api_type") == "koboldcpp":
        return KOBOLD_FLAVOUR
    if body.get("api_type") in (None, "") and "sampler_order" in body and "sampler_priority" not in body:
        return KOBOLD_FLAVOUR
    return WEBUI_FLAVOUR


def build_preset(body: dict, flavour: str, max_new_tokens: int, stop: list[str],
                 preset_name: str | None = None, renames: dict[str, str] | None = None):
    """(Preset, skipped) for a request: samplers and CFG from the flavour's importer (or from a
    built-in preset named by the web UI's `preset` field, whose sampler settings win as in the web
    UI), length and stop strings from the envelope (already checked by the caller). `skipped`
    lists the `sampler_priority` / `sampler_order` entries the importer did not know and skipped,
    as the imitated app does, for the response header and the request log."""
    try:
        if flavour == KOBOLD_FLAVOUR:
            view = {k: v for k, v in body.items() if k not in ("max_length", "stop_sequence")}
            data, report = kobold.import_request(view)
        else:
            data, report = textgen_webui.import_request(body)
    except PresetError as err:
        raise from_preset_error(err, None, None, renames) from None
    if preset_name is not None:
        if preset_name not in builtin_names():
            raise APIError(400, f"`preset`: no built-in preset named {preset_name!r}; known: "
                                f"{', '.join(builtin_names())}", "preset")
        base = load_preset(preset_name).to_dict()
        data["samplers"], data["do_sample"] = base["samplers"], base["do_sample"]
        if "guidance_scale" not in body:
            data["cfg"] = base["cfg"]
    data["max_new_tokens"] = max_new_tokens
    data["stop"] = list(dict.fromkeys(list(data.get("stop", [])) + stop))
    try:
        return parse_preset(data, "request"), list(report.skipped)
    except PresetError as err:
        raise from_preset_error(err, data, report, renames) from None

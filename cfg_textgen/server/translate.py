"""A request's sampler fields -> the one Preset model, by the importers that read the same app's
preset files (importers/textgen_webui.py, importers/kobold.py): import and API cannot drift."""

from __future__ import annotations

from ..errors import PresetError
from ..grammar import GrammarError, check_grammar
from ..importers import kobold, llamacpp_server, textgen_webui
from ..presets import builtin_names, load_preset, parse_preset
from .errors import APIError, from_preset_error

WEBUI_FLAVOUR, KOBOLD_FLAVOUR, LLAMACPP_FLAVOUR = "webui", "kobold", "llama.cpp"


def flavour_of_completion(body: dict) -> str:
    """SillyTavern's "KoboldCpp" text-completion type posts to /v1/completions too, with KoboldCpp's
    field names (`sampler_order`, `rep_pen`); its "Text Generation WebUI" type sends
    `sampler_priority`. Both send `api_type`."""
    if body.get("api_type") == "koboldcpp":
        return KOBOLD_FLAVOUR
    if body.get("api_type") in (None, "") and "sampler_order" in body and "sampler_priority" not in body:
        return KOBOLD_FLAVOUR
    return WEBUI_FLAVOUR


# a request's sampler fields, per flavour: sending any of them means "my samplers, not the server's"
SAMPLER_KEYS = {WEBUI_FLAVOUR: textgen_webui.PRESET_KEYS - {"guidance_scale", "negative_prompt"},
                KOBOLD_FLAVOUR: kobold.REQUEST_KEYS - {"max_length", "stop_sequence"},
                LLAMACPP_FLAVOUR: llamacpp_server.REQUEST_KEYS - {"guidance_scale", "negative_prompt"}}


def build_preset(body: dict, flavour: str, max_new_tokens: int, stop: list[str],
                 preset_name: str | None = None, renames: dict[str, str] | None = None, *, defaults=None,
                 vocab_size: int | None = None):
    """(Preset, skipped) for a request: samplers and CFG from the flavour's importer, the server's
    defaults where the request is silent (defaults.py), or a built-in preset named by the web UI's
    `preset` field (whose sampler settings win, as in the web UI); length and stop strings from
    the envelope (already checked by the caller). `skipped` lists the `sampler_priority` /
    `sampler_order` entries the importer did not know and skipped, as the imitated app does, for
    the response header and the request log. `vocab_size` bounds the token ids of bias and bans."""
    try:
        if flavour == KOBOLD_FLAVOUR:
            view = {k: v for k, v in body.items() if k not in ("max_length", "stop_sequence")}
            data, report = kobold.import_request(view, vocab_size=vocab_size)
        elif flavour == LLAMACPP_FLAVOUR:
            data, report = llamacpp_server.import_request(body, vocab_size=vocab_size)
        else:
            data, report = textgen_webui.import_request(body, vocab_size=vocab_size)
    except PresetError as err:
        raise from_preset_error(err, None, None, renames) from None
    if defaults is not None:
        data = defaults.apply(data, body, "guidance_scale", "negative_prompt", SAMPLER_KEYS[flavour])
    if preset_name is not None:
        if preset_name not in builtin_names():
            raise APIError(400, f"`preset`: no built-in preset named {preset_name!r}; known: "
                                f"{', '.join(builtin_names())}", "preset")
        base = load_preset(preset_name).to_dict()
        steering = [s for s in data["samplers"] if s["sampler"] == "logit_bias"]  # the request's own
        data["samplers"], data["do_sample"] = steering + base["samplers"], base["do_sample"]
        if "guidance_scale" not in body:
            data["cfg"] = base["cfg"]
    data["max_new_tokens"] = max_new_tokens
    data["stop"] = list(dict.fromkeys(list(data.get("stop", [])) + stop))
    try:
        return parse_preset(data, "request"), list(report.skipped)
    except PresetError as err:
        raise from_preset_error(err, data, report, renames) from None


def check_request_grammar(service, preset, body: dict, fields: tuple[str, ...]) -> None:
    """A request's grammar must parse on the loaded backend: else a 400 naming the field that held it."""
    if not preset.grammar:
        return
    field = next((f for f in fields if isinstance(body.get(f), str) and body[f] == preset.grammar), fields[0])
    try:
        check_grammar(service.backend, preset.grammar)
    except GrammarError as err:
        raise APIError(400, f"`{field}`: {err}", field) from None

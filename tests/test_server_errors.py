"""The server names the request field from the library's typed errors (`field`, `problems`), never
from their words: the same typed error with any message names the same field, and real errors
from the engine, the importers and the preset model carry the field they are about."""

from __future__ import annotations

import pytest

from cfg_textgen.errors import ContextError, PresetError, PresetProblem, SettingError
from cfg_textgen.importers import textgen_webui
from cfg_textgen.server.errors import from_engine_error, from_preset_error
from cfg_textgen.server.translate import WEBUI_FLAVOUR, build_preset

WORDS = ["", "something else entirely", "the `prompt` is fine: `scale`"]  # misleading text too


@pytest.mark.parametrize("words", WORDS)
@pytest.mark.parametrize("engine_field,length_field,request_field", [
    ("max_new_tokens", "max_tokens", "max_tokens"), ("max_new_tokens", "max_length", "max_length"),
    ("prompt", "max_tokens", "prompt"), ("opposing_prompt", "max_tokens", "negative_prompt"),
    ("scale", "max_length", "guidance_scale")])
def test_engine_error_names_the_request_field_whatever_its_words(words, engine_field, length_field,
                                                                  request_field):
    err = from_engine_error(ContextError(words, field=engine_field), length_field)
    assert (err.status, err.field) == (400, request_field)
    assert f"`{request_field}`" in err.message


def test_engine_setting_error_keeps_the_rule_in_its_message():
    err = from_engine_error(SettingError("scale", "a finite number", float("nan")), "max_tokens")
    assert err.field == "guidance_scale" and "a finite number" in err.message


@pytest.mark.parametrize("words", WORDS)
def test_preset_validation_error_is_traced_by_its_json_path_not_its_words(words):
    data, report = textgen_webui.import_request({"top_k": 40, "temperature": 0.7})
    k = next(i for i, s in enumerate(data["samplers"]) if s["sampler"] == "top_k")
    err = PresetError(words, problems=[PresetProblem(("samplers", k, "k"), "must be an integer >= 0")])
    api = from_preset_error(err, data, report)
    assert api.field == "top_k" and api.message == "`top_k`: must be an integer >= 0"
    cfg = PresetError(words, problems=[PresetProblem(("cfg", "opposing_prompt"), "must be a string")])
    assert from_preset_error(cfg, data, report).field == "negative_prompt"


@pytest.mark.parametrize("words", WORDS)
def test_importer_error_names_its_source_key_whatever_its_words(words):
    err = PresetError(words, field="sampler_priority[1]", rule="unknown sampler name 'warp'")
    api = from_preset_error(err, None, None, {"sampler_priority[1]": "samplers[1]"})
    assert api.field == "samplers[1]" and api.message == "`samplers[1]`: unknown sampler name 'warp'"


def test_real_importer_and_preset_errors_carry_their_field():
    with pytest.raises(PresetError) as info:
        textgen_webui.import_request({"top_p": 1.5})
    assert info.value.field == "top_p" and "[0, 1]" in info.value.rule
    with pytest.raises(Exception) as api:
        build_preset({"top_k": -3}, WEBUI_FLAVOUR, 8, [])
    assert api.value.field == "top_k" and ">= 0" in api.value.message


def test_real_engine_errors_carry_their_field(tiny_tokenizer):
    from cfg_textgen.engine import Generation
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    with pytest.raises(SettingError) as bad_scale:
        Generation(model, tiny_tokenizer, "Once", scale=float("inf"))
    assert bad_scale.value.field == "scale"
    with pytest.raises(SettingError) as last_token:
        Generation(model, tiny_tokenizer, "Once", scale=1.5, opposing_mode="last-token", opposing_prompt="x")
    assert last_token.value.field == "opposing_prompt"
    with pytest.raises(ContextError) as too_long:
        Generation(model, tiny_tokenizer, "Once upon a time " * 200, max_new_tokens=8, truncate=False)
    assert too_long.value.field == "prompt"
    with pytest.raises(ContextError) as no_room:
        Generation(model, tiny_tokenizer, "Once", max_new_tokens=100_000)
    assert no_room.value.field == "max_new_tokens"

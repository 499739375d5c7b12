"""Logit bias, token bans and grammars through the importers and exporters: what each app's key
means (read from the apps' sources, see cfg_textgen/importers/steering.py), what maps and what the
report says does not."""

from __future__ import annotations

import pytest

from cfg_textgen.errors import PresetError
from cfg_textgen.importers import DROPPED, MAPPED, NEUTRAL, export_preset, import_preset, kobold, textgen_webui
from cfg_textgen.presets import parse_preset

GRAMMAR = 'root ::= ("yes" | "no")'


def first(data) -> dict:
    return data["samplers"][0]


def test_webui_request_logit_bias_minus_100_bans_and_the_rest_is_added_first_in_the_chain():
    data, report = textgen_webui.import_request({"logit_bias": {"5": -100, "6": 3, "7": 0, "8": -250},
                                                 "custom_token_bans": "9, 10,", "banned_tokens": [11],
                                                 "temperature": 0.7, "grammar_string": GRAMMAR})
    assert first(data) == {"sampler": "logit_bias", "bias": {"6": 3.0}, "ban": [5, 8, 9, 10, 11]}
    assert data["samplers"][1]["sampler"] == "temperature" and data["grammar"] == GRAMMAR
    assert {k: report.status(k) for k in ("logit_bias", "custom_token_bans", "banned_tokens", "grammar_string")} \
        == dict.fromkeys(("logit_bias", "custom_token_bans", "banned_tokens", "grammar_string"), MAPPED)


def test_kobold_request_logit_bias_is_clamped_and_added_as_koboldcpp_does():
    data, report = kobold.import_request({"logit_bias": {"5": -100, "6": 300}, "banned_tokens": [11, "a phrase"],
                                          "custom_token_bans": "1,x,2", "grammar": GRAMMAR})
    assert first(data) == {"sampler": "logit_bias", "bias": {"5": -100.0, "6": 100.0}, "ban": [1, 2, 11]}
    assert data["grammar"] == GRAMMAR
    assert data["banned_strings"] == ["a phrase"]  # KoboldCpp's strings are phrases; the id is a token
    assert report.status("banned_tokens") == MAPPED and "banned_strings" in report.entries["banned_tokens"].detail


def test_kobold_request_banned_strings_count_only_without_banned_tokens():
    data, report = kobold.import_request({"banned_strings": ["A Shiver", ""], "custom_token_bans": "3"})
    assert data["banned_strings"] == ["A Shiver"] and first(data)["ban"] == [3]
    data, report = kobold.import_request({"banned_strings": ["ignored"], "banned_tokens": ["kept", "kept"]})
    assert data["banned_strings"] == ["kept"] and report.status("banned_strings") == DROPPED


def test_webui_request_banned_strings_are_phrases_a_list_or_one_string():
    data, report = textgen_webui.import_request({"banned_strings": ["a testament to", "x"], "banned_tokens": ["x", 4]})
    assert data["banned_strings"] == ["x", "a testament to"] and first(data)["ban"] == [4]
    assert report.status("banned_strings") == MAPPED
    assert textgen_webui.import_request({"banned_strings": "one phrase"})[0]["banned_strings"] == ["one phrase"]
    assert "banned_strings" not in textgen_webui.import_request({"banned_strings": []})[0]
    with pytest.raises(PresetError, match="^request: banned_strings: must be a list of strings"):
        textgen_webui.import_request({"banned_strings": ["ok", 5]})


@pytest.mark.parametrize("body,key", [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": [5]}, "logit_bias"),
                                      ({"logit_bias": {"5": True}}, "logit_bias"),
                                      ({"custom_token_bans": "1,b"}, "custom_token_bans"),
                                      ({"banned_tokens": [1.5]}, "banned_tokens"),
                                      ({"logit_bias": {"400": 1}}, "logit_bias")])
def test_webui_request_bad_token_fields_name_the_key(body, key):
    with pytest.raises(PresetError, match=f"^request: {key}: "):
        textgen_webui.import_request(body, vocab_size=400)


NOVELAI = {"presetVersion": 3, "name": "biased", "parameters": {
    "textGenerationSettingsVersion": 7, "temperature": 0.9, "order": [{"id": "temperature", "enabled": True}],
    "logit_bias_exp": [{"sequence": [100], "bias": -0.5, "ensure_sequence_finish": False, "generate_once": False},
                       {"sequence": [200, 201], "bias": 1.0, "ensure_sequence_finish": True, "generate_once": False},
                       {"sequence": [300], "bias": 2.0, "ensure_sequence_finish": False, "generate_once": True}],
    "bad_words_ids": [[7], [8, 9]]}}


def test_novelai_one_token_biases_and_bans_map_and_the_report_says_what_does_not():
    data, report = import_preset(NOVELAI)
    assert first(data) == {"sampler": "logit_bias", "bias": {"100": -0.5}, "ban": [7]}
    bias = report.entries["parameters.logit_bias_exp"]
    assert bias.status == MAPPED and "[1] biases a sequence of 2 tokens" in bias.detail and "[2] generate_once" in bias.detail
    assert "[1] bans a sequence of 2 tokens" in report.entries["parameters.bad_words_ids"].detail
    assert any("NovelAI's tokenizer" in note for note in report.notes)


def test_novelai_only_sequences_is_dropped():
    data, report = import_preset({**NOVELAI, "parameters": {**NOVELAI["parameters"], "bad_words_ids": [[1, 2]],
                                                            "logit_bias_exp": []}})
    assert report.status("parameters.bad_words_ids") == DROPPED
    assert report.status("parameters.logit_bias_exp") == NEUTRAL
    assert all(s["sampler"] != "logit_bias" for s in data["samplers"])


STEERED = {"name": "steered", "grammar": GRAMMAR,
           "samplers": [{"sampler": "logit_bias", "bias": {"12": -2.5, "40": 1.0}, "ban": [7, 9]},
                        {"sampler": "temperature", "temperature": 0.8}]}


@pytest.mark.parametrize("fmt", ["novelai", "sillytavern-textgen"])
def test_export_and_import_keep_logit_bias_and_bans(fmt):
    out, report = export_preset(parse_preset(STEERED), fmt)
    back, _ = import_preset(out)
    assert back["samplers"][:2] == STEERED["samplers"]
    if fmt == "novelai":
        assert "grammar" not in back and report.status("grammar") == DROPPED
    else:
        assert back["grammar"] == GRAMMAR and report.status("grammar") == MAPPED


def test_sillytavern_text_lines_need_its_tokenizer_and_are_reported():
    out, _ = export_preset(parse_preset(STEERED), "sillytavern-textgen")
    out["banned_tokens"] += '\n"a phrase"\nplain words'
    out["logit_bias"].append({"id": "x", "text": " city", "value": -5})
    back, report = import_preset(out)
    assert first(back) == STEERED["samplers"][0]
    assert back["banned_strings"] == ["a phrase"]  # a quoted line is a phrase (SillyTavern's banned_strings)
    assert "1 text lines" in report.entries["banned_tokens"].detail
    assert "1 entries given as text" in report.entries["logit_bias"].detail


@pytest.mark.parametrize("fmt", ["novelai", "sillytavern-textgen"])
def test_export_and_import_of_banned_strings(fmt):
    preset = parse_preset({**STEERED, "banned_strings": ["a testament to", "two\nlines"]})
    out, report = export_preset(preset, fmt)
    back, _ = import_preset(out)
    if fmt == "novelai":
        assert "banned_strings" not in back and report.status("banned_strings") == DROPPED
    else:  # quoted lines of banned_tokens; SillyTavern reads one phrase per line
        assert back["banned_strings"] == ["a testament to"] and report.status("banned_strings") == MAPPED
        assert any("line break" in note for note in report.notes)

"""One translation per format: an API request's sampler fields give the same preset as the same
keys in that app's preset file, through the same importer; request-only keys are ignored."""

from __future__ import annotations

import pytest

from cfg_textgen.errors import PresetError
from cfg_textgen.importers import kobold, textgen_webui
from cfg_textgen.server.translate import KOBOLD_FLAVOUR, WEBUI_FLAVOUR, build_preset, flavour_of_completion

WEBUI_KEYS = {"temperature": 0.8, "min_p": 0.05, "top_k": 40, "repetition_penalty": 1.1, "dry_multiplier": 0.8,
              "xtc_probability": 0.5, "xtc_threshold": 0.1, "sampler_priority": ["min_p", "temperature", "top_k",
                                                                                   "dry", "repetition_penalty", "xtc"],
              "guidance_scale": 1.5, "negative_prompt": "dull"}
KOBOLD_KEYS = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "rep_pen": 1.1, "rep_pen_range": 256,
               "rep_pen_slope": 0.7, "sampler_order": [6, 0, 1, 3, 4, 2, 5]}


def test_translate_webui_request_equals_the_web_ui_preset_file():
    from_file, _ = textgen_webui.import_yaml(dict(WEBUI_KEYS), "<file>", None, "x")
    request = dict(WEBUI_KEYS, prompt="Once", max_tokens=8, api_type="ooba", rep_pen=1.3, tfs_z=0.5)
    from_request, _ = textgen_webui.import_request(request)
    assert from_request["samplers"] == from_file["samplers"] and from_request["cfg"] == from_file["cfg"]


def test_translate_kobold_request_equals_koboldcpp_settings_with_its_defaults():
    from_file, _ = kobold.import_preset(dict(KOBOLD_KEYS), "<file>", None, "x", fmt="KoboldCpp settings")
    from_request, _ = kobold.import_request(dict(KOBOLD_KEYS, prompt="Once", genkey="KCPP1", trim_stop=True))
    assert from_request["samplers"] == from_file["samplers"]
    # a key left out takes KoboldCpp's default (koboldcpp.py `generate`: temperature 0.75,
    # top_k 100, top_p 0.92, rep_pen_range 320), not "off"
    bare, _ = kobold.import_request({"prompt": "Once", "rep_pen": 1.2})
    assert {"sampler": "temperature", "temperature": 0.75} in bare["samplers"]
    assert {"sampler": "top_k", "k": 100} in bare["samplers"] and {"sampler": "top_p", "p": 0.92} in bare["samplers"]
    assert bare["samplers"][0] == {"sampler": "repetition_penalty", "penalty": 1.2, "range": 320}


def test_translate_guidance_fields_become_the_preset_cfg_in_both_flavours():
    for flavour in (WEBUI_FLAVOUR, KOBOLD_FLAVOUR):
        preset, _ = build_preset({"guidance_scale": 2.0, "negative_prompt": "A dull story."}, flavour, 8, ["\n\n"])
        assert (preset.cfg.scale, preset.cfg.opposing_prompt) == (2.0, "A dull story.")
        assert preset.max_new_tokens == 8 and preset.stop == ("\n\n",)


def test_translate_flavour_follows_sillytaverns_api_type():
    assert flavour_of_completion({"api_type": "koboldcpp", "sampler_order": [6]}) == KOBOLD_FLAVOUR
    assert flavour_of_completion({"api_type": "ooba", "sampler_order": [6]}) == WEBUI_FLAVOUR
    assert flavour_of_completion({"sampler_order": [6, 0]}) == KOBOLD_FLAVOUR
    assert flavour_of_completion({"temperature": 1}) == WEBUI_FLAVOUR


def test_translate_bad_value_names_the_request_key():
    with pytest.raises(PresetError, match="top_p"):
        textgen_webui.import_request({"top_p": "high"})
    with pytest.raises(PresetError, match=r"sampler_order: must be a list"):
        kobold.import_request({"sampler_order": "top_k"})


def test_translate_unknown_sampler_priority_name_is_skipped_in_a_request_and_refused_in_a_file():
    # text-generation-webui sorts names it does not know out of the way and runs the rest
    keys = {"top_k": 40, "temperature": 0.7, "sampler_priority": ["top_k", "banana_sampler", "temperature"]}
    preset, report = textgen_webui.import_request(dict(keys))
    assert report.skipped == ["banana_sampler"]
    assert [s["sampler"] for s in preset["samplers"]] == ["top_k", "temperature"]
    with pytest.raises(PresetError, match=r"sampler_priority\[1\]: unknown sampler name 'banana_sampler'"):
        textgen_webui.import_yaml(dict(keys), "<file>", None, "x")
    _, skipped = build_preset(dict(keys), WEBUI_FLAVOUR, 8, [])
    assert skipped == ["banana_sampler"]


def test_translate_unknown_sampler_order_id_is_skipped_in_a_request_and_refused_in_a_file():
    # KoboldCpp prints "Unknown Sampler" for an id it does not know and runs the others
    keys = {"temperature": 0.7, "top_k": 50, "rep_pen": 1.0, "sampler_order": [0, 11, 5]}
    preset, report = kobold.import_request(dict(keys))
    assert report.skipped == ["11"]
    assert [s["sampler"] for s in preset["samplers"]] == ["top_k", "temperature"]
    with pytest.raises(PresetError, match=r"sampler_order\[1\]: unknown sampler id 11"):
        kobold.import_preset(dict(keys), "<file>", None, "x", fmt="KoboldCpp settings")
    _, skipped = build_preset(dict(keys), KOBOLD_FLAVOUR, 8, [])
    assert skipped == ["11"]


def test_translate_sillytavern_adaptive_p_request_is_off_at_its_default_and_on_above_zero():
    order = ["temperature", "top_k", "min_p", "adaptive_p", "xtc"]
    off, report = textgen_webui.import_request(
        {"sampler_priority": order, "adaptive_target": -0.01, "adaptive_decay": 0.9, "min_p": 0.05})
    assert [s["sampler"] for s in off["samplers"]] == ["min_p"] and report.skipped == []
    on, report = textgen_webui.import_request(
        {"sampler_priority": order, "adaptive_target": 0.4, "adaptive_decay": 0.95, "min_p": 0.05,
         "xtc_probability": 0.5})
    # the web UI's Adaptive-P keeps only the token it drew: XTC after it acts on one token there
    assert on["samplers"] == [{"sampler": "min_p", "p": 0.05},
                              {"sampler": "adaptive_p", "target": 0.4, "decay": 0.95}]
    assert report.status("xtc_probability") == "not carried over"
    # KoboldCpp's names, llama.cpp's rule: 0 is on, negative is off; Adaptive-P runs last
    kob, _ = kobold.import_request({"adaptive_target": 0.0, "adaptive_decay": 1.5, "top_k": 10})
    assert kob["samplers"][-1] == {"sampler": "adaptive_p", "target": 0.0, "decay": 0.99}
    kob_off, _ = kobold.import_request({"adaptive_target": -0.01, "top_k": 10})
    assert all(s["sampler"] != "adaptive_p" for s in kob_off["samplers"])


def test_translate_smoothing_factor_is_quadratic_sampling_in_both_flavours():
    # Kobold Lite: KoboldCpp bends the logits right after the temperature (sample_temperature)
    kob, report = kobold.import_request({"temperature": 0.7, "top_k": 0, "top_p": 1, "rep_pen": 1,
                                         "smoothing_factor": 0.3, "sampler_order": [6, 0, 1, 3, 4, 2, 5]})
    assert kob["samplers"] == [{"sampler": "temperature", "temperature": 0.7},
                               {"sampler": "quadratic", "factor": 0.3, "curve": 1.0}]
    assert report.status("smoothing_factor") == "mapped"
    # the web UI: its quadratic_sampling slot of sampler_priority, with the curve
    web, _ = textgen_webui.import_request({"smoothing_factor": 0.3, "smoothing_curve": 2.0, "top_k": 20,
                                           "sampler_priority": ["quadratic_sampling", "top_k"]})
    assert web["samplers"] == [{"sampler": "quadratic", "factor": 0.3, "curve": 2.0}, {"sampler": "top_k", "k": 20}]
    off, _ = kobold.import_request({"temperature": 0, "smoothing_factor": 0.3})  # greedy: no smoothing
    assert all(s["sampler"] != "quadratic" for s in off["samplers"])

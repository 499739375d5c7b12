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
        preset = build_preset({"guidance_scale": 2.0, "negative_prompt": "A dull story."}, flavour, 8, ["\n\n"])
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
    with pytest.raises(PresetError, match=r"sampler_order\[1\]"):
        kobold.import_request({"sampler_order": [0, 11]})

"""Export to each foreign format and import again gives the same preset, except what the format
cannot carry; each such loss is stated here, per preset."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from cfg_textgen.importers import DROPPED, export_preset, import_preset
from cfg_textgen.presets import builtin_names, load_preset, parse_preset

COMMUNITY = next((p / "shared" / "community-presets" for p in Path(__file__).resolve().parents[1].parents
                  if (p / "shared" / "community-presets").is_dir()),
                 Path(__file__).resolve().parents[1].parent / "shared" / "community-presets")  # worktrees: one up
needs_community = pytest.mark.skipif(
    not COMMUNITY.is_dir(), reason=f"community presets not found at {COMMUNITY} (CI puts ../shared beside the clone)")


def norm(preset) -> dict:
    data = preset.to_dict() if hasattr(preset, "to_dict") else parse_preset(preset, "<test>").to_dict()
    data.pop("description")  # neither format has a description field
    data["stop"] = []  # NovelAI stops are token ids; SillyTavern keeps stops outside presets
    return data


def drop_samplers(names):
    def edit(d):
        d["samplers"] = [s for s in d["samplers"] if s["sampler"] not in names]
    return edit


def neutral_temperature(d):  # temperature 1.0 is "off": written as the neutral value, read back as nothing
    d["samplers"] = [s for s in d["samplers"] if s != {"sampler": "temperature", "temperature": 1.0}]


def text_mode(d):  # neither format has the last-token opposing branch
    d["cfg"]["opposing_mode"] = "text"


def no_slope(d):  # text-generation-webui semantics: no repetition-penalty slope
    for s in d["samplers"]:
        s.pop("slope", None)


def sampling(d):  # NovelAI always samples
    d["do_sample"] = True


LOSSES = {
    ("sillytavern-textgen", "balanced-story"): [no_slope],
    ("sillytavern-textgen", "dry-xtc-creative"): [neutral_temperature],
    ("sillytavern-textgen", "paper-lambada"): [text_mode],
    ("novelai", "dry-xtc-creative"): [drop_samplers({"dry", "xtc"}), neutral_temperature],
    ("novelai", "greedy"): [sampling],
    ("novelai", "paper-lambada"): [text_mode, sampling],
}


@pytest.mark.parametrize("fmt", ["sillytavern-textgen", "novelai"])
@pytest.mark.parametrize("name", builtin_names())
def test_export_preset_round_trip_of_builtin(name, fmt):
    original = load_preset(name)
    exported, report = export_preset(original, fmt)
    again, _ = import_preset(exported, name=name)
    expected = norm(original)
    for edit in LOSSES.get((fmt, name), []):
        edit(expected)
    assert norm(again) == expected
    assert report.render()


def test_export_preset_reports_what_novelai_cannot_carry():
    _, report = export_preset(load_preset("dry-xtc-creative"), "novelai")
    assert report.status("samplers[0]") == DROPPED  # dry
    assert report.status("samplers[2]") == DROPPED  # xtc
    _, report = export_preset(load_preset("paper-lambada"), "novelai")
    assert report.status("cfg.opposing_mode") == DROPPED
    assert report.status("do_sample") == DROPPED


def test_export_preset_sillytavern_reports_slope_and_name():
    data, report = export_preset(load_preset("balanced-story"), "sillytavern-textgen")
    assert report.status("samplers[0].slope") == DROPPED
    assert report.status("name") == DROPPED
    assert data["guidance_scale"] == 1.5 and data["rep_pen"] == 1.1 and data["rep_pen_range"] == 512
    assert data["sampler_priority"][:2] == ["temperature", "top_p"]


def test_export_preset_sillytavern_carries_adaptive_p_and_reimports_it():
    preset = parse_preset({"format": "cfg-textgen-preset/1", "name": "adaptive", "samplers": [
        {"sampler": "min_p", "p": 0.05}, {"sampler": "adaptive_p", "target": 0.4, "decay": 0.8}]})
    data, report = export_preset(preset, "sillytavern-textgen")
    assert (data["adaptive_target"], data["adaptive_decay"]) == (0.4, 0.8)
    assert data["sampler_priority"][:2] == ["min_p", "adaptive_p"]
    again, _ = import_preset(data, name="adaptive")
    assert norm(again)["samplers"] == norm(preset.to_dict())["samplers"]
    _, report = export_preset(dataclasses.replace(preset, samplers=preset.samplers[::-1]), "sillytavern-textgen")
    assert any("Adaptive-P picks the token" in n for n in report.notes)


def test_export_preset_novelai_writes_order_with_cfg_enabled():
    data, _ = export_preset(load_preset("balanced-story"), "novelai")
    order = data["parameters"]["order"]
    assert [o["id"] for o in order if o["enabled"]] == ["cfg", "temperature", "top_p"]
    assert len(order) == 11 and data["parameters"]["cfg_scale"] == 1.5


ROUND_TRIP_IMPORTED = {
    # (file, format): losses of that format for this file
    ("novelai/official/llama_3_erato_v1/Dragonfruit.preset", "novelai"): [],
    ("novelai/sillytavern-with-cfg/Pilotfish-Kayra.json", "novelai"): [],
    ("sillytavern-textgen/Titanic.json", "sillytavern-textgen"): [],
    ("koboldai-sillytavern/Godlike.json", "sillytavern-textgen"): [no_slope],
    ("textgen-webui/Big O.yaml", "novelai"): [],
    ("textgen-webui/Big O.yaml", "sillytavern-textgen"): [],
}


@needs_community
@pytest.mark.parametrize("rel,fmt", sorted(ROUND_TRIP_IMPORTED))
def test_export_preset_round_trip_of_imported(rel, fmt):
    first, _ = import_preset(COMMUNITY / rel)
    exported, _ = export_preset(first, fmt)
    again, _ = import_preset(exported, name=first["name"])
    expected = norm(copy.deepcopy(first))
    for edit in ROUND_TRIP_IMPORTED[(rel, fmt)]:
        edit(expected)
    assert norm(again) == expected

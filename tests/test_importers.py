"""Importers: every community preset imports and validates with a complete report; hand-written
expected presets for files of every format; decisions the formats leave open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfg_textgen.errors import PresetError
from cfg_textgen.importers import DROPPED, MAPPED, NEUTRAL, detect_format, import_bundle, import_preset
from cfg_textgen.presets import parse_preset

import os


def _community_dir() -> Path:
    """$CFG_TEXTGEN_COMMUNITY, else ../shared/community-presets beside the clone or beside any folder
    above it (a git worktree lives one level deeper than the clone)."""
    if os.environ.get("CFG_TEXTGEN_COMMUNITY"):
        return Path(os.environ["CFG_TEXTGEN_COMMUNITY"])
    for parent in Path(__file__).resolve().parents[1].parents:
        if (parent / "shared" / "community-presets").is_dir():
            return parent / "shared" / "community-presets"
    return Path(__file__).resolve().parents[1].parent / "shared" / "community-presets"


COMMUNITY = _community_dir()
needs_community = pytest.mark.skipif(
    not COMMUNITY.is_dir(), reason=f"community presets not found at {COMMUNITY} (CI puts ../shared beside the clone)")
FILES = sorted(p for p in COMMUNITY.rglob("*") if p.is_file() and p.name != "SOURCES.md") if COMMUNITY.is_dir() else []


def community(rel: str) -> Path:
    return COMMUNITY / rel


def source_keys(path: Path) -> set[str]:
    """Every key of the source file, nested NovelAI parameters as `parameters.<key>`."""
    if path.suffix == ".yaml":
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
    keys = {k for k in data if k != "parameters"}
    if isinstance(data.get("parameters"), dict):
        keys |= {f"parameters.{k}" for k in data["parameters"]}
    return keys


def norm(preset: dict) -> dict:
    """Validated and with every default filled in; name and description aside."""
    out = parse_preset(preset, "<test>").to_dict()
    del out["name"], out["description"]
    return out


def expect(samplers, scale=1.0, opposing="", max_new_tokens=200, do_sample=True) -> dict:
    return norm({"name": "x", "cfg": {"scale": scale, "opposing_prompt": opposing}, "samplers": samplers,
                 "max_new_tokens": max_new_tokens, "do_sample": do_sample})


def rp(penalty, **kw):
    return {"sampler": "repetition_penalty", "penalty": penalty, **kw}


# ---- acceptance 1: every file imports, validates, and reports every key once ------------------


@needs_community
def test_importers_community_folder_is_complete():
    assert len(FILES) >= 90  # the folder as SOURCES.md describes it; a missing sub-folder would hide tests


@needs_community
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(COMMUNITY)))
def test_import_preset_every_community_file_validates_and_reports_every_key(path):
    preset, report = import_preset(path)
    parse_preset(preset, str(path))  # raises on anything invalid
    assert list(report.entries) == list(dict.fromkeys(report.entries))  # once each
    assert set(report.entries) == source_keys(path)
    assert {e.status for e in report.entries.values()} <= {MAPPED, NEUTRAL, DROPPED}
    assert all(e.detail for e in report.entries.values())
    text = report.render()
    for key in source_keys(path):
        assert key in text


@pytest.fixture(scope="module")
def schema_validator():
    import jsonschema

    from cfg_textgen.presets import preset_schema

    return jsonschema.Draft202012Validator(preset_schema())


@needs_community
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(COMMUNITY)))
def test_preset_schema_accepts_every_imported_community_preset(path, schema_validator):
    # `presets schema`, checked by the independent jsonschema package, against what the importers
    # write: the JSON form must be valid JSON Schema-wise too, not only for parse_preset
    preset, _ = import_preset(path)
    assert [e.message for e in schema_validator.iter_errors(preset)] == []


# ---- acceptance 2: expected presets, written from the source files ---------------------------

EXPECTED = {
    # NovelAI official, Llama 3 Erato: only math1 and top_p enabled; rep pen first.
    "novelai/official/llama_3_erato_v1/Golden Arrow.preset": expect(
        [rp(1.5, range=2240, slope=1), {"sampler": "unified", "linear": 0.3, "quad": 0.19, "conf": 0},
         {"sampler": "top_p", "p": 0.995}], max_new_tokens=75),
    # six enabled samplers in file order; cfg (scale 1) and the rest disabled
    "novelai/official/llama_3_erato_v1/Dragonfruit.preset": expect(
        [rp(3.25, range=6000, slope=3.25), {"sampler": "temperature", "temperature": 1.37},
         {"sampler": "typical", "p": 0.875}, {"sampler": "unified", "linear": 0.9, "quad": 0.07, "conf": -0.05},
         {"sampler": "min_p", "p": 0.035}, {"sampler": "mirostat", "version": 2, "tau": 4, "eta": 0.2},
         {"sampler": "top_a", "a": 0.1}], max_new_tokens=75),
    # Euterpe: top_p disabled (value 1 anyway); the rest in the file's order
    "novelai/official/euterpe_v2/Moonlit Chronicler.preset": expect(
        [rp(2.075, range=512, slope=0.36), {"sampler": "top_k", "k": 300}, {"sampler": "typical", "p": 0.95},
         {"sampler": "top_a", "a": 0.782}, {"sampler": "tfs", "z": 0.802},
         {"sampler": "temperature", "temperature": 1.25}], max_new_tokens=40),
    # Krake: top_k 10 and top_a 0.15 and typical 0.95 all enabled; frequency 0 / presence 0 off
    "novelai/official/krake_v2/Calypso.preset": expect(
        [rp(1.075, range=2048, slope=0.09), {"sampler": "top_p", "p": 0.95}, {"sampler": "top_k", "k": 10},
         {"sampler": "tfs", "z": 0.95}, {"sampler": "temperature", "temperature": 1.1},
         {"sampler": "top_a", "a": 0.15}, {"sampler": "typical", "p": 0.95}], max_new_tokens=40),
    # SillyTavern's NovelAI with CFG: order [8, 6, 5, 0, 3] = mirostat, cfg, typical, temperature, tfs
    "novelai/sillytavern-with-cfg/CosmicCube-Kayra.json": expect(
        [rp(3, range=4000), {"sampler": "mirostat", "version": 2, "tau": 4.95, "eta": 0.22},
         {"sampler": "typical", "p": 0.95}, {"sampler": "temperature", "temperature": 0.9},
         {"sampler": "tfs", "z": 0.92}], scale=1.48, max_new_tokens=150),
    # order [6, 0, 4, 1, 2, 5, 3]; tail_free_sampling 1 is off
    "novelai/sillytavern-with-cfg/Pilotfish-Kayra.json": expect(
        [rp(1.55, range=8192, slope=1.8, presence=0.00085, frequency=0.00075),
         {"sampler": "temperature", "temperature": 1.31}, {"sampler": "top_a", "a": 0.18},
         {"sampler": "top_k", "k": 25}, {"sampler": "top_p", "p": 0.97}, {"sampler": "typical", "p": 0.98}],
        scale=1.35, max_new_tokens=150),
    # order [0, 10]: temperature then min_p; cfg not in order; penalty 1 is off
    "novelai/sillytavern-with-cfg/Universal-Erato.json": expect(
        [{"sampler": "temperature", "temperature": 1.25}, {"sampler": "min_p", "p": 0.1}]),
    # temperature_last with the default priority: penalties, top_k, top_p, eta (10.78e-4), top_a, temperature
    "sillytavern-textgen/Titanic.json": expect(
        [rp(1.21), {"sampler": "top_k", "k": 91}, {"sampler": "top_p", "p": 0.21},
         {"sampler": "eta", "eta": 0.001078}, {"sampler": "top_a", "a": 0.75},
         {"sampler": "temperature", "temperature": 1.01}]),
    # temperature_last false: temperature first, then min_p; top_p 1 / top_k 0 / rep_pen 1 are off
    "sillytavern-textgen/Universal-Creative.json": expect(
        [{"sampler": "temperature", "temperature": 1.5}, {"sampler": "min_p", "p": 0.1}]),
    # temp 0 and do_sample false: greedy; top_k 1 (top_p 0 keeps the same single token)
    "sillytavern-textgen/Deterministic.json": expect([rp(1.18), {"sampler": "top_k", "k": 1}], do_sample=False),
    # mirostat 2: only temperature before it
    "sillytavern-textgen/Miro Bronze.json": expect(
        [{"sampler": "temperature", "temperature": 1.06}, {"sampler": "mirostat", "version": 2, "tau": 9.61,
                                                          "eta": 1}]),
    # KoboldAI order [6, 5, 4, 3, 2, 1, 0]: rep pen, temperature, typical, tfs, top_p, top_a; top_k 0 off
    "koboldai-sillytavern/Godlike.json": expect(
        [rp(1.1, range=1024, slope=0.7), {"sampler": "temperature", "temperature": 0.7},
         {"sampler": "typical", "p": 0.19}, {"sampler": "tfs", "z": 0.97}, {"sampler": "top_p", "p": 0.5},
         {"sampler": "top_a", "a": 0.75}]),
    # order [5, 6, 0, 1, 2, 3, 4]; min_p rides with top_p (id 2); rep_pen 1 off
    "koboldai-sillytavern/Universal-Light.json": expect(
        [{"sampler": "temperature", "temperature": 1.25}, {"sampler": "min_p", "p": 0.1}]),
    # mirostat 2 in KoboldCpp: rep pen (1: off), temperature, mirostat
    "koboldai-sillytavern/Miro Gold.json": expect(
        [{"sampler": "temperature", "temperature": 1.17}, {"sampler": "mirostat", "version": 2, "tau": 9.91,
                                                          "eta": 1}]),
    # web UI defaults: repetition_penalty_range 1024; default priority temperature, top_k, top_p
    "textgen-webui/Titanic.yaml": expect(
        [rp(1.21, range=1024), {"sampler": "temperature", "temperature": 1.01}, {"sampler": "top_k", "k": 91},
         {"sampler": "top_p", "p": 0.21}]),
    "textgen-webui/tfs-with-top-a.yaml": expect(
        [rp(1.15, range=1024), {"sampler": "temperature", "temperature": 0.7}, {"sampler": "tfs", "z": 0.95},
         {"sampler": "top_a", "a": 0.2}]),
    "textgen-webui/Mirostat.yaml": expect([{"sampler": "mirostat", "version": 2, "tau": 8, "eta": 0.1}]),
    "textgen-webui/Debug-deterministic.yaml": expect([{"sampler": "top_k", "k": 1}], do_sample=False),
}


@needs_community
@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_import_preset_matches_hand_written_expectation(rel):
    preset, _ = import_preset(community(rel))
    assert norm(preset) == EXPECTED[rel]


@needs_community
def test_import_preset_uses_the_file_name_or_given_name():
    preset, report = import_preset(community("textgen-webui/Titanic.yaml"))
    assert preset["name"] == "Titanic"
    preset, report = import_preset(community("novelai/official/krake_v2/Iris.preset"), name="my-iris")
    assert preset["name"] == "my-iris"
    assert report.status("name") == DROPPED


# ---- decisions the formats leave open -------------------------------------------------------


@needs_community
def test_import_preset_novelai_disabled_samplers_are_not_applied_and_reported():
    _, report = import_preset(community("novelai/official/llama_3_erato_v1/Golden Arrow.preset"))
    assert report.status("parameters.tail_free_sampling") == DROPPED  # 0.87, but disabled
    assert "disabled" in report.entries["parameters.tail_free_sampling"].detail
    assert report.status("parameters.temperature") == NEUTRAL  # 1, disabled
    assert report.status("parameters.phrase_rep_pen") == DROPPED  # "light": no public algorithm
    assert report.status("parameters.repetition_penalty_default_whitelist") == DROPPED
    assert any("right after CFG" in n for n in report.notes)


@needs_community
def test_import_preset_novelai_legacy_rep_pen_is_unchanged_with_a_note():
    preset, report = import_preset(community("novelai/official/6B_v4/Coherent Creativity.preset"))
    assert preset["samplers"][0] == rp(3.875, range=2048)
    assert any("never published" in n for n in report.notes)


def test_import_preset_novelai_cfg_scale_needs_cfg_in_order():
    flat = {"order": [0], "temperature": 0.9, "cfg_scale": 1.5, "cfg_uc": "dull", "tail_free_sampling": 1}
    preset, report = import_preset(flat)
    assert preset["cfg"]["scale"] == 1.0
    assert report.status("cfg_scale") == DROPPED
    preset, report = import_preset(dict(flat, order=[0, 6]))
    assert preset["cfg"] == {"scale": 1.5, "opposing_prompt": "dull"}
    assert report.status("cfg_uc") == MAPPED


def test_import_preset_novelai_top_g_and_phrase_rep_pen_are_not_guessed():
    flat = {"order": [7, 0], "temperature": 0.9, "top_g": 5, "phrase_rep_pen": "medium", "tail_free_sampling": 1}
    preset, report = import_preset(flat)
    assert [s["sampler"] for s in preset["samplers"]] == ["temperature"]
    assert report.status("top_g") == DROPPED and "no public algorithm" in report.entries["top_g"].detail
    assert report.status("phrase_rep_pen") == DROPPED


def test_import_preset_neutral_sampler_listed_in_order_is_omitted_and_reported_neutral():
    flat = {"order": [1, 2, 0], "top_k": 0, "top_p": 1, "temperature": 0.7, "tail_free_sampling": 1}
    preset, report = import_preset(flat)
    assert preset["samplers"] == [{"sampler": "temperature", "temperature": 0.7}]
    assert report.status("top_k") == NEUTRAL and report.status("top_p") == NEUTRAL


def test_import_preset_kobold_without_rep_pen_id_applies_it_first():
    data = {"temp": 0.7, "rep_pen": 1.1, "rep_pen_range": 512, "rep_pen_slope": 0, "top_p": 0.9, "top_k": 0,
            "top_a": 0, "typical": 1, "tfs": 1, "sampler_order": [0, 1, 2, 3, 4, 5]}
    preset, report = import_preset(data)
    assert preset["samplers"] == [rp(1.1, range=512), {"sampler": "top_p", "p": 0.9},
                                  {"sampler": "temperature", "temperature": 0.7}]
    assert any("id 6" in n for n in report.notes)


def test_import_preset_koboldcpp_settings_and_dynatemp():
    data = {"temperature": 1.0, "dynatemp_range": 0.5, "dynatemp_exponent": 1.2, "rep_pen": 1.0, "top_k": 40,
            "sampler_order": [6, 0, 1, 3, 4, 2, 5], "max_length": 120, "stop_sequence": ["\n\n"]}
    assert detect_format(data) == "koboldai"
    preset, report = import_preset(data)
    assert preset["samplers"] == [{"sampler": "top_k", "k": 40},
                                  {"sampler": "dynamic_temperature", "low": 0.5, "high": 1.5, "exponent": 1.2}]
    assert preset["max_new_tokens"] == 120 and preset["stop"] == ["\n\n"]


def test_import_preset_kobold_united_bundle_by_name_and_each():
    bundle = [
        {"preset": "Alpha", "description": "first", "temp": 0.5, "rep_pen": 1.1, "rep_pen_range": 1024,
         "sampler_order": [6, 5, 0], "top_k": 10, "genamt": 80, "max_length": 2048, "uid": 1},
        {"preset": "Beta", "temp": 1.2, "rep_pen": 1.0, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "top_p": 0.8},
    ]
    preset, report = import_preset(bundle, name="beta")
    assert preset["name"] == "Beta"
    assert preset["samplers"] == [{"sampler": "top_p", "p": 0.8}, {"sampler": "temperature", "temperature": 1.2}]
    assert "[1].preset" in report.entries
    with pytest.raises(PresetError, match="Alpha, Beta"):
        import_preset(bundle)
    both = import_bundle(bundle)
    assert [p["name"] for p, _ in both] == ["Alpha", "Beta"]
    alpha, alpha_report = both[0]
    assert alpha["description"] == "first" and alpha["max_new_tokens"] == 80
    assert alpha["samplers"] == [rp(1.1, range=1024), {"sampler": "temperature", "temperature": 0.5},
                                 {"sampler": "top_k", "k": 10}]
    assert alpha_report.status("[0].max_length") == DROPPED and alpha_report.status("[0].uid") == DROPPED


def test_import_preset_textgen_webui_sampler_priority_and_temperature_last():
    text = ("temperature: 0.5\ntop_k: 20\nmin_p: 0.05\ntemperature_last: true\n"
            "sampler_priority: [min_p, top_k, temperature]\nrepetition_penalty: 1.1\nrepetition_penalty_range: 0\n")
    preset, report = import_preset(text)
    assert preset["samplers"] == [rp(1.1), {"sampler": "min_p", "p": 0.05}, {"sampler": "top_k", "k": 20},
                                  {"sampler": "temperature", "temperature": 0.5}]
    assert report.status("sampler_priority") == MAPPED


def test_import_preset_sillytavern_guidance_dry_and_xtc():
    data = {"temp": 0.9, "guidance_scale": 1.6, "negative_prompt": "boring", "dry_multiplier": 0.8,
            "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breakers": "[\"\\n\", \":\"]",
            "dry_penalty_last_n": 0, "xtc_probability": 0.5, "xtc_threshold": 0.1, "epsilon_cutoff": 3,
            "sampler_priority": ["temperature", "epsilon_cutoff"], "typical_p": 1}
    preset, report = import_preset(data)
    assert preset["cfg"] == {"scale": 1.6, "opposing_prompt": "boring"}
    assert preset["samplers"] == [
        {"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2,
         "sequence_breakers": ["\n", ":"]},
        {"sampler": "temperature", "temperature": 0.9}, {"sampler": "epsilon", "epsilon": 0.0003},
        {"sampler": "xtc", "threshold": 0.1, "probability": 0.5}]
    assert report.status("negative_prompt") == MAPPED


def test_import_preset_sillytavern_adaptive_p_and_what_runs_after_it():
    # text-generation-webui runs Adaptive-P for a target above 0 and leaves only the token it drew:
    # with temperature_last, temperature comes after it and acts on that one token
    data = {"temp": 0.8, "min_p": 0.05, "adaptive_target": 0.45, "adaptive_decay": 0.9,
            "temperature_last": True, "sampler_priority": ["temperature", "min_p", "adaptive_p"]}
    preset, report = import_preset(data)
    assert preset["samplers"] == [{"sampler": "min_p", "p": 0.05},
                                  {"sampler": "adaptive_p", "target": 0.45, "decay": 0.9}]
    assert report.status("adaptive_target") == MAPPED and report.status("temp") == DROPPED
    off, report = import_preset(dict(data, adaptive_target=-0.01, temperature_last=False))
    assert [s["sampler"] for s in off["samplers"]] == ["temperature", "min_p"]
    assert report.status("adaptive_target") == NEUTRAL


def test_import_preset_unknown_format_is_a_clear_error():
    with pytest.raises(PresetError, match="unrecognised preset format"):
        import_preset({"colour": "blue"})


# ---- keys whose meaning differs between the apps ------------------------------------------------


def test_import_preset_koboldcpp_slope_is_the_two_step_rule():
    # KoboldCpp gpttype_adapter.cpp: gpttype_generate sets rep_pen_slope to 1 when > 1 or <= 0 and
    # repeat_last_n to 1 when < 1; sample_rep_pen gives the older half 1 + (rep_pen - 1) * slope.
    base = {"temperature": 0.8, "rep_pen": 1.1, "sampler_order": [6, 5]}
    preset, report = import_preset(dict(base, rep_pen_range=256, rep_pen_slope=0.5))
    assert preset["samplers"][0] == rp(1.1, range=256, slope=0.5, slope_mode="halves")
    assert "halves" in report.entries["rep_pen_slope"].detail
    for slope in (1, 0, 3.4):  # all flat in KoboldCpp
        preset, report = import_preset(dict(base, rep_pen_range=256, rep_pen_slope=slope))
        assert preset["samplers"][0] == rp(1.1, range=256), slope
        assert report.status("rep_pen_slope") == NEUTRAL
    preset, _ = import_preset(dict(base, rep_pen_range=0))  # KoboldCpp clamps the range to 1
    assert preset["samplers"][0] == rp(1.1, range=1)
    preset, report = import_preset(base)  # koboldcpp.py: genparams.get('rep_pen_range', 320)
    assert preset["samplers"][0] == rp(1.1, range=320)
    assert any("320" in n for n in report.notes)


@needs_community
def test_import_preset_koboldai_slope_is_united_curve_over_the_range():
    # SillyTavern's KoboldAI presets are KoboldAI United's: slope 3.4 over rep_pen_range 2048
    preset, report = import_preset(community("koboldai-sillytavern/Best Guess.json"))
    assert preset["samplers"][0] == rp(1.15, range=2048, slope=3.4)
    assert "curve" in report.entries["rep_pen_slope"].detail
    # a slope without a range has no effect in KoboldAI (`if cls.rep_pen_range > 0`)
    data = {"temp": 0.7, "rep_pen": 1.1, "rep_pen_range": 0, "rep_pen_slope": 0.9, "sampler_order": [6, 5]}
    preset, report = import_preset(data)
    assert preset["samplers"][0] == rp(1.1)
    assert report.status("rep_pen_slope") == NEUTRAL


def test_import_preset_textgen_webui_dry_takes_the_repetition_penalty_range():
    # text-generation-webui sampler_hijack.py: DRYLogitsProcessor(..., _range=repetition_penalty_range)
    text = "dry_multiplier: 0.8\nrepetition_penalty: 1.1\nrepetition_penalty_range: 512\n"
    preset, report = import_preset(text)
    assert preset["samplers"][:2] == [rp(1.1, range=512),
                                      {"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2,
                                       "range": 512}]
    assert "dry.range" in report.entries["repetition_penalty_range"].detail
    preset, _ = import_preset("dry_multiplier: 0.8\n")  # the web UI's default range, 1024
    assert preset["samplers"] == [{"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2,
                                   "range": 1024}]


def test_import_preset_sillytavern_dry_ignores_dry_penalty_last_n():
    # read as the web UI reads it: DRY's range is rep_pen_range; dry_penalty_last_n is KoboldCpp's
    data = {"temp": 1.0, "rep_pen": 1.0, "rep_pen_range": 300, "dry_multiplier": 0.8, "dry_penalty_last_n": 100,
            "sampler_priority": ["temperature"]}
    preset, report = import_preset(data)
    assert preset["samplers"] == [{"sampler": "dry", "multiplier": 0.8, "base": 1.75, "allowed_length": 2,
                                   "range": 300}]
    assert report.status("dry_penalty_last_n") == DROPPED
    assert report.status("rep_pen_range") == MAPPED


def test_import_preset_koboldcpp_xtc_has_no_newline_eos_protection():
    # KoboldCpp sample_xtc never checks newline or EOS; the web UI does (our default)
    data = {"temperature": 1.0, "rep_pen": 1.0, "xtc_probability": 0.5, "xtc_threshold": 0.1,
            "sampler_order": [6, 5]}
    preset, _ = import_preset(data)
    assert preset["samplers"] == [{"sampler": "xtc", "threshold": 0.1, "probability": 0.5,
                                   "protect_newline_eos": False}]
    st = {"temp": 1.0, "xtc_probability": 0.5, "xtc_threshold": 0.1, "sampler_priority": ["temperature"]}
    preset, _ = import_preset(st)
    assert preset["samplers"] == [{"sampler": "xtc", "threshold": 0.1, "probability": 0.5}]

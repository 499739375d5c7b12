"""The preset model: strict validation, loading, the JSON Schema, and building the chain so that
`model.generate` applies each sampler exactly once."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch

from cfg_textgen.errors import PresetError
from cfg_textgen.backends.transformers import cache_keyword, returned_cache
from cfg_textgen.presets import (
    FORMAT, MAX_PRESET_BYTES, Preset, SamplerSpec, build_chain, build_processors, builtin_names,
    generate_kwargs, list_presets, load_preset, parse_preset, preset_schema,
)
from cfg_textgen.samplers import SAMPLERS

from conftest import make_tiny_model
from test_presets_cli import BAD_PRESETS

REPO = Path(__file__).resolve().parent.parent
PRESET_FILES = sorted((REPO / "presets").glob("*.json"))


def needs(*names):
    """Skip while a sampler of the doc's table is not in the registry yet."""
    missing = [n for n in names if n not in SAMPLERS]
    return pytest.mark.skipif(bool(missing), reason=f"samplers not registered yet: {missing}")


def error_lines(data, source="t.json"):
    with pytest.raises(PresetError) as info:
        parse_preset(data, source)
    return list(info.value.errors)


# ---- parse_preset ---------------------------------------------------------------------------


def test_parse_preset_minimal_takes_documented_defaults():
    p = parse_preset({"name": "x"}, "t.json")
    assert (p.name, p.description, p.samplers, p.max_new_tokens, p.stop, p.do_sample) == \
        ("x", "", (), 200, (), True)
    assert (p.cfg.scale, p.cfg.opposing_prompt, p.cfg.opposing_mode) == (1.0, "", "text")
    assert not p.cfg.active


@needs("temperature", "top_k")
def test_parse_preset_int_is_fine_where_a_number_is_expected():
    p = parse_preset({"name": "x", "cfg": {"scale": 2},
                      "samplers": [{"sampler": "temperature", "temperature": 2}]}, "t.json")
    assert p.cfg.scale == 2.0 and p.samplers[0].params["temperature"] == 2


@needs("top_k")
def test_parse_preset_integral_float_is_accepted_for_an_integer_param():
    p = parse_preset({"name": "x", "samplers": [{"sampler": "top_k", "k": 40.0}]}, "t.json")
    assert p.samplers[0].params["k"] == 40 and type(p.samplers[0].params["k"]) is int
    [line] = error_lines({"name": "x", "samplers": [{"sampler": "top_k", "k": 40.5}]})
    assert line == "t.json: $.samplers[0].k: must be an integer >= 0, got 40.5"


@needs("temperature")
def test_parse_preset_bool_is_not_a_number():
    [line] = error_lines({"name": "x", "samplers": [{"sampler": "temperature", "temperature": True}]})
    assert line == "t.json: $.samplers[0].temperature: must be a number > 0, got boolean true"
    [line] = error_lines({"name": "x", "max_new_tokens": False})
    assert line.startswith("t.json: $.max_new_tokens: must be an integer >= 1, got boolean false")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_parse_preset_non_finite_scale_is_refused(value):
    [line] = error_lines({"name": "x", "cfg": {"scale": value}})
    assert line.startswith("t.json: $.cfg.scale: must be a number in [-1000, 1000] (finite), got ")


@needs("temperature", "top_p")
def test_parse_preset_collects_every_error_with_its_path():
    lines = error_lines({"name": "", "bogus": 1, "cfg": {"scale": "2"},
                         "samplers": [{"sampler": "temperature", "temperature": 0},
                                      {"sampler": "top_p", "p": 1.5}],
                         "stop": [""]}, "presets/x.json")
    paths = [re.match(r"presets/x\.json: (\S+):", line).group(1) for line in lines]
    assert sorted(paths) == sorted(["$.bogus", "$.name", "$.cfg.scale", "$.samplers[0].temperature",
                                    "$.samplers[1].p", "$.stop[0]"])
    assert "presets/x.json: $.samplers[1].p: must be a number in (0, 1], got 1.5" in lines


def test_parse_preset_error_is_one_preset_error_with_one_line_per_problem():
    with pytest.raises(PresetError) as info:
        parse_preset({"nme": "x", "do_sample": "yes"}, "a.json")
    assert str(info.value).splitlines() == list(info.value.errors)
    assert len(info.value.errors) == 3  # unknown key, missing name, do_sample type


def test_parse_preset_unknown_key_lists_valid_keys_and_a_suggestion():
    [line] = error_lines({"name": "x", "max_new_token": 5})
    assert "$.max_new_token: unknown key (did you mean 'max_new_tokens'?)" in line
    assert "format, name, description, cfg, samplers, max_new_tokens, stop, do_sample" in line


def test_parse_preset_last_token_mode_refuses_an_opposing_prompt():
    [line] = error_lines({"name": "x", "cfg": {"opposing_mode": "last-token", "opposing_prompt": "a"}})
    assert line.startswith("t.json: $.cfg.opposing_prompt: must be \"\" when opposing_mode is")
    p = parse_preset({"name": "x", "cfg": {"opposing_mode": "last-token", "scale": 1.5}}, "t.json")
    assert p.cfg.opposing_mode == "last-token"


def test_parse_preset_unknown_sampler_lists_the_registered_ones():
    [line] = error_lines({"name": "x", "samplers": [{"sampler": "nucleus"}]})
    assert line.startswith('t.json: $.samplers[0].sampler: unknown sampler "nucleus"')
    assert line.endswith("valid samplers: " + ", ".join(sorted(SAMPLERS)))


def test_parse_preset_cfg_in_the_chain_points_to_the_cfg_key():
    [line] = error_lines({"name": "x", "samplers": [{"sampler": "cfg", "scale": 1.5}]})
    assert "$.samplers[0].sampler: CFG is not a chain sampler: set it under $.cfg" in line


@needs("repetition_penalty")
def test_parse_preset_list_param_checks_each_item():
    [line] = error_lines({"name": "x", "samplers": [{"sampler": "repetition_penalty",
                                                     "whitelist": [3, "a"]}]})
    assert line.startswith("t.json: $.samplers[0].whitelist[1]: must be an integer")


def test_parse_preset_rejects_every_value_out_of_its_declared_range():
    # brute force over the registry: for each bounded numeric parameter, a value just outside
    # each bound is refused and the bound itself follows the inclusive/exclusive declaration
    checked = 0
    for name, cls in SAMPLERS.items():
        for p in cls.params:
            if p.kind not in (int, float) or p.choices is not None:
                continue
            for bound, excl, outside in ((p.min, p.min_exclusive, -1), (p.max, p.max_exclusive, +1)):
                if bound is None:
                    continue
                step = 1 if p.kind is int else 1e-3
                bad = bound + outside * step
                data = {"name": "x", "samplers": [{"sampler": name, p.name: bad}]}
                assert error_lines(data), (name, p.name, bad)
                at = {"name": "x", "samplers": [{"sampler": name, p.name: bound}]}
                if excl:
                    assert error_lines(at), (name, p.name, bound)
                checked += 1
    if SAMPLERS:
        assert checked > 0


# ---- immutability and the JSON form ---------------------------------------------------------


@needs("repetition_penalty")
def test_preset_is_immutable():
    p = parse_preset({"name": "x", "samplers": [{"sampler": "repetition_penalty",
                                                 "whitelist": [1, 2]}]}, "t.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "y"
    with pytest.raises(TypeError):
        p.samplers[0].params["penalty"] = 2.0
    assert p.samplers[0].params["whitelist"] == (1, 2)
    assert isinstance(p.samplers, tuple) and isinstance(p.stop, tuple)


@needs("top_p", "temperature")
def test_preset_to_dict_keeps_only_given_params_in_declaration_order():
    data = {"name": "x", "samplers": [{"p": 0.9, "sampler": "top_p"},
                                      {"sampler": "temperature"}]}
    d = parse_preset(data, "t.json").to_dict()
    assert list(d) == ["format", "name", "description", "cfg", "samplers", "max_new_tokens",
                       "stop", "do_sample"]
    assert d["samplers"] == [{"sampler": "top_p", "p": 0.9}, {"sampler": "temperature"}]
    assert list(d["samplers"][0]) == ["sampler", "p"]
    assert d["format"] == FORMAT and d["cfg"] == {"scale": 1.0, "opposing_prompt": "",
                                                  "opposing_mode": "text"}


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_to_dict_round_trips_every_builtin(path):
    p = load_preset(path)
    again = parse_preset(json.loads(json.dumps(p.to_dict())), "again")
    assert again == p
    # the JSON form is the file's content with the defaults made explicit
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert [dict(s) for s in raw.get("samplers", [])] == p.to_dict()["samplers"]


# ---- loading --------------------------------------------------------------------------------


def test_builtin_presets_are_at_least_eight_valid_one_line_described_files():
    names = builtin_names()
    assert len(names) >= 8
    assert names == [p.stem for p in PRESET_FILES]
    for preset in list_presets():
        assert preset.name in names
        assert preset.description and "\n" not in preset.description
    assert [p.name for p in list_presets()] == names  # the file stem is the preset's name


def test_builtin_presets_cover_the_promised_settings():
    by_name = {p.name: p for p in list_presets()}
    assert by_name["plain"].cfg.scale == 1 and by_name["plain"].samplers == ()
    assert by_name["greedy"].do_sample is False
    assert by_name["strong-cfg"].cfg.scale == 3
    assert by_name["negative-prompt"].cfg.opposing_prompt
    lam = by_name["paper-lambada"]
    assert (lam.cfg.opposing_mode, lam.cfg.scale, lam.do_sample) == ("last-token", 1.5, False)
    assert any(s.name == "mirostat" for s in by_name["mirostat"].samplers)
    assert {"dry", "xtc"} <= {s.name for s in by_name["dry-xtc-creative"].samplers}


def test_load_preset_unknown_name_lists_the_builtins():
    with pytest.raises(PresetError) as info:
        load_preset("balanced-stroy")
    msg = str(info.value)
    assert "unknown preset 'balanced-stroy' (did you mean 'balanced-story'?)" in msg
    assert "built-in presets: " + ", ".join(builtin_names()) in msg


def test_load_preset_builtin_name_wins_over_a_bare_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "greedy").write_text('{"name": "impostor"}')
    (tmp_path / "mine").write_text('{"name": "mine"}')
    assert load_preset("greedy").name == "greedy"
    assert load_preset("./greedy").name == "impostor"
    assert load_preset("mine").name == "mine"


def test_load_preset_invalid_json_says_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "x",\n  "stop": [,]\n}\n', encoding="utf-8")
    with pytest.raises(PresetError) as info:
        load_preset(path)
    assert str(info.value) == f"{path}: not valid JSON: Expecting value at line 3, column 12"


def test_load_preset_refuses_a_file_above_one_mebibyte(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"name": "x", "description": "' + "a" * MAX_PRESET_BYTES + '"}')
    with pytest.raises(PresetError, match=r"big\.json: file is \d+ bytes; a preset may be at most"):
        load_preset(path)
    small = tmp_path / "ok.json"
    small.write_text('{"name": "x", "description": "' + "a" * (MAX_PRESET_BYTES - 100) + '"}')
    assert load_preset(small).name == "x"


def test_load_preset_reports_a_duplicate_key_by_path(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"name": "x", "cfg": {"scale": 1.5, "scale": 3}}')
    with pytest.raises(PresetError) as info:
        load_preset(path)
    assert str(info.value) == f"{path}: $.cfg.scale: duplicate key (the second value would silently win)"


def test_load_preset_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(PresetError, match="no such preset file"):
        load_preset(tmp_path / "nope.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(PresetError, match="not UTF-8"):
        load_preset(latin)


def test_load_preset_nan_literal_in_the_file_is_refused(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"name": "x", "cfg": {"scale": NaN}}')
    with pytest.raises(PresetError, match=r"\$\.cfg\.scale: must be a number in \[-1000, 1000\] \(finite\), got NaN"):
        load_preset(path)


# ---- JSON Schema ----------------------------------------------------------------------------

# The schema is checked with the `jsonschema` package (the `test` extra), an implementation of
# Draft 2020-12 independent of pydantic, which generates the schema.


def _all_validators():
    jsonschema.Draft202012Validator.check_schema(preset_schema())
    validator = jsonschema.Draft202012Validator(preset_schema())
    return [lambda data: [e.message for e in validator.iter_errors(data)]]


def test_preset_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(preset_schema())
    assert preset_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def _sampler_defs() -> dict:
    """sampler name -> its schema, through the `samplers` items' oneOf references."""
    schema = preset_schema()
    refs = schema["properties"]["samplers"]["items"]["oneOf"]
    defs = [schema["$defs"][r["$ref"].rsplit("/", 1)[1]] for r in refs]
    return {d["properties"]["sampler"]["const"]: d for d in defs}


def test_preset_schema_is_generated_from_the_param_declarations():
    defs = _sampler_defs()
    assert set(defs) == set(SAMPLERS)
    for name, cls in SAMPLERS.items():
        d = defs[name]
        assert d["additionalProperties"] is False and d["properties"]["sampler"]["const"] == name
        assert d["required"] == ["sampler"]
        assert list(d["properties"]) == ["sampler"] + [p.name for p in cls.params]
        for p in cls.params:
            default = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
            assert d["properties"][p.name]["default"] == default
            assert d["properties"][p.name]["description"] and d["properties"][p.name]["title"]


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_schema_accepts_every_builtin(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    for check in _all_validators():
        assert check(data) == []


SCHEMA_INVALID = [
    {"samplers": []},                                          # no name
    {"name": ""},
    {"name": "x", "format": "cfg-textgen-preset/2"},
    {"name": "x", "extra": 1},
    {"name": "x", "cfg": {"scale": "1.5"}},
    {"name": "x", "cfg": {"negative": ""}},
    {"name": "x", "cfg": {"opposing_mode": "first"}},
    {"name": "x", "cfg": {"opposing_mode": "last-token", "opposing_prompt": "a"}},
    {"name": "x", "samplers": [{"sampler": "nucleus"}]},
    {"name": "x", "samplers": [{"p": 0.5}]},
    {"name": "x", "max_new_tokens": 0},
    {"name": "x", "max_new_tokens": 2.5},
    {"name": "x", "stop": "\n"},
    {"name": "x", "stop": [""]},
    {"name": "x", "do_sample": 1},
]
SCHEMA_INVALID_SAMPLERS = [
    ("top_p", {"p": 1.5}), ("top_p", {"p": 0}), ("temperature", {"temperature": True}),
    ("temperature", {"t": 1.0}), ("top_k", {"k": -1}), ("top_k", {"k": 2.5}),
    ("mirostat", {"version": 3}), ("repetition_penalty", {"whitelist": ["a"]}),
    ("dry", {"sequence_breakers": [1]}), ("epsilon", {"epsilon": 1}),
]


@pytest.mark.parametrize("data", SCHEMA_INVALID + [
    {"name": "x", "samplers": [{"sampler": s, **params}]} for s, params in SCHEMA_INVALID_SAMPLERS])
def test_preset_schema_and_parse_preset_both_reject_invalid_presets(data):
    names = [e["sampler"] for e in data.get("samplers", []) if "sampler" in e]
    if any(n not in SAMPLERS and n != "nucleus" for n in names):
        pytest.skip(f"samplers not registered yet: {names}")
    with pytest.raises(PresetError):
        parse_preset(data, "t.json")
    for check in _all_validators():
        assert check(data) != []


# The CLI's bad-preset table (test_presets_cli.py): the schema refuses every case that is about the
# JSON itself. Not these: the file is not JSON at all; Infinity is not JSON and JSON Schema has no
# "finite" (Python's json reads it as a float, which "type": "number" accepts); a duplicate key is
# gone once the JSON is parsed (the last value wins), before any schema sees it.
# (an infinite scale is beyond the schema's maximum too, so the schema refuses it)
NOT_ABOUT_THE_JSON = {"not-json": "not JSON", "duplicate-key": "duplicate key"}


@pytest.mark.parametrize("name, content", [b[:2] for b in BAD_PRESETS], ids=[b[0] for b in BAD_PRESETS])
def test_preset_schema_rejects_every_bad_preset_of_the_cli_table(name, content):
    [check] = _all_validators()
    if name == "not-json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
    elif name in NOT_ABOUT_THE_JSON:
        assert check(json.loads(content)) == []  # parse_preset refuses it; the schema cannot
    else:
        assert check(json.loads(content)) != []


# ---- building the chain ---------------------------------------------------------------------


@needs("temperature", "top_k")
def test_build_chain_applies_samplers_in_the_preset_order():
    # hand-computed: temperature 2 halves the logits, then top-k 2 keeps the two largest
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    ids = torch.tensor([[0]])
    inf = float("-inf")
    preset = parse_preset({"name": "x", "samplers": [{"sampler": "temperature", "temperature": 2},
                                                     {"sampler": "top_k", "k": 2}]}, "t.json")
    assert torch.equal(build_chain(preset)(ids, logits), torch.tensor([[inf, 2.0, inf, 1.5]]))
    # the other order keeps the same tokens, but top_k first must not see halved logits
    other = parse_preset({"name": "x", "samplers": [{"sampler": "top_k", "k": 2},
                                                    {"sampler": "temperature", "temperature": 2}]},
                         "t.json")
    assert torch.equal(build_chain(other)(ids, logits), torch.tensor([[inf, 2.0, inf, 1.5]]))
    assert torch.equal(logits, torch.tensor([[1.0, 4.0, 2.0, 3.0]]))  # input untouched


def test_build_chain_order_changes_the_result_when_the_samplers_do_not_commute():
    """min-p keeps a token whose probability is at least p times the best one's, and temperature
    changes those ratios, so the two orders keep different tokens (hand-computed): a chain that
    ran its samplers in any other order than the preset's fails here."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids = torch.tensor([[0]])
    inf = float("-inf")

    def chain(*samplers):
        return build_chain(parse_preset({"name": "x", "samplers": list(samplers)}, "t.json"))(ids, logits)

    sharpen, min_p = {"sampler": "temperature", "temperature": 0.5}, {"sampler": "min_p", "p": 0.1}
    # temperature first: [0, 2, 4, 6]; ratios to the best e^-6, e^-4, e^-2 = 0.0025, 0.018, 0.135
    assert torch.equal(chain(sharpen, min_p), torch.tensor([[inf, inf, 4.0, 6.0]]))
    # min-p first on [0, 1, 2, 3]: ratios e^-3, e^-2, e^-1 = 0.050, 0.135, 0.368; then halved T
    assert torch.equal(chain(min_p, sharpen), torch.tensor([[inf, 2.0, 4.0, 6.0]]))


@needs("temperature", "mirostat")
def test_build_chain_gives_fresh_objects_per_generation():
    preset = parse_preset({"name": "x", "samplers": [{"sampler": "mirostat"},
                                                     {"sampler": "temperature"}]}, "t.json")
    a, b = build_chain(preset), build_chain(preset)
    assert [type(s).name for s in a] == ["mirostat", "temperature"]
    assert all(x is not y for x, y in zip(a, b))


@needs("xtc")
def test_build_chain_gives_the_generator_to_random_samplers():
    preset = parse_preset({"name": "x", "samplers": [{"sampler": "xtc", "threshold": 0.05,
                                                      "probability": 0.5, "protect_newline_eos": False}]},
                          "t.json")
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0]])
    ids = torch.tensor([[0]])

    def run(global_seed):
        torch.manual_seed(global_seed)  # must not matter: the draws come from the generator
        chain = build_chain(preset, generator=torch.Generator().manual_seed(7))
        return [torch.isinf(chain(ids, logits)).any().item() for _ in range(24)]

    first = run(1)
    assert run(2) == first and 0 < sum(first) < 24


def test_build_chain_unknown_sampler_in_a_hand_built_preset_is_a_preset_error():
    with pytest.raises(PresetError, match="unknown sampler 'nucleus'"):  # now when the preset is built
        build_chain(Preset(name="x", samplers=(SamplerSpec("nucleus", {}),)))


def test_build_processors_puts_cfg_first_only_when_scale_is_not_one(tiny_tokenizer):
    guidance = pytest.importorskip("cfg_textgen.guidance")
    model = make_tiny_model("llama")
    plain = parse_preset({"name": "x", "samplers": [{"sampler": "repetition_penalty", "penalty": 1.3}]},
                         "t.json")
    procs = build_processors(plain, model, tiny_tokenizer)
    # without CFG the samplers see the model's raw logits, as in every reference app (no
    # log-probabilities step first); the penalty then acts on raw logits as transformers' does
    assert [type(p).__name__ for p in procs] == ["RepetitionPenalty"]
    scores = torch.tensor([[2.0, -1.0, 0.5]])
    got = procs(torch.tensor([[0, 1]]), scores.clone())
    assert torch.allclose(got, torch.tensor([[2.0 / 1.3, -1.0 * 1.3, 0.5]]))  # HF: x/p if x>0 else x*p
    with_cfg = parse_preset({"name": "x", "cfg": {"scale": 1.5}}, "t.json")
    procs = build_processors(with_cfg, model, tiny_tokenizer)
    assert len(procs) == 1 and isinstance(procs[0], guidance.CFGLogitsProcessor)
    assert procs[0].scale == 1.5


def test_generate_kwargs_with_cfg_needs_the_model():
    with pytest.raises(Exception, match="needs the model"):
        generate_kwargs(parse_preset({"name": "x", "cfg": {"scale": 2}}, "t.json"))


# ---- generate == the chain by hand ----------------------------------------------------------


def _pick(scores, do_sample):
    try:
        from cfg_textgen.samplers import pick_token
    except ImportError:
        pick_token = None
    if pick_token is not None:
        return pick_token(scores, do_sample=do_sample)
    if do_sample:  # what transformers' _sample does
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


def manual_decode(model, input_ids, processors, steps, do_sample, eos_token_id):
    """A plain KV-cached decode loop: forward, our processors, pick; stops at EOS like generate."""
    ids, past, scores_seen = input_ids, None, []
    step_input = input_ids
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=step_input, **{cache_keyword(model): past}, use_cache=True)
            past = returned_cache(out)
            scores = processors(ids, out.logits[:, -1, :].float())
            scores_seen.append(scores)
            token = _pick(scores, do_sample)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            step_input = token[:, None]
            if int(token[0]) == eos_token_id:
                break
    return ids, scores_seen


def _model_with_meddling_generation_config():
    model = make_tiny_model("llama")
    gc = model.generation_config
    gc.temperature, gc.top_k, gc.top_p, gc.do_sample = 0.5, 5, 0.5, True
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 1.3, 2, 5
    return model


def _generate(model, input_ids, kwargs):
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, list(out.scores)


@needs("temperature")
def test_generate_kwargs_neutralise_the_models_generation_config():
    model = _model_with_meddling_generation_config()
    # no truncation in the preset: every token the model's config would remove (top-k 5, top-p,
    # EOS before min_new_tokens) shows up as a -inf that the chain by hand does not have
    preset = parse_preset({"name": "x", "max_new_tokens": 12, "samplers": [
        {"sampler": "temperature", "temperature": 1.5}]}, "t.json")
    input_ids = torch.tensor([[1, 20, 31, 47, 5]])

    torch.manual_seed(3)
    seq, scores = _generate(model, input_ids, generate_kwargs(preset))
    torch.manual_seed(3)
    ref_seq, ref_scores = manual_decode(model, input_ids, build_processors(preset), 12, True,
                                        model.config.eos_token_id)
    assert seq.tolist() == ref_seq.tolist()
    for got, want in zip(scores, ref_scores):
        torch.testing.assert_close(got, want)

    # control: the same chain without our neutral kwargs is changed by the model's config
    torch.manual_seed(3)
    _, naive_scores = _generate(model, input_ids, {"logits_processor": build_processors(preset),
                                                   "do_sample": True, "max_new_tokens": 12})
    assert not torch.isinf(ref_scores[0]).any() and torch.isinf(naive_scores[0]).any()


ACCEPTANCE = {"name": "acceptance", "max_new_tokens": 16, "samplers": [
    {"sampler": "repetition_penalty", "penalty": 1.2},
    {"sampler": "temperature", "temperature": 0.9},
    {"sampler": "top_k", "k": 50},
    {"sampler": "top_p", "p": 0.9},
    {"sampler": "min_p", "p": 0.02},
]}


def _acceptance(preset, seed, tokenizer=None):
    model = _model_with_meddling_generation_config()
    input_ids = torch.tensor([[1, 60, 61, 62, 63, 64]])
    for s in (seed, seed + 1, seed + 2):
        torch.manual_seed(s)
        seq, _ = _generate(model, input_ids, generate_kwargs(preset, model, tokenizer))
        torch.manual_seed(s)
        ref, _ = manual_decode(model, input_ids, build_processors(preset, model, tokenizer),
                               preset.max_new_tokens, preset.do_sample, model.config.eos_token_id)
        assert seq.tolist() == ref.tolist(), s


@needs("repetition_penalty", "temperature", "top_k", "top_p", "min_p")
def test_generate_with_preset_kwargs_equals_the_chain_by_hand_without_cfg():
    _acceptance(parse_preset(ACCEPTANCE, "t.json"), seed=0)


@needs("repetition_penalty", "temperature", "top_k", "top_p", "min_p")
@pytest.mark.parametrize("cfg", [{"scale": 1.5}, {"scale": 1.5, "opposing_mode": "last-token"},
                                 {"scale": 3.0, "opposing_prompt": "the cold wind"}])
def test_generate_with_preset_kwargs_equals_the_chain_by_hand_with_cfg(cfg, tiny_tokenizer):
    pytest.importorskip("cfg_textgen.guidance")
    _acceptance(parse_preset({**ACCEPTANCE, "cfg": cfg}, "t.json"), seed=10, tokenizer=tiny_tokenizer)


def test_generate_with_a_greedy_preset_equals_argmax_by_hand():
    model = _model_with_meddling_generation_config()
    preset = parse_preset({"name": "g", "do_sample": False, "max_new_tokens": 10}, "t.json")
    input_ids = torch.tensor([[1, 7, 8, 9]])
    seq, _ = _generate(model, input_ids, generate_kwargs(preset))
    ref, _ = manual_decode(model, input_ids, build_chain(preset), 10, False, model.config.eos_token_id)
    assert seq.tolist() == ref.tolist()


@pytest.mark.parametrize("name", builtin_names())
def test_generate_kwargs_every_builtin_runs_on_a_tiny_model(name, tiny_tokenizer):
    model = make_tiny_model("llama")
    preset = dataclasses.replace(load_preset(name), max_new_tokens=6)
    input_ids = tiny_tokenizer("The knight rode", return_tensors="pt").input_ids
    torch.manual_seed(0)
    seq, scores = _generate(model, input_ids, generate_kwargs(preset, model, tiny_tokenizer))
    assert 1 <= seq.shape[1] - input_ids.shape[1] <= 6
    assert all(not torch.isnan(s).any() and torch.isfinite(s).any() for s in scores)


# ---- the installed package ------------------------------------------------------------------


def test_builtin_presets_load_by_name_from_a_built_wheel(tmp_path):
    """Build a wheel from a copy of the sources (no build isolation: no network), unpack it, and
    load every built-in preset by name in a fresh interpreter that cannot see the checkout.
    Takes a few seconds."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "cfg_textgen", src / "cfg_textgen", ignore=ignore)
    shutil.copytree(REPO / "presets", src / "presets", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", src)
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text(encoding="utf-8") if readme.exists() else "x\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("cfg_textgen-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    assert sorted(p.name for p in (site / "cfg_textgen" / "presets_data").glob("*.json")) == \
        sorted(p.name for p in PRESET_FILES)

    code = ("import json, cfg_textgen.presets as P\n"
            "print(json.dumps({'file': P.__file__, 'dir': str(P._builtin_dir()),\n"
            "                  'names': [p.name for p in P.list_presets()],\n"
            "                  'story': P.load_preset('balanced-story').to_dict()}))\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True)
    got = json.loads(out.stdout)
    assert got["file"].startswith(str(site)) and got["dir"].startswith(str(site))
    assert got["names"] == [p.stem for p in PRESET_FILES]
    assert got["story"] == load_preset("balanced-story").to_dict()

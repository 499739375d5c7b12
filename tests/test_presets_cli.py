"""`cfg-textgen presets list / show / validate / schema` through click's CliRunner: exit code,
stdout and stderr asserted separately (click >= 8.2 keeps stderr apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.presets import MAX_PRESET_BYTES, builtin_names, load_preset, preset_schema
from cfg_textgen.samplers import SAMPLERS

REPO = Path(__file__).resolve().parent.parent
VALID_SAMPLERS = ", ".join(sorted(SAMPLERS))
TOP_KEYS = "format, name, description, cfg, samplers, max_new_tokens, stop, do_sample, grammar, banned_strings, ban_case_sensitive"


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_presets_list_prints_a_table_of_every_builtin():
    result = run("presets", "list")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == builtin_names()
    for line in lines[1:]:
        name = line.split()[0]
        assert line.endswith(load_preset(name).description)
        assert line.index(load_preset(name).description) == lines[0].index("DESCRIPTION")


@pytest.mark.parametrize("name", ["balanced-story", "paper-lambada"])
def test_presets_show_prints_the_json_form_of_a_builtin(name):
    result = run("presets", "show", name)
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout) == load_preset(name).to_dict()
    assert result.stdout.startswith('{\n  "format": "cfg-textgen-preset/1",\n  "name": ')


def test_presets_show_reads_a_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"name": "mine", "samplers": [{"sampler": "top_p", "p": 0.9}]}')
    result = run("presets", "show", str(path))
    assert result.exit_code == 0 and result.stderr == ""
    shown = json.loads(result.stdout)
    assert shown["name"] == "mine" and shown["samplers"] == [{"sampler": "top_p", "p": 0.9}]
    assert shown["cfg"] == {"scale": 1.0, "opposing_prompt": "", "opposing_mode": "text"}


def test_presets_show_unknown_name_lists_the_builtins_on_stderr():
    result = run("presets", "show", "nope")
    assert result.exit_code == 1 and result.stdout == ""
    assert "unknown preset 'nope'" in result.stderr
    assert "built-in presets: " + ", ".join(builtin_names()) in result.stderr


def test_presets_schema_prints_the_json_schema():
    result = run("presets", "schema")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout) == preset_schema()


def test_presets_validate_accepts_every_builtin_file():
    files = sorted(str(p) for p in (REPO / "presets").glob("*.json"))
    result = run("presets", "validate", *files)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for line, path in zip(lines, files):
        assert line.startswith(f"OK {path} ({load_preset(path).name}: ")


def test_presets_validate_needs_a_file():
    result = run("presets", "validate")
    assert result.exit_code == 2 and "Missing argument 'FILE...'" in result.stderr


# (id, file content, the exact error after "FILE: ")
OK = '"name": "x"'
BAD_PRESETS = [
    ("not-json", '{"name": "x",\n  "cfg": {"scale": 1.5,}\n}',
     "not valid JSON: Expecting property name enclosed in double quotes at line 2, column 24"),
    ("not-an-object", '["name", "x"]', '$: must be an object, got array ["name", "x"]'),
    ("missing-name", '{"description": "d"}', '$: missing required key "name"'),
    ("blank-name", '{"name": "  "}', '$.name: must be a non-empty string (not only spaces), got "  "'),
    ("bad-format", '{"format": "cfg-textgen-preset/2", ' + OK + "}",
     '$.format: must be one of "cfg-textgen-preset/1", got "cfg-textgen-preset/2"'),
    ("unknown-top-key", "{" + OK + ', "temprature": 0.7}',
     f"$.temprature: unknown key; valid top-level keys: {TOP_KEYS}"),
    ("unknown-cfg-key", "{" + OK + ', "cfg": {"negative_prompt": "dull"}}',
     "$.cfg.negative_prompt: unknown key; valid cfg keys: scale, opposing_prompt, opposing_mode"),
    ("scale-is-a-string", "{" + OK + ', "cfg": {"scale": "1.5"}}',
     '$.cfg.scale: must be a number in [-1000, 1000], got string "1.5"'),
    ("scale-beyond-the-range", "{" + OK + ', "cfg": {"scale": 1e39}}',  # the combine would overflow
     "$.cfg.scale: must be a number in [-1000, 1000], got 1e+39"),
    ("scale-is-infinite", "{" + OK + ', "cfg": {"scale": Infinity}}',
     "$.cfg.scale: must be a number in [-1000, 1000] (finite), got Infinity"),
    ("bad-opposing-mode", "{" + OK + ', "cfg": {"opposing_mode": "first-token"}}',
     '$.cfg.opposing_mode: must be one of "text", "last-token", got "first-token"'),
    ("last-token-with-prompt", "{" + OK + ', "cfg": {"opposing_mode": "last-token", '
     '"opposing_prompt": "boring"}}',
     '$.cfg.opposing_prompt: must be "" when opposing_mode is "last-token" (that mode takes the '
     'opposing branch from the last prompt token), got "boring"'),
    ("samplers-not-a-list", "{" + OK + ', "samplers": {"sampler": "top_p"}}',
     '$.samplers: must be an array of sampler objects, got object {"sampler": "top_p"}'),
    ("sampler-without-name", "{" + OK + ', "samplers": [{"p": 0.9}]}',
     f'$.samplers[0]: missing key "sampler"; valid samplers: {VALID_SAMPLERS}'),
    ("unknown-sampler", "{" + OK + ', "samplers": [{"sampler": "top-p", "p": 0.9}]}',
     f"$.samplers[0].sampler: unknown sampler \"top-p\" (did you mean 'top_p'?); "
     f"valid samplers: {VALID_SAMPLERS}"),
    ("cfg-as-sampler", "{" + OK + ', "samplers": [{"sampler": "cfg"}]}',
     "$.samplers[0].sampler: CFG is not a chain sampler: set it under $.cfg (it always runs first)"),
    ("unknown-sampler-param", "{" + OK + ', "samplers": [{"sampler": "temperature", "temp": 0.7}]}',
     "$.samplers[0].temp: unknown key (did you mean 'temperature'?); "
     "valid 'temperature' keys: sampler, temperature"),
    ("top-p-above-one", "{" + OK + ', "samplers": [{"sampler": "temperature"}, '
     '{"sampler": "top_k", "k": 40}, {"sampler": "top_p", "p": 1.5}]}',
     "$.samplers[2].p: must be a number in (0, 1], got 1.5"),
    ("temperature-zero", "{" + OK + ', "samplers": [{"sampler": "temperature", "temperature": 0}]}',
     "$.samplers[0].temperature: must be a number > 0, got 0"),
    ("bool-as-number", "{" + OK + ', "samplers": [{"sampler": "min_p", "p": true}]}',
     "$.samplers[0].p: must be a number in [0, 1], got boolean true"),
    ("fractional-top-k", "{" + OK + ', "samplers": [{"sampler": "top_k", "k": 2.5}]}',
     "$.samplers[0].k: must be an integer >= 0, got 2.5"),
    ("mirostat-version", "{" + OK + ', "samplers": [{"sampler": "mirostat", "version": 3}]}',
     "$.samplers[0].version: must be one of 1, 2, got 3"),
    ("whitelist-item", "{" + OK + ', "samplers": [{"sampler": "repetition_penalty", '
     '"whitelist": [5, -1]}]}',
     "$.samplers[0].whitelist[1]: must be an integer >= 0, got -1"),
    ("dry-breakers", "{" + OK + ', "samplers": [{"sampler": "dry", "sequence_breakers": "\\n"}]}',
     '$.samplers[0].sequence_breakers: must be an array, got string "\\n"'),
    ("max-new-tokens-zero", "{" + OK + ', "max_new_tokens": 0}',
     "$.max_new_tokens: must be an integer >= 1, got 0"),
    ("stop-is-a-string", "{" + OK + ', "stop": "\\n\\n"}',
     '$.stop: must be an array of strings, got string "\\n\\n"'),
    ("stop-empty-string", "{" + OK + ', "stop": ["END", ""]}',
     '$.stop[1]: must be a non-empty string, got ""'),
    ("do-sample-string", "{" + OK + ', "do_sample": "yes"}',
     '$.do_sample: must be true or false, got string "yes"'),
    ("duplicate-key", "{" + OK + ', "cfg": {"scale": 1.5, "scale": 3}}',
     "$.cfg.scale: duplicate key (the second value would silently win)"),
]


@pytest.mark.parametrize("content, expected", [b[1:] for b in BAD_PRESETS],
                         ids=[b[0] for b in BAD_PRESETS])
def test_presets_validate_names_file_and_json_path_of_each_error(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    result = run("presets", "validate", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"{path}: {expected}\n1 of 1 preset files invalid\n"


def test_presets_validate_bad_preset_table_has_at_least_fifteen_distinct_errors():
    assert len({b[2] for b in BAD_PRESETS}) >= 15


def test_presets_validate_refuses_a_huge_file_and_non_utf8(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_PRESET_BYTES + 1))
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "d\u00e9j\u00e0"}'.encode("latin-1"))
    result = run("presets", "validate", str(big), str(latin))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{big}: file is {MAX_PRESET_BYTES + 1} bytes; a preset may be at most "
        f"{MAX_PRESET_BYTES} bytes (1 MiB)",
        f"{latin}: not UTF-8 text (byte 11: invalid continuation byte)",
        "2 of 2 preset files invalid",
    ]


def test_presets_validate_reports_every_error_of_every_file_and_oks_the_good_ones(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"name": "good", "cfg": {"scale": 1.5}, '
                    '"samplers": [{"sampler": "top_k", "k": 40}]}')
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "", "samplers": [{"sampler": "top_p", "p": 0}], "stop": [1]}')
    missing = tmp_path / "missing.json"
    result = run("presets", "validate", str(bad), str(good), str(missing))
    assert result.exit_code == 1
    assert result.stdout == f"OK {good} (good: 1 samplers, CFG scale 1.5)\n"
    assert result.stderr.splitlines() == [
        f'{bad}: $.name: must be a non-empty string (not only spaces), got ""',
        f"{bad}: $.samplers[0].p: must be a number in (0, 1], got 0",
        f"{bad}: $.stop[0]: must be a string, got number 1",
        f"{missing}: no such preset file",
        "2 of 3 preset files invalid",
    ]

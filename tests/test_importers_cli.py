"""`cfg-textgen presets import/export`: output to file or stdout, report to stderr, and hostile
input refused with a message naming the file, a non-zero exit and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.presets import parse_preset

COMMUNITY = next((p / "shared" / "community-presets" for p in Path(__file__).resolve().parents[1].parents
                  if (p / "shared" / "community-presets").is_dir()),
                 Path(__file__).resolve().parents[1].parent / "shared" / "community-presets")  # worktrees: one up
needs_community = pytest.mark.skipif(
    not COMMUNITY.is_dir(), reason=f"community presets not found at {COMMUNITY} (CI puts ../shared beside the clone)")


def run(*args):
    return CliRunner().invoke(main, ["presets", *map(str, args)])


@needs_community
def test_presets_import_writes_preset_to_file_and_report_to_stderr(tmp_path):
    out = tmp_path / "golden.json"
    src = COMMUNITY / "novelai/official/llama_3_erato_v1/Golden Arrow.preset"
    result = run("import", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "parameters.phrase_rep_pen" in result.stderr and "not carried over" in result.stderr
    preset = parse_preset(json.loads(out.read_text(encoding="utf-8")), str(out))
    assert preset.name == "Golden Arrow"
    assert [s.name for s in preset.samplers] == ["repetition_penalty", "unified", "top_p"]
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


@needs_community
def test_presets_import_to_stdout_with_name():
    result = run("import", COMMUNITY / "textgen-webui/Titanic.yaml", "--name", "titanic")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "titanic"
    assert "text-generation-webui" in result.stderr


def test_presets_export_writes_each_format(tmp_path):
    for fmt in ("novelai", "sillytavern-textgen"):
        out = tmp_path / f"out-{fmt}.json"
        result = run("export", "balanced-story", "--format", fmt, "-o", out)
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text(encoding="utf-8"))
        assert ("parameters" in data) == (fmt == "novelai")
        assert "mapped" in result.stderr


def test_presets_export_unknown_preset_writes_nothing(tmp_path):
    out = tmp_path / "out.json"
    result = run("export", "no-such-preset", "--format", "novelai", "-o", out)
    assert result.exit_code != 0
    assert "no-such-preset" in result.output
    assert not out.exists()


NESTED = "[" * 200_000 + "]" * 200_000
BOMB = "\n".join(
    ["a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
       f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]
    + ["temperature: *i"]) + "\n"
HOSTILE = {
    "truncated.json": ('{"temp": 0.7, "top_p": 0.9, "sampler_prio', "invalid JSON"),
    "wrong-type.json": ('{"temp": "hot", "rep_pen": 1.1, "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5]}',
                        "temp: must be a number"),
    "unknown-id.json": ('{"order": [0, 42], "temperature": 0.8, "tail_free_sampling": 1}', "order[1]"),
    "unknown-name.preset": ('{"presetVersion": 3, "name": "x", "parameters": {"order": [{"id": "banana", '
                            '"enabled": true}]}}', "banana"),
    "bad-enabled.preset": ('{"presetVersion": 3, "parameters": {"order": [{"id": "top_k", "enabled": "yes"}]}}',
                           "enabled"),
    "bad-priority.json": ('{"temp": 0.7, "typical_p": 1, "sampler_priority": ["temperature", "warp_drive"]}',
                          "warp_drive"),
    "out-of-range.json": ('{"temp": 0.7, "typical_p": 1, "top_p": 1.5, "sampler_priority": ["top_p"]}', "top_p"),
    "nested.json": (NESTED, "nested"),
    "bomb.yaml": (BOMB, "aliases are not allowed"),
    "list.yaml": ("- 1\n- 2\n", "not a KoboldAI bundle"),
    "unknown.json": ('{"colour": "blue"}', "unrecognised preset format"),
    "empty.json": ("", "empty"),
    "latin1.json": (b'{"temp": 0.7, "negative_prompt": "caf\xe9"}', "not UTF-8"),
}


@pytest.mark.parametrize("filename", sorted(HOSTILE))
def test_presets_import_hostile_input_fails_cleanly(tmp_path, filename):
    content, message = HOSTILE[filename]
    src = tmp_path / filename
    src.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "out.json"
    result = run("import", src, "-o", out)
    assert result.exit_code != 0
    assert str(src) in result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]  # nothing written, no temp file


def test_presets_import_refuses_a_huge_file_before_reading_it(tmp_path, monkeypatch):
    src = tmp_path / "huge.json"
    with open(src, "wb") as fh:
        fh.write(b'{"temp": 0.7}')
        fh.truncate(50 * 1024 * 1024)  # 50 MB (sparse)
    read = []
    real_open = open

    def spy_open(path, *args, **kwargs):
        if str(path) == str(src):
            read.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    out = tmp_path / "out.json"
    result = run("import", src, "-o", out)
    assert result.exit_code != 0
    assert str(src) in result.output and "byte limit" in result.output
    assert read == []  # refused from its size alone
    assert not out.exists()


def test_presets_import_existing_output_is_untouched_on_error(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text('{"order": [99]}', encoding="utf-8")
    out = tmp_path / "out.json"
    out.write_text("keep me", encoding="utf-8")
    result = run("import", src, "-o", out)
    assert result.exit_code != 0
    assert out.read_text(encoding="utf-8") == "keep me"


def test_presets_import_missing_file_names_it(tmp_path):
    result = run("import", tmp_path / "nope.preset")
    assert result.exit_code != 0
    assert "nope.preset" in result.output

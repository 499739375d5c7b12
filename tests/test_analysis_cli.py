"""`cfg-textgen sweep / explain / eval lambada` through click's CliRunner on a tiny model folder:
what goes to stdout and stderr, the report file, and the errors."""

from __future__ import annotations

import base64
import re
import sys

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main


def run(args, env=None):
    result = CliRunner().invoke(main, args, env=env or {})
    return result


def test_sweep_shows_texts_in_columns_and_a_metric_row_per_scale(tiny_model_dir):
    r = run(["sweep", "Once upon a time", "--model", str(tiny_model_dir), "--scales", "0,1,3",
             "--tokens", "5", "--seed", "3"], env={"COLUMNS": "150"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert re.match(r"scale 0 +scale 1 +scale 3$", lines[0])
    header = next(i for i, ln in enumerate(lines) if ln.startswith("scale  fluency"))
    assert [ln.split()[0] for ln in lines[header + 2:header + 5]] == ["0", "1", "3"]
    assert lines[header + 3].split()[5] == "0.000"  # scale 1 differs from itself by nothing
    assert "sweep:" not in r.stderr + r.stdout  # the progress bar: on a terminal stderr only (test_progress.py)
    assert "seed" not in r.stderr  # a given seed is not announced


def test_sweep_narrow_terminal_gives_sections_and_announces_a_random_seed(tiny_model_dir):
    r = run(["sweep", "Once upon a time", "--model", str(tiny_model_dir), "--scales", "1.5,1",
             "--tokens", "4"], env={"COLUMNS": "30"})
    assert r.exit_code == 0, r.output
    assert "=== scale 1.5 ===" in r.stdout and "=== scale 1 ===" in r.stdout
    seed = re.search(r"seed (\d+) \(repeat with --seed \1\)", r.stderr)
    assert seed
    # the announced seed reproduces the texts
    again = run(["sweep", "Once upon a time", "--model", str(tiny_model_dir), "--scales", "1.5,1",
                 "--tokens", "4", "--seed", seed.group(1)], env={"COLUMNS": "30"})
    assert again.stdout == r.stdout


def test_sweep_same_seed_text_matches_explain_at_that_scale(tiny_model_dir):
    common = ["--model", str(tiny_model_dir), "--tokens", "6", "--seed", "11"]
    sweep = run(["sweep", "The knight", "--scales", "2", *common], env={"COLUMNS": "1000"})
    explain = run(["explain", "The knight", "--scale", "2", *common])
    assert sweep.exit_code == 0 and explain.exit_code == 0, sweep.output + explain.output
    section = sweep.stdout.split("=== scale 2 ===\n")[1].split("\n\nscale  fluency")[0]
    text = explain.stdout.split("\n\n[1] ")[0].removeprefix("text: ")
    assert "".join(section.split()) == "".join(text.split()) != ""


def test_sweep_report_is_self_contained_html(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.html"
    r = run(["sweep", "A <b>bold</b> prompt", "--model", str(tiny_model_dir), "--scales", "0,1,2",
             "--tokens", "4", "--seed", "1", "--report", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text(encoding="utf-8")
    assert "A &lt;b&gt;bold&lt;/b&gt; prompt" in page and "<b>bold" not in page
    png = base64.b64decode(re.search(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1))
    assert png.startswith(b"\x89PNG")
    assert page.count("<h3>scale ") == 3
    assert f"wrote {out}" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.html"]


def test_sweep_report_without_matplotlib_fails_before_generating(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run(["sweep", "Once", "--model", str(tiny_model_dir), "--report", str(tmp_path / "r.html")])
    assert r.exit_code == 1
    assert "pip install 'cfg-textgen[report]'" in r.stderr
    assert "sweep [" not in r.stderr and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("args, message", [
    (["--scales", "1,big"], "--scales"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--model", "/no/such/model"], "no such model"),
    (["--tokens", "0"], "--tokens"),
])
def test_sweep_bad_input_is_a_clear_error(tiny_model_dir, args, message):
    base = ["sweep", "Once", "--seed", "1"] + ([] if "--model" in args else ["--model", str(tiny_model_dir)])
    r = run(base + args)
    assert r.exit_code != 0 and message in r.stderr
    assert "Traceback" not in r.output


def test_explain_prints_a_block_per_token_with_before_and_after(tiny_model_dir):
    r = run(["explain", "Once upon a time", "--model", str(tiny_model_dir), "--scale", "3",
             "--tokens", "3", "--top", "4", "--seed", "2"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("text: ")
    blocks = re.findall(r"^\[(\d+)\] ", out, flags=re.M)
    assert blocks == ["1", "2", "3"]
    assert out.count("before CFG (plain)") == 3 and out.count("after CFG (scale 3)") == 3
    assert out.count("promoted most:") == 3 and out.count("demoted most:") == 3
    # --top 4: ranks 1..4 in every block
    assert len(re.findall(r"^ +4  ", out, flags=re.M)) == 3


def test_explain_default_scale_comes_from_the_preset(tiny_model_dir):
    r = run(["explain", "Once", "--model", str(tiny_model_dir), "--tokens", "1", "--seed", "2",
             "--preset", "balanced-story"])
    assert r.exit_code == 0, r.output
    assert "after CFG (scale 1.5)" in r.stdout


def test_eval_lambada_prints_a_row_per_scale(tiny_model_dir, tmp_path):
    data = tmp_path / "lambada.jsonl"
    data.write_text('{"text": "Once upon a time there was a fox"}\n'
                    '{"text": "The knight rode through the rain"}\n\n'
                    '{"text": "She opened the door"}\n', encoding="utf-8")
    r = run(["eval", "lambada", str(data), "--model", str(tiny_model_dir), "--scales", "1,1.5,2",
             "--limit", "2", "--opposing", "empty"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"LAMBADA last-word accuracy: {data}, 2 examples, greedy, opposing: empty, rule: tokens"
    assert lines[1].split() == ["scale", "correct", "accuracy"]
    rows = [ln.split() for ln in lines[3:]]
    assert [row[0] for row in rows] == ["1", "1.5", "2"]
    assert all(re.fullmatch(r"[0-2]/2", row[1]) and row[2].endswith("%") for row in rows)
    assert "lambada:" not in r.stderr and "6/6" not in r.stderr  # the bar: on a terminal only (test_progress.py)


def test_eval_lambada_bad_line_names_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a fine line"}\n{"txt": "wrong key"}\n', encoding="utf-8")
    r = run(["eval", "lambada", str(data), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1
    assert f"{data}:2:" in r.stderr and '"text"' in r.stderr


def test_eval_lambada_rejects_unknown_opposing(tiny_model_dir, tmp_path):
    data = tmp_path / "l.jsonl"
    data.write_text('{"text": "a fine line"}\n')
    r = run(["eval", "lambada", str(data), "--model", str(tiny_model_dir), "--opposing", "blank"])
    assert r.exit_code == 2 and "last-token" in r.stderr

"""`cfg-textgen write` / `generate` on a tiny random model saved as a folder: exit codes, stdout
(story text only) and stderr (status) checked separately; every bad input; the interactive loop
driven line by line with the file checked between steps; SIGTERM in a real process."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main
from cfg_textgen.session import join_typed

STORY = "Once upon a time, the knight rode"
REPO = Path(__file__).resolve().parent.parent


def run(args, **kw):
    return CliRunner().invoke(main, args, **kw)


def model_args(model_dir):
    return ["--model", str(model_dir)]


@pytest.fixture(scope="module")
def endless_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without an EOS token: the random model would otherwise often end after a
    token or two, and these tests need text to check."""
    path = tmp_path_factory.mktemp("tiny-llama-no-eos")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, path / f.name)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = None
        (path / name).write_text(json.dumps(cfg))
    # the tokenizer's EOS ends a story too (context.eos_ids): take it away as well
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


# ---- write / generate ------------------------------------------------------------------------

def test_write_appends_exactly_the_streamed_text(tmp_path, endless_model_dir):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    r = run(["write", str(path), "--tokens", "12", "--seed", "1", *model_args(endless_model_dir)])
    assert r.exit_code == 0, r.output
    assert r.stdout and path.read_text(encoding="utf-8") == STORY + r.stdout
    assert "12 tokens in" in r.stderr and "stopped: token limit" in r.stderr
    assert "loading model" in r.stderr and "tokens/s" in r.stderr and "story:" in r.stderr
    assert "loading model" not in r.stdout and "tokens/s" not in r.stdout


def test_write_with_a_model_that_may_end_early(tmp_path, tiny_model_dir):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    r = run(["write", str(path), "--tokens", "12", "--seed", "1", *model_args(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    assert path.read_text(encoding="utf-8") == STORY + r.stdout
    assert "stopped: " in r.stderr


def test_write_new_story_file_is_created(tmp_path, endless_model_dir):
    path = tmp_path / "new.txt"
    r = run(["write", str(path), "--tokens", "6", "--seed", "2", *model_args(endless_model_dir)])
    assert r.exit_code == 0, r.output
    assert path.read_text(encoding="utf-8") == r.stdout


def test_generate_streams_to_stdout_and_writes_nothing(tmp_path, endless_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(["generate", STORY, "--tokens", "10", "--seed", "3", *model_args(endless_model_dir)])
    assert os.listdir(tmp_path) == []
    assert r.exit_code == 0, r.output
    assert r.stdout and "tokens/s" in r.stderr and "tokens/s" not in r.stdout


def test_generate_flags_override_the_preset(endless_model_dir):
    """greedy preset + flags == the engine run directly with those settings."""
    from cfg_textgen.engine import generate_stream
    from cfg_textgen.models import load_model

    r = run(["generate", STORY, "--preset", "greedy", "--cfg-scale", "2.5", "--opposing", "The dragon",
             "--tokens", "9", *model_args(endless_model_dir)])
    assert r.exit_code == 0, r.output
    assert "CFG scale 2.5" in r.stderr and "'The dragon'" in r.stderr and "9 tokens" in r.stderr
    model, tok = load_model(str(endless_model_dir))
    s = generate_stream(model, tok, STORY, scale=2.5, opposing_prompt="The dragon", max_new_tokens=9,
                        do_sample=False)
    assert r.stdout == "".join(s)


def test_generate_seed_repeats(endless_model_dir):
    args = ["generate", STORY, "--tokens", "12", "--seed", "5", *model_args(endless_model_dir)]
    a, b = run(args), run(args)
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout


def test_generate_opposing_file_is_used(tmp_path, endless_model_dir):
    f = tmp_path / "opp.txt"
    f.write_text("A dull story.\n", encoding="utf-8")
    r = run(["generate", STORY, "--tokens", "3", "--opposing-file", str(f), *model_args(endless_model_dir)])
    assert r.exit_code == 0, r.output
    assert "'A dull story.'" in r.stderr  # the final newline is dropped


def test_write_reports_cut_context_on_stderr(tmp_path, endless_model_dir):
    path = tmp_path / "long.txt"
    path.write_text(" ".join(["The knight rode through the rain."] * 40), encoding="utf-8")
    r = run(["write", str(path), "--tokens", "5", *model_args(endless_model_dir)])
    assert r.exit_code == 0, r.output
    # 256 - 5: the opposing row (BOS) is a row of its own and no longer counts
    assert "older text was cut" in r.stderr and "last 251 tokens" in r.stderr
    assert "cut" not in r.stdout


@pytest.mark.parametrize("args,flag,words", [
    (["--model", "/no/such/model"], "--model", "no such file"),
    (["--cfg-scale", "abc"], "--cfg-scale", "not a valid float"),
    (["--cfg-scale", "nan"], "--cfg-scale", "finite"),
    (["--cfg-scale", "inf"], "--cfg-scale", "finite"),
    (["--tokens", "-3"], "--tokens", "x>=1"),
    (["--tokens", "0"], "--tokens", "x>=1"),
    (["--seed", "x"], "--seed", "not a valid integer"),
    (["--preset", "no-such-preset"], "--preset", "balanced-story"),  # lists the built-in presets
    (["--preset", "missing.json"], "--preset", "no such preset file"),
    (["--opposing", "a", "--opposing-file", "OPP"], "--opposing-file", "not both"),
    (["--opposing-file", "/no/such/file"], "--opposing-file", "No such file"),
])
@pytest.mark.parametrize("command", ["write", "generate"])
def test_cli_bad_flag_values_name_the_flag(tmp_path, tiny_model_dir, command, args, flag, words):
    opp = tmp_path / "opp.txt"
    opp.write_text("x")
    args = [str(opp) if a == "OPP" else a for a in args]
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    target = str(story) if command == "write" else STORY
    if "--model" not in args:
        args = args + model_args(tiny_model_dir)
    r = run([command, target, *args])
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert flag in r.stderr and words in r.stderr
    assert "loading model" not in r.stderr
    assert story.read_text() == STORY


def test_write_refuses_non_utf8_story_untouched(tmp_path, tiny_model_dir):
    path = tmp_path / "latin1.txt"
    raw = "Il était une fois un café".encode("latin-1")
    path.write_bytes(raw)
    r = run(["write", str(path), "--tokens", "3", *model_args(tiny_model_dir)])
    assert r.exit_code == 1
    assert r.stdout == ""
    assert "latin1.txt" in r.stderr and "not UTF-8" in r.stderr
    assert "loading model" not in r.stderr  # refused before the model loads
    assert path.read_bytes() == raw


@pytest.mark.parametrize("make", [
    lambda tmp: tmp,  # a directory
    lambda tmp: (tmp / "plain-file").write_text("x") and tmp / "plain-file" / "story.txt",  # parent is a file
])
def test_write_refuses_unwritable_story_before_generation(tmp_path, tiny_model_dir, make):
    path = make(tmp_path)
    r = run(["write", str(path), "--tokens", "3", *model_args(tiny_model_dir)])
    assert r.exit_code == 1
    assert r.stdout == "" and "Error" in r.stderr and str(path) in r.stderr
    assert "loading model" not in r.stderr


# ---- interactive ------------------------------------------------------------------------------

class ScriptedStdin(io.RawIOBase):
    """Serves one line per read; before each line it snapshots the story file (the state after the
    previous step), so the test sees the file at every step of the session."""

    def __init__(self, lines, path):
        self.lines, self.path, self.snapshots = list(lines), path, []

    def readable(self):
        return True

    def readinto(self, buf):
        self.snapshots.append(self.path.read_text(encoding="utf-8"))
        if not self.lines:
            return 0
        data = (self.lines.pop(0) + "\n").encode()
        buf[:len(data)] = data
        return len(data)


@pytest.fixture(params=["transformers", "llama.cpp"])
def story_model_args(request, endless_model_dir):
    """--model/--backend for the story-safety tests: the tiny endless model on transformers, and
    the real default model on llama.cpp (fast there; its end-of-text never comes this early at
    these seeds)."""
    if request.param == "transformers":
        return model_args(endless_model_dir) + ["--backend", "transformers"]
    pytest.importorskip("llama_cpp")
    return ["--backend", "llama.cpp"]


def test_write_interactive_session_end_to_end(tmp_path, story_model_args):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    typed = "The dragon woke and"  # not a sentence end: a real model may end its text there
    script = ScriptedStdin([typed, "", "/retry", "/undo", "/undo", "/scale 2", "/show", "", "/quit"], path)
    r = run(["write", str(path), "--interactive", "--preset", "plain", "--tokens", "8", "--seed", "4",
             *story_model_args], input=io.BufferedReader(script))
    assert r.exit_code == 0, r.output
    s = script.snapshots
    assert len(s) == 9  # one read per line; /quit ends the session
    # s[0]: after the first continuation
    assert s[0].startswith(STORY) and len(s[0]) > len(STORY)
    first = s[0][len(STORY):]
    # s[1]: typed text joined with one space (unless the story ends in whitespace), then continued
    join = "" if s[0][-1].isspace() else " "
    assert s[1].startswith(s[0] + join + typed) and len(s[1]) > len(s[0] + join + typed)
    # s[2]: Enter continued
    assert s[2].startswith(s[1]) and len(s[2]) > len(s[1])
    # s[3]: /retry replaced the last continuation: same start, a new continuation after it
    assert s[3].startswith(s[1]) and len(s[3]) > len(s[1])
    # s[4]: /undo took back the retried continuation; s[5]: and the typed line's continuation
    assert s[4] == s[1]
    assert s[5] == s[0] + join + typed
    # s[6], s[7]: /scale 2 and /show change settings only
    assert s[6] == s[7] == s[5]
    # s[8]: Enter continued at CFG scale 2 (two rows per forward pass)
    assert s[8].startswith(s[5]) and len(s[8]) > len(s[5])
    assert path.read_text(encoding="utf-8") == s[8]
    # stdout: the story text as it was shown, typed text included
    assert r.stdout.startswith(first + join + typed + s[1][len(s[0] + join + typed):])
    assert "CFG scale 2 " in r.stderr and "batch 2" in r.stderr.split("CFG scale 2 ")[-1]
    assert r.stderr.count("undone") == 3  # /retry undoes once, then two /undo
    assert "preset plain" in r.stderr  # /show


def test_write_interactive_commands_report_errors_and_keep_going(tmp_path, endless_model_dir):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    script = ScriptedStdin(["/scale abc", "/tokens -1", "/preset nope", "/frobnicate", "/help",
                            "/tokens 3", "/preset greedy", "/show"], path)
    r = run(["write", str(path), "-i", "--tokens", "4", "--seed", "1", *model_args(endless_model_dir)],
            input=io.BufferedReader(script))
    assert r.exit_code == 0, r.output  # end of input quits
    assert "/scale needs a finite number" in r.stderr and "/tokens needs an integer" in r.stderr
    assert "unknown preset 'nope'" in r.stderr and "unknown command /frobnicate" in r.stderr
    assert "/retry" in r.stderr  # the help
    assert "preset greedy" in r.stderr
    assert len(set(script.snapshots)) == 1  # only the first continuation changed the file


@pytest.mark.parametrize("story,typed,want", [
    ("Once", "upon a time", " upon a time"),
    ("Once ", "upon", "upon"),
    ("Once\n", "upon", "upon"),
    ("", "Start", "Start"),
    ("He said", ", quietly", ", quietly"),
    ("He left", ".", "."),
    ("The end", "\\n\\nChapter 2", "\n\nChapter 2"),
    ("Path", "// is a comment", " / is a comment"),
])
def test_join_typed_rule(story, typed, want):
    assert join_typed(story, typed) == want


# ---- a real process: SIGTERM keeps exactly what was shown ------------------------------------

def test_write_sigterm_keeps_exactly_the_text_shown(tmp_path, story_model_args):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfg_textgen.cli", "write", str(path), "--tokens", "200", "--preset",
         "plain", "--seed", "2", *story_model_args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < 20 and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.read() or b""
            time.sleep(0.05)
        assert len(seen) >= 20, "no streamed text before the deadline"
        proc.send_signal(signal.SIGTERM)
        os.set_blocking(proc.stdout.fileno(), True)
        seen += proc.stdout.read()
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 143, err
    finally:
        proc.kill()
        proc.wait()
    assert "terminated" in err
    assert path.read_bytes() == STORY.encode() + seen

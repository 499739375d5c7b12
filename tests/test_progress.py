"""report.ProgressBar (tqdm): drawn on stderr when it is a terminal (a pseudo-terminal here, as a
user's), nothing at all otherwise (pipes, logs, CliRunner's captured stderr)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from cfg_textgen import report as R

REPO = Path(__file__).resolve().parents[1]


def _terminal(columns: int = 100):
    """A pseudo-terminal with a size (a real one has one; tqdm draws to its width)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def _drain(fd: int, timeout: float = 0.5) -> bytes:
    out = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the writer closed the terminal
            break
        if not data:
            break
        out += data
    return out


def test_progress_bar_on_a_pipe_writes_nothing():
    buf = io.StringIO()
    bar = R.ProgressBar("eval", stream=buf)
    for i in range(1, 21):
        bar(i, 20)
    assert buf.getvalue() == ""


def test_progress_bar_on_a_terminal_is_redrawn_in_place_and_ends_with_a_newline():
    master, slave = _terminal()
    try:
        stream = os.fdopen(slave, "w", encoding="utf-8")
        bar = R.ProgressBar("eval", stream=stream)
        for i in range(1, 21):
            bar(i, 20)
        stream.flush()
        shown = _drain(master).decode("utf-8")
        stream.close()
    finally:
        os.close(master)
    assert "\r" in shown and shown.endswith("\n")
    last = shown.rstrip("\r\n").split("\r")[-1]
    assert last.startswith("eval: 100%") and "20/20" in last


def test_cli_sweep_draws_its_bar_on_a_terminal_stderr_only(tiny_model_dir):
    master, slave = _terminal()
    proc = subprocess.Popen([sys.executable, "-m", "cfg_textgen.cli", "sweep", "Once upon a time", "--model",
                             str(tiny_model_dir), "--scales", "1,2,3", "--tokens", "3", "--seed", "1"],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        out, _ = proc.communicate(timeout=300)
        err = _drain(master).decode("utf-8", "replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "sweep: 100%" in err and "3/3" in err
    assert "sweep:" not in out.decode()

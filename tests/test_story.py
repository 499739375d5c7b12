"""Story file I/O: refusing bad files untouched, flushed appends, atomic rewrites, signal deferral."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from cfg_textgen import story as story_mod
from cfg_textgen.errors import CFGTextgenError
from cfg_textgen.story import SignalGuard, Story, Terminated

TEXT = "Café au lait, 🦊 and déjà vu.\r\nLine two\n"


def test_story_open_missing_file_is_a_new_story_and_creates_nothing(tmp_path):
    s = Story.open(tmp_path / "new.txt")
    assert s.text == "" and not s.existed
    assert os.listdir(tmp_path) == []  # the writability probe leaves nothing behind


def test_story_open_reads_text_exactly(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(TEXT.encode())
    s = Story.open(path)
    assert s.text == TEXT and s.existed  # no newline translation


def test_story_open_refuses_non_utf8_untouched(tmp_path):
    path = tmp_path / "latin1.txt"
    raw = "Caf\xe9 cr\xe8me".encode("latin-1")
    path.write_bytes(raw)
    before = os.stat(path)
    with pytest.raises(CFGTextgenError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        Story.open(path)
    assert path.read_bytes() == raw and os.stat(path).st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("make,match", [
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt" / "story.txt", "parent"),
    (lambda tmp: tmp / "no-such-folder" / "story.txt", "cannot write"),
])
def test_story_open_refuses_unwritable_paths(tmp_path, make, match):
    with pytest.raises(CFGTextgenError, match=match):
        Story.open(make(tmp_path))


def test_story_prompt_drops_a_byte_order_mark_but_keeps_it_in_the_file(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffOnce".encode())
    s = Story.open(path)
    assert s.prompt == "Once"
    with s.appender() as out:
        out.write(" more")
    assert path.read_bytes() == "\ufeffOnce more".encode()


def test_story_appender_makes_each_piece_visible_at_once(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("Start.", encoding="utf-8")
    s = Story.open(path)
    with s.appender() as out:
        for piece, total in ((" 🦊", "Start. 🦊"), ("é\n", "Start. 🦊é\n")):
            out.write(piece)
            assert path.read_bytes() == total.encode()  # read by another handle, before close
    assert s.text == "Start. 🦊é\n"


def test_story_appender_creates_a_new_story(tmp_path):
    s = Story.open(tmp_path / "new.txt")
    with s.appender() as out:
        out.write("Hello")
    assert (tmp_path / "new.txt").read_text() == "Hello" and s.existed


def test_story_appender_rolls_back_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "s.txt"
    path.write_text("Kept.", encoding="utf-8")
    s = Story.open(path)
    real_write = os.write

    def disk_fills_up(fd, data):  # writes 2 bytes, then the disk is full
        if len(data) > 2:
            return real_write(fd, bytes(data[:2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with s.appender() as out:
        out.write(" one")
        monkeypatch.setattr(story_mod.os, "write", disk_fills_up)
        with pytest.raises(CFGTextgenError, match="No space left"):
            out.write(" two three")
        monkeypatch.setattr(story_mod.os, "write", real_write)
    assert path.read_text() == "Kept. one" == s.text


def test_story_rewrite_replaces_by_rename_and_keeps_the_mode(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("old text", encoding="utf-8")
    os.chmod(path, 0o640)
    s = Story.open(path)
    inode = os.stat(path).st_ino
    s.rewrite("new ✨ text")
    assert path.read_text(encoding="utf-8") == "new ✨ text" == s.text
    st = os.stat(path)
    assert st.st_ino != inode  # a new file renamed into place, not truncated in place
    assert st.st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["s.txt"]


def test_story_rewrite_failure_leaves_the_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "s.txt"
    path.write_text("precious", encoding="utf-8")
    s = Story.open(path)

    def fail(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(story_mod.os, "replace", fail)
    with pytest.raises(CFGTextgenError, match="unchanged"):
        s.rewrite("lost")
    assert path.read_text() == "precious" == s.text
    assert os.listdir(tmp_path) == ["s.txt"]


def test_story_rewrite_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("a")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    Story.open(link).rewrite("b")
    assert link.is_symlink() and real.read_text() == "b"


@pytest.mark.parametrize("sig,exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_signal_guard_defers_signals_to_the_end_of_a_critical_section(sig, exc):
    done = []
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with SignalGuard() as guard:
        with pytest.raises(exc):
            with guard.critical():
                os.kill(os.getpid(), sig)
                done.append("after kill")  # still runs: the signal waits
                done.append("section end")
        assert done == ["after kill", "section end"]
        with pytest.raises(exc):  # outside a critical section it raises at once
            os.kill(os.getpid(), sig)
            for _ in range(1000):
                pass
            done.append("not reached")
    assert "not reached" not in done
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored

"""files.atomic_write / files.replacing: the one way every file (and the model cache folder) is
replaced. Checked on the file system itself: contents, leftovers, permission bits, symlinks, and
the order of fsync and rename as the OS sees it (the fsynced paths read back from /proc)."""

from __future__ import annotations

import os
import sys

import pytest

from cfg_textgen import files


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def syscalls(monkeypatch):
    """Every fsync (by the path of its descriptor) and os.replace, in call order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a descriptor's file")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    files.atomic_write(path, "new ✨\n")
    assert path.read_bytes() == "new ✨\n".encode("utf-8")
    files.atomic_write(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes" and _names(tmp_path) == ["out.json"]


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, syscalls):
    path = tmp_path / "story.txt"
    files.atomic_write(path, "text")
    kinds = [c[0] for c in syscalls]
    assert kinds == ["fsync", "replace", "fsync"]
    tmp = syscalls[0][1]
    assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(path)  # a temp file in the same folder
    assert syscalls[1][1:] == (tmp, str(path))
    assert syscalls[2][1] == str(tmp_path)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    files.atomic_write(path, "new")
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_atomic_write_gives_a_new_file_the_umask_mode_not_a_private_one(tmp_path):
    # mkstemp makes 0600 files; a report or an exported preset must be as readable as any new file
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "report.html", "<html>")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "report.html").st_mode & 0o777 == 0o644


def test_atomic_write_through_a_symlink_replaces_the_target(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("a")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    files.atomic_write(link, "b")
    assert link.is_symlink() and real.read_text() == "b"


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "story.txt"
    path.write_text("old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["story.txt"]


def test_atomic_write_into_a_missing_folder_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.atomic_write(tmp_path / "no" / "such.txt", "x")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_atomic_write_into_a_read_only_folder_raises_and_changes_nothing(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "f.txt").write_text("old")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(PermissionError):
            files.atomic_write(tmp_path / "f.txt", "new")
    finally:
        os.chmod(tmp_path, 0o700)
    assert (tmp_path / "f.txt").read_text() == "old"


def test_replacing_a_folder_fsyncs_every_file_then_renames_once(tmp_path, syscalls):
    target = tmp_path / "cache-entry"
    with files.replacing(target, folder=True) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    assert sorted(p.name for p in target.rglob("*")) == ["a.bin", "b.json", "sub"]
    assert [c[0] for c in syscalls] == ["fsync", "fsync", "replace", "fsync"]
    assert {os.path.basename(c[1]) for c in syscalls[:2]} == {"a.bin", "b.json"}
    assert syscalls[-1][1] == str(tmp_path) and _names(tmp_path) == ["cache-entry"]


def test_replacing_a_folder_removes_it_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with files.replacing(tmp_path / "entry", folder=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("conversion failed")
    assert _names(tmp_path) == []


def test_presets_export_output_file_is_readable_like_any_new_file(tmp_path):
    """The CLI's -o files go through atomic_write (they were mkstemp's 0600 before)."""
    import json

    from click.testing import CliRunner

    from cfg_textgen.cli import main

    out = tmp_path / "balanced.preset"
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(main, ["presets", "export", "balanced-story", "--format", "novelai",
                                      "-o", str(out)])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text(encoding="utf-8")) and _names(tmp_path) == ["balanced.preset"]
    assert os.stat(out).st_mode & 0o777 == 0o644

"""A user's mistakes on the command line end in one line on stderr and a non-zero exit, never a
traceback: output files that cannot be written (`-o`, `--out`, `--report`) and a bad `--backend`
on `serve`. Driven through click's CliRunner, stdout and stderr checked separately."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from cfg_textgen.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, path: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and path in lines[0], result.stderr
    assert ".tmp" not in result.stderr  # the temporary file is ours, not the user's business
    assert result.stdout == ""


@pytest.fixture
def preset_file(tmp_path):
    path = tmp_path / "Golden.yaml"  # a text-generation-webui preset
    path.write_text("temperature: 0.9\ntop_p: 0.9\nrepetition_penalty: 1.1\n")
    return path


def test_presets_import_into_a_missing_folder_is_one_line_naming_the_path(preset_file, tmp_path):
    out = str(tmp_path / "missing-dir" / "x.json")
    r = run("presets", "import", str(preset_file), "-o", out)
    _one_line_error(r, out)
    assert "No such file or directory" in r.stderr
    assert not (tmp_path / "missing-dir").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_presets_export_into_proc_is_one_line_naming_the_path():
    r = run("presets", "export", "balanced-story", "--format", "novelai", "-o", "/proc/x")
    _one_line_error(r, "/proc/x")


def test_presets_export_into_a_folder_without_write_permission_leaves_nothing(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        r = run("presets", "export", "balanced-story", "--format", "novelai", "-o", str(folder / "x.preset"))
        _one_line_error(r, str(folder / "x.preset"))
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_presets_import_output_is_written_when_the_folder_exists(preset_file, tmp_path):
    out = tmp_path / "x.json"
    r = run("presets", "import", str(preset_file), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert '"format": "cfg-textgen-preset/1"' in out.read_text()


def test_serve_unknown_backend_is_a_usage_error_before_anything_loads():
    r = run("serve", "--backend", "bogus")
    assert r.exit_code == 2, r.output  # click's usage error, not an uncaught ValueError
    assert "Invalid value for '--backend'" in r.stderr and "'bogus'" in r.stderr
    assert "transformers" in r.stderr and "llama.cpp" in r.stderr
    assert "Traceback" not in r.stderr

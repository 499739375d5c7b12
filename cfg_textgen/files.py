"""Replacing a file (or a folder) so that a reader or a crash never sees half of it.

The one rule, used for the story's undo/retry rewrite, the sweep report, `presets import/export -o`,
`eval lambada --out` and the converted-model cache: write a temporary file in the target's own
folder (a rename is atomic only within one file system), fsync it, `os.replace` it over the
target, then fsync the folder so that the rename itself survives a power cut. On any failure the
temporary file is removed and the previous file is untouched.

- A symlink is followed: the file it points to is replaced, the link stays a link.
- A replaced file keeps its permission bits; a new one gets the usual ones (0666 minus the umask,
  which the kernel applies when the temporary file is created: the umask is never read or
  changed, so this is safe in threads), not `mkstemp`'s private 0600.
- `atomic_write` and `replacing` raise `OSError`s; `write_file` (the commands' `-o`/`--out`/
  `--report` files) turns them into one `CFGTextgenError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CFGTextgenError


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace the file at `path` with `data` (str is written as UTF-8): all of it or nothing."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """`atomic_write` for a file a user named: an OSError (no such folder, a read-only place, a
    full disk) is a `CFGTextgenError` naming the path, and nothing was written."""
    try:
        atomic_write(path, data)
    except OSError as err:
        raise CFGTextgenError(f"{path}: cannot write: {err.strerror or err}") from err


@contextlib.contextmanager
def replacing(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """A temporary file (or, with `folder`, an empty folder) next to `path` for the block to fill;
    fsynced and renamed over `path` when the block ends normally, removed when it raises."""
    target = Path(os.path.realpath(path))
    parent = target.parent
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    else:
        tmp = _new_file(parent, target.name)
    try:
        yield tmp
        for file in (sorted(p for p in tmp.rglob("*") if p.is_file()) if folder else [tmp]):
            _fsync(file)
        if not folder and target.exists():
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if folder else os.unlink(tmp)
        raise
    fsync_folder(parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file(parent: Path, name: str) -> Path:
    """A new empty file `.NAME.XXXXXXXX.tmp` in `parent`, with the mode `open` gives a new file
    (0666 minus the umask, applied by the kernel)."""
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{parent}: no free temporary file name for {name}")


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

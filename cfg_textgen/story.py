"""Story file I/O that never damages the story.

- Reading: a missing file is a new, empty story; a file that is not UTF-8 is refused untouched;
  writability is checked when the story is opened, i.e. before any generation starts.
- Appending (`Story.appender`): every streamed piece is written and flushed to the OS before the
  caller shows it; the file is fsynced when the appender closes. A failed write (a full disk) is
  rolled back to the last whole piece.
- Rewriting for undo/retry (`Story.rewrite`): `files.atomic_write` (temporary file in the same
  folder, fsync, rename, fsync of the folder). The story is never truncated in place.
- `SignalGuard`: SIGINT and SIGTERM become exceptions, deferred while a piece is being written and
  shown, so that after Ctrl-C or `kill` the file holds exactly the text that reached the screen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import CFGTextgenError
from .files import atomic_write


def _why(err: OSError) -> str:
    return err.strerror or str(err)


class Story:
    """A story file: its current text and safe ways to change it. Open it with `Story.open`."""

    def __init__(self, path: str | os.PathLike, text: str, existed: bool):
        self.path = Path(path)
        self.text = text
        self.existed = existed

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Story":
        """Read `path` (missing = a new story) and check that it can be written, without changing it."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            existed = True
        except FileNotFoundError:
            raw, existed = b"", False
        except IsADirectoryError:
            raise CFGTextgenError(f"{path}: is a directory, not a story file") from None
        except NotADirectoryError:
            raise CFGTextgenError(f"{path}: cannot be a file: a parent in the path is a file") from None
        except OSError as err:
            raise CFGTextgenError(f"{path}: cannot read: {_why(err)}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CFGTextgenError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); the file "
                                  f"was left untouched") from None
        story = cls(path, text, existed)
        story.check_writable()
        return story

    @property
    def prompt(self) -> str:
        """The text the model continues (a UTF-8 byte order mark is not story text)."""
        return self.text[1:] if self.text.startswith("\ufeff") else self.text

    def check_writable(self) -> None:
        """Raise CFGTextgenError if the story cannot be appended to or rewritten; changes nothing."""
        try:
            if self.existed:
                with open(self.path, "ab"):
                    pass  # appending nothing: the file is untouched
            # rewrite and a new file both need the folder: create and remove a probe file there
            fd, probe = tempfile.mkstemp(prefix=".cfg-textgen-probe-", dir=self._folder())
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise CFGTextgenError(f"{self.path}: cannot write the story: {_why(err)}") from None

    def _folder(self) -> Path:
        return Path(os.path.realpath(self.path)).parent  # a rewrite replaces the file a symlink points to

    @contextlib.contextmanager
    def appender(self) -> Iterator["Appender"]:
        """Append pieces as they come; fsync on the way out (also after an exception)."""
        out = Appender(self)
        try:
            yield out
        finally:
            out.close()

    def rewrite(self, text: str) -> None:
        """Replace the whole file atomically (files.atomic_write: temp file in the same folder,
        fsync, rename, fsync of the folder); a symlink keeps pointing at the rewritten file."""
        try:
            atomic_write(self.path, text)
        except OSError as err:
            raise CFGTextgenError(f"{self.path}: cannot rewrite the story (it is unchanged): "
                                  f"{_why(err)}") from None
        self.text = text
        self.existed = True


class Appender:
    """Writes pieces to the end of a story file, each flushed to the OS before `write` returns."""

    def __init__(self, story: Story):
        self.story = story
        try:
            self._fd = os.open(story.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # minus the umask
        except OSError as err:
            raise CFGTextgenError(f"{story.path}: cannot write the story: {_why(err)}") from None
        story.existed = True
        self._size = os.fstat(self._fd).st_size
        self.written = ""  # text appended by this appender

    def write(self, piece: str) -> None:
        data = piece.encode("utf-8")
        try:
            view = memoryview(data)
            while view:  # unbuffered: the bytes are in the OS when this returns
                view = view[os.write(self._fd, view):]
        except OSError as err:
            # keep the file at the last whole piece (what the screen shows), e.g. on a full disk
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise CFGTextgenError(f"{self.story.path}: writing failed ({_why(err)}); the story holds "
                                  f"everything shown so far") from None
        self._size += len(data)
        self.written += piece
        self.story.text += piece

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EROFS):  # not every file system can fsync
                raise
        finally:
            os.close(self._fd)
            self._fd = None


class Terminated(BaseException):
    """Raised in place of the default SIGTERM action: a clean exit that keeps what was written."""


class SignalGuard:
    """Within `with SignalGuard() as guard:`, SIGINT raises KeyboardInterrupt and SIGTERM raises
    `Terminated`; inside `with guard.critical():` both wait until the block ends, so a piece is
    either written and shown, or neither. Outside the main thread it does nothing."""

    def __init__(self):
        self._depth = 0
        self._pending: BaseException | None = None
        self._saved: dict = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum, frame) -> None:
        err = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
        if self._depth:
            self._pending = self._pending or err
        else:
            raise err

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None:
            err, self._pending = self._pending, None
            raise err

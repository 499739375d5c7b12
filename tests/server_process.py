"""Start `cfg-textgen serve` as a real process on a free local port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None, key: str | None = None, timeout: float = 180,
                 preexec=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"cfg-textgen-serve-{self.port}.log"
        self._log = open(self.stderr_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cfg_textgen.cli", "serve", "--port", str(self.port), *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log,
            env={**os.environ, **(env or {})}, preexec_fn=preexec)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + "/v1/models", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not come up in {timeout} s:\n{self.stderr()}")
            time.sleep(0.3)

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.stderr_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first match of `pattern` in the server's stderr, waiting for it: a stream's log line is
        written when the server has finished with the request, which may be just after the client
        has read the last byte."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr()
            found = re.search(pattern, text)
            if found or time.monotonic() > deadline:
                assert found, f"{pattern!r} not in the server's log:\n{text}"
                return found
            time.sleep(0.05)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM and wait; the exit code (the server should exit 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(*args: str, **kw):
    """A ServerProcess for a `with` block (a module fixture's body); it must exit 0 on SIGTERM."""
    srv = ServerProcess(*args, **kw)
    yield srv
    assert srv.terminate() == 0, srv.stderr()

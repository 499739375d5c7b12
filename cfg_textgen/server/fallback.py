"""FALLBACK scheduler: the INTERFACE.md `Scheduler` contract, serial, over today's `engine.stream_preset`.

This exists only until the batched `cfg_textgen.engine.Scheduler` (branch `llamacpp`) lands;
`scheduling.py` picks that one whenever it can be imported. Here one background thread runs the
jobs one at a time from a FIFO queue (the transformers backend may serve that way, INTERFACE.md),
so concurrent requests wait their turn; a job's tokens never depend on what else is queued.

Per step the job's cancel flag is checked by a processor appended to the sampler chain (the only
hook `Stream` runs every decode step), so `cancel()` ends a running job within one step.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..engine import stream_preset
from ..presets import Preset

_END = object()  # the pieces queue's end marker


@dataclass(frozen=True)
class Request:
    """One generation, as INTERFACE.md defines it (the batched engine has the same class)."""

    prompt: str | list[int]
    preset: Preset
    seed: int | None = None
    ban_eos: bool = False
    truncate: bool = True


@dataclass
class JobStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    time_to_first_token: float | None = None


class _Cancelled(Exception):
    """Raised inside the decode loop by the per-step cancel check."""


@dataclass(eq=False)
class Job:
    request: Request
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str | None = None
    error: BaseException | None = None
    stats: JobStats = field(default_factory=JobStats)

    def __post_init__(self):
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._stream = None
        self._submitted = time.perf_counter()

    def pieces(self) -> Iterator[str]:
        """Text pieces as they become final; ends when the job ends (any reason)."""
        while True:
            piece = self._pieces.get()
            if piece is _END:
                self._pieces.put(_END)  # a second iterator also ends
                return
            yield piece

    def cancel(self) -> None:
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.stop_reason = reason
        self.error = error
        self._pieces.put(_END)
        self._done.set()


class SerialScheduler:
    """`Scheduler(model_handle, max_parallel)` with `model_handle = (model, tokenizer)`; runs one job
    at a time whatever `max_parallel` says."""

    batched = False  # the server reports which scheduler it runs

    def __init__(self, model_handle, max_parallel: int = 1):
        self.model, self.tokenizer = model_handle
        self.max_parallel = max_parallel
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cfg-textgen-decode", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Job:
        """Set the job up now (tokenizing, the context cut: bad requests raise here), run it later."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            job = Job(request)
            job._stream = self._make_stream(job)
            job.stats.prompt_tokens = job._stream.stats.prompt_tokens
            self._queue.put(job)
        return job

    def _make_stream(self, job: Job):
        request = job.request
        window = getattr(self.model.config, "max_position_embeddings", None)
        if not request.truncate and window:
            ids = (request.prompt if not isinstance(request.prompt, str)
                   else self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            if len(ids) + request.preset.max_new_tokens > window:
                raise ValueError(f"`prompt` is {len(ids)} tokens; with {request.preset.max_new_tokens} new "
                                 f"tokens it does not fit the model's context of {window} tokens "
                                 f"(truncation is off)")
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(int(request.seed))
        stream = stream_preset(self.model, self.tokenizer, request.prompt, request.preset,
                               generator=generator, on_cut=lambda kept, total: None)
        eos = sorted(stream.eos)

        def per_step(history, scores):
            if job._cancelled.is_set():
                raise _Cancelled()
            if request.ban_eos and eos:  # the web UI's ban_eos_token: EOS can never be picked
                scores = scores.clone()
                scores[:, eos] = float("-inf")
            return scores

        stream.chain = list(stream.chain) + [per_step]
        return stream

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._current = job
            self._run(job)
            self._current = None

    def _run(self, job: Job) -> None:
        stream = job._stream
        start = time.perf_counter()
        try:
            if job._cancelled.is_set():
                job._finish("cancelled")
                return
            for piece in stream:
                if job.stats.time_to_first_token is None:
                    job.stats.time_to_first_token = time.perf_counter() - job._submitted
                job.text += piece
                job._pieces.put(piece)
                if job._cancelled.is_set():
                    raise _Cancelled()
            job.token_ids = list(stream.token_ids)
            job._finish(stream.stop_reason or "max_tokens")
        except _Cancelled:
            job.token_ids = list(stream.token_ids)
            job._finish("cancelled")
        except Exception as err:  # a failing job must not take the decode thread down
            job.token_ids = list(stream.token_ids)
            job._finish("error", err)
        finally:
            job.stats.generated_tokens = len(job.token_ids)
            job.stats.seconds = time.perf_counter() - start
            job._stream = None

    def close(self, finish: bool = True) -> None:
        """Stop accepting; finish (or cancel) what is queued and running; join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not finish:
            if self._current is not None:
                self._current.cancel()
            pending = []
            while True:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for job in pending:
                if job is not None:
                    job.cancel()
                    self._queue.put(job)
        self._queue.put(None)
        self._thread.join()

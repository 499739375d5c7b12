"""The server's way in: requests queued from any thread, decoded together on one background thread.

`Scheduler.submit(Request)` checks the request (a bad setting raises there, as a typed error naming
the setting) and queues a `Job`; the decode thread runs the one decode loop (lanes.py) over the
active jobs, admitting waiting ones between steps. Nothing a job does can stop the others or the
thread: a failed decode step ends the jobs in it, a failed prefill the job that joined, a failing
sampler its own job, each with its error; anything else that goes wrong on the thread ends the
jobs it touched and the thread serves on. Should the thread itself ever end abnormally, every
job left ends with the error and `submit` refuses new ones (`SchedulerClosed`): a job never waits
forever.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .backends import as_backend
from .errors import GenerationFailed, SchedulerClosed, SettingError
from .generation import Generation, Stats, preset_settings, random_seed
from .lanes import DecodeLoop, Lane


@dataclass(frozen=True)
class Request:
    """One generation request for the `Scheduler`."""

    prompt: str | list[int]  # the story (text, or token ids)
    preset: object  # presets.Preset: cfg, samplers, max_new_tokens, stop, do_sample
    seed: int | None = None  # same seed + same request -> same text, whatever else runs
    ban_eos: bool = False
    truncate: bool = True  # False: a prompt longer than the window is an error
    logprobs: int | None = None  # record each token's log-prob and this many alternatives
    opposing_ids: tuple[int, ...] | None = None  # the opposing prompt as token ids (a chat rendered
    # by its template), instead of the preset's opposing text
    cache_prompt: bool = True  # False: read the whole prompt, none of it from the prompt cache


_END = object()


class Job(Lane):
    """A submitted request: iterate `pieces()` for its text as it becomes final, or `wait()`.
    After it ends: `stop_reason` ("eos", "max_tokens", "stop", "cancelled", "error") and `error`."""

    def __init__(self, request: Request, generation: Generation, submitted: float):
        super().__init__(generation)
        self.request = request
        self.generation = generation
        self._stop_reason: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._started = threading.Event()  # taken from the queue to run
        self._submitted = submitted
        self._wake: Callable[[], None] = lambda: None

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def token_ids(self) -> list[int]:
        return self.generation.token_ids

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def stats(self) -> Stats:
        return self.generation.stats

    @property
    def finish_reason(self) -> str:
        """What the served APIs say (OpenAI's convention): "length" at the token limit, "cancelled"
        for a job ended by a stop/abort request or a shutdown, else "stop"."""
        return {"max_tokens": "length", "cancelled": "cancelled"}.get(self._stop_reason, "stop")

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def started(self) -> bool:
        """Taken from the queue to run (its prefill may still be under way)."""
        return self._started.is_set()

    def pieces(self) -> Iterator[str]:
        """Text pieces as they become final (stop strings cut off); ends when the job ends."""
        for piece, _ in self.pieces_with_tokens():
            yield piece

    def pieces_with_tokens(self) -> Iterator[tuple[str, int]]:
        """(piece, tokens generated when it became final): the piece is the text of the tokens
        up to that count that was not given out before."""
        while True:
            item = self._queue.get()
            if item is _END:
                self._queue.put(_END)  # a second iterator ends too
                return
            yield item

    def cancel(self) -> None:
        """End the job within one decode step and free its sequences (no effect once done)."""
        self._cancel.set()
        self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended; False if `timeout` passed first."""
        return self._done.wait(timeout)

    # ---- the lane's side (the decode thread) ----------------------------------------------------

    def put(self, piece) -> None:
        if piece:
            self._queue.put((piece, len(self.generation.token_ids)))

    def end(self, reason: str | None, error: BaseException | None) -> None:
        gen = self.generation
        self._stop_reason = reason or gen.stop_reason
        self.error = error
        gen.stats.seconds = time.perf_counter() - self._submitted
        self._queue.put(_END)
        self._done.set()


class Scheduler:
    """Runs submitted requests on one background decode thread.

    On the llama.cpp backend every active job's sequences go into ONE `llama_decode` per step, and
    a job joins (its prompt read from where the prompt cache's tokens end, in `--batch-size`
    pieces between steps) and leaves (its sequences freed, their tokens kept for the cache)
    between steps. A cancel during the prompt acts at the next piece. Up to `max_parallel` jobs run at once; the rest wait in FIFO order (also while the
    backend has no free sequences for them). On the transformers backend each active pair is its
    own forward (still one step for all). A job's tokens never depend on what else runs: greedy
    gives the text it gives alone, a seeded job samples from its own `torch.Generator`.

    `model_handle` is a backend (`models.load_backend(spec, backend=None, pairs=max_parallel)`) or
    a transformers (model, tokenizer). The Scheduler owns the backend while it runs: do not use it
    from a `Stream` at the same time.
    """

    def __init__(self, model_handle, max_parallel: int = 1):
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise SettingError("max_parallel", "an integer >= 1", max_parallel)
        self.backend = as_backend(model_handle)
        self.max_parallel = max_parallel
        self.backend.reserve(max_parallel)
        self._cv = threading.Condition()
        # the backend's tokenizer is used by submit and the server's token routes (any thread) and
        # by the decode thread's samplers and text decoders (while lanes read their logits, never
        # during a decode); a transformers tokenizer is not safe to call from two threads at once
        self.tokenizer_lock = threading.RLock()
        self._pending: collections.deque[Job] = collections.deque()
        self._decode = DecodeLoop(self.backend, text_lock=self.tokenizer_lock)
        self._closing = False
        self._failed: BaseException | None = None  # why the decode thread ended abnormally
        self._thread = threading.Thread(target=self._run, name="cfg-textgen-decode", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        """Decode steps made so far."""
        return self._decode.steps

    # ---- client side (any thread) --------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        """Queue a request; returns at once. A request that cannot run (bad settings, a prompt
        too long with truncate=False) raises here, before it is queued."""
        if not isinstance(request, Request):
            raise SettingError("request", "a Request", type(request).__name__)
        submitted = time.perf_counter()
        backend = self.backend
        seed = request.seed if request.seed is not None else random_seed()
        with self.tokenizer_lock:
            generator = torch.Generator(device=backend.device).manual_seed(int(seed))
            settings = preset_settings(backend, request.preset, generator)
            if request.opposing_ids is not None:
                settings.update(opposing_prompt=list(request.opposing_ids), opposing_mode="text")
            gen = Generation(backend, None, request.prompt, ban_eos=request.ban_eos,
                             truncate=request.truncate, on_cut=lambda kept, total: None,
                             logprobs=request.logprobs, cache_prompt=request.cache_prompt, **settings)
        gen._start = submitted
        job = Job(request, gen, submitted)
        job._wake = self._notify
        with self._cv:
            if self._failed is not None:
                raise SchedulerClosed(f"the decode thread has stopped ({self._failed!r}); no new "
                                      "requests can run: restart the server")
            if self._closing:
                raise SchedulerClosed("the scheduler is closed and takes no new requests")
            self._pending.append(job)
            self._cv.notify()
        return job

    def would_wait(self, coming: int = 0) -> int:
        """Jobs that will wait, of those submitted and `coming` more: those beyond the free
        places of `max_parallel`."""
        with self._cv:
            return max(0, len(self._pending) + coming - (self.max_parallel - len(self._decode.live)))

    def refuse_waiting(self, reason: str = "shutdown") -> int:
        """Take no new requests and end the waiting ones at once with `reason` (a server that stops
        answers them now instead of after the running ones); running jobs go on. How many ended."""
        with self._cv:
            self._closing = True
            ended = list(self._pending)
            self._pending.clear()
            for job in ended:
                job.end(reason, None)
            self._cv.notify()
        return len(ended)

    def waiting(self) -> int:
        """Submitted jobs not yet started (queued behind `max_parallel` or the backend's room)."""
        with self._cv:
            return len(self._pending)

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self, finish: bool = True) -> None:
        """Take no new requests; finish what runs and waits (or cancel it); join the thread."""
        with self._cv:
            self._closing = True
            if not finish:
                for job in list(self._pending) + list(self._decode.live):
                    job._cancel.set()
            self._cv.notify()
        self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the decode thread runs (False after `close`, or if it ended abnormally)."""
        return self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(finish=exc[0] is None)

    # ---- the decode thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # never silently: every job left ends, submit refuses
            with self._cv:
                self._failed = err
                left = list(self._pending) + list(self._decode.live)
                self._pending.clear()
            self._decode.fail(left, GenerationFailed(f"the decode thread stopped: {err!r}"))
            raise

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._decode.live or self._closing):
                    self._cv.wait()
                if self._closing and not self._pending and not self._decode.live:
                    return
            admit: list[Job] = []  # the caller's list: a job taken from the queue is never lost
            try:
                with self._cv:
                    self._admit(admit)
                self._decode.step(admit)
            except Exception as err:  # a fault of the loop itself: it ends the jobs it touched
                failure = GenerationFailed(f"the decode step failed: {err!r}")
                failure.__cause__ = err
                self._decode.fail(list(self._decode.live) + admit, failure)

    def _admit(self, admit: list[Job]) -> None:
        """Move the jobs that start this step to `admit`: FIFO, within max_parallel and the
        backend's free sequences (llama.cpp: each sequence has its own stream of a full window,
        so a free slot is room). A cancelled job goes too (the step ends it) and takes no room."""
        rows = starting = 0  # sequences and jobs admitted so far
        while self._pending and len(self._decode.live) + starting < self.max_parallel:
            job = self._pending[0]
            if not job.cancelled:
                need = job.generation.rows  # 2 with CFG, 1 at scale 1
                if not self.backend.fits(rows + need):
                    break  # waits until a job leaves and frees its sequences
                rows, starting = rows + need, starting + 1
            admit.append(self._pending.popleft())
            admit[-1]._started.set()

"""The model behind the server: load its backend, run the engine's Scheduler (the server uses only
its submit / cancel / wait contract), tokenize, and track which API's jobs are running.

On llama.cpp the Scheduler decodes every active request (and each of `n` choices) in one batch per
step; on transformers each active pair is its own forward within a step.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

from ..backends.base import AUTO_PAIRS
from ..context import fit_context, fit_with_memory
from ..errors import CFGTextgenError
from ..generation import random_seed
from ..scheduler import Request, Scheduler
from .defaults import ServerDefaults
from .errors import APIError

RETRY_AFTER = 5  # seconds a client refused for a full queue is asked to wait


class Service:
    """One loaded model (an engine backend), its scheduler, and the jobs each API has running."""

    def __init__(self, model_spec: str | None = None, backend: str | None = None, parallel: int | None = None,
                 log=print, runtime=None, defaults: ServerDefaults = ServerDefaults(), max_queue: int = 16):
        from ..models import DEFAULT_NAME

        self.defaults = defaults  # serve --preset / --cfg-scale / --opposing (defaults.py)
        self.model_name = (Path(model_spec).stem if model_spec not in (None, "default", DEFAULT_NAME)
                           else "SmolLM2-135M-Instruct")
        self.backend = _load_backend(model_spec, backend, parallel, log, runtime)
        if parallel is None:  # --parallel auto: what the llama.cpp context was sized for
            parallel = getattr(self.backend, "pairs", AUTO_PAIRS)
        self.scheduler = Scheduler(self.backend, max_parallel=parallel)
        self.max_queue = max_queue  # jobs waiting for a free slot; more are refused with a 503
        self._submitting = 0  # submits under way (tokenizing), counted against the queue bound
        self._stopping = False
        self.backend_name = self.backend.name
        self.tokenizer = self.backend.tokenizer
        self.n_ctx = int(self.backend.n_ctx or 2048)
        self._jobs: dict[int, tuple[object, str, str | None]] = {}  # id(job) -> (job, api, genkey)
        self._lock = threading.Lock()
        self._tokenizer_lock = self.scheduler.tokenizer_lock  # also held by the decode thread's text work
        self.started = self.last_request = time.time()
        self.total = 0  # generations submitted since start
        self._recent: collections.deque = collections.deque(maxlen=16)
        self.last_kobold = None  # (job, genkey) of the latest KoboldAI API generation
        # recent KoboldAI jobs by genkey: poll mode reads their text, also after they end or abort
        self.kobold_jobs: collections.OrderedDict[str, object] = collections.OrderedDict()

    # -- tokens
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (chat.py); the
        template writes its own special tokens, so none are added."""
        from ..chat import render, template_of

        template, special = template_of(self.backend)
        return self.tokenize(render(template, messages, special), special=False)

    def detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's own text (a lone byte of a multi-byte character shows as U+FFFD)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode([int(token)], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """One token's raw bytes where the backend has them (llama.cpp), else its text's UTF-8."""
        piece_bytes = getattr(self.backend, "piece_bytes", None)
        return piece_bytes(int(token), special=True) if piece_bytes else self.token_text(token).encode()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def fit(self, prompt: str | list[int], context: int | None, max_new: int) -> str | list[int]:
        """The prompt cut to a client's smaller context setting (the web UI's truncation_length,
        Kobold's max_context_length): its last `context - max_new` tokens, as these apps do. The
        model's own window is the engine's to enforce."""
        if not context or context >= self.n_ctx:
            return prompt
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        # the engine's cut (context.fit_context: BOS stays in front) at the client's window; a
        # window smaller than max_new + 1 still keeps the last story token
        kept = fit_context(ids, max(context, max_new + 1), max_new, self.backend.special_ids)
        return prompt if len(kept) == len(ids) else kept

    def fit_memory(self, memory: str, prompt: str, context: int | None, max_new: int) -> list[int]:
        """Kobold's `memory` in front of the prompt, kept whole while the prompt keeps its most
        recent tokens, in the client's window or the model's, whichever is smaller
        (context.fit_with_memory, KoboldCpp's rule)."""
        window = min(context or self.n_ctx, self.n_ctx)
        return fit_with_memory(self.tokenize(memory), self.tokenize(prompt), window, max_new,
                               self.backend.special_ids)

    # -- jobs
    def submit(self, prompt, preset, seed: int | None, *, ban_eos=False, truncate=True, api="webui",
               genkey=None, logprobs: int | None = None, opposing_ids=None, cache_prompt: bool = True):
        if seed is None:
            seed = random_seed()
        with self._lock:
            if self._stopping:
                raise shutting_down()
            if self.scheduler.would_wait(coming=self._submitting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {self.max_queue} requests are already waiting "
                                    f"(serve --max-queue); try again in a few seconds", None,
                               "service_unavailable", headers={"Retry-After": str(RETRY_AFTER)})
            self._submitting += 1
        try:
            job = self.scheduler.submit(Request(prompt=prompt, preset=preset, seed=seed, ban_eos=ban_eos,
                                                truncate=truncate, logprobs=logprobs,
                                                opposing_ids=opposing_ids, cache_prompt=cache_prompt))
        except CFGTextgenError:
            if self._stopping:  # the scheduler closed while this one was tokenized
                raise shutting_down() from None
            raise
        finally:
            with self._lock:
                self._submitting -= 1
        job.seed = seed
        with self._lock:
            self.last_request = time.time()
            self._jobs = {i: v for i, v in self._jobs.items() if not _done(v[0])}
            self._jobs[id(job)] = (job, api, genkey)
            self.total += 1
            self._recent.append(job)
            if api == "kobold":
                self.last_kobold = (job, genkey)
                if genkey:
                    self.kobold_jobs[genkey] = job
                    self.kobold_jobs.move_to_end(genkey)
                    while len(self.kobold_jobs) > KEPT_GENKEYS:
                        self.kobold_jobs.popitem(last=False)
        return job

    def kobold_job(self, genkey: str | None):
        """The KoboldAI job a poll asks about: the one with `genkey`, or without a key the latest
        one if it had no key either (KoboldCpp never shows one user's text to another)."""
        with self._lock:
            if genkey:
                return self.kobold_jobs.get(genkey)
            job, key = self.last_kobold or (None, None)
            return job if not key else None

    def last_finished(self):
        """The most recently submitted job that has ended (any API), for KoboldCpp's perf figures."""
        with self._lock:
            return next((job for job in reversed(self._recent) if _done(job)), None)

    def waiting(self) -> int:
        """Requests queued behind the running ones (KoboldCpp's `queue`)."""
        return self.scheduler.waiting()

    def _live(self) -> list[tuple[object, str, str | None]]:
        with self._lock:
            return [v for v in self._jobs.values() if not _done(v[0])]

    def stop_running(self, api: str) -> int:
        """The web UI's stop button: end the generations of `api` that run now. Waiting ones still
        run later, as in the web UI (each generation clears its stop flag when it starts)."""
        return _cancel([job for job, a, _ in self._live() if a == api and job.started])

    def abort(self, genkey: str | None) -> int:
        """KoboldCpp's abort: the job named by `genkey`, running or waiting; without a genkey the
        running job only when it is the one job on the server (KoboldCpp honours a keyless abort
        only with nothing queued: with several users it cannot tell whose job to end)."""
        live = self._live()
        if genkey:
            return _cancel([job for job, _, k in live if k == genkey])
        return _cancel([job for job, _, _ in live]) if len(live) == 1 and live[0][0].started else 0

    def cancel_all(self) -> int:
        """End every job (shutdown after the grace period): each ends with what it has so far."""
        return _cancel([job for job, _, _ in self._live()])

    def stop_taking(self) -> int:
        """Shutdown begins: no new jobs; the waiting ones end now (their requests get a 503)."""
        self._stopping = True
        return self.scheduler.refuse_waiting(SHUTDOWN)

    def running(self) -> int:
        """Jobs submitted and not yet ended (running or waiting), over both APIs."""
        with self._lock:
            return sum(not _done(job) for job, _, _ in self._jobs.values())

    def close(self, finish: bool = True) -> None:
        self.scheduler.close(finish=finish)


def _load_backend(spec, backend, parallel, log, runtime=None):
    """The engine backend: `models.load_backend` (llama.cpp for GGUF when installed, else
    transformers), sized for `parallel` live pairs (None: llama.cpp's `auto_pairs`)."""
    from ..models import load_backend

    return load_backend(spec, backend, pairs=parallel, runtime=runtime, log=log)


SHUTDOWN = "shutdown"  # the stop reason of a job the server refused to start because it stops


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and takes no new requests", None, "service_unavailable")


def _cancel(jobs) -> int:
    for job in jobs:
        job.cancel()
    return len(jobs)


KEPT_GENKEYS = 64  # poll mode asks about the generation just made; a few dozen users at most


def _done(job) -> bool:
    return job.stop_reason is not None

"""The model behind the server: load its backend, run the engine's Scheduler (the server uses only
its submit / cancel / wait contract), tokenize, and track which API's jobs are running.

On llama.cpp the Scheduler decodes every active request (and each of `n` choices) in one batch per
step; on transformers each active pair is its own forward within a step.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..context import fit_context, fit_with_memory
from ..scheduler import Request, Scheduler


class Service:
    """One loaded model (an engine backend), its scheduler, and the jobs each API has running."""

    def __init__(self, model_spec: str | None = None, backend: str | None = None, parallel: int = 4,
                 log=print):
        from ..models import DEFAULT_NAME

        self.model_name = (Path(model_spec).stem if model_spec not in (None, "default", DEFAULT_NAME)
                           else "SmolLM2-135M-Instruct")
        self.backend = _load_backend(model_spec, backend, parallel, log)
        self.scheduler = Scheduler(self.backend, max_parallel=parallel)
        self.backend_name = self.backend.name
        self.tokenizer = self.backend.tokenizer
        self.n_ctx = int(self.backend.n_ctx or 2048)
        self._jobs: dict[int, tuple[object, str, str | None]] = {}  # id(job) -> (job, api, genkey)
        self._lock = threading.Lock()
        self._tokenizer_lock = self.scheduler.tokenizer_lock  # also held by the decode thread's text work

    # -- tokens
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

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
               genkey=None):
        job = self.scheduler.submit(Request(prompt=prompt, preset=preset, seed=seed, ban_eos=ban_eos,
                                                 truncate=truncate))
        with self._lock:
            self._jobs = {i: v for i, v in self._jobs.items() if not _done(v[0])}
            self._jobs[id(job)] = (job, api, genkey)
            self.total = getattr(self, "total", 0) + 1
        return job

    def cancel(self, api: str | None = None, genkey: str | None = None) -> int:
        """Cancel running jobs of one API (and one Kobold genkey, if given); how many."""
        with self._lock:
            hits = [j for j, a, k in self._jobs.values()
                    if not _done(j) and (api is None or a == api) and (genkey is None or k == genkey)]
        for job in hits:
            job.cancel()
        return len(hits)

    def running(self) -> int:
        """Jobs submitted and not yet ended (running or waiting), over both APIs."""
        with self._lock:
            return sum(not _done(job) for job, _, _ in self._jobs.values())

    def close(self, finish: bool = True) -> None:
        self.scheduler.close(finish=finish)


def _load_backend(spec, backend, parallel, log):
    """The engine backend: `models.load_backend` (llama.cpp for GGUF when installed, else
    transformers), sized for `parallel` live pairs."""
    from ..models import load_backend

    return load_backend(spec, backend, pairs=parallel, log=log)


def _done(job) -> bool:
    return job.stop_reason is not None

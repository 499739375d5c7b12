"""The streaming decode loop over a backend: one step for every live generation at once.

Per step and generation (the same parts as the `model.generate` plugin, in the same order):

    logits (rows, vocab) = backend.run(...)                   # story row (+ opposing row with CFG)
    scores = cfg_combine(logits[0], logits[1], scale)        # guidance.py: the one formula
    scores = chain(story_ids, scores)                        # presets.build_chain: the samplers
    token  = pick_token(scores, do_sample, generator)        # samplers.py: argmax / multinomial
    the backend appends `token` to the pair's rows

At scale 1 the opposing row is not run (one sequence) and the scores are the raw logits, which is
what `CFGLogitsProcessor(scale=1)` returns; with CFG the guided scores are on the same raw-logit
scale (guidance.cfg_combine), so a repetition penalty acts as in the reference apps. `story_ids` is the prompt plus the generated tokens,
exactly what `generate` gives its processors, so repetition penalties see the same history. Text
comes out as soon as it is final (the backend's decoder; on transformers tokenizers' DecodeStream,
a constant cost per token): the pieces joined equal the one-shot decode of all new tokens.

Three ways in, one `Generation` (the per-generation state: settings, history, text, stop rules):
- `Stream` (the CLI's): one generation, iterated in the caller's thread;
- `Scheduler` + `Request` + `Job` (the server's, INTERFACE.md): a background thread decodes every
  active job together, one `backend.run` per step; jobs join and leave between steps;
- `generate_stream` / `stream_preset`: a `Stream` from settings or from a preset.
Backends (backends/): transformers (any Hugging Face model) and llama.cpp (GGUF, many sequences
in one batch). Pass a backend, or a transformers (model, tokenizer) as before.
"""

from __future__ import annotations

import collections
import queue
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .backends.transformers import REPLACEMENT, IncrementalDecoder, TransformersBackend  # noqa: F401
from .context import context_length, eos_ids, fit_context  # noqa: F401  (context_length, eos_ids: API)
from .errors import CFGTextgenError
from .grammar import make_grammar
from .guidance import MODES, cfg_combine, check_scale, opposing_token_ids
from .logprobs import TokenLogprob, token_logprob
from .samplers import pick_token


def as_backend(model, tokenizer=None):
    """A backend for `model`: itself when it is one, else a transformers model + its tokenizer."""
    if hasattr(model, "run") and hasattr(model, "release"):
        return model
    if isinstance(model, tuple) and len(model) == 2 and tokenizer is None:
        model, tokenizer = model
    if tokenizer is None:
        raise ValueError("a transformers model needs its `tokenizer` (or pass a backend)")
    return TransformersBackend(model, tokenizer)


@dataclass
class Stats:
    """What one generation cost: generated tokens, wall seconds, decode calls, context cut."""

    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0  # backend decode calls this generation took part in
    prompt_tokens: int = 0  # story tokens before the cut
    kept_tokens: int = 0  # story tokens the model saw
    batch: int = 1  # rows of this generation per step: 2 with CFG, 1 without
    first_token_seconds: float | None = None  # from the start (or submit) to the first token

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def generated_tokens(self) -> int:
        return self.tokens

    @property
    def time_to_first_token(self) -> float | None:
        return self.first_token_seconds


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop sequence (held back)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Generation:
    """The state of one generation over a backend: settings, token history, text, stop rules.

    Setup (tokenizing, the context cut) happens in the constructor, so bad settings fail before
    any decoding. The decode loop (a `Stream` or the `Scheduler`) prefills `pair_ids()`, then per
    step hands the pair's logits to `advance`, which picks the token and returns the text that
    became final; when `done`, the loop releases the pair. Afterwards: `token_ids` (every
    generated token, EOS included), `text` (what was given out), `stop_reason` ("eos",
    "max_tokens", "stop"; the Scheduler adds "cancelled" and "error") and `stats`."""

    def __init__(self, model, tokenizer, prompt: str | Sequence[int], *, scale: float = 1.0,
                 opposing_prompt: str = "", opposing_mode: str = "text", chain=None,
                 max_new_tokens: int = 200, stop: Sequence[str] = (), do_sample: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 on_cut: Callable[[int, int], None] | None = None, ban_eos: bool = False,
                 truncate: bool = True, logprobs: int | None = None, grammar: str = ""):
        self.backend = backend = as_backend(model, tokenizer)
        self.scale = check_scale(scale)
        if opposing_mode not in MODES:
            raise ValueError(f"`opposing_mode` has to be one of {MODES}, but is {opposing_mode!r}")
        if opposing_mode == "last-token" and opposing_prompt:
            raise ValueError("`opposing_mode='last-token'` takes its opposing prompt from the story; "
                             f"leave `opposing_prompt` empty, but it is {opposing_prompt!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` has to be an integer >= 1, but is {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"`logprobs` has to be None or an integer >= 0, but is {logprobs!r}")
        self.logprobs = logprobs  # None: not recorded; n: each token's log-prob and n alternatives
        self.token_logprobs: list[TokenLogprob] = []  # logprobs.py: one per generated token
        self.stop = [s for s in stop if s]
        self.chain = chain if chain is not None else []
        self.do_sample = do_sample
        if generator is None and seed is not None:
            generator = torch.Generator(device=backend.device).manual_seed(int(seed))
        self.generator = generator  # None: the global torch RNG, as `generate` uses
        self.eos = set(backend.eos_ids)
        self.ban_eos = bool(ban_eos)
        bos = backend.bos_id

        ids = backend.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            if bos is None:
                raise CFGTextgenError("the story is empty and this model has no BOS token to start "
                                      "from: write a first line")
            ids = [int(bos)]
        cfg = self.scale != 1.0
        # each row is cut on its own (context.fit_context): the opposing row has its own positions
        self.prompt_ids = self._fit(ids, on_cut, truncate)
        if not cfg:
            self.opposing = None
        elif opposing_mode == "text":
            full = opposing_token_ids(opposing_prompt, backend.tokenizer, bos)[0]
            self.opposing = fit_context(full, backend.n_ctx, max_new_tokens, backend.special_ids,
                                        "the opposing prompt")
            if len(self.opposing) < len(full):
                warnings.warn(f"the opposing prompt is {len(full)} tokens; only its last {len(self.opposing)} "
                              f"fit the context and were used", stacklevel=3)
        else:  # last-token: the story's last token after the cut
            self.opposing = [self.prompt_ids[-1]]
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.done = False
        self.stats = Stats(prompt_tokens=len(ids), kept_tokens=len(self.prompt_ids),
                           batch=2 if cfg else 1)
        device = backend.device
        # story ids + room for every new token; the chain sees a view of the filled part
        self._history = torch.zeros((1, len(self.prompt_ids) + max_new_tokens), dtype=torch.long,
                                    device=device)
        self._history[0, :len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.long)
        self._filled = len(self.prompt_ids)
        self._eos_index = torch.tensor(sorted(self.eos), dtype=torch.long, device=device)
        self._decoder = backend.decoder(self.prompt_ids)
        self.grammar = make_grammar(backend, grammar) if grammar else None  # grammar.py
        self._start = time.perf_counter()

    def _fit(self, ids: list[int], on_cut, truncate: bool) -> list[int]:
        """The most recent story tokens that fit the window with the new tokens (context.fit_context)."""
        kept = fit_context(ids, self.backend.n_ctx, self.max_new_tokens, self.backend.special_ids)
        if len(kept) < len(ids):
            if not truncate:
                raise CFGTextgenError(
                    f"the story is {len(ids)} tokens; with {self.max_new_tokens} new tokens at most "
                    f"{len(kept)} fit this model's context of {self.backend.n_ctx} tokens")
            if on_cut is not None:
                on_cut(len(kept), len(ids))
            else:
                warnings.warn(f"the story is {len(ids)} tokens; only the last {len(kept)} fit the "
                              f"context and were used", stacklevel=4)
        return kept

    def pair_ids(self) -> tuple[list[int], list[int] | None]:
        """What the backend prefills: (story ids, opposing ids or None at scale 1)."""
        return self.prompt_ids, (self.opposing if self.stats.batch == 2 else None)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def advance(self, logits: torch.Tensor) -> str:
        """One step: the pair's logits (rows, vocab) -> pick a token; the text that became final."""
        logits = logits.to(dtype=torch.float32)
        if self.stats.batch == 2:
            scores = cfg_combine(logits[:1], logits[1:2], self.scale)
        else:  # what CFGLogitsProcessor(scale=1) returns: the raw logits
            scores = logits[:1]
        if self.ban_eos and len(self._eos_index):
            scores = scores.index_fill(-1, self._eos_index, float("-inf"))
        history = self._history[:, :self._filled]
        guided = scores
        for processor in self.chain:
            scores = processor(history, scores)
        if self.grammar is not None:
            scores = self._grammar_allowed(history, guided, scores)
            if not torch.isfinite(scores).any():  # complete, and its end is banned: nothing may follow
                self.stop_reason = "stop"
                return self._finish()
        tok = int(pick_token(scores, self.do_sample, self.generator))
        if self.logprobs is not None:  # the distribution the token was drawn from (logprobs.py)
            self.token_logprobs.append(token_logprob(scores, logits[:1], tok, self.logprobs))
        if self.grammar is not None and tok not in self.eos:
            self.grammar.accept(tok)
        if self.stats.first_token_seconds is None:
            self.stats.first_token_seconds = time.perf_counter() - self._start
        self._history[0, self._filled] = tok
        self._filled += 1
        self.stats.seconds = time.perf_counter() - self._start  # live: a summary after Ctrl-C is right
        self.token_ids.append(tok)
        self.stats.tokens += 1
        if tok in self.eos and not self.ban_eos:
            self.stop_reason = "eos"
            return self._finish()
        self._decoder.add(tok)
        piece = self._emit(self._decoder.released, final=False)
        if self.stop_reason:  # a stop sequence
            self.done = True
            return piece
        if len(self.token_ids) >= self.max_new_tokens:
            self.stop_reason = "max_tokens"
            return piece + self._finish()
        return piece

    def _grammar_allowed(self, history, guided, scores):
        """The chain's scores limited to what the grammar allows; if that leaves nothing, the
        grammar filters the guided scores and the chain runs again (llama.cpp's resampling)."""
        allowed = self.grammar.allowed(scores)
        if torch.isfinite(allowed).any():
            return allowed
        scores = self.grammar.allowed(guided)
        for processor in self.chain:
            scores = processor(history, scores)
        return self.grammar.allowed(scores)

    def _finish(self) -> str:
        self.done = True
        self._decoder.flush()
        return self._emit(self._decoder.released, final=True)

    def _emit(self, released: str, final: bool) -> str:
        """Text to give out now, from the decoder's stable text: a stop sequence is cut off (and
        ends the run); an end that may be the start of one is held back until the next tokens
        decide."""
        pending = released[len(self.text):]
        hits = [at for at in (pending.find(stop) for stop in self.stop) if at >= 0]
        if hits:
            pending = pending[:min(hits)]
            self.stop_reason = "stop"
        elif not final:
            pending = pending[:len(pending) - _stop_prefix_len(pending, self.stop)]
        self.text += pending
        return pending


class Stream(Generation):
    """One streaming generation in the caller's thread. Iterate it for text pieces; afterwards
    read `token_ids`, `text`, `stop_reason` and `stats` (see `Generation`)."""

    def __init__(self, model, tokenizer, prompt: str | Sequence[int], **settings):
        super().__init__(model, tokenizer, prompt, **settings)
        self._iter = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def _run(self) -> Iterator[str]:
        backend = self.backend
        pair = None
        self._start = start = time.perf_counter()
        try:
            [pair] = backend.prefill([self.pair_ids()])
            self.stats.forwards += 1
            while True:
                piece = self.advance(pair.logits)
                if piece:
                    yield piece
                if self.done:
                    return
                backend.step([(pair, self.last_token)])
                self.stats.forwards += 1
        finally:
            if pair is not None:
                backend.release(pair)
            self.stats.seconds = time.perf_counter() - start


def generate_stream(model, tokenizer, prompt: str | Sequence[int], **settings) -> Stream:
    """Stream a continuation of `prompt` (text or token ids); see `Generation` for the settings.
    `model` is a backend, or a transformers model with its `tokenizer`."""
    return Stream(model, tokenizer, prompt, **settings)


def _preset_settings(backend, preset, generator) -> dict:
    from .presets import build_chain

    return dict(scale=preset.cfg.scale, opposing_prompt=preset.cfg.opposing_prompt,
                opposing_mode=preset.cfg.opposing_mode,
                chain=build_chain(preset, backend.tokenizer, generator),
                max_new_tokens=preset.max_new_tokens, stop=preset.stop, do_sample=preset.do_sample,
                generator=generator, grammar=preset.grammar)


def stream_preset(model, tokenizer, prompt: str | Sequence[int], preset, *,
                  generator: torch.Generator | None = None, seed: int | None = None,
                  on_cut: Callable[[int, int], None] | None = None) -> Stream:
    """A `Stream` with a preset's settings and a fresh sampler chain from `presets.build_chain`."""
    backend = as_backend(model, tokenizer)
    if generator is None and seed is not None:
        generator = torch.Generator(device=backend.device).manual_seed(int(seed))
    return Stream(backend, None, prompt, on_cut=on_cut, **_preset_settings(backend, preset, generator))


# ---- the Scheduler: many jobs, one decode thread ----------------------------------------------


@dataclass(frozen=True)
class Request:
    """One generation request for the `Scheduler` (see INTERFACE.md)."""

    prompt: str | list[int]  # the story (text, or token ids)
    preset: object  # presets.Preset: cfg, samplers, max_new_tokens, stop, do_sample
    seed: int | None = None  # same seed + same request -> same text, whatever else runs
    ban_eos: bool = False
    truncate: bool = True  # False: a prompt longer than the window is an error
    logprobs: int | None = None  # record each token's log-prob and this many alternatives
    opposing_ids: tuple[int, ...] | None = None  # the opposing prompt as token ids (a chat rendered
    # by its template), instead of the preset's opposing text


_END = object()


class Job:
    """A submitted request: iterate `pieces()` for its text as it becomes final, or `wait()`."""

    def __init__(self, request: Request, generation: Generation, submitted: float):
        self.request = request
        self.generation = generation
        self.pair = None
        self.error: BaseException | None = None
        self._stop_reason: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
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
    def done(self) -> bool:
        return self._done.is_set()

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

    def _put(self, piece: str) -> None:
        if piece:
            self._queue.put((piece, len(self.generation.token_ids)))

    def _end(self, reason: str | None, error: BaseException | None = None) -> None:
        gen = self.generation
        self._stop_reason = reason or gen.stop_reason
        self.error = error
        gen.stats.seconds = time.perf_counter() - self._submitted
        self._queue.put(_END)
        self._done.set()


class Scheduler:
    """Runs submitted requests on one background decode thread.

    On the llama.cpp backend every active job's sequences go into ONE `llama_decode` per step, and
    a job joins (its prompt prefilled in that same call) and leaves (its sequences removed) between
    steps. Up to `max_parallel` jobs run at once; the rest wait in FIFO order (also while the
    context has no room for them). On the transformers backend each active pair is its own
    forward (still one step for all). A job's tokens never depend on what else runs: greedy gives
    the text it gives alone, a seeded job samples from its own `torch.Generator`.

    `model_handle` is a backend (`models.load_backend(spec, backend=None, pairs=max_parallel)`) or
    a transformers (model, tokenizer). The Scheduler owns the backend while it runs: do not use it
    from a `Stream` at the same time.
    """

    def __init__(self, model_handle, max_parallel: int = 1):
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise ValueError(f"`max_parallel` has to be an integer >= 1, but is {max_parallel!r}")
        self.backend = as_backend(model_handle)
        self.max_parallel = max_parallel
        self.backend.reserve(max_parallel)
        self._cv = threading.Condition()
        self._setup = threading.Lock()  # tokenizers are not safe to call from several threads
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._closing = False
        self.steps = 0  # backend.run calls made
        self._thread = threading.Thread(target=self._loop, name="cfg-textgen-decode", daemon=True)
        self._thread.start()

    # ---- client side (any thread) --------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        """Queue a request; returns at once. A request that cannot run (bad settings, a prompt
        too long with truncate=False) raises here, before it is queued."""
        if not isinstance(request, Request):
            raise ValueError(f"`request` has to be a Request, but is {type(request).__name__}")
        submitted = time.perf_counter()
        backend = self.backend
        with self._setup:
            seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
            generator = torch.Generator(device=backend.device).manual_seed(int(seed))
            settings = _preset_settings(backend, request.preset, generator)
            if request.opposing_ids is not None:
                settings.update(opposing_prompt=list(request.opposing_ids), opposing_mode="text")
            gen = Generation(backend, None, request.prompt, ban_eos=request.ban_eos,
                             truncate=request.truncate, on_cut=lambda kept, total: None,
                             logprobs=request.logprobs, **settings)
        gen._start = submitted
        job = Job(request, gen, submitted)
        job._wake = self._notify
        with self._cv:
            if self._closing:
                raise CFGTextgenError("the scheduler is closed and takes no new requests")
            self._pending.append(job)
            self._cv.notify()
        return job

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
                for job in list(self._pending) + list(self._active):
                    job._cancel.set()
            self._cv.notify()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(finish=exc[0] is None)

    # ---- the decode thread ---------------------------------------------------------------------

    def _admit(self) -> list[Job]:
        """Jobs that start this step: FIFO, within max_parallel and the backend's free sequences
        (llama.cpp: each sequence has its own stream of a full window, so a free slot is room)."""
        fits = getattr(self.backend, "fits", None)
        rows = 0  # sequences the jobs admitted so far take
        admit: list[Job] = []
        while self._pending and len(self._active) + len(admit) < self.max_parallel:
            job = self._pending[0]
            if job._cancel.is_set():
                self._pending.popleft()
                job._end("cancelled")
                continue
            need = job.generation.stats.batch  # 2 with CFG, 1 at scale 1
            if fits is not None and not fits(rows + need):
                break  # waits until a job leaves and frees its sequences
            rows += need
            admit.append(self._pending.popleft())
        return admit

    def _drop(self, job: Job, reason: str | None, error: BaseException | None = None) -> None:
        if job.pair is not None:
            try:
                self.backend.release(job.pair)
            finally:
                job.pair = None
        if job in self._active:
            self._active.remove(job)
        job._end(reason, error)

    def _loop(self) -> None:
        threads = getattr(self.backend, "torch_threads", None)
        if threads is not None:  # OpenMP's thread count is per thread: set it here too
            torch.set_num_threads(threads)
        while True:
            with self._cv:
                while not (self._pending or self._active or self._closing):
                    self._cv.wait()
                if self._closing and not self._pending and not self._active:
                    return
                admit = self._admit()
            for job in list(self._active):
                if job._cancel.is_set():
                    self._drop(job, "cancelled")
            if not admit and not self._active:
                continue
            steps = [(job.pair, job.generation.last_token) for job in self._active]
            try:
                _, pairs = self.backend.run(steps=steps, new=[job.generation.pair_ids() for job in admit])
            except Exception as err:  # a failed batch ends the jobs in it, never the thread
                for job in list(self._active) + admit:
                    self._drop(job, "error", err)
                continue
            self.steps += 1
            for job, pair in zip(admit, pairs):
                job.pair = pair
                self._active.append(job)
            # every job reads its logits (views into the backend's output buffer) before any
            # sequence is released: llama.cpp may reuse that buffer when its memory changes
            leaving: list[tuple[Job, str | None, BaseException | None]] = []
            for job in self._active:
                if job._cancel.is_set():  # cancelled during the decode: no more text
                    leaving.append((job, "cancelled", None))
                    continue
                gen = job.generation
                gen.stats.forwards += 1
                try:
                    job._put(gen.advance(job.pair.logits))
                except Exception as err:  # one job's bad sampler must not end the others
                    leaving.append((job, "error", err))
                    continue
                if gen.done:
                    leaving.append((job, None, None))
            for job, reason, err in leaving:
                self._drop(job, reason, err)

"""Many (story, opposing) jobs decoded side by side on the engine's decode loop (lanes.py): a
sweep's scales and LAMBADA's examples share each decode step; `Forced` feeds given tokens (teacher
forcing). Also the constants the analysis commands share."""

from __future__ import annotations

import collections
from typing import Callable, Sequence

from ..lanes import DecodeLoop, Lane


GenerateFn = Callable[[list, float], list]  # (prompt ids, scale) -> generated ids
Progress = Callable[[int, int], None]  # (done, total)

DEFAULT_SCALES = (0.0, 1.0, 1.5, 3.0, 6.0, 12.0)
MAX_WORD_TOKENS = 10  # LAMBADA: a word longer than this many tokens is cut here
LANES = 8  # pairs decoded side by side (llama.cpp: 16 sequences, one decode per step with CFG)
MAX_LANES = 16  # llama.cpp's step decodes hold 32 tokens (backends/llama_cpp.py STEP_CHUNK)
WINDOW_STEP = 256  # llama.cpp windows are sized in these (its attention pads the cells it reads to 256)


# ---- the backend and the side-by-side decode loop -------------------------------------------


def _size_llama_window(backend, jobs, lanes: int) -> None:
    """llama.cpp keeps a full window of KV cells for every sequence of every lane (90 MiB per
    4096-token window on the default model, 512 MiB on a 7B): make each sequence's window just
    what these jobs need (their longest row plus their new tokens, rounded up to WINDOW_STEP so
    that attention reads the same cells as in a full window), never more than the model's."""
    need = max(len(ids) + job.max_new_tokens for job in jobs for ids in job.pair_ids() if ids is not None)
    window = min(backend.n_ctx, -(-need // WINDOW_STEP) * WINDOW_STEP)
    backend.reserve(lanes, window=window)


def run_side_by_side(backend, jobs: Sequence, lanes: int = LANES,
                     on_done: Callable[[int], None] | None = None) -> None:
    """Decode `jobs` to the end with up to `lanes` of them live at once, on the engine's decode
    loop (lanes.py): each step of every live job in one `backend.run` (on llama.cpp: one decode);
    a job joins as soon as another leaves. The first job that fails raises its error (every pair
    is released first).

    A job is an engine `Generation` or anything with its protocol: `pair_ids()` (story ids,
    opposing ids or None), `advance(logits)` with the pair's logits (rows, vocab), `done`,
    `last_token`, `max_new_tokens`. `on_done(index)` is called as each job ends."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"`lanes` has to be an integer >= 1, but is {lanes!r}")
    jobs = list(jobs)
    if not jobs:
        return
    lanes = min(lanes, len(jobs), MAX_LANES)
    if getattr(backend, "name", None) == "llama.cpp":
        _size_llama_window(backend, jobs, lanes)
    else:
        backend.reserve(lanes)
    loop = DecodeLoop(backend)
    pending = collections.deque(_SideLane(job, i, on_done) for i, job in enumerate(jobs))
    try:
        while pending or loop.live:
            joining = [pending.popleft() for _ in range(min(len(pending), lanes - len(loop.live)))]
            failed = [lane for lane in loop.step(joining) if lane.error is not None]
            if failed:
                raise failed[0].error
    finally:
        loop.close()  # every pair released, also after a failure


class _SideLane(Lane):
    """A side-by-side job in the decode loop; `on_done(index)` when it ends."""

    def __init__(self, job, index: int, on_done):
        super().__init__(job)
        self.index, self.on_done = index, on_done

    def end(self, reason, error) -> None:
        if self.on_done and error is None:
            self.on_done(self.index)


class Forced:
    """A teacher-forcing job for `run_side_by_side`: the pair (story, opposing or None) is fed
    `new_ids` one per step, and `values[i] = measure(logits)` is kept for the logits (rows, vocab)
    that predict `new_ids[i]` (they are a view valid for this step only: `measure` must copy)."""

    def __init__(self, story: Sequence[int], opposing: Sequence[int] | None, new_ids: Sequence[int],
                 measure: Callable):
        if not new_ids:
            raise ValueError("`new_ids` has to hold at least one token to score")
        self.story, self.opposing = list(story), (list(opposing) if opposing is not None else None)
        self.new_ids = [int(t) for t in new_ids]
        self.measure = measure
        self.max_new_tokens = len(self.new_ids)
        self.values: list = []

    def pair_ids(self):
        return self.story, self.opposing

    def advance(self, logits) -> None:
        self.values.append(self.measure(logits, self.new_ids[len(self.values)]))

    @property
    def done(self) -> bool:
        return len(self.values) >= len(self.new_ids)

    @property
    def last_token(self) -> int:
        return self.new_ids[len(self.values) - 1]

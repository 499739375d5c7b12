"""The one decode loop: lanes (a generation's state + its pair of sequences) over a backend.

Every way of generating runs it: the CLI's `Stream` (one lane), the server's `Scheduler` (lanes
join and leave between steps) and the analysis commands (`analysis.run_side_by_side`: a sweep's
scales, LAMBADA's examples). One call of `DecodeLoop.step(joining)` is one decode step:

    1. lanes cancelled since the last step leave (their pairs are released), also lanes still
       reading their prompt;
    2. every ready lane's last token goes into ONE `backend.run(steps=...)`; each lane's state
       reads its pair's logits (`advance`: CFG, samplers, pick), and only then does any finished
       lane release its pair (llama.cpp may reuse its output buffer once its memory changes);
    3. each joining lane opens its pair (`backend.open`: slots taken, the prompt cache's tokens
       reused) and is live from then on, "prefilling" until its prompt is read;
    4. prefilling lanes read at most `backend.prefill_chunk` prompt tokens in all (`backend.feed`,
       oldest lane first); a lane whose prompt is read advances at once and steps from then on.
       While other lanes stream, the chunk is paced (`PrefillPacer`): about a step's time of
       prompt reading, so their gap between two tokens stays near two steps.

So a long prompt is read in chunks between the running lanes' steps: they keep streaming, and a
cancel during the prompt acts at the next step, within one chunk. (A backend without chunks,
transformers, reads the whole prompt in `open`.)

Failures stay with the lanes they belong to, and no pair is ever leaked: a failed step ends the
lanes in that step (all ready ones) with the error; a failed open or feed ends only the lane it
was for; a failing `advance` (a sampler's bug) ends only its own lane. Every pair the loop got is
released when its lane ends, and `close()` releases whatever is still live.

A lane's state is any object with the generation protocol: `pair_ids()` (story ids, opposing ids
or None), `advance(logits) -> text piece or None`, `done`, `last_token` (engine.Generation is
one), optionally `cache_prompt` (False: the backend reads the whole prompt, none of it from its
prompt cache), and optionally `end_early() -> text piece`: a cancelled lane's last piece (the text it held
back), given out before it ends. A `Lane` subclass decides what a piece and the end mean to its
caller (`put`, `end`). A state may also have `rewind`: when it is a number n after `advance`, the
loop takes the pair's last n tokens back (`backend.rewind`, after every lane of the step has read
its logits) and hands the state the logits there (phrase bans, generation.py).
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol, Sequence

from .backends.base import PairIds


class LaneState(Protocol):
    """What the loop needs of a generation (engine.Generation, analysis' teacher forcing)."""

    done: bool

    def pair_ids(self) -> tuple: ...

    def advance(self, logits): ...

    @property
    def last_token(self) -> int: ...


class Lane:
    """One generation in the loop: its state and, while live, its backend pair.

    After it ends: `reason` (None when the state finished on its own, "cancelled", "error") and
    `error` (the exception that ended it). Subclasses override `cancelled`, `put` and `end`."""

    def __init__(self, state: LaneState):
        self.state = state
        self.pair = None
        self.ended = False
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.cached_tokens = 0  # the story's prompt tokens the backend's prompt cache held
        self.cached_rows: list[int] = []  # the same for each row (story, opposing prompt)

    @property
    def prefilling(self) -> bool:
        """Live, with part of its prompt still to read."""
        return self.pair is not None and self.pair.pending > 0

    @property
    def cancelled(self) -> bool:
        return False

    def put(self, piece) -> None:
        """A text piece (or whatever `advance` returned) the state gave this step."""

    def end(self, reason: str | None, error: BaseException | None) -> None:
        """Called once, after the lane's pair was released."""


class PrefillPacer:
    """How many prompt tokens one step may read: the backend's whole chunk (`--batch-size`) when
    nothing else runs, and while other lanes stream, what takes about `share` times their step
    (measured: moving averages of the step's seconds and of a prompt token's seconds in the
    pieces read so far), at least one token, at most the chunk.

    Why: a piece is read between two steps of the running lanes, so their gap between tokens is a
    step plus a piece. A fixed 512-token piece of a 7B model on a CPU takes many seconds, a freeze
    in every running stream; a piece paced to one step keeps the gap near two steps: the running
    streams go at half speed while a prompt joins, and the joining prompt gets half the machine.
    There is no floor of a micro-batch: on a CPU a prompt token far into a long story costs about
    two decode steps' worth of one sequence (flash attention over thousands of cells), so even 32
    tokens there can take ten steps of three CFG streams; on a GPU the measured rule gives hundreds.
    (Pieces of any size read exactly what one whole read does in the deterministic mode.)
    llama.cpp's server instead puts up to `n_batch` prompt tokens into the running lanes' own
    decode."""

    SMOOTHING = 0.3
    FIRST = 16  # before anything is measured

    def __init__(self, chunk: int | None, share: float = 1.0):
        self.chunk, self.share = chunk, share
        self.step_s: float | None = None
        self.token_s: float | None = None

    def budget(self, streaming: bool) -> int | None:
        if self.chunk is None or not streaming:
            return self.chunk
        if self.step_s is None or self.token_s is None:
            return min(self.chunk, self.FIRST)
        return max(1, min(self.chunk, int(self.share * self.step_s / self.token_s)))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def stepped(self, seconds: float) -> None:
        self.step_s = self._average(self.step_s, seconds)

    def read(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.token_s = self._average(self.token_s, seconds / tokens)


class DecodeLoop:
    """Live lanes on one backend, decoded one step at a time (see the module docstring)."""

    def __init__(self, backend, text_lock=None):
        self.backend = backend
        # held while lanes read their logits (samplers and text decoders use the tokenizer), not
        # during decodes: the Scheduler's lock, shared with the threads that tokenize requests
        self.text_lock = text_lock if text_lock is not None else contextlib.nullcontext()
        self.live: list[Lane] = []
        self.steps = 0  # decode steps made
        self.pacer = PrefillPacer(getattr(backend, "prefill_chunk", None))

    def step(self, joining: Sequence[Lane] = ()) -> list[Lane]:
        """One decode step of every live lane, then the joining lanes' prefill; the lanes that
        ended in it (their pairs released)."""
        ended: list[Lane] = []
        for lane in [lane for lane in self.live if lane.cancelled]:
            self._end(lane, "cancelled", None, ended)
        ready = [lane for lane in self.live if not lane.prefilling]
        if ready:
            self._step_live(ready, ended)
        for lane in joining:
            if lane.cancelled:
                self._end(lane, "cancelled", None, ended)
            else:
                self._join(lane, ended)
        self._prefill(ended, streaming=bool(ready))
        if self.live or joining:
            self.steps += 1
        return ended

    def _step_live(self, lanes: list[Lane], ended: list[Lane]) -> None:
        try:
            started = time.perf_counter()
            self.backend.run(steps=[(lane.pair, lane.state.last_token) for lane in lanes])
            self.pacer.stepped(time.perf_counter() - started)
        except Exception as err:  # the step failed: it ends the lanes in it, never the loop
            for lane in lanes:
                self._end(lane, "error", err, ended)
            return
        self._advance(lanes, ended)

    def _join(self, lane: Lane, ended: list[Lane]) -> None:
        cache = getattr(lane.state, "cache_prompt", True)
        try:
            lane.pair = self.backend.open(PairIds(*lane.state.pair_ids()), cache=cache)
        except Exception as err:  # the backend holds nothing for it (base.py's contract)
            lane.pair = None
            self._end(lane, "error", err, ended)
            return
        lane.cached_tokens = lane.pair.cached
        lane.cached_rows = list(lane.pair.cached_rows)
        self.live.append(lane)
        if not lane.prefilling:  # nothing left to read (a backend that reads it all in `open`)
            self._advance([lane], ended)

    def _prefill(self, ended: list[Lane], streaming: bool) -> None:
        """Read up to the pacer's budget of prompt tokens (`streaming`: other lanes stepped in
        this step), oldest prefilling lane first; a lane whose prompt is read advances before the
        next decode overwrites its logits."""
        budget = self.pacer.budget(streaming)
        for lane in [lane for lane in self.live if lane.prefilling]:
            if budget is not None and budget <= 0:
                break
            try:
                started = time.perf_counter()
                used = self.backend.feed(lane.pair, budget)
                self.pacer.read(used, time.perf_counter() - started)
            except Exception as err:  # the pair is still live: `_end` releases it
                self._end(lane, "error", err, ended)
                continue
            if budget is not None:
                budget -= used
            if not lane.prefilling:
                # what the backend took from cells it held (it may take more while reading)
                lane.cached_tokens = lane.pair.cached
                lane.cached_rows = list(lane.pair.cached_rows)
                self._advance([lane], ended)

    def _advance(self, lanes: list[Lane], ended: list[Lane]) -> None:
        """Each lane reads its logits; finished lanes release only after all have read theirs."""
        leaving, rewinding = [], []
        with self.text_lock:
            for lane in lanes:
                if lane.cancelled:  # cancelled during the decode: no more text
                    leaving.append((lane, "cancelled", None))
                    continue
                try:
                    lane.put(lane.state.advance(lane.pair.logits))
                except Exception as err:  # one lane's bad sampler must not end the others
                    leaving.append((lane, "error", err))
                    continue
                if getattr(lane.state, "rewind", None) is not None:
                    rewinding.append(lane)
                elif lane.state.done:
                    leaving.append((lane, None, None))
            # only now: a rewind may decode, which reuses the buffer the other lanes read from
            for lane in rewinding:
                try:
                    self._rewind(lane)
                except Exception as err:
                    leaving.append((lane, "error", err))
                    continue
                if lane.state.done:
                    leaving.append((lane, None, None))
        for lane, reason, err in leaving:
            self._end(lane, reason, err, ended)

    def _rewind(self, lane: Lane) -> None:
        """The lane's state asked to take its last `rewind` tokens back (a banned phrase): the
        backend rewinds the pair, and the state reads the logits there again, until it asks no
        more (generation.py bounds how often)."""
        while lane.state.rewind is not None and not lane.state.done:
            logits = self.backend.rewind(lane.pair, lane.state.rewind)
            lane.put(lane.state.advance(logits))

    def _end(self, lane: Lane, reason: str | None, error: BaseException | None, ended: list[Lane]) -> None:
        """Release the lane's pair and end it. A release that fails (a backend bug) becomes the
        lane's error, and the caller's other lanes still end."""
        if lane.ended:
            return
        lane.ended = True
        if lane in self.live:
            self.live.remove(lane)
        pair, lane.pair = lane.pair, None
        if pair is not None:
            try:
                self.backend.release(pair)
            except Exception as err:
                reason, error = "error", error or err
        lane.reason, lane.error = reason, error
        end_early = getattr(lane.state, "end_early", None)
        if reason == "cancelled" and end_early is not None:
            try:
                with self.text_lock:  # the decoder uses the tokenizer
                    lane.put(end_early())
            except Exception as err:  # the held-back text is lost; the lane still ends
                lane.reason, lane.error = reason, error = "error", err
        ended.append(lane)
        lane.end(reason, error)

    def fail(self, lanes: Sequence[Lane], error: BaseException) -> list[Lane]:
        """End `lanes` (live or not yet joined) with `error`, releasing their pairs: what a caller
        does when something outside a step failed around them."""
        ended: list[Lane] = []
        for lane in lanes:
            self._end(lane, "error", error, ended)
        return ended

    def close(self) -> list[Lane]:
        """End every live lane as cancelled, releasing its pair."""
        ended: list[Lane] = []
        for lane in list(self.live):
            self._end(lane, "cancelled", None, ended)
        return ended

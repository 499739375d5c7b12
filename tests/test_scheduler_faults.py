"""The decode loop and the Scheduler when something fails, on a real backend (a tiny random Llama
on transformers): a failure ends only the jobs it belongs to, every pair is released, and the
decode thread keeps serving the jobs that come after. Failures are injected at the backend
boundary (its `run` or `fits`), where a real model's would come from."""

from __future__ import annotations

import dataclasses

import pytest

from cfg_textgen.backends.transformers import TransformersBackend
from cfg_textgen.engine import Request, Scheduler, generate_stream
from cfg_textgen.presets import load_preset
from conftest import make_tiny_model

STORY = "Once upon a time, the knight rode"
WAIT = 120  # seconds; a job that hangs fails the test instead of the suite


def _greedy(scale: float, tokens: int) -> object:
    """Greedy at `scale` for `tokens` tokens (the requests ban EOS: a random model ends early)."""
    p = load_preset("plain")
    return dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, scale=scale), do_sample=False,
                               max_new_tokens=tokens, stop=())


class CountingBackend(TransformersBackend):
    """The transformers backend, counting live pairs, with a failure that can be armed for the
    n-th `run` call from now (a decode that fails)."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.live_pairs = 0
        self.fail_at: int | None = None  # `run` calls from now until one fails

    def run(self, steps=(), new=()):
        if self.fail_at is not None:
            self.fail_at -= 1
            if self.fail_at == 0:
                self.fail_at = None
                raise RuntimeError("injected: the decode failed")
        out, pairs = super().run(steps, new)
        self.live_pairs += len(pairs)
        return out, pairs

    def release(self, pair) -> None:
        if pair.live:
            self.live_pairs -= 1
        super().release(pair)


@pytest.fixture
def backend(tiny_tokenizer):
    return CountingBackend(make_tiny_model("llama"), tiny_tokenizer)


def test_scheduler_failed_prefill_while_two_jobs_join_fails_only_that_job(backend):
    with Scheduler(backend, max_parallel=2) as sched:
        with sched._cv:  # both are queued before the decode thread admits either
            backend.fail_at = 2  # the second joining job's prefill
            first = sched.submit(Request(STORY, _greedy(1.5, 8), ban_eos=True))
            second = sched.submit(Request(STORY, _greedy(1.5, 8), ban_eos=True))
        assert first.wait(WAIT) and second.wait(WAIT)
        assert first.stop_reason == "max_tokens" and first.error is None
        assert second.stop_reason == "error" and "injected" in str(second.error)
        later = sched.submit(Request(STORY, _greedy(2.0, 4), ban_eos=True))
        assert later.wait(WAIT) and later.stop_reason == "max_tokens", later.error
    assert backend.live_pairs == 0


def test_scheduler_failed_step_fails_the_jobs_in_it_and_the_next_job_runs(backend):
    with Scheduler(backend, max_parallel=2) as sched:
        running = [sched.submit(Request(STORY, _greedy(1.5, 200), ban_eos=True)) for _ in range(2)]
        for job in running:
            next(job.pieces())  # both are decoding
        backend.fail_at = 1
        for job in running:
            assert job.wait(WAIT)
            assert job.stop_reason == "error" and "injected" in str(job.error)
        later = sched.submit(Request(STORY, _greedy(1.0, 4), ban_eos=True))
        assert later.wait(WAIT) and later.stop_reason == "max_tokens", later.error
    assert backend.live_pairs == 0


def test_scheduler_exception_outside_a_decode_fails_the_running_jobs_and_later_jobs_run(backend):
    """`fits` (asked while admitting a job) raises once: on the decode thread, but outside the
    decode itself. The jobs running then end with the error; the thread serves on."""
    with Scheduler(backend, max_parallel=2) as sched:
        running = sched.submit(Request(STORY, _greedy(1.5, 200), ban_eos=True))
        next(running.pieces())
        calls = []

        def fits_once(rows=2):
            calls.append(rows)
            if len(calls) == 1:
                raise RuntimeError("injected: the scheduler itself failed")
            return True

        backend.fits = fits_once
        waiting = sched.submit(Request(STORY, _greedy(1.5, 4), ban_eos=True))
        assert running.wait(WAIT), "the running job never ended: the decode thread died"
        assert running.stop_reason == "error" and "injected" in str(running.error)
        assert waiting.wait(WAIT) and waiting.stop_reason == "max_tokens", waiting.error
        later = sched.submit(Request(STORY, _greedy(1.0, 4), ban_eos=True))
        assert later.wait(WAIT) and later.stop_reason == "max_tokens", later.error
        assert sched.alive
    assert backend.live_pairs == 0


def test_stream_failed_step_raises_and_releases_its_pair(backend):
    stream = generate_stream(backend, None, STORY, scale=1.5, max_new_tokens=50, do_sample=False,
                             ban_eos=True)
    next(stream)
    backend.fail_at = 1
    with pytest.raises(RuntimeError, match="injected"):
        list(stream)
    assert backend.live_pairs == 0


def test_stream_closed_early_releases_its_pair(backend):
    stream = generate_stream(backend, None, STORY, scale=1.5, max_new_tokens=50, do_sample=False,
                             ban_eos=True)
    next(stream)
    assert backend.live_pairs == 1
    stream._iter.close()  # what a for loop's break and garbage collection do
    assert backend.live_pairs == 0

"""lanes.PrefillPacer: the prompt tokens a step may read, from the measured step and token times
(values worked out by hand from its rule: share * step / token, down to a multiple of the granule,
between one granule and the backend's chunk)."""

from __future__ import annotations

from cfg_textgen.lanes import PrefillPacer


def test_prefill_pacer_reads_the_whole_chunk_when_nothing_else_streams():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)
    pacer.read(64, 0.64)
    assert pacer.budget(streaming=False) == 512


def test_prefill_pacer_first_chunk_beside_streams_is_two_granules():
    assert PrefillPacer(512).budget(streaming=True) == 64
    assert PrefillPacer(16).budget(streaming=True) == 16  # never above the backend's chunk


def test_prefill_pacer_budget_is_twice_a_step_of_prompt_tokens_in_granules():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)  # a step of the running lanes: 100 ms
    pacer.read(100, 0.1)  # a prompt token: 1 ms -> 2 * 100 / 1 = 200 tokens -> 192 (6 granules of 32)
    assert pacer.budget(streaming=True) == 192
    slow = PrefillPacer(512)
    slow.stepped(0.1)
    slow.read(10, 0.1)  # 10 ms a token: 20 tokens fit, less than a granule -> one granule
    assert slow.budget(streaming=True) == 32
    fast = PrefillPacer(512)
    fast.stepped(0.1)
    fast.read(1000, 0.1)  # 0.1 ms a token: 2,000 tokens fit -> the chunk
    assert fast.budget(streaming=True) == 512


def test_prefill_pacer_averages_its_measurements():
    pacer = PrefillPacer(512)
    pacer.stepped(0.1)
    pacer.stepped(0.2)  # 0.1 + 0.3 * (0.2 - 0.1)
    assert abs(pacer.step_s - 0.13) < 1e-12
    pacer.read(0, 5.0)  # a read of no token says nothing about a token's time
    assert pacer.token_s is None

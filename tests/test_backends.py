"""The llama.cpp backend and the Scheduler on the real default GGUF, against independent
references: the transformers tokenizer of the same GGUF, each pair decoded alone (fresh backend,
one sequence at a time), llama.cpp's own detokenizer, and counts of what went into each
llama_decode. The brute-force CFG reference and the transformers-vs-llama.cpp agreement are in the
`llamaref` tests."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfg_textgen.engine import Request, Scheduler, generate_stream
from cfg_textgen.presets import load_preset
from llamacpp_reference import DETERMINISTIC, WITHOUT_LLAMA_CPP

llama_cpp = pytest.importorskip("llama_cpp")

REPO = Path(__file__).resolve().parent.parent
STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the stairs, "
         "lit the lamp, and")
STORIES = [
    STORY,
    "Zoë's café served crème brûlée 🍮 and 🐉🔥 — «déjà vu» ñandú, 東京.",
    "Chapter 1\n\n\"Run!\" she shouted.\n\tThe door\r\nslammed. 🦊✨",
    "  leading spaces, trailing spaces   ",
    "<|im_start|>user\nWrite a story.<|im_end|>\n<|im_start|>assistant\nOnce",
    "naïve façade — ÀÉÎÕÜ 😀😃 ​zero-width and ﬁ ligature",
]


@pytest.fixture(scope="module")
def backend():
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path

    b = LlamaCppBackend(default_gguf_path(), DETERMINISTIC, pairs=4)
    yield b
    b.close()


def _greedy(scale, tokens=24, opposing=""):
    p = load_preset("plain")
    return dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, scale=scale, opposing_prompt=opposing,
                                                          opposing_mode="text"),
                               do_sample=False, max_new_tokens=tokens, stop=())


def _alone(backend, prompt, preset, seed=None):
    """The reference: the same request as a Stream on its own, nothing else in the context."""
    from cfg_textgen.engine import stream_preset

    s = stream_preset(backend, None, prompt, preset, seed=seed)
    text = "".join(s)
    return s.token_ids, text


# ---- tokenizer and text ---------------------------------------------------------------------

@pytest.mark.slow
def test_llama_tokenizer_equals_transformers_tokenizer_on_the_default_model(backend, default_model):
    _, tok = default_model
    for text in STORIES:
        assert backend.tokenize(text) == tok(text, add_special_tokens=True)["input_ids"], text


def test_llama_stream_pieces_join_to_llama_detokenize(backend):
    """Forced tokens of a text with characters split over several tokens: the streamed pieces
    join to llama.cpp's own one-shot detokenization (llama_detokenize), with no U+FFFD."""
    text = STORIES[1]
    ids = backend.tokenize(text)
    assert any(b"\xef\xbf\xbd" in backend.tokenizer.decode([i]).encode() for i in ids)  # split chars
    L = backend.lib
    buf = (llama_cpp.ctypes.c_char * 4096)()
    n = L.llama_detokenize(backend.vocab, (L.llama_token * len(ids))(*ids), len(ids), buf, 4096, False, False)
    want = bytes(buf[:n]).decode("utf-8")

    class Force:
        def __init__(self):
            self.i = 0

        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            out[:, ids[self.i]] = 0.0
            self.i += 1
            return out

    s = generate_stream(backend, None, STORY, scale=1.5, chain=[Force()], do_sample=False,
                        max_new_tokens=len(ids))
    pieces = list(s)
    assert s.token_ids == ids
    assert "".join(pieces) == want == text
    assert not any("\ufffd" in p for p in pieces)


# ---- decode structure --------------------------------------------------------------------------

class _RecordDecodes:
    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.orig = backend._decode

    def __enter__(self):
        def record(entries):
            self.calls.append([(seq, len(ids)) for seq, ids, *_ in entries])
            return self.orig(entries)
        self.backend._decode = record
        return self

    def __exit__(self, *exc):
        del self.backend._decode


@pytest.mark.parametrize("scale,rows", [(1.0, 1), (1.5, 2), (0.0, 2)])
def test_llama_scale_1_decodes_the_story_sequence_only(backend, scale, rows):
    with _RecordDecodes(backend) as rec:
        s = generate_stream(backend, None, STORY, scale=scale, max_new_tokens=10, do_sample=False,
                            cache_prompt=False)  # the whole prompt is read, not a cached prefix's rest
        list(s)
    n = len(s.token_ids)
    # one prefill (story [+ opposing BOS] in ONE llama_decode), then one decode per new token
    assert len(rec.calls) == n == s.stats.forwards
    assert [len(ids) for ids in [rec.calls[0]]] == [rows]
    assert rec.calls[0][0][1] == len(s.prompt_ids)
    if rows == 2:
        assert rec.calls[0][1][1] == 1  # the blank story: BOS alone
    assert all(len(call) == rows and all(k == 1 for _, k in call) for call in rec.calls[1:])


def test_llama_pair_rows_equal_each_sequence_alone(backend):
    """A pair's story row and opposing row are exactly what each sequence gives decoded alone."""
    story, opposing = backend.tokenize(STORY), backend.tokenize("A dull, generic story.")
    [pair] = backend.prefill([(story, opposing)])
    both = pair.logits.clone()
    backend.release(pair)
    for row, ids in enumerate((story, opposing)):
        [alone] = backend.prefill([(ids, None)])
        assert torch.equal(alone.logits[0], both[row])
        backend.release(alone)


def test_llama_steps_of_several_pairs_equal_each_pair_alone_bit_for_bit(backend):
    """Teacher-forced: 4 pairs (mixed scales) stepped together give each pair's logits exactly as
    stepping it alone (bound 0: llama.cpp's kernels only change beyond 34 tokens per decode, and
    steps stay in decodes of <= 32)."""
    prompts = [(backend.tokenize(t), o) for t, o in [(STORY, [1]), (STORIES[1], None),
                                                      (STORIES[2], backend.tokenize("Dull.")),
                                                      ("Once upon a time", [1])]]
    forced = backend.tokenize(" the sea was calm and grey under the moon, and nobody came")

    def run(group):
        pairs, out = [], []
        for p in group:  # each prefill on its own; its logits are valid until the next decode
            pairs.append(backend.prefill([p])[0])
            out.append([pairs[-1].logits.clone()])
        for t in forced:
            backend.step([(p, t) for p in pairs])
            for o, p in zip(out, pairs):
                o.append(p.logits.clone())
        for p in pairs:
            backend.release(p)
        return out

    together = run(prompts)
    for i, p in enumerate(prompts):
        [alone] = run([p])
        for a, b in zip(alone, together[i]):
            assert torch.equal(a, b)


def test_scheduler_jobs_together_give_the_text_each_gives_alone(backend):
    requests = [Request(STORY, _greedy(1.0)), Request(STORY, _greedy(1.5)),
                Request(STORIES[2], _greedy(3.0, opposing="A dull story.")),
                Request("Once upon a time", _greedy(0.5))]
    want = [_alone(backend, r.prompt, r.preset) for r in requests]
    with Scheduler(backend, max_parallel=4) as sched:
        jobs = [sched.submit(r) for r in requests]
        got = [(j.wait(60), j) for j in jobs]
    for (ok, job), (ids, text) in zip(got, want):
        assert ok and job.error is None and job.stop_reason in ("max_tokens", "eos")
        assert job.token_ids == ids and job.text == text
        assert "".join(job.pieces()) == text


def test_scheduler_job_joining_and_leaving_mid_run_changes_nobody(backend):
    long_req = Request(STORY, _greedy(1.5, tokens=48))
    short_req = Request(STORIES[1], _greedy(2.0, tokens=6))
    seeded = Request(STORY, dataclasses.replace(load_preset("balanced-story"), max_new_tokens=16), seed=5)
    want = [_alone(backend, r.prompt, r.preset, r.seed) for r in (long_req, short_req, seeded)]
    with Scheduler(backend, max_parallel=3) as sched:
        first = sched.submit(long_req)
        pieces = first.pieces()
        next(pieces)  # the long job is running: the others join mid-run (short ones leave early)
        others = [sched.submit(short_req), sched.submit(seeded)]
        for job in [first] + others:
            assert job.wait(60)
    for job, (ids, text) in zip([first] + others, want):
        assert job.error is None and job.token_ids == ids and job.text == text


def _bench_story() -> str:
    """The benchmarks' long story (~250 tokens), as the server helper submitted it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.STORY


@pytest.mark.slow
def test_scheduler_identical_long_prompt_greedy_jobs_at_once_equal_alone():
    """Two and four identical greedy requests on a ~250-token story submitted at once: each text
    is the one the request gives alone (the reference: the same request, nothing else running).

    Failed before the fix (2 of 2 and 4 of 4 texts parted at token 20): a lone scale-1 job steps
    one token, and with 2 threads ggml's CPU flash attention splits that query's keys (512+ cells
    once the story passes 256 tokens) into one chunk per thread, while several jobs' step runs
    each query whole. In the deterministic mode the backend decodes single tokens on one thread
    (n_threads=2 here so the split would happen)."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path
    from cfg_textgen.presets import parse_preset

    story = _bench_story()
    preset = parse_preset({"name": "t", "samplers": [], "do_sample": False, "max_new_tokens": 48})
    b = LlamaCppBackend(default_gguf_path(), DETERMINISTIC, pairs=4, n_threads=2)
    try:
        # story + new tokens pass 256 cells: llama.cpp then attends over 512 keys (padded to 256)
        assert len(b.tokenize(story)) + 48 > 256 + 16
        with Scheduler(b, max_parallel=4) as sched:
            alone = sched.submit(Request(prompt=story, preset=preset))
            assert alone.wait(300) and alone.error is None, alone.error
            for n in (2, 4):
                jobs = [sched.submit(Request(prompt=story, preset=preset)) for _ in range(n)]
                for job in jobs:
                    assert job.wait(300) and job.error is None, job.error
                parted = [next((i for i, (x, y) in enumerate(zip(job.token_ids, alone.token_ids))
                                if x != y), None) for job in jobs]
                assert [job.text for job in jobs] == [alone.text] * n, (n, parted)
    finally:
        b.close()


def test_scheduler_seeded_sampling_repeats_whatever_else_runs(backend):
    preset = dataclasses.replace(load_preset("balanced-story"), max_new_tokens=20)
    with Scheduler(backend, max_parallel=4) as sched:
        alone = sched.submit(Request(STORY, preset, seed=11))
        alone.wait(60)
        crowd = [sched.submit(Request(STORY, preset, seed=s)) for s in (11, 12, 13, 11)]
        for j in crowd:
            j.wait(60)
    assert crowd[0].token_ids == crowd[3].token_ids == alone.token_ids
    assert crowd[1].token_ids != alone.token_ids or crowd[2].token_ids != alone.token_ids


def test_scheduler_cancel_ends_within_one_step_and_frees_the_sequences(backend):
    with Scheduler(backend, max_parallel=2) as sched:
        other = sched.submit(Request(STORY, _greedy(1.5, tokens=200)))
        job = sched.submit(Request(STORY, _greedy(1.5, tokens=200)))
        it = job.pieces()
        next(it)
        steps_at_cancel = sched.steps
        n_at_cancel = len(job.token_ids)
        job.cancel()
        assert job.wait(30)
        assert job.stop_reason == "cancelled"
        assert sched.steps - steps_at_cancel <= 1 and len(job.token_ids) - n_at_cancel <= 1
        list(it)  # the iterator ends (it may hold pieces given before the cancel)
        other.cancel()
        assert other.wait(30) and other.stop_reason == "cancelled"
    assert backend.used_cells == 0 and backend.free_slots == 2 * backend._pairs


def test_scheduler_long_run_of_submit_and_cancel_never_exhausts_the_context():
    """A small context (2 pairs of a 256-token window: 4 streams of 256 cells) and 40 jobs of
    ~100-token stories started and cancelled in a row, mid-prefill, mid-run or before they start:
    4,000+ cells in all, so a release that leaked cells or sequence ids would fill a stream or run
    out of sequences within a few jobs."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path

    small = LlamaCppBackend(default_gguf_path(), DETERMINISTIC, n_ctx=256, pairs=2)
    story = " ".join([STORY] * 4)
    assert 90 < len(small.tokenize(story)) < 256 - 32
    try:
        with Scheduler(small, max_parallel=2) as sched:
            for i in range(40):
                job = sched.submit(Request(story, _greedy(1.5, tokens=32)))
                if i % 3 == 1:
                    next(job.pieces(), None)  # running
                job.cancel()
                assert job.wait(60) and job.error is None, job.error
                assert job.stop_reason in ("cancelled", "max_tokens", "eos")
            last = sched.submit(Request(story, _greedy(1.5, tokens=32)))
            assert last.wait(60) and last.stop_reason == "max_tokens", last.error
        assert small.used_cells == 0 and small.free_slots == 4
    finally:
        small.close()


class _FailingDecode:
    """Make the `n`-th llama_decode from now fail, as llama.cpp does when it cannot place a batch."""

    def __init__(self, backend, n: int):
        from cfg_textgen.backends.llama_cpp import LlamaCppError

        self.backend, self.n, self.error = backend, n, LlamaCppError
        self.orig = backend._decode
        backend._decode = self

    def __call__(self, entries):
        self.n -= 1
        if self.n == 0:
            del self.backend._decode  # once
            raise self.error("llama_decode failed with code 1 (injected)")
        return self.orig(entries)


def test_llama_run_that_fails_on_the_second_new_pair_leaves_every_slot_free():
    """Two pairs join in one `run`; the second one's prefill decode fails: the first pair, whose
    own decode had succeeded, must not stay allocated (the backend's failure contract)."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend, LlamaCppError
    from cfg_textgen.models import default_gguf_path

    b = LlamaCppBackend(default_gguf_path(), n_ctx=128, pairs=2)
    try:
        story = b.tokenize(STORY)
        _FailingDecode(b, 2)
        with pytest.raises(LlamaCppError, match="injected"):
            b.run(new=[(story, [1]), (story, [1])])
        assert b.used_cells == 0 and b.free_slots == 4
        pairs = b.prefill([(story, [1]), (story, [1])])  # both fit again
        for p in pairs:
            b.release(p)
    finally:
        b.close()


def test_scheduler_failing_decode_while_jobs_join_leaves_every_slot_free_and_the_next_job_runs():
    """Three times, two CFG jobs join at once and the second one's prefill fails (2 pairs: all 4
    sequences taken by the two). Every slot must come back each time, and a healthy CFG job
    then runs; a leak of the first job's sequences would leave it queued forever."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path

    b = LlamaCppBackend(default_gguf_path(), n_ctx=128, pairs=2)
    try:
        with Scheduler(b, max_parallel=2) as sched:
            for _ in range(3):
                with sched._cv:  # both are queued before the decode thread admits either
                    _FailingDecode(b, 2)
                    jobs = [sched.submit(Request(STORY, _greedy(1.5, tokens=4))) for _ in range(2)]
                for job in jobs:
                    assert job.wait(60), "a job never ended"
                assert jobs[1].stop_reason == "error" and "injected" in str(jobs[1].error)
                assert jobs[0].error is None  # it was not in the failed decode
            healthy = sched.submit(Request(STORY, _greedy(1.5, tokens=4)))
            assert healthy.wait(60), "a healthy job stayed queued: sequences leaked"
            assert healthy.stop_reason in ("max_tokens", "eos"), healthy.error
        assert b.used_cells == 0 and b.free_slots == 4
    finally:
        b.close()


def test_scheduler_refuses_bad_requests_at_submit():
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend
    from cfg_textgen.models import default_gguf_path

    backend = LlamaCppBackend(default_gguf_path(), DETERMINISTIC, n_ctx=128, pairs=1)  # a small window: quick
    with Scheduler(backend, max_parallel=1) as sched:
        with pytest.raises(ValueError, match="max_new_tokens"):
            sched.submit(Request(STORY, dataclasses.replace(_greedy(1.5), max_new_tokens=0)))
        long_story = " ".join([STORY] * 6)
        from cfg_textgen.errors import CFGTextgenError
        with pytest.raises(CFGTextgenError, match="at most"):
            sched.submit(Request(long_story, _greedy(1.5), truncate=False))
        job = sched.submit(Request(long_story, _greedy(1.5, tokens=4)))  # truncate: cut, runs
        assert job.wait(60) and job.stats.kept_tokens < job.stats.prompt_tokens
        assert job.stats.first_token_seconds is not None and job.stats.tokens == 4
    backend.close()


def test_scheduler_ban_eos_never_ends_on_eos(backend):
    class PreferEOS:
        def __call__(self, input_ids, scores):
            # a model that wants to end here: EOS far ahead, unless something removed it (-inf)
            eos = sorted(backend.eos_ids)
            out = scores.clone()
            out[:, eos] = torch.where(torch.isneginf(scores[:, eos]), scores[:, eos], 100.0)
            return out

    for ban, reason in ((False, "eos"), (True, "max_tokens")):
        s = generate_stream(backend, None, STORY, chain=[PreferEOS()], do_sample=False,
                            max_new_tokens=5, ban_eos=ban)  # EOS wins every step unless banned
        list(s)
        assert s.stop_reason == reason and bool(set(s.token_ids) & backend.eos_ids) == (not ban)


# ---- without llama-cpp-python ----------------------------------------------------------------

_BLOCK = WITHOUT_LLAMA_CPP


def _without_llama(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_without_llama_cpp_the_package_imports_and_llama_paths_name_the_install_command():
    r = _without_llama(
        "import cfg_textgen.engine, cfg_textgen.models, cfg_textgen.cli\n"
        "from cfg_textgen.backends import BackendUnavailable, LLAMA_CPP_INSTALL\n"
        "from cfg_textgen.models import choose_backend\n"
        "msgs = []\n"
        "assert choose_backend(None, log=msgs.append) == 'transformers'\n"
        "assert LLAMA_CPP_INSTALL in msgs[0], msgs\n"
        "try:\n"
        "    choose_backend(None, 'llama.cpp')\n"
        "except BackendUnavailable as err:\n"
        "    assert LLAMA_CPP_INSTALL in str(err), err\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_without_llama_cpp_cli_backend_llama_says_the_install_command(tmp_path):
    from cfg_textgen.backends import LLAMA_CPP_INSTALL

    r = _without_llama("import sys; sys.argv = ['cfg-textgen', 'generate', 'Hi', '--backend', 'llama.cpp']\n"
                       "from cfg_textgen.cli import main\nmain()\n")
    assert r.returncode == 1
    assert LLAMA_CPP_INSTALL in r.stderr and "Traceback" not in r.stderr


def test_without_llama_cpp_transformers_backend_still_generates(tiny_model_dir):
    r = _without_llama(
        f"from cfg_textgen.models import load_backend\n"
        f"from cfg_textgen.engine import generate_stream\n"
        f"b = load_backend({str(tiny_model_dir)!r})\n"
        f"s = generate_stream(b, None, 'Once upon', scale=1.5, max_new_tokens=4, do_sample=False)\n"
        f"list(s); assert len(s.token_ids) >= 1; print(b.name)\n")
    assert r.returncode == 0 and r.stdout.strip() == "transformers", r.stderr


def test_backend_choice_rules(tiny_model_dir, tmp_path):
    from cfg_textgen.errors import ModelNotFoundError
    from cfg_textgen.models import choose_backend, default_gguf_path

    assert choose_backend(None) == "llama.cpp"
    assert choose_backend(str(default_gguf_path())) == "llama.cpp"
    assert choose_backend(str(tiny_model_dir)) == "transformers"
    assert choose_backend(None, "transformers") == "transformers"
    with pytest.raises(ModelNotFoundError, match="--backend transformers"):
        choose_backend(str(tiny_model_dir), "llama.cpp")
    with pytest.raises(ValueError, match="backend"):
        choose_backend(None, "vllm")


def test_llama_generation_with_a_full_preset_never_imports_transformers():
    code = ("import sys\n"
            "from cfg_textgen.engine import stream_preset\n"
            "from cfg_textgen.models import load_backend\n"
            "from cfg_textgen.presets import load_preset\n"
            "b = load_backend(None, 'llama.cpp')\n"
            "s = stream_preset(b, None, 'Once upon a time', load_preset('balanced-story'), seed=1)\n"
            "assert ''.join(s) and s.stats.batch == 2\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_generate_on_llama_cpp_streams_and_reports_the_backend():
    r = subprocess.run([sys.executable, "-m", "cfg_textgen.cli", "generate", STORY, "--tokens", "12",
                        "--seed", "1", "--cfg-scale", "1.5"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(llama.cpp)" in r.stderr and "12 tokens" in r.stderr and r.stdout.strip()
    assert "llama_" not in r.stderr and "ggml" not in r.stderr  # llama.cpp's own logs stay quiet

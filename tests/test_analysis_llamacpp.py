"""`sweep`, `explain` and `eval lambada` on the llama.cpp backend: the same analysis code
as on transformers, over the backend API, with scales and examples decoded side by side.

Three kinds of checks, all on the real default model (SmolLM2-135M Q4_1):

1. Exact, against the independent llama.cpp reference (tests/llamacpp_reference.py, llama-cpp-python's
   low-level API only, nothing of cfg_textgen): with micro-batches of 32 tokens on both sides every
   token goes through the same kernels (see tests/test_llamacpp_cfg.py), so the sweep's fluency and
   entropy equal the brute-force CFG reference's (which re-decodes story and opposing sequences from
   scratch at every step) up to the float32 vs float64 combine (bound 1e-4), and LAMBADA's greedy
   ids equal the reference's bare two-sequence loop (`greedy_cfg_batched`).
2. Side by side equals alone: a sweep's scales decoded together (one llama_decode per step) and
   LAMBADA's examples in lanes of 8 give exactly what each gives alone.
3. llama.cpp vs transformers on the same GGUF. They cannot be bit-equal: transformers dequantizes
   Q4_1 to float32, llama.cpp multiplies 4-bit weights by 8-bit activations and keeps the KV cache
   in float16 (tests/test_llamacpp_parity.py). Measured here (2026-11-24), LAMBADA on the 28
   hand-written examples (scales 1 and 1.5, token rule): correct counts equal in 7 of 8
   (setting, scale) cells, 1 apart in the last (10 vs 11); the same predicted word in 24-26 of 28
   (word rule: 22-26). explain over the same 20 tokens at scales 1.5 and 3: top-1 before/after CFG
   agree in 18-20 of 20 steps, top-5 lists share 0.92-0.97 of their tokens; sweep fluency and
   entropy 0.026-0.034 apart. Bounds below, with a margin.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cfg_textgen import analysis as A
from llamacpp_reference import (DETERMINISTIC, WITHOUT_LLAMA_CPP, brute_force_cfg, default_gguf, exact_pair,
                               have_llama_cpp, log_softmax64)
from test_lambada_rule import HANDWRITTEN

REPO = Path(__file__).resolve().parents[1]
needs_llama = pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python is not installed")

THREADS = 1  # as tests/test_llamacpp_cfg.py: 2 threads on 2 shared cores spin-wait
PROMPT = "The dragon folded her wings over the sleeping village, and the old baker looked up"
SCALES = [0.0, 1.0, 1.5, 3.0]
TOKENS = 12
EXACT = 1e-4  # float32 combine (ours) vs float64 (the reference); tests/test_llamacpp_cfg.py
TIE = 1e-3  # a greedy token may differ from the reference's only where its top-2 gap is below this

# llama.cpp vs transformers (the measurement in the module docstring, with a margin)
LAMBADA_CORRECT_APART = 2  # of 28; measured <= 1
LAMBADA_SAME_PREDICTIONS = 20  # of 28; measured >= 24 (token rule)
EXPLAIN_TOP1 = 0.8  # share of steps whose top candidate agrees; measured >= 0.9
EXPLAIN_TOP5_OVERLAP = 0.8  # measured >= 0.92
SWEEP_METRIC_APART = 0.1  # |fluency| and |entropy| difference, same tokens; measured <= 0.034


def _examples():
    return [A.LambadaExample(*A.split_last_word(t), i + 1) for i, t in enumerate(HANDWRITTEN)]


@pytest.fixture(scope="module")
def exact():
    """Our backend and the reference, both with micro-batches of 32 tokens (same kernels)."""
    with exact_pair(THREADS) as pair:
        yield pair


@pytest.fixture(scope="module")
def lcpp():
    """The llama.cpp backend with default micro-batches (one thread: see THREADS)."""
    from cfg_textgen.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(default_gguf(), DETERMINISTIC, n_threads=THREADS, n_ubatch=512)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(default_model):
    from cfg_textgen.backends.transformers import TransformersBackend

    return TransformersBackend(*default_model)


# ---- 1. exact, against the independent reference ----------------------------------------------


@pytest.mark.slow
@needs_llama
def test_sweep_on_llamacpp_equals_the_brute_force_reference(exact):
    """Every scale of a greedy sweep, decoded side by side: its tokens are the reference's greedy
    CFG tokens, its fluency and entropy the reference's, recomputed from scratch along them."""
    from cfg_textgen.presets import load_preset

    backend, ref = exact
    prompt = backend.tokenize(PROMPT)
    gen = A.make_engine_generate_fn(backend, load_preset("greedy"), max_new_tokens=TOKENS)
    rows = A.sweep(backend, None, prompt, SCALES, gen)
    for row in rows:
        assert len(row.token_ids) == TOKENS  # no EOS in 12 tokens here: every step compared
        trace = brute_force_cfg(ref, prompt, [backend.bos_id], row.scale, TOKENS, forced=row.token_ids)
        for k, tok in enumerate(row.token_ids):
            want = int(np.argmax(trace.guided_lp[k]))
            assert tok == want or trace.gaps[k] < TIE, (row.scale, k)
        fluency = np.mean([c[t] for c, t in zip(trace.c, row.token_ids)])
        guided = [log_softmax64(g) for g in trace.guided_lp]
        ent = np.mean([-(np.exp(g) * g).sum() for g in guided])
        assert abs(row.fluency - fluency) < EXACT and abs(row.entropy - ent) < EXACT, row.scale


@pytest.mark.slow
@needs_llama
def test_explain_on_llamacpp_scores_equal_the_brute_force_reference(exact):
    backend, ref = exact
    prompt = backend.tokenize(PROMPT)
    new = A.make_engine_generate_fn(backend, None, seed=3, max_new_tokens=8)(prompt, 3.0)
    text, steps = A.explain(backend, None, prompt, 3.0, lambda ids, s: new, top=5)
    assert text == backend.tokenizer.decode(new) and len(steps) == len(new)
    trace = brute_force_cfg(ref, prompt, [backend.bos_id], 3.0, len(new), forced=new)
    for step, c, g in zip(steps, trace.c, trace.guided_lp):
        g = log_softmax64(g)
        for shown, ref_lp, p in ((step.before, c, "plain_p"), (step.after, g, "guided_p")):
            fifth = np.partition(ref_lp, -5)[-5]  # the reference's top 5 (up to float32 ties)
            assert all(ref_lp[x.token_id] >= fifth - EXACT for x in shown)
            assert all(abs(np.log(getattr(x, p)) - ref_lp[x.token_id]) < EXACT for x in shown)
        assert abs(np.log(step.chosen.plain_p) - c[step.chosen.token_id]) < EXACT
        assert abs(np.log(step.chosen.guided_p) - g[step.chosen.token_id]) < EXACT


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_lambada_on_llamacpp_equals_the_bare_two_sequence_loop(exact, opposing):
    """The token rule's greedy ids, 8 examples at a time, against the reference's bare CFG loop
    (story and opposing sequence in one llama_decode per step, combined in numpy)."""
    backend, ref = exact
    examples = _examples()[:12]
    results = A.eval_lambada(backend, None, examples, [1.0, 1.5], A.lambada_opposing(opposing), lanes=8)
    for res in results:
        for ex, d in zip(examples, res.details):
            ids = backend.tokenize(ex.context)
            opp = [ids[-1]] if opposing == "last-token" else [backend.bos_id]
            gaps = []

            def gap(scores):
                top2 = np.partition(scores, -2)[-2:]
                gaps.append(float(top2[1] - top2[0]))

            want = ref.greedy_cfg_batched(ids, opp, res.scale, len(d.target_ids), on_step=gap)
            n = next((i for i, t in enumerate(want) if t in backend.eos_ids), len(want) - 1) + 1
            want = want[:n]  # our rule ends at the first EOS
            ok = d.predicted_ids == want or any(g < TIE for g in gaps)
            assert ok, (res.scale, ex.line, d.predicted_ids, want)


# ---- 2. side by side equals alone -------------------------------------------------------------


@pytest.mark.slow
@needs_llama
def test_sweep_scales_side_by_side_equal_each_scale_alone(lcpp):
    """Sampling (preset plain, one seed): all scales in one decode per step, or one at a time."""
    prompt = lcpp.tokenize(PROMPT)
    gen = A.make_engine_generate_fn(lcpp, None, seed=11, max_new_tokens=16)
    forwards = lcpp.forwards
    together = A.sweep(lcpp, None, prompt, SCALES, gen)
    decodes = lcpp.forwards - forwards
    alone = [A.sweep(lcpp, None, prompt, [s], A.make_engine_generate_fn(lcpp, None, seed=11, max_new_tokens=16,
                                                                       lanes=1), lanes=1)[0]
             for s in SCALES]
    for a, b in zip(together, alone):
        assert (a.token_ids, a.fluency, a.entropy, a.text) == (b.token_ids, b.fluency, b.entropy, b.text), a.scale
    # side by side: a prefill per scale, then ONE decode per step for all of them (x2: generate, score)
    assert decodes <= 2 * (len(SCALES) + 16)
    # each sequence got the KV cells it needs (prompt + 16 tokens -> 256), not the 4096 window
    assert lcpp.window == 256 < lcpp.n_ctx
    with pytest.raises(ValueError, match="`window`"):
        lcpp.reserve(1, window=lcpp.n_ctx + 1)


@pytest.mark.slow
@needs_llama
def test_lambada_examples_in_lanes_equal_each_alone(lcpp):
    examples = _examples()[:10]
    for rule in ("tokens", "word"):
        batched = A.eval_lambada(lcpp, None, examples, [1.0, 1.5], A.lambada_opposing("empty"), rule=rule, lanes=8)
        alone = A.eval_lambada(lcpp, None, examples, [1.0, 1.5], A.lambada_opposing("empty"), rule=rule, lanes=1)
        assert [[d.to_dict() for d in r.details] for r in batched] == [[d.to_dict() for d in r.details] for r in alone]


# ---- 3. llama.cpp vs transformers on the same GGUF --------------------------------------------


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_lambada_llamacpp_agrees_with_transformers(lcpp, hf, opposing):
    examples = _examples()
    got = A.eval_lambada(lcpp, None, examples, [1.0, 1.5], A.lambada_opposing(opposing))
    ref = A.eval_lambada(hf, None, examples, [1.0, 1.5], A.lambada_opposing(opposing))
    for a, b in zip(got, ref):
        same = sum(x == y for x, y in zip(a.predictions, b.predictions))
        report = f"scale {a.scale}: llama.cpp {a.correct}/28, transformers {b.correct}/28, same {same}/28"
        print(report)
        assert abs(a.correct - b.correct) <= LAMBADA_CORRECT_APART, report
        assert same >= LAMBADA_SAME_PREDICTIONS, report
        # the target ids are the same: both tokenizers agree (test_llamacpp_parity.py)
        assert [d.target_ids for d in a.details] == [d.target_ids for d in b.details]


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_explain_and_sweep_metrics_llamacpp_agree_with_transformers(lcpp, hf, scale):
    """The same 20 tokens teacher-forced on both backends: explain's top candidates and the sweep's
    metrics."""
    prompt = lcpp.tokenize("The dragon circled the tower")
    assert prompt == hf.tokenize("The dragon circled the tower")
    new = A.make_engine_generate_fn(lcpp, None, seed=7, max_new_tokens=20)(prompt, scale)
    new = A._strip_eos_padding(new, lcpp)
    a = A.explain(lcpp, None, prompt, scale, lambda ids, s: new)[1]
    b = A.explain(hf, None, prompt, scale, lambda ids, s: new)[1]
    n = len(a)
    for side in ("before", "after"):
        top1 = sum(getattr(x, side)[0].token_id == getattr(y, side)[0].token_id for x, y in zip(a, b)) / n
        overlap = sum(len({c.token_id for c in getattr(x, side)} & {c.token_id for c in getattr(y, side)})
                      for x, y in zip(a, b)) / (5 * n)
        print(f"scale {scale} {side} CFG: top-1 agrees {top1:.2f}, top-5 overlap {overlap:.2f}")
        assert top1 >= EXPLAIN_TOP1 and overlap >= EXPLAIN_TOP5_OVERLAP, (side, top1, overlap)
    opp = A.Opposing().start_ids(prompt, lcpp)
    [ra], [rb] = (A.score_rows(backend, prompt, [(scale, new)], opp) for backend in (lcpp, hf))
    print(f"scale {scale}: fluency {ra.fluency:.3f} vs {rb.fluency:.3f}, entropy {ra.entropy:.3f} vs {rb.entropy:.3f}")
    assert abs(ra.fluency - rb.fluency) < SWEEP_METRIC_APART and abs(ra.entropy - rb.entropy) < SWEEP_METRIC_APART


# ---- the CLI: --backend on sweep, explain, eval ----------------------------------------------


def _lambada_file(tmp_path, n=4):
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in HANDWRITTEN[:n]), encoding="utf-8")
    return path


def _commands(tmp_path):
    return {
        "sweep": ["sweep", "The dragon circled the tower", "--scales", "1,2", "--tokens", "4", "--seed", "1"],
        "explain": ["explain", "The dragon circled the tower", "--scale", "2", "--tokens", "2", "--seed", "1"],
        "eval": ["eval", "lambada", str(_lambada_file(tmp_path)), "--scales", "1,1.5", "--batch", "4"],
    }


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("command", ["sweep", "explain", "eval"])
def test_cli_backend_flag_picks_the_backend(tmp_path, command):
    """The default model runs on llama.cpp unless --backend says transformers; both print results."""
    from cfg_textgen.cli import main

    args = _commands(tmp_path)[command]
    outs = {}
    for flag in ([], ["--backend", "llama.cpp"], ["--backend", "transformers"]):
        r = CliRunner().invoke(main, args + flag + ["--threads", "1"])  # (THREADS; torch's on transformers)
        assert r.exit_code == 0, r.output
        ran = re.search(r"model ready in [\d.]+ s \(([^)]+)\)", r.stderr).group(1)
        assert ran == (flag[1] if flag else "llama.cpp"), (flag, r.stderr)
        outs[ran] = r.stdout
    for out in outs.values():
        if command == "sweep":
            assert "=== scale 2 ===" in out or re.match(r"scale 1 +scale 2", out)
        elif command == "explain":
            assert out.count("after CFG (scale 2)") == 2
        else:
            assert re.search(r"^1\.5 +\d/4 ", out, flags=re.M)


_BLOCK = WITHOUT_LLAMA_CPP + """
from cfg_textgen.cli import main
sys.argv = ["cfg-textgen"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("command", ["sweep", "explain", "eval"])
def test_cli_backend_llamacpp_without_it_names_the_flag_and_the_install_command(tmp_path, command):
    from cfg_textgen.backends import LLAMA_CPP_INSTALL

    args = _commands(tmp_path)[command] + ["--backend", "llama.cpp"]
    r = subprocess.run([sys.executable, "-c", _BLOCK, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert "--backend llama.cpp" in r.stderr and LLAMA_CPP_INSTALL in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""

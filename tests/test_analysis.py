"""cfg_textgen.analysis and cfg_textgen.report: metrics on hand-made inputs, scoring against
hand-computed log-probabilities and transformers' own CFG, the LAMBADA rule and eval against
transformers' `generate(guidance_scale=...)`, and the rendering (terminal, HTML, atomic write)."""

from __future__ import annotations

import base64
import functools
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cfg_textgen import analysis as A
from cfg_textgen import report as R
from cfg_textgen.errors import CFGTextgenError
from conftest import make_tiny_model

# ---- text metrics ------------------------------------------------------------------------------


def test_distinct_n_of_a_known_string():
    # bigrams: (the cat) (cat the) (the cat) (cat sat): 3 distinct of 4
    assert A.distinct_n("the cat the cat sat".split(), 2) == pytest.approx(0.75)
    assert A.distinct_n("a b c d".split(), 2) == 1.0
    assert A.distinct_n(list("aaaa"), 1) == 0.25


def test_distinct_n_without_ngrams_is_nan():
    assert math.isnan(A.distinct_n(["one"], 2))
    assert math.isnan(A.distinct_n([], 2))


def test_repeated_ngram_rate_of_a_known_string():
    # 3-grams: abc bca cab abc bca: the last two repeat earlier ones -> 2/5
    assert A.repeated_ngram_rate("a b c a b c a".split(), 3) == pytest.approx(0.4)
    assert A.repeated_ngram_rate("a b c d e".split(), 3) == 0.0
    assert math.isnan(A.repeated_ngram_rate(["a", "b"], 3))


def test_ngrams_rejects_n_below_one():
    with pytest.raises(ValueError, match="`n`"):
        A.ngrams([1, 2], 0)


def test_entropy_of_known_distributions():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    assert float(A.entropy(probs.log())[0]) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # a removed token (-inf) counts as probability 0; a constant shift changes nothing
    assert float(A.entropy(torch.tensor([[3.0, 3.0, float("-inf")]]))[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(A.entropy(torch.zeros(1, 7))[0]) == pytest.approx(math.log(7), abs=1e-6)


def test_edit_distance_of_known_pairs():
    assert A.edit_distance("kitten", "sitting") == 3
    assert A.edit_distance("", "abc") == 3
    assert A.edit_distance("the cat sat".split(), "the dog sat down".split()) == 2
    assert A.normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert A.normalized_edit_distance([], []) == 0.0
    assert A.normalized_edit_distance("abc", "xyz") == 1.0


def _levenshtein_reference(a, b):
    """The recursive definition, memoised: the independent reference."""
    @functools.lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@settings(max_examples=150, deadline=None)
@given(st.text("abc", max_size=8), st.text("abc", max_size=8))
def test_edit_distance_matches_the_recursive_definition(a, b):
    assert A.edit_distance(a, b) == _levenshtein_reference(a, b)


# ---- scoring: a stub model whose logits depend on the last token only ---------------------------

TABLE = {0: [0.0, 1.0, 2.0], 1: [2.0, 0.0, -1.0], 2: [0.5, 0.5, 3.0]}  # next-token logits by last token


class LastTokenModel(torch.nn.Module):
    """logits[t] = TABLE[ids[t]]: every value can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(bos_token_id=0, eos_token_id=None, pad_token_id=None,
                                      max_position_embeddings=64)

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, ids, **kwargs):
        return SimpleNamespace(logits=torch.tensor([[TABLE[int(t)] for t in ids[0]]]))


def _log_softmax(row):
    z = math.log(sum(math.exp(x) for x in row))
    return [x - z for x in row]


def test_score_row_mean_logprob_by_hand_for_two_steps():
    model = LastTokenModel()
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    prompt, new = [1, 2], [1, 0]
    row = A.score_row(model, tokenizer, prompt, new, 1.0, [0])
    # step 1 predicts 1 after 2; step 2 predicts 0 after 1
    want = (_log_softmax(TABLE[2])[1] + _log_softmax(TABLE[1])[0]) / 2
    assert row.fluency == pytest.approx(want, abs=1e-6)
    # scale 1: the guided distribution is the plain one
    h = [-sum(math.exp(lp) * lp for lp in _log_softmax(TABLE[t])) for t in (2, 1)]
    assert row.entropy == pytest.approx(sum(h) / 2, abs=1e-6)


def test_score_continuation_guided_by_hand():
    model = LastTokenModel()
    prompt, new, scale = [1, 2], [1, 0], 2.0
    plain, guided = A.score_continuation(model, prompt, new, scale, opposing_ids=[0])
    # step 1: story ends in 2, opposing branch is [0]; step 2: both end in 1 (so guided = plain)
    c, u = _log_softmax(TABLE[2]), _log_softmax(TABLE[0])
    want1 = _log_softmax([ui + scale * (ci - ui) for ci, ui in zip(c, u)])
    assert guided[0].tolist() == pytest.approx(want1, abs=1e-5)
    assert guided[1].tolist() == pytest.approx(_log_softmax(TABLE[1]), abs=1e-5)
    assert plain[0].tolist() == pytest.approx(c, abs=1e-5)


def test_score_continuation_matches_transformers_cfg_scores(tiny_tokenizer):
    """Teacher-forced guided log-probs equal the scores transformers' own CFG processor produced
    while generating (opposing branch = the last prompt token, its default)."""
    model = make_tiny_model("llama")
    ids = tiny_tokenizer("Once upon a time the knight", return_tensors="pt").input_ids
    out = model.generate(ids, guidance_scale=2.0, do_sample=False, max_new_tokens=8, top_k=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    _, guided = A.score_continuation(model, ids[0].tolist(), new, 2.0, [int(ids[0, -1])])
    want = torch.log_softmax(torch.stack(out.scores, 1)[0].float(), -1)
    assert (guided - want).abs().max() < 1e-4


# ---- generation and the sweep --------------------------------------------------------------------


def test_make_generate_fn_greedy_matches_transformers_guidance_scale(tiny_tokenizer):
    from cfg_textgen.presets import load_preset

    model = make_tiny_model("llama")
    ids = tiny_tokenizer("The knight rode through", return_tensors="pt").input_ids
    gen = A.make_generate_fn(model, tiny_tokenizer, load_preset("greedy"), max_new_tokens=10,
                             opposing=A.Opposing("", "last-token"))
    want = model.generate(ids, guidance_scale=1.5, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert gen(ids[0].tolist(), 1.5) == want[0, ids.shape[1]:].tolist()


def test_make_generate_fn_sampling_is_seeded_like_plain_generate(tiny_tokenizer):
    model = make_tiny_model("llama")
    ids = tiny_tokenizer("The knight rode through", return_tensors="pt").input_ids
    gen = A.make_generate_fn(model, tiny_tokenizer, seed=123, max_new_tokens=12)  # preset "plain"
    torch.manual_seed(123)
    want = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=12,
                          pad_token_id=0)
    assert gen(ids[0].tolist(), 1.0) == want[0, ids.shape[1]:].tolist()
    assert gen(ids[0].tolist(), 1.0) == gen(ids[0].tolist(), 1.0)  # every call starts from the seed


def test_sweep_measures_each_scale_and_adds_the_scale_1_reference(tiny_tokenizer):
    model = make_tiny_model("llama")
    texts = {1.0: "the cat sat on the mat", 0.0: "the cat the cat the cat", 3.0: "a dog sat on the mat"}
    calls = []

    def fake_generate(prompt_ids, scale):
        calls.append(scale)
        return tiny_tokenizer(texts[scale], add_special_tokens=False).input_ids

    prompt = tiny_tokenizer("Once upon a time").input_ids
    rows = A.sweep(model, tiny_tokenizer, prompt, [0.0, 3.0], fake_generate)
    assert sorted(calls) == [0.0, 1.0, 3.0] and [r.scale for r in rows] == [0.0, 3.0]
    r0, r3 = rows
    assert r0.text == texts[0.0]
    # "the cat the cat the cat": bigrams (the cat)x3 (cat the)x2 -> 2/5; 3-grams: 4, 2 distinct
    assert r0.distinct2 == pytest.approx(2 / 5) and r0.repeat3 == pytest.approx(2 / 4)
    # vs "the cat sat on the mat": 6 words each; substitutions at positions 3, 4, 6 -> 3/6
    assert r0.diff_vs_plain == pytest.approx(3 / 6)
    assert r3.diff_vs_plain == pytest.approx(2 / 6)  # "a dog" for "the cat"
    assert all(math.isfinite(r.fluency) and r.fluency < 0 and r.entropy > 0 for r in rows)


def test_sweep_scale_1_row_differs_by_zero_from_itself(tiny_tokenizer):
    model = make_tiny_model("llama")
    gen = A.make_generate_fn(model, tiny_tokenizer, seed=5, max_new_tokens=6)
    prompt = tiny_tokenizer("Once upon a time").input_ids
    rows = A.sweep(model, tiny_tokenizer, prompt, [1.0, 2.0], gen)
    assert rows[0].diff_vs_plain == 0.0
    assert rows[0].token_ids == gen(prompt, 1.0)


@pytest.mark.parametrize("text, want", [("0,1,1.5", [0.0, 1.0, 1.5]), (" 3 , -1,3", [3.0, -1.0]),
                                        ("12", [12.0])])
def test_parse_scales_valid(text, want):
    assert A.parse_scales(text) == want


@pytest.mark.parametrize("text", ["1,x", "1,,2", "nan", "1,inf"])
def test_parse_scales_invalid(text):
    with pytest.raises(CFGTextgenError, match="--scales"):
        A.parse_scales(text)


def test_encode_prompt_keeps_the_most_recent_tokens_and_says_so(tiny_tokenizer):
    model = make_tiny_model("llama")  # context 256
    text = "The knight rode through the rain. " * 40
    ids = tiny_tokenizer(text).input_ids
    logged = []
    got = A.encode_prompt(tiny_tokenizer, text, model, reserve=56, log=logged.append)
    assert got == ids[-200:] and "kept the last 200" in logged[0]
    with pytest.raises(CFGTextgenError, match="empty"):
        A.encode_prompt(tiny_tokenizer, "", model)


# ---- explain ------------------------------------------------------------------------------------


def test_explain_steps_on_hand_made_distributions():
    plain = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    guided = torch.tensor([[0.2, 0.6, 0.02, 0.18]]).log()
    (step,) = A.explain_steps(plain, guided, [1], top=2)
    assert [c.token_id for c in step.before] == [0, 1] and [c.token_id for c in step.after] == [1, 0]
    assert step.chosen.plain_p == pytest.approx(0.3) and step.chosen.guided_p == pytest.approx(0.6)
    # union of the top-2 lists is {0, 1}: 1 rose by log 2, 0 fell by log 2.5; token 3 (x3.6) is not
    # a top candidate on either side, so it is not considered
    assert step.promoted.token_id == 1 and step.promoted.log_change == pytest.approx(math.log(2))
    assert step.demoted.token_id == 0 and step.demoted.log_change == pytest.approx(math.log(0.4))


def test_explain_steps_rejects_top_below_one():
    with pytest.raises(ValueError, match="`top`"):
        A.explain_steps(torch.zeros(1, 3), torch.zeros(1, 3), [0], top=0)


def test_format_explain_marks_promoted_and_demoted(tiny_tokenizer):
    plain = torch.full((1, 400), -30.0)
    guided = torch.full((1, 400), -30.0)
    plain[0, 100], plain[0, 101] = 0.0, -1.0
    guided[0, 100], guided[0, 101] = -3.0, 0.0
    steps = A.explain_steps(torch.log_softmax(plain, -1), torch.log_softmax(guided, -1), [101], top=2)
    text = R.format_explain(steps, tiny_tokenizer, 2.0)
    tok100, tok101 = repr(tiny_tokenizer.decode([100])), repr(tiny_tokenizer.decode([101]))
    assert text.startswith(f"[1] {tok101}")
    assert f"+ promoted most: {tok101}" in text and f"- demoted most:  {tok100}" in text
    assert "after CFG (scale 2)" in text


# ---- LAMBADA: the word rule ----------------------------------------------------------------------


@pytest.mark.parametrize("text, context, target", [
    ("He opened the door", "He opened the", "door"),
    ("He said: \"go home\n", "He said: \"go", "home"),   # trailing whitespace dropped
    ("a  b   c", "a  b", "c"),                           # the context loses its trailing spaces only
    ("one two.", "one", "two."),
])
def test_split_last_word(text, context, target):
    assert A.split_last_word(text) == (context, target)


@pytest.mark.parametrize("text", ["single", "   ", ""])
def test_split_last_word_needs_two_words(text):
    with pytest.raises(ValueError, match="two words"):
        A.split_last_word(text)


@pytest.mark.parametrize("generated, first, complete", [
    (" door.", "door.", False),
    (" door. He", "door.", True),
    ("\n\ndoor", "door", False),
    (" door\n", "door", True),
    ("", "", False),
    ("  ", "", False),
    ("door's edge", "door's", True),
])
def test_first_word_and_word_complete(generated, first, complete):
    assert A.first_word(generated) == first
    assert A.word_complete(generated) is complete


@pytest.mark.parametrize("predicted, target, ok", [
    ("door.", "door", True),
    ("door", "door.", True),
    ("\u201cdoor,\u201d", "door", True),   # curly quotes are punctuation too
    ("don't", "don't", True),
    ("don", "don't", False),
    ("Door", "door", False),              # case-sensitive
    ("doors", "door", False),
    ("...", "...", False),                # nothing left: never correct
    ("", "door", False),
])
def test_word_matches(predicted, target, ok):
    assert A.word_matches(predicted, target) is ok


def test_read_lambada_names_file_and_line_of_every_bad_line(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_bytes(b'{"text": "a good line"}\n\n[1, 2]\n{"text": "one"}\n{"text": 5}\nnot json\n'
                     b'\xff\xfe\n{"text": "fine again"}\n')
    with pytest.raises(CFGTextgenError) as err:
        A.read_lambada(path)
    msg = str(err.value)
    for line in (3, 4, 5, 6, 7):
        assert f"{path}:{line}:" in msg
    assert f"{path}:1:" not in msg and f"{path}:8:" not in msg


def test_read_lambada_skips_blank_lines_and_honours_limit(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "the cat sat"}\n\n{"text": "a dog ran"}\n{"text": "broken"}\n')
    got = A.read_lambada(path, limit=2)
    assert [(e.context, e.target, e.line) for e in got] == [("the cat", "sat", 1), ("a dog", "ran", 3)]


def test_read_lambada_missing_file(tmp_path):
    with pytest.raises(CFGTextgenError, match="cannot read"):
        A.read_lambada(tmp_path / "nope.jsonl")


# ---- LAMBADA eval against transformers' generate(guidance_scale=...) ------------------------------

CONTEXTS = ["Once upon a time there was a little", "The knight rode through the rain, his sword",
            "She opened the door and the cold", "\"Run!\" he shouted: the dragon", "Chapter two"]
MAX_TOKENS = 6


def _transformers_word(model, tokenizer, context, scale, opposing):
    ids = tokenizer(context, return_tensors="pt").input_ids
    kwargs = {}
    if opposing == "empty":
        kwargs["negative_prompt_ids"] = torch.tensor([[model.config.bos_token_id]])
    out = model.generate(ids, guidance_scale=scale, do_sample=False, max_new_tokens=MAX_TOKENS,
                         pad_token_id=model.config.pad_token_id, **kwargs)
    return A.first_word(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_eval_lambada_agrees_with_transformers_guidance_scale(tiny_tokenizer, opposing):
    model = make_tiny_model("gpt2")
    scales = [1.0, 1.5, 3.0]
    ref = {s: [_transformers_word(model, tiny_tokenizer, c, s, opposing) for c in CONTEXTS] for s in scales}
    # targets: what transformers predicts at 1.5 for the first three, something else for the rest,
    # so that the accuracies are not all zero
    targets = ref[1.5][:3] + ["zebra", "zebra"]
    examples = [A.LambadaExample(c, t, i + 1) for i, (c, t) in enumerate(zip(CONTEXTS, targets))]
    results = A.eval_lambada(model, tiny_tokenizer, examples, scales, A.lambada_opposing(opposing), MAX_TOKENS,
                             rule="word")
    for res in results:
        assert res.predictions == ref[res.scale]
        assert res.correct == sum(A.word_matches(w, t) for w, t in zip(ref[res.scale], targets))
        assert res.total == len(CONTEXTS)
    assert results[1].correct >= 1


def test_lambada_opposing_rejects_unknown_setting():
    with pytest.raises(ValueError, match="`opposing`"):
        A.lambada_opposing("blank")


LAMBADA_HANDWRITTEN = [
    "The cat climbed up the tree and could not get back down, so we called the fire department to rescue the cat",
    "She put the letter in an envelope, wrote the address on the front, and took it to the post office",
    "After the long winter, the snow finally melted and the first flowers appeared in the garden",
    "He was so thirsty after the run that he drank a whole bottle of water",
    "The children built a sandcastle on the beach, but the waves washed it away when the tide came in",
]


@pytest.mark.slow
@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_eval_lambada_agrees_with_transformers_on_the_default_model(default_model, opposing):
    model, tokenizer = default_model
    examples = [A.LambadaExample(*A.split_last_word(t), i + 1) for i, t in enumerate(LAMBADA_HANDWRITTEN)]
    scales = [1.0, 1.5]
    results = A.eval_lambada(model, tokenizer, examples, scales, A.lambada_opposing(opposing), MAX_TOKENS,
                             rule="word")
    for res in results:
        ref = [_transformers_word(model, tokenizer, e.context, res.scale, opposing) for e in examples]
        assert res.predictions == ref
        assert res.correct == sum(A.word_matches(w, e.target) for w, e in zip(ref, examples))


# ---- rendering ----------------------------------------------------------------------------------


def _rows():
    return [A.SweepRow(s, text, [1] * n, -2.0 - s, 3.0 / (1 + s), 0.9, 0.1 * s, 0.2 * s)
            for s, text, n in [(0.0, "first text about a fox", 5), (1.0, "second <b>bold</b> & co", 5),
                               (3.0, "third\nline two", 4)]]


def test_format_texts_columns_when_wide_and_sections_when_narrow():
    wide = R.format_texts(_rows(), width=120)
    assert re.match(r"scale 0 +scale 1 +scale 3", wide.splitlines()[0])
    assert "===" not in wide
    narrow = R.format_texts(_rows(), width=40)
    assert [ln for ln in narrow.splitlines() if ln.startswith("===")] == [
        "=== scale 0 ===", "=== scale 1 ===", "=== scale 3 ==="]
    assert "line two" in narrow


def test_format_texts_escapes_control_characters():
    rows = [A.SweepRow(1.0, "red \x1b[31mtext", [1], 0.0, 0.0, 0.0, 0.0)]
    out = R.format_texts(rows, width=80)
    assert "\x1b" not in out and "\\x1b[31mtext" in out


def test_format_metrics_table_has_a_row_per_scale_and_na_for_nan():
    rows = _rows()
    rows[0].distinct2 = math.nan
    lines = R.format_metrics(rows).splitlines()
    assert lines[0].split() == ["scale", "fluency", "entropy", "distinct-2", "repeat-3", "diff-vs-1", "tokens"]
    assert [ln.split()[0] for ln in lines[2:]] == ["0", "1", "3"]
    assert lines[2].split()[3] == "n/a" and lines[4].split()[1] == "-5.000"


def test_sweep_html_escapes_texts_and_embeds_the_png():
    pytest.importorskip("matplotlib")
    png = R.sweep_plot_png(_rows(), title="t")
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    page = R.sweep_html(_rows(), "Prompt <script>alert(1)</script>", {"seed": 7}, png)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "second &lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    b64 = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(b64) == png
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(CFGTextgenError, match=re.escape("pip install 'cfg-textgen[report]'")):
        R.require_matplotlib()


def test_write_atomic_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    R.write_atomic(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R.os, "replace", broken_replace)
    with pytest.raises(CFGTextgenError, match="No space left"):
        R.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]

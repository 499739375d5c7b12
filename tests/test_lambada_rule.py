"""LAMBADA with lm-eval-harness' token rule, against transformers' own CFG:
`generate(guidance_scale=s, negative_prompt_ids=...)` greedy, as many tokens as
`tokenizer(" " + last_word)` has; an example is correct when the ids are exactly those. The examples
are written here by hand (no dataset download is possible)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cfg_textgen import analysis as A
from cfg_textgen.cli import main
from cfg_textgen.context import eos_ids
from conftest import make_tiny_model

CONTEXTS = ["Once upon a time there was a little", "The knight rode through the rain, his sword",
            "She opened the door and the cold", "\"Run!\" he shouted: the dragon", "Chapter two",
            "The cold wind of the north came"]


def _until_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def transformers_ids(model, tokenizer, context, n, scale, opposing):
    """transformers' own CFG (guidance_scale; last-token by default, BOS for "empty"), greedy, n tokens."""
    ids = tokenizer(context, return_tensors="pt").input_ids
    kwargs = {}
    if opposing == "empty":
        kwargs["negative_prompt_ids"] = torch.tensor([[model.config.bos_token_id]])
    if scale != 1.0:
        kwargs["guidance_scale"] = scale
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=model.config.pad_token_id, top_k=None, **kwargs)
    return _until_eos(out[0, ids.shape[1]:].tolist(), eos_ids(model, tokenizer))


def targets_some_right(model, tokenizer, contexts, scale, opposing):
    """A target per context: the model's own greedy next word where it re-tokenizes to that one
    token (so the example is correct), else a word it will not produce."""
    targets = []
    for i, c in enumerate(contexts):
        (t,) = transformers_ids(model, tokenizer, c, 1, scale, opposing)[:1] or [None]
        word = tokenizer.decode([t]) if t is not None else ""
        if i % 2 == 0 and word.startswith(" ") and word.strip() and \
                A.target_token_ids(tokenizer, word.strip()) == [t]:
            targets.append(word.strip())
        else:
            targets.append("zebra")
    return targets


@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_token_rule_agrees_with_transformers_guidance_scale(tiny_tokenizer, opposing):
    model = make_tiny_model("gpt2")
    scales = [1.0, 1.5, 3.0]
    targets = targets_some_right(model, tiny_tokenizer, CONTEXTS, 1.5, opposing)
    examples = [A.LambadaExample(c, t, i + 1) for i, (c, t) in enumerate(zip(CONTEXTS, targets))]
    results = A.eval_lambada(model, tiny_tokenizer, examples, scales, A.lambada_opposing(opposing))
    for res in results:
        for ex, d in zip(examples, res.details):
            want = A.target_token_ids(tiny_tokenizer, ex.target)
            ref = transformers_ids(model, tiny_tokenizer, ex.context, len(want), res.scale, opposing)
            assert d.predicted_ids == ref and d.target_ids == want and d.correct == (ref == want)
        assert res.correct == sum(d.correct for d in res.details) and res.total == len(CONTEXTS)
    assert results[1].correct >= 1


def test_target_token_ids_are_the_words_tokens_after_a_space(tiny_tokenizer):
    ids = A.target_token_ids(tiny_tokenizer, "fox.")
    assert tiny_tokenizer.decode(ids) == " fox." and ids == tiny_tokenizer(" fox.").input_ids


def test_eval_lambada_rejects_unknown_rule():
    with pytest.raises(ValueError, match="`rule`"):
        A.eval_lambada(None, None, [], [1.0], rule="letters")


def test_cli_rule_and_out_file(tiny_model_dir, tmp_path):
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": c + " fox"}) + "\n" for c in CONTEXTS[:3]), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    r = CliRunner().invoke(main, ["eval", "lambada", str(data), "--model", str(tiny_model_dir), "--scales", "1,2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "rule: tokens" in r.stdout.splitlines()[0]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["line"], row["scale"]) for row in rows] == [(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0), (3, 1.0),
                                                            (3, 2.0)]
    assert all(row["target"] == "fox" and row["rule"] == "tokens" and isinstance(row["correct"], bool)
               and row["target_ids"] and row["context"] for row in rows)
    word = CliRunner().invoke(main, ["eval", "lambada", str(data), "--model", str(tiny_model_dir), "--rule", "word"])
    assert word.exit_code == 0 and "rule: word" in word.stdout
    bad = CliRunner().invoke(main, ["eval", "lambada", str(data), "--model", str(tiny_model_dir), "--out",
                                    str(tmp_path / "no" / "x.jsonl")])
    assert bad.exit_code == 2 and "--out" in bad.output


# ---- acceptance 4: the default model, example for example ---------------------------------------

HANDWRITTEN = [
    "The cat climbed up the tree and could not get back down, so we called the fire department to rescue the cat",
    "She put the letter in an envelope, wrote the address on the front, and took it to the post office",
    "After the long winter, the snow finally melted and the first flowers appeared in the garden",
    "He was so thirsty after the run that he drank a whole bottle of water",
    "The children built a sandcastle on the beach, but the waves washed it away when the tide came in",
    "Every morning my grandfather reads the newspaper while he drinks his cup of coffee",
    "The baker woke up at four to knead the dough, and by six the shop smelled of fresh bread",
    "When the power went out, we lit a few candles and told stories in the dark",
    "The orchestra tuned their instruments, the lights dimmed, and the conductor raised his baton",
    "She forgot her umbrella at home, and by the time she reached the office she was soaking wet",
    "The farmer woke before dawn to milk the cows and feed the chickens",
    "He unlocked the door with his key",
    "The students opened their books and the teacher wrote the date on the board",
    "We packed sandwiches, a blanket and a thermos, and spent the afternoon having a picnic in the park",
    "The old lighthouse keeper climbed the stairs every night to light the lamp",
    "My sister loves to read, so for her birthday I bought her a new book",
    "The dog wagged its tail and barked at the mailman",
    "After dinner, she washed the plates and dried them with a towel",
    "The pilot announced that we would soon begin our descent, and asked everyone to fasten their seat belts",
    "The detective examined the footprints in the mud and lit his pipe",
    "It was getting dark, so the campers gathered wood and built a fire",
    "The queen sat on her golden throne and wore a jeweled crown",
    "He planted the seeds in spring, watered them every day, and in autumn he harvested the vegetables",
    "The little boy lost his first tooth and put it under his pillow for the tooth fairy",
    "The ship sailed across the ocean for many weeks before the sailors saw land",
    "She practiced the piano every day, and at the concert she played beautifully",
    "The mouse ran into its hole when it saw the cat",
    "They climbed all day and finally reached the top of the mountain",
]


@pytest.mark.slow
@pytest.mark.parametrize("opposing", ["last-token", "empty"])
def test_eval_lambada_token_rule_equals_transformers_on_the_default_model(default_model, tmp_path, opposing):
    """Acceptance 4: `eval lambada` (the CLI, token rule) equals transformers' generate(guidance_scale=...)
    example for example, with the same opposing setting."""
    model, tok = default_model
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in HANDWRITTEN), encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    # scale 1.5 only (the paper's; scale 1 is plain greedy and CFG-free): ~2 min per setting on a loaded CPU
    # on the transformers backend: the reference is transformers' generate on the same float32 weights
    # (the default model runs on llama.cpp by default; tests/test_analysis_llamacpp.py compares those)
    r = CliRunner().invoke(main, ["eval", "lambada", str(data), "--scales", "1.5", "--opposing", opposing,
                                  "--backend", "transformers", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(HANDWRITTEN)
    correct = {1.5: 0}
    for row in rows:
        context, target = A.split_last_word(HANDWRITTEN[row["line"] - 1])
        want = A.target_token_ids(tok, target)
        ref = transformers_ids(model, tok, context, len(want), row["scale"], opposing)
        assert row["target_ids"] == want
        assert row["predicted_ids"] == ref, (row, ref)
        assert row["correct"] == (ref == want)
        correct[row["scale"]] += row["correct"]
    assert correct[1.5] >= 5  # a real measurement, not all wrong
    assert f"{correct[1.5]}/{len(HANDWRITTEN)}" in r.stdout

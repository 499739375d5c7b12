"""CFG on the real default model (SmolLM2-135M-Instruct): the differential against transformers'
own processor, and that guidance really changes a story continuation."""

from __future__ import annotations

import pytest
import torch
from transformers import UnbatchedClassifierFreeGuidanceLogitsProcessor

from cfg_textgen.guidance import CFGLogitsProcessor

pytestmark = pytest.mark.slow

STORY = ("The lighthouse keeper had not seen a ship in eleven years. Every night he climbed the "
         "stairs, lit the lamp, and wrote one line in the logbook:")


def _run(model, ids, proc, steps=48):
    out = model.generate(ids, logits_processor=[proc], max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


def test_default_model_cfg_equals_transformers_processor(default_model):
    model, tokenizer = default_model
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    blank = torch.tensor([[tokenizer.bos_token_id]])
    ours_seq, ours = _run(model, ids, CFGLogitsProcessor(model, 1.5, tokenizer=tokenizer))
    theirs_seq, theirs = _run(model, ids, UnbatchedClassifierFreeGuidanceLogitsProcessor(
        1.5, model, unconditional_ids=blank))
    assert torch.equal(ours_seq, theirs_seq)
    # distributions: ours are on the story's raw-logit scale (c_raw + (s-1)(c-u)),
    # transformers' are u + s(c-u); they differ by the per-row constant logsumexp(c_raw)
    ours, theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    finite = torch.isfinite(ours)
    assert torch.equal(finite, torch.isfinite(theirs))
    assert (ours[finite] - theirs[finite]).abs().max() < 1e-5


def test_default_model_cfg_changes_the_continuation(default_model):
    model, tokenizer = default_model
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    plain, _ = _run(model, ids, CFGLogitsProcessor(model, 1.0), steps=24)
    guided, _ = _run(model, ids, CFGLogitsProcessor(model, 3.0, tokenizer=tokenizer), steps=24)
    assert not torch.equal(plain, guided)
    text = tokenizer.decode(guided[0, ids.shape[1]:])
    assert text.strip(), text

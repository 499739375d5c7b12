"""The logits-processor contract, without importing transformers.

A processor is `__call__(input_ids, scores) -> new scores`, shapes (batch, seq) and (batch,
vocab): transformers' `LogitsProcessor` interface, which `model.generate(logits_processor=[...])`
calls on any object that has it (it checks no base class). Declaring it here lets the engine run
CFG and the samplers on llama.cpp without loading transformers (a second or more at start-up).
"""

from __future__ import annotations


class LogitsProcessor:
    """Base of every processor here: `__call__(input_ids, scores)` returns new scores and never
    changes `scores` in place."""

    def __call__(self, input_ids, scores):
        raise NotImplementedError


class ProcessorList(list):
    """Processors applied in order, each to the previous one's output (transformers'
    `LogitsProcessorList` for processors that take no extra arguments)."""

    def __call__(self, input_ids, scores, **kwargs):
        for processor in self:
            scores = processor(input_ids, scores)
        return scores

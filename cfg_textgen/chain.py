"""From a preset to logits processors: the sampler chain the engine runs after CFG, and the
keyword arguments that run a whole preset (CFG first, then the chain) through `model.generate`.

presets.py holds the preset model itself (immutable data, validation, files); this is the one
place where a preset becomes objects with state (a fresh chain per generation: mirostat's mu,
XTC's random draws).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from .errors import CFGTextgenError

if TYPE_CHECKING:
    from .presets import Preset


def build_chain(preset: Preset, tokenizer=None, generator=None):
    """Fresh sampler objects in the preset's order, as a `samplers.SamplerChain` (a list of
    logits processors that `model.generate` takes too).

    Call it once per generation: samplers such as mirostat keep state while generating.
    `generator` (a `torch.Generator`) goes to samplers whose `from_params` accepts it.
    """
    from .samplers import SAMPLERS as registry
    from .samplers import SamplerChain

    chain = SamplerChain()  # runs single-threaded on the CPU
    for spec in preset.samplers:
        cls = registry[spec.name]
        params = dict(spec.params)
        try:  # a sampler that needs the tokenizer for these parameters says so (ValueError)
            if generator is not None and "generator" in inspect.signature(cls.from_params).parameters:
                sampler = cls.from_params(params, tokenizer=tokenizer, generator=generator)
            else:
                sampler = cls.from_params(params, tokenizer=tokenizer)
                if generator is not None and "generator" in inspect.signature(cls).parameters:
                    sampler.generator = generator  # random samplers (xtc) draw from it
        except ValueError as err:
            if not cls.needs_tokenizer or tokenizer is not None:
                raise
            raise CFGTextgenError(f"preset {preset.name}: sampler {spec.name!r} needs a tokenizer: {err}") from None
        chain.append(sampler)
    return chain


def build_processors(preset: Preset, model=None, tokenizer=None, generator=None):
    """`CFGLogitsProcessor` first (scale != 1; needs the model), then a fresh `build_chain`: the
    samplers see the story's raw logits without CFG and the guided scores on that scale with it,
    as in the engine."""
    from transformers import LogitsProcessorList

    from .guidance import CFGLogitsProcessor

    if preset.grammar:  # transformers has no grammar engine; the llama.cpp backend's engine does it
        raise CFGTextgenError(f"preset {preset.name}: grammar: GBNF grammars need the llama.cpp backend "
                              "(the streaming engine on a .gguf model), not model.generate")
    if preset.banned_strings:  # a phrase is undone by rewinding the text, which `generate` cannot do
        raise CFGTextgenError(f"preset {preset.name}: banned_strings: phrase bans go back in the text; they "
                              "need the streaming engine (cfg-textgen write/generate/serve), not model.generate")
    processors = LogitsProcessorList()
    if preset.cfg.active:
        if model is None:
            raise CFGTextgenError(f"preset {preset.name}: CFG (scale {preset.cfg.scale}) needs the model "
                                  "for its opposing branch: generate_kwargs(preset, model, tokenizer)")
        processors.append(CFGLogitsProcessor(
            model, scale=preset.cfg.scale, opposing_prompt=preset.cfg.opposing_prompt,
            tokenizer=tokenizer, mode=preset.cfg.opposing_mode))
    processors.extend(build_chain(preset, tokenizer, generator))
    return processors


# Every GenerationConfig field that makes `generate` add a logits processor or warper of its own
# (transformers 5 `_get_logits_processor`), or change the decoding mode, with its neutral value.
# A model's generation_config.json may set any of them (top_k 50, temperature 0.6, ...), and the
# global default top_k is 50: without these, a sampler would run twice or a foreign one would run.
_NEUTRAL = {
    "temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": None, "top_h": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": None, "sequence_bias": None, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None,
    "watermarking_config": None, "renormalize_logits": False,
    # one sequence, no beams, no contrastive / constrained / assisted decoding
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "constraints": None,
    "force_words_ids": None, "prompt_lookup_num_tokens": None,
}


def generate_kwargs(preset: Preset, model=None, tokenizer=None, generator=None) -> dict:
    """Keyword arguments for `model.generate(input_ids, **kwargs)` that apply the preset exactly once.

    transformers' own warpers and penalties are neutralised (whatever the model's
    generation_config says) and the preset's processors are passed as `logits_processor`.
    A preset with CFG (scale != 1) needs the `model`; text stop sequences need the `tokenizer`
    (`generate` keeps the stop text in its output; trim it).
    """
    from transformers import GenerationConfig

    known = GenerationConfig()
    kwargs = {k: v for k, v in _NEUTRAL.items() if hasattr(known, k)}  # older transformers lack some
    kwargs["do_sample"] = preset.do_sample
    kwargs["max_new_tokens"] = preset.max_new_tokens
    if preset.stop and tokenizer is not None:
        kwargs["stop_strings"] = list(preset.stop)
        kwargs["tokenizer"] = tokenizer
    kwargs["logits_processor"] = build_processors(preset, model, tokenizer, generator)
    return kwargs

"""Generate functions `fn(prompt_ids, scale) -> new ids`: the engine's own (side by side on a
backend) and the `model.generate` plugin's (transformers only)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from ..backends.base import is_backend
from .scoring import Opposing
from .side_by_side import GenerateFn, MAX_LANES, run_side_by_side


# ---- generation -------------------------------------------------------------------------------


def make_generate_fn(model, tokenizer, preset=None, seed: int = 0, max_new_tokens: int = 60,
                     opposing: Opposing | None = None) -> GenerateFn:
    """A generate function on `model.generate` (the transformers plugin): CFG at the given scale
    first, then the preset's sampler chain (transformers' own warpers neutralised), seeded with
    `seed` before every call so that every scale starts from the same random state.

    `preset` is a `Preset` (default: the built-in "plain": sampling at temperature 1, no samplers);
    its scale is replaced by the call's scale and its opposing prompt by `opposing` when given.
    Stop sequences are not applied: every scale gets the same budget of tokens (EOS still ends).
    """
    import torch

    from ..backends.transformers import padding_id
    from ..chain import generate_kwargs
    from ..context import eos_ids
    from ..presets import load_preset

    base = preset if preset is not None else load_preset("plain")
    cfg = base.cfg
    if opposing is not None:
        cfg = replace(cfg, opposing_prompt=opposing.prompt, opposing_mode=opposing.mode)

    def generate(prompt_ids: list, scale: float) -> list:
        p = replace(base, cfg=replace(cfg, scale=float(scale)), max_new_tokens=int(max_new_tokens), stop=())
        # the samplers' own draws (xtc) come from a generator on the scores' device
        generator = torch.Generator(device=model.device).manual_seed(seed)
        kwargs = generate_kwargs(p, model, tokenizer, generator=generator)
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        torch.manual_seed(seed)  # generate samples with the global RNG
        out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=sorted(eos_ids(model, tokenizer)),
                             pad_token_id=padding_id(model, tokenizer), **kwargs)
        return out[0, ids.shape[1]:].tolist()

    return generate


class EngineGenerate:
    """The engine's generate function on a backend: `fn(prompt_ids, scale) -> new ids`, and
    `fn.many(prompt_ids, scales)` for several scales side by side. Every scale is an engine
    `Generation` with the preset's settings (generation.preset_settings: `chain.build_chain`, the
    preset's do_sample) and its own `torch.Generator` seeded with `seed`, so every scale starts
    from the same random state, alone or beside the others. Stop sequences are not applied: every
    scale gets the same budget of tokens (EOS still ends)."""

    def __init__(self, backend, preset=None, seed: int = 0, max_new_tokens: int = 60,
                 opposing: Opposing | None = None, lanes: int = MAX_LANES):
        from ..presets import load_preset

        self.backend, self.seed, self.lanes = backend, int(seed), lanes
        self.max_new_tokens = int(max_new_tokens)
        base = preset if preset is not None else load_preset("plain")
        cfg = base.cfg
        if opposing is not None:
            cfg = replace(cfg, opposing_prompt=opposing.prompt, opposing_mode=opposing.mode)
        self.base = replace(base, cfg=cfg, max_new_tokens=self.max_new_tokens, stop=())

    def generation(self, prompt_ids: Sequence[int], scale: float):
        import torch

        from ..generation import Generation, preset_settings

        preset = replace(self.base, cfg=replace(self.base.cfg, scale=float(scale)))
        generator = torch.Generator(device=self.backend.device).manual_seed(self.seed)
        return Generation(self.backend, None, [int(t) for t in prompt_ids], on_cut=lambda kept, total: None,
                          **preset_settings(self.backend, preset, generator))

    def many(self, prompt_ids: Sequence[int], scales: Sequence[float],
             on_done: Callable[[int], None] | None = None) -> list[list]:
        gens = [self.generation(prompt_ids, s) for s in scales]
        run_side_by_side(self.backend, gens, self.lanes, on_done)
        return [list(g.token_ids) for g in gens]

    def __call__(self, prompt_ids: list, scale: float) -> list:
        return self.many(prompt_ids, [scale])[0]


def make_engine_generate_fn(backend, preset=None, seed: int = 0, max_new_tokens: int = 60,
                            opposing: Opposing | None = None, lanes: int = MAX_LANES) -> EngineGenerate:
    """A generate function on the engine over `backend` (see `EngineGenerate`)."""
    return EngineGenerate(backend, preset, seed, max_new_tokens, opposing, lanes)


def _eos(model, tokenizer=None) -> set:
    if is_backend(model):
        return set(model.eos_ids)
    from ..context import eos_ids

    return eos_ids(model, tokenizer)


def _strip_eos_padding(ids: list, model, tokenizer=None) -> list:
    """Generated ids up to and including the first EOS (the backend's EOS set: context.eos_ids
    on transformers; generate pads after it in batches)."""
    eos = _eos(model, tokenizer)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids

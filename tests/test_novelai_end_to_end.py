"""A NovelAI preset with CFG enabled, imported from the community's own file, generates text on the
default model end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

COMMUNITY = next((p / "shared" / "community-presets" for p in Path(__file__).resolve().parents[1].parents
                  if (p / "shared" / "community-presets").is_dir()),
                 Path(__file__).resolve().parents[1].parent / "shared" / "community-presets")  # worktrees: one up
BLOOK = COMMUNITY / "novelai" / "sillytavern-with-cfg" / "Blook-Kayra.json"

pytestmark = pytest.mark.slow


@pytest.fixture
def blook():
    if not BLOOK.is_file():
        pytest.skip(f"community presets not found at {COMMUNITY} (../shared beside the clone)")
    from cfg_textgen.importers import import_preset
    from cfg_textgen.presets import parse_preset

    data, report = import_preset(BLOOK)
    return parse_preset(data, str(BLOOK))


def test_novelai_preset_with_cfg_generates_on_the_default_model(default_model, blook):
    from cfg_textgen.guidance import CFGLogitsProcessor
    from cfg_textgen.presets import generate_kwargs

    model, tokenizer = default_model
    assert blook.cfg.scale == 1.3  # the file's cfg_scale, with cfg (id 6) enabled in its order
    ids = tokenizer("The rain had not stopped for three days, and the ferryman", return_tensors="pt").input_ids
    kwargs = generate_kwargs(blook, model, tokenizer)
    kwargs["max_new_tokens"] = 24
    cfg = kwargs["logits_processor"][0]
    assert isinstance(cfg, CFGLogitsProcessor) and cfg.scale == 1.3
    torch.manual_seed(0)
    out = model.generate(ids, **kwargs)
    new = out[0, ids.shape[1]:]
    assert 0 < len(new) <= 24
    assert cfg.branch is not None and cfg.branch.calls == len(new)  # the opposing pass ran every step
    assert tokenizer.decode(new, skip_special_tokens=True).strip()

"""cfg-textgen: classifier-free guidance for language-model text generation.

    from cfg_textgen import CFGLogitsProcessor, load_model
"""

__version__ = "0.1.0"

_LAZY = {
    "CFGLogitsProcessor": "guidance",
    "cfg_combine": "guidance",
    "load_model": "models",
    "load_default": "models",
    "load_preset": "presets",
}


def __getattr__(name):  # imports torch/transformers only when used (keeps `--help` fast)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)

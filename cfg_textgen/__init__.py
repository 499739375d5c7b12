"""cfg-textgen: classifier-free guidance for language-model text generation.

    from cfg_textgen import CFGLogitsProcessor, load_model
"""

import importlib.util as _util
import os as _os

__version__ = "0.1.0"

# llama.cpp's CPU threads are OpenMP threads from the same libgomp.so.1 that torch loads first (the
# loader shares one copy), which reads OMP_WAIT_POLICY once, at torch's import. Spinning idle
# threads take the cores from the other library's work and, on a busy machine, from llama.cpp
# itself: measured on 2 loaded cores, llama.cpp with 2 threads decoded 9 tokens/s spinning and
# 73 passive. So when llama.cpp may run, set it before anything imports torch; a value the user
# set wins.
if _util.find_spec("llama_cpp") is not None:
    _os.environ.setdefault("OMP_WAIT_POLICY", "passive")

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

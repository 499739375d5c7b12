"""One click option bundle for every command that runs a model (write, generate, sweep, explain, eval,
serve): which model, on which backend, and how it runs (runtime.RuntimeSettings).

    @main.command()
    @model_options
    def generate(..., model: ModelChoice): load_backend(model.spec, model.backend, runtime=model.runtime)

The flags are llama.cpp's own names (llama-server: --threads, --threads-batch, --ctx-size,
--n-gpu-layers, --flash-attn, --cache-type-k, --cache-type-v, --cache-prompt,
--batch-size, --ubatch-size). They are checked in one place,
`RuntimeSettings`; a bad value or combination is a usage error naming the flag.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import click

from .runtime import CACHE_TYPES, FLASH_ATTN, RuntimeSettings, RuntimeSettingsError


@dataclass(frozen=True)
class ModelChoice:
    """The model a command runs: `spec` (None: the embedded default), `backend` (None: chosen by
    the model's kind) and its runtime settings."""

    spec: str | None
    backend: str | None
    runtime: RuntimeSettings


def _check_model(ctx, param, value):
    from .models import DEFAULT_NAME

    if value is not None and value not in ("default", DEFAULT_NAME) and not os.path.exists(value):
        raise click.BadParameter(f"{value}: no such model (no such file or folder; give a local model "
                                 f"folder or .gguf file, or leave --model out for the embedded default)")
    return value


# (parameter name, click option): the names are RuntimeSettings' fields where they are one
_OPTIONS = [
    ("model_spec", click.option(
        "--model", "model_spec", metavar="PATH", callback=_check_model,
        help="A local Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct).")),
    ("backend_name", click.option(
        "--backend", "backend_name", type=click.Choice(["transformers", "llama.cpp"]), default=None,
        help="Where the model runs (default: llama.cpp for .gguf files and the default model when "
             "llama-cpp-python is installed, else transformers).")),
    ("threads", click.option(
        "--threads", type=click.IntRange(min=1), metavar="N",
        help="CPU threads for generating (default: the physical cores; on transformers, torch's).")),
    ("threads_batch", click.option(
        "--threads-batch", type=click.IntRange(min=1), metavar="N",
        help="llama.cpp: CPU threads for reading the prompt (default: --threads).")),
    ("ctx_size", click.option(
        "--ctx-size", type=click.IntRange(min=16), metavar="N",
        help="Context window per sequence in tokens (default: the model's, at most 4096).")),
    ("n_gpu_layers", click.option(
        "--n-gpu-layers", type=click.IntRange(min=-1), default=0, show_default=True, metavar="N",
        help="Layers on the GPU, -1 = all (llama.cpp needs a GPU build, see the README; "
             "transformers: any but 0 puts the whole model on CUDA).")),
    ("flash_attn", click.option(
        "--flash-attn", type=click.Choice(list(FLASH_ATTN)), default="auto", show_default=True,
        help="llama.cpp: flash attention (auto: off on a CPU-only run unless --deterministic "
             "or a quantized KV cache, else llama.cpp decides).")),
    ("cache_type_k", click.option(
        "--cache-type-k", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
        help="llama.cpp: KV cache type of the keys (q8_0 halves their memory).")),
    ("cache_type_v", click.option(
        "--cache-type-v", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
        help="llama.cpp: KV cache type of the values; quantized ones need flash attention.")),
    ("cache_prompt", click.option(
        "--cache-prompt/--no-cache-prompt", default=True, show_default=True,
        help="llama.cpp: start from the cached tokens an earlier request shares with this one and "
             "read only the rest (a request's cache_prompt: false turns it off for that request).")),
    ("context_shift", click.option(
        "--context-shift/--no-context-shift", default=True, show_default=True,
        help="llama.cpp: a story that lost its oldest tokens to the window keeps the rest of its "
             "cache, moved down, instead of reading it again (not with --deterministic).")),
    ("batch_size", click.option(
        "--batch-size", type=click.IntRange(min=1), default=512, show_default=True, metavar="N",
        help="llama.cpp: prompt tokens read at once between the running streams' steps.")),
    ("ubatch_size", click.option(
        "--ubatch-size", type=click.IntRange(min=1), metavar="N",
        help="llama.cpp: micro-batch of its kernels (default 512; 32 with --deterministic, where "
             "prompt reads must round like token-by-token decoding).")),
    ("deterministic", click.option(
        "--deterministic", is_flag=True,
        help="A request's text does not depend on what else runs (slower lone streams; README).")),
]


def model_options(f):
    """The bundle: adds the options above and hands the command one `model` (ModelChoice)."""

    @functools.wraps(f)
    def command(*args, **kwargs):
        values = {name: kwargs.pop(name) for name, _ in _OPTIONS}
        kwargs["model"] = model_choice(**values)
        return f(*args, **kwargs)

    for _, option in reversed(_OPTIONS):
        command = option(command)
    return command


def model_choice(model_spec=None, backend_name=None, **runtime) -> ModelChoice:
    """The options' values checked by RuntimeSettings; a bad combination is a usage error naming
    the flag (e.g. a quantized --cache-type-v with --flash-attn off)."""
    try:
        settings = RuntimeSettings(**runtime)
    except RuntimeSettingsError as err:
        raise click.BadParameter(str(err), param_hint=f"'{err.flag}'") from None
    return ModelChoice(model_spec, backend_name, settings)

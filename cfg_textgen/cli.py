"""The `cfg-textgen` command line: a thin click layer over the library.

Story text goes to stdout; progress, warnings and timings go to stderr. Library errors
(`CFGTextgenError`) become a one-line message and exit code 1; set CFG_TEXTGEN_DEBUG=1 to
see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from .cli_options import model_options
from .errors import CFGTextgenError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CFGTextgenError as err:
            if os.environ.get("CFG_TEXTGEN_DEBUG"):
                raise
            flag = getattr(err, "flag", None)  # a runtime setting the model refused
            if flag:
                raise click.BadParameter(str(err), param_hint=f"'{flag}'") from err
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group)
@click.version_option(package_name="cfg-textgen")
def main():
    """Classifier-free guidance (CFG) for story writing with language models."""


@main.group(cls=_Group)
def presets():
    """List, show, validate, import and export sampler presets."""


# ---- presets: list / show / validate / schema (presets.py) -------------------------------


@presets.command("list")
def presets_list():
    """List the built-in presets: name and what each is for."""
    from .presets import list_presets

    rows = [(p.name, p.description.splitlines()[0] if p.description else "") for p in list_presets()]
    width = max([len("NAME")] + [len(name) for name, _ in rows])
    click.echo(f"{'NAME':<{width}}  DESCRIPTION")
    for name, description in rows:
        click.echo(f"{name:<{width}}  {description}")


@presets.command("show")
@click.argument("preset")
def presets_show(preset):
    """Print a preset (a built-in NAME or a FILE) as pretty JSON.

    \b
    Examples:
      cfg-textgen presets show balanced-story
      cfg-textgen presets show my-preset.json
    """
    import json

    from .presets import load_preset

    click.echo(json.dumps(load_preset(preset).to_dict(), indent=2, ensure_ascii=False))


@presets.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.pass_context
def presets_validate(ctx, files):
    """Check preset files: an OK line per valid file on stdout, every problem on stderr
    (file and JSON path). Exit code 1 if any file is invalid."""
    from .errors import PresetError
    from .presets import load_preset_file

    bad = 0
    for path in files:
        try:
            preset = load_preset_file(path)
        except PresetError as err:
            bad += 1
            click.echo(str(err), err=True)
            continue
        click.echo(f"OK {path} ({preset.name}: {len(preset.samplers)} samplers, "
                   f"CFG scale {preset.cfg.scale:g})")
    if bad:
        click.echo(f"{bad} of {len(files)} preset files invalid", err=True)
        ctx.exit(1)


@presets.command("schema")
def presets_schema():
    """Print the JSON Schema (draft 2020-12) of the preset format."""
    import json

    from .presets import preset_schema

    click.echo(json.dumps(preset_schema(), indent=2, ensure_ascii=False))



# ---- presets: import / export (importers/) ------------------------------------------------


def _write_json_atomically(data, out: str | None) -> None:
    """stdout, or OUT via files.write_file (temp file in the same folder, fsync, rename): never a
    partial file; a place that cannot be written is a one-line error naming it."""
    import json

    from .files import write_file

    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if out is None or out == "-":
        click.echo(text, nl=False)
        return
    write_file(out, text)


@presets.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write the preset JSON here "
              "(default: stdout).")
@click.option("--name", help="Name of the imported preset; for a KoboldAI bundle, the entry to import.")
def presets_import(file, out, name):
    """Translate a NovelAI, SillyTavern, KoboldAI/KoboldCpp or text-generation-webui preset.

    The format is recognised from the content. The preset JSON goes to OUT (or stdout); the
    report of what was mapped, what means "off" and what was not carried over goes to stderr.

    \b
    Examples:
      cfg-textgen presets import "Golden Arrow.preset" -o golden-arrow.json
      cfg-textgen presets import Titanic.yaml --name titanic
    """
    from .importers import import_preset
    from .presets import parse_preset

    preset, report = import_preset(file, name=name)
    data = parse_preset(preset, file).to_dict()  # validated before anything is written
    _write_json_atomically(data, out)
    click.echo(report.render(), err=True)


@presets.command("export")
@click.argument("preset")
@click.option("--format", "fmt", required=True, type=click.Choice(["sillytavern-textgen", "novelai"]),
              help="The foreign format to write.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here (default: stdout).")
def presets_export(preset, fmt, out):
    """Write PRESET (a built-in name or a JSON file) as a SillyTavern or NovelAI preset.

    \b
    Examples:
      cfg-textgen presets export balanced-story --format novelai -o balanced-story.preset
      cfg-textgen presets export my-preset.json --format sillytavern-textgen
    """
    from .importers import export_preset
    from .presets import load_preset

    data, report = export_preset(load_preset(preset), fmt)
    _write_json_atomically(data, out)
    click.echo(report.render(), err=True)


# ---- write / generate (engine.py, story.py) -----------------------------------------------


DEFAULT_PRESET = "balanced-story"


def _load_preset_or_bad(value, param_hint):
    from .errors import PresetError
    from .presets import load_preset

    try:
        return load_preset(value)
    except PresetError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


def _check_preset(ctx, param, value):
    return _load_preset_or_bad(value if value is not None else DEFAULT_PRESET, "'--preset'")


def _check_parallel(ctx, param, value):
    """--parallel: a whole number >= 1, or `auto` (None: the backend sizes it)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise click.BadParameter(f"must be a whole number >= 1 or `auto`, but is {value!r}") from None
    if number < 1:
        raise click.BadParameter(f"must be a whole number >= 1 or `auto`, but is {number}")
    return number


def _check_scale(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, but is {value}")
    return value


def _read_opposing_file(ctx, param, value):
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise click.BadParameter(f"{value}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise click.BadParameter(f"{value}: {err.strerror or err}") from None
    return text[:-1] if text.endswith("\n") else text  # an editor's final newline is not the prompt


def _read_grammar_file(ctx, param, value):
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            return value, f.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise click.BadParameter(f"{value}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise click.BadParameter(f"{value}: {err.strerror or err}") from None


def _check_grammar(backend, preset, grammar_file) -> None:
    """A grammar the backend cannot use is an error naming where it came from, before any text."""
    from .grammar import GrammarError, check_grammar

    if not preset.grammar:
        return
    try:
        check_grammar(backend, preset.grammar)
    except GrammarError as err:
        where = f"--grammar {grammar_file[0]}" if grammar_file else f"preset {preset.name}: grammar"
        raise CFGTextgenError(f"{where}: {err}") from None


def _generation_options(f):
    """Options shared by `write` and `generate`: flags override the preset, which overrides defaults."""
    options = [
        click.option("--preset", "preset", metavar="NAME|FILE", callback=_check_preset,
                     help=f"Sampler preset: a built-in name or a .json file (default: {DEFAULT_PRESET})."),
        click.option("--cfg-scale", type=float, callback=_check_scale, metavar="X",
                     help="CFG scale: 1 = off, 1.5 = usual, higher follows the story harder."),
        click.option("--opposing", metavar="TEXT",
                     help="Opposing prompt (what to steer away from); \"\" = a blank story."),
        click.option("--opposing-file", type=click.Path(dir_okay=False), callback=_read_opposing_file,
                     metavar="FILE", help="Read the opposing prompt from a UTF-8 file (one final newline dropped)."),
        click.option("--tokens", type=click.IntRange(min=1), metavar="N",
                     help="Tokens to generate per continuation."),
        click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), callback=_read_grammar_file,
                     metavar="FILE", help="A GBNF grammar (rule root) the text must follow; llama.cpp backend."),
        click.option("--ban", "bans", multiple=True, metavar="TEXT",
                     help="A phrase the text must never contain (repeatable; ignoring case): generation goes back "
                          "to where it began and picks another word (anti-slop). Adds to the preset's."),
        click.option("--seed", type=int, metavar="S", help="Random seed, for repeatable sampling."),
        model_options,
        _verbose_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _apply_flags(preset, cfg_scale, opposing, opposing_file, tokens, grammar_file=None, bans=()):
    """The preset with the command-line flags applied on top."""
    import dataclasses

    if opposing is not None and opposing_file is not None:
        raise click.UsageError("give --opposing or --opposing-file, not both")
    if opposing_file is not None:
        opposing = opposing_file
    cfg = preset.cfg
    if cfg_scale is not None:
        cfg = dataclasses.replace(cfg, scale=cfg_scale)
    if opposing is not None:  # an explicit opposing text means text mode
        cfg = dataclasses.replace(cfg, opposing_prompt=opposing, opposing_mode="text")
    preset = dataclasses.replace(preset, cfg=cfg)
    if tokens is not None:
        preset = dataclasses.replace(preset, max_new_tokens=tokens)
    if grammar_file is not None:
        preset = dataclasses.replace(preset, grammar=grammar_file[1])
    if any(not ban for ban in bans):
        raise click.BadParameter("a banned phrase cannot be empty", param_hint="--ban")
    if bans:
        preset = dataclasses.replace(preset, banned_strings=tuple(dict.fromkeys(preset.banned_strings + tuple(bans))))
    return preset


def _say(text="", nl=True):
    click.echo(text, err=True, nl=nl)


def _echo_story(piece):
    click.echo(piece, nl=False)  # click flushes stdout after every echo


def _verbose_option(f):
    return click.option("--verbose", is_flag=True,
                        help="Show transformers' own loading progress bars (default: one status line).")(f)


def _load(model, verbose=False):
    """Load the model with ONE status line on stderr ("loading model X ... ready in 1.2 s").

    transformers draws a "Loading weights" progress bar (and "Writing model shards" when the
    converted default model is cached) on every start; to a writer that is noise around the story,
    so the bars show only with --verbose (transformers.utils.logging.disable_progress_bar, which
    also silences huggingface_hub's bars)."""
    import time

    from .backends import BackendUnavailable
    from .models import choose_backend, load_backend

    try:
        name = choose_backend(model.spec, model.backend, _say)
    except BackendUnavailable as err:  # only an explicit --backend llama.cpp gets here: name the flag
        raise BackendUnavailable(f"--backend {model.backend}: {err}") from None
    if name == "transformers":  # (llama.cpp loads without bars)
        from transformers.utils import logging as hf_logging

        if verbose:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
    open_line = [not verbose]  # with --verbose the bars get lines of their own

    def log(msg):  # a message while loading (a first-time GGUF conversion) starts its own line
        if open_line[0]:
            _say("")
            open_line[0] = False
        _say(msg)

    _say(f"loading model {model.spec or 'default (SmolLM2-135M-Instruct)'} ...", nl=verbose)
    t0 = time.perf_counter()
    try:
        loaded = load_backend(model.spec, name, runtime=model.runtime, log=log)
    except BaseException:
        if open_line[0]:
            _say("")
        raise
    _say(f"{' ' if open_line[0] else ''}model ready in {time.perf_counter() - t0:.1f} s ({loaded.name})")
    return loaded


def _start(model, seed, verbose=False):
    """Load the model on its backend (one status line on stderr) and make the random generator."""
    import torch

    backend = _load(model, verbose)
    generator = torch.Generator(device=backend.device).manual_seed(seed) if seed is not None else None
    return backend, generator


def _stream_factory(backend, generator):
    from .engine import stream_preset

    def on_cut(kept, total):
        _say(f"warning: the text is {total} tokens, more than fits the model's context; older text "
             f"was cut: the model sees the last {kept} tokens")

    return lambda prompt, preset: stream_preset(backend, None, prompt, preset, generator=generator,
                                                on_cut=on_cut)


def _exit_interrupted(ctx, err):
    from .story import Terminated

    what = "terminated" if isinstance(err, Terminated) else "interrupted"
    _say(f"\n{what}" + ("; the story file holds everything shown" if ctx.command.name == "write" else ""))
    ctx.exit(143 if isinstance(err, Terminated) else 130)


@main.command("write")
@click.argument("story_file", metavar="STORY.txt", type=click.Path(dir_okay=True))
@_generation_options
@click.option("--interactive", "-i", is_flag=True,
              help="After each continuation, read a line: Enter continues, text is added, /help.")
@click.pass_context
def write(ctx, story_file, preset, cfg_scale, opposing, opposing_file, tokens, grammar_file, bans, seed, model,
          verbose, interactive):
    """Continue the story in STORY.txt, streaming the new text to the screen and into the file.

    A missing file starts a new story. Every piece is in the file before it is shown, so after
    Ctrl-C or a crash the file holds the story plus exactly the text you saw.

    \b
    Examples:
      cfg-textgen write story.txt
      cfg-textgen write story.txt --cfg-scale 2 --opposing "A dull, generic story."
      cfg-textgen write story.txt --preset wild --tokens 400 --interactive
      cfg-textgen write story.txt --ban "shivers down" --ban "a testament to"
    """
    from .presets import load_preset
    from .session import WriteSession, describe
    from .story import SignalGuard, Story, Terminated

    preset = _apply_flags(preset, cfg_scale, opposing, opposing_file, tokens, grammar_file, bans)
    story = Story.open(story_file)  # not UTF-8 / not writable: an error before any generation
    with SignalGuard() as guard:
        try:
            backend, generator = _start(model, seed, verbose)
            _check_grammar(backend, preset, grammar_file)
            _say(describe(preset))
            session = WriteSession(story, preset, _stream_factory(backend, generator),
                                   _echo_story, _say, guard, load_preset=load_preset)
            if interactive:
                session.interactive(iter(sys.stdin.readline, ""))
            else:
                session.continue_story()
        except (KeyboardInterrupt, Terminated) as err:
            _exit_interrupted(ctx, err)
    _say(f"story: {story.path} ({len(story.text)} characters)")


@main.command("generate")
@click.argument("prompt")
@_generation_options
@click.pass_context
def generate(ctx, prompt, preset, cfg_scale, opposing, opposing_file, tokens, grammar_file, bans, seed, model,
             verbose):
    """Stream one continuation of PROMPT to stdout (nothing is written to disk).

    \b
    Examples:
      cfg-textgen generate "The dragon opened one eye and"
      cfg-textgen generate "Dear diary," --cfg-scale 3 --seed 1 --tokens 60
    """
    from .session import describe, summary
    from .story import SignalGuard, Terminated

    preset = _apply_flags(preset, cfg_scale, opposing, opposing_file, tokens, grammar_file, bans)
    with SignalGuard() as guard:
        try:
            backend, generator = _start(model, seed, verbose)
            _check_grammar(backend, preset, grammar_file)
            _say(describe(preset))
            stream = _stream_factory(backend, generator)(prompt, preset)
            try:
                for piece in stream:
                    with guard.critical():
                        _echo_story(piece)
            finally:
                _say("")
                _say(summary(stream))
        except (KeyboardInterrupt, Terminated) as err:
            _exit_interrupted(ctx, err)



# ---- serve (server/) ----------------------------------------------------------------------


def _check_api_key(ctx, param, value):
    from .server.serve import check_api_key

    try:
        return check_api_key(value or None)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key (or a warning is printed).")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
@click.option("--api-key", envvar="CFG_TEXTGEN_API_KEY", metavar="KEY", default=None, callback=_check_api_key,
              help="Require `Authorization: Bearer KEY` or `x-api-key: KEY` on every route "
                   "(env: CFG_TEXTGEN_API_KEY; printable ASCII).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (repeatable; e.g. Kobold Lite's). Default: CORS off.")
@click.option("--parallel", metavar="N|auto", default="auto", show_default=True, callback=_check_parallel,
              help="Requests decoded together (batched scheduler). auto: on llama.cpp as many as "
                   "1 GiB of KV cache holds (each request keeps 2 windows), 1 to 4; 4 on transformers.")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait for a free slot; more get 503 with Retry-After.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=30, show_default=True, metavar="SECONDS",
              help="On SIGTERM, running generations may finish for this long, then end (waiting ones get 503 at once).")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=15, show_default=True,
              metavar="SECONDS", help="Close a connection that has not sent its request headers within this time.")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              metavar="SECONDS", help="Answer 408 and close a connection whose request body has not arrived within "
                                      "this time (1 s more per 500 bytes received).")
@click.option("--max-connections", type=click.IntRange(min=1), default=None, metavar="N",
              help="Open connections at most; beyond it the ones idle longest are closed "
                   "(default: what the open-file limit allows, at most 4096).")
@click.option("--preset", "preset_name", metavar="NAME|FILE", default=None,
              help="Default CFG and samplers for requests that do not set them (a request's own "
                   "fields win; one that sends no sampler field gets this preset's samplers).")
@click.option("--cfg-scale", type=float, callback=_check_scale, metavar="X", default=None,
              help="Default CFG scale for requests without `guidance_scale` (wins over --preset's).")
@click.option("--opposing", metavar="TEXT", default=None,
              help="Default opposing prompt for requests without `negative_prompt` (wins over "
                   "--preset's; \"\" = a blank story).")
@click.option("--quiet", is_flag=True, help="No request log (by default one line per request on stderr: "
                                            "method, path, status, prompt/new tokens, time).")
def serve(model, host, port, api_key, cors_origins, parallel, quiet, preset_name, cfg_scale, opposing,
          max_queue, shutdown_grace, header_timeout, max_connections, body_timeout):
    """Serve text-generation-webui's OpenAI-compatible API (/v1) and the KoboldAI API (/api) with
    CFG, for SillyTavern, Kobold Lite and OpenAI clients.

    \b
    Examples:
      cfg-textgen serve
      cfg-textgen serve --port 5001 --cors-origin https://lite.koboldai.net
      cfg-textgen serve --preset negative-prompt      # CFG for clients that cannot send it
      CFG_TEXTGEN_API_KEY=secret cfg-textgen serve --host 0.0.0.0
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise click.ClickException(f"serving needs the server extra: pip install 'cfg-textgen[server]' ({err})")
    from .server import serve as run
    from .server.defaults import ServerDefaults

    preset = _load_preset_or_bad(preset_name, "'--preset'") if preset_name is not None else None
    defaults = ServerDefaults(preset, cfg_scale, opposing)
    sys.exit(run(host=host, port=port, model=model.spec, backend=model.backend, runtime=model.runtime,
                 api_key=api_key, cors_origins=tuple(cors_origins), parallel=parallel, log=_say, quiet=quiet,
                 defaults=defaults, max_queue=max_queue, grace=shutdown_grace, header_timeout=header_timeout,
                 body_timeout=body_timeout, max_connections=max_connections))


# ---- sweep / explain / eval (analysis) ----------------------------------------------------


def _analysis_model_options(default_tokens: int):
    """The model bundle, --seed / --preset / --opposing / --tokens for sweep and explain."""
    def decorate(f):
        for opt in reversed([
            model_options,
            click.option("--seed", type=int, default=None,
                         help="Random seed, the same for every scale (default: a random one, printed "
                              "on stderr)."),
            click.option("--preset", "preset_name", metavar="NAME|FILE", default=None,
                         help="Sampler preset after CFG (default: plain: temperature 1, no filters). "
                              "Its CFG scale is replaced; its stop sequences are not used."),
            click.option("--opposing", metavar="TEXT", default=None,
                         help="Opposing prompt (default: the preset's; empty = a blank story)."),
            click.option("--tokens", type=click.IntRange(min=1), default=None,
                         help=f"Tokens per continuation (default: {default_tokens}; the preset's "
                              "max_new_tokens is not used)."),
            _verbose_option,
        ]):
            f = opt(f)
        return f
    return decorate


def _analysis_setup(model, seed, preset_name, opposing, tokens, default_tokens, prompt, verbose=False):
    """Load the preset and the model on its backend, pick the seed, encode the prompt: everything
    sweep and explain share. Generation is the engine's (the same as `write`) on that backend."""
    from .analysis import Opposing, encode_prompt, make_engine_generate_fn
    from .generation import random_seed
    from .presets import load_preset

    preset = load_preset(preset_name or "plain")
    tokens = tokens or default_tokens
    opp = (Opposing(opposing, "text") if opposing is not None
           else Opposing(preset.cfg.opposing_prompt, preset.cfg.opposing_mode))
    if seed is None:
        seed = random_seed()
        click.echo(f"seed {seed} (repeat with --seed {seed})", err=True)
    backend = _load(model, verbose)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    prompt_ids = encode_prompt(None, prompt, backend, reserve=tokens, log=log)
    generate_fn = make_engine_generate_fn(backend, preset, seed=seed, max_new_tokens=tokens, opposing=opp)
    return preset, backend, prompt_ids, generate_fn, opp, seed, tokens


@main.command("sweep")
@click.argument("prompt")
@click.option("--scales", default="0,1,1.5,3,6,12", show_default=True, metavar="LIST",
              help="Comma-separated CFG scales; one continuation each (scale 1 is always generated "
                   "as the reference of diff-vs-1).")
@_analysis_model_options(default_tokens=60)
@click.option("--report", "report_path", metavar="FILE.html", default=None,
              help="Also write a self-contained HTML report with a plot (needs matplotlib).")
def sweep_command(prompt, scales, model, seed, preset_name, opposing, tokens, verbose, report_path):
    """Continue PROMPT once per CFG scale with the same seed, show the texts side by side, and
    measure each: fluency under the plain model, entropy of the guided distribution, distinct-2,
    repeated 3-grams, and how far it is from the scale-1 text.

    \b
    Examples:
      cfg-textgen sweep "The dragon circled the tower" --scales 0,1,1.5,3,6,12 --seed 7
      cfg-textgen sweep "Chapter one." --preset balanced-story --report sweep.html
    """
    from . import report
    from .analysis import parse_scales, sweep

    scale_list = parse_scales(scales)
    if report_path:
        report.require_matplotlib()  # fail before minutes of generation, not after
    preset, backend, prompt_ids, generate_fn, opp, seed, tokens = _analysis_setup(
        model, seed, preset_name, opposing, tokens, 60, prompt, verbose)
    # every scale side by side: one decode per step for all of them on llama.cpp
    rows = sweep(backend, None, prompt_ids, scale_list, generate_fn, opp,
                 progress=report.ProgressBar("sweep"))
    click.echo(report.format_texts(rows))
    click.echo()
    click.echo(report.format_metrics(rows))
    click.echo(report.METRIC_HELP)
    if report_path:
        settings = {"model": model.spec or "default (SmolLM2-135M-Instruct)", "backend": backend.name,
                    "preset": preset.name,
                    "seed": seed, "tokens": tokens,
                    "opposing": "last prompt token" if opp.mode == "last-token" else (opp.prompt or "(blank story)")}
        png = report.sweep_plot_png(rows, title=f"CFG sweep, seed {seed}")
        report.write_atomic(report_path, report.sweep_html(rows, prompt, settings, png))
        click.echo(f"wrote {report_path}", err=True)


@main.command("explain")
@click.argument("prompt")
@click.option("--scale", type=float, default=None,
              help="CFG scale (default: the preset's when it has one, else 1.5).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Candidates shown before and after guidance.")
@_analysis_model_options(default_tokens=20)
def explain_command(prompt, scale, top, model, seed, preset_name, opposing, tokens, verbose):
    """Continue PROMPT with CFG and show, for every generated token, the top candidates before
    guidance (the plain model) and after it, marking the candidate CFG promoted most (+) and the one
    it demoted most (-). "After" is the guided distribution before the preset's samplers.

    \b
    Example:
      cfg-textgen explain "The dragon circled the tower" --scale 3 --tokens 10 --seed 7
    """
    from .analysis import explain
    from .guidance import check_scale
    from .report import format_explain, printable

    preset, backend, prompt_ids, generate_fn, opp, seed, tokens = _analysis_setup(
        model, seed, preset_name, opposing, tokens, 20, prompt, verbose)
    if scale is None:
        scale = preset.cfg.scale if preset_name and preset.cfg.active else 1.5
    try:
        scale = check_scale(scale)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--scale") from None
    text, steps = explain(backend, None, prompt_ids, scale, generate_fn, opp, top=top)
    click.echo(f"text: {printable(text)}")
    click.echo()
    click.echo(format_explain(steps, backend.tokenizer, scale))


@main.group("eval", cls=_Group)
def eval_group():
    """Measure what guidance does on a benchmark (LAMBADA last-word accuracy)."""


def _write_jsonl_atomically(rows, out: str) -> None:
    """One JSON object per line into OUT via files.write_file: never a partial file."""
    import json

    from .files import write_file

    write_file(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _check_out_folder(ctx, param, value):
    if value is not None and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise click.BadParameter(f"{value}: its folder does not exist")
    return value


@eval_group.command("lambada")
@click.argument("file", metavar="FILE.jsonl", type=click.Path(dir_okay=False))
@click.option("--scales", default="1,1.5", show_default=True, metavar="LIST",
              help="Comma-separated CFG scales to evaluate.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N examples.")
@click.option("--opposing", type=click.Choice(["last-token", "empty"]), default="last-token",
              show_default=True,
              help="Opposing branch: the last context token (the CFG paper's and transformers' "
                   "default) or a blank story (BOS alone).")
@click.option("--rule", type=click.Choice(["tokens", "word"]), default="tokens", show_default=True,
              help="tokens: the greedy tokens must equal tokenizer(\" \" + word) (lm-eval-harness, the "
                   "paper's numbers); word: the first generated word, punctuation stripped.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=10, show_default=True,
              help="Word rule: at most this many tokens are generated for the word.")
@click.option("--out", "out_path", metavar="FILE.jsonl", default=None, callback=_check_out_folder,
              type=click.Path(dir_okay=False),
              help="Also write every example's prediction (one JSON object per example and scale).")
@click.option("--batch", type=click.IntRange(1, 16), default=8, show_default=True, metavar="N",
              help="Examples (times scales) decoded side by side.")
@model_options
@_verbose_option
def eval_lambada_command(file, scales, limit, opposing, rule, max_tokens, batch, out_path, model, verbose):
    """LAMBADA last-word accuracy per CFG scale (zero-shot, greedy), as in Table 1 of Sanchez et al.
    2023. FILE has one JSON object per line with a "text" field; the target is its last
    whitespace-separated word.

    \b
    Rule "tokens" (default, lm-eval-harness'): generate greedily as many tokens as
    tokenizer(" " + word) has; correct when the ids are exactly those.
    Rule "word": generate until the first word is followed by whitespace (or EOS, or --max-tokens);
    correct when that word equals the target after stripping leading and trailing punctuation
    from both (case-sensitive).

    \b
    Example:
      cfg-textgen eval lambada lambada_test.jsonl --scales 1,1.25,1.5 --limit 500 --out mistakes.jsonl
    """
    from .analysis import eval_lambada, lambada_opposing, parse_scales, read_lambada
    from .report import ProgressBar, format_lambada

    scale_list = parse_scales(scales)
    examples = read_lambada(file, limit)
    backend = _load(model, verbose)
    results = eval_lambada(backend, None, examples, scale_list, lambada_opposing(opposing), max_tokens,
                           progress=ProgressBar("lambada"), rule=rule, lanes=batch)
    click.echo(f"LAMBADA last-word accuracy: {file}, {len(examples)} examples, greedy, "
               f"opposing: {opposing}, rule: {rule}")
    click.echo(format_lambada(results))
    if out_path:
        rows = [res.details[i].to_dict() for i in range(len(examples)) for res in results]
        _write_jsonl_atomically(rows, out_path)
        click.echo(f"wrote {out_path} ({len(rows)} predictions)", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

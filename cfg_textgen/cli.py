"""The `cfg-textgen` command line: a thin click layer over the library.

Story text goes to stdout; progress, warnings and timings go to stderr. Library errors
(`CFGTextgenError`) become a one-line message and exit code 1; set CFG_TEXTGEN_DEBUG=1 to
see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from .errors import CFGTextgenError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CFGTextgenError as err:
            if os.environ.get("CFG_TEXTGEN_DEBUG"):
                raise
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
    """stdout, or OUT via a temp file in the same folder renamed over it: never a partial file."""
    import json
    import tempfile

    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if out is None or out == "-":
        click.echo(text, nl=False)
        return
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".cfg-textgen-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


# ---- sweep / explain / eval (analysis) ----------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

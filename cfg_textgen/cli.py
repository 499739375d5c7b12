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


# ---- presets: import / export (importers/) ------------------------------------------------


# ---- write / generate (engine.py, story.py) -----------------------------------------------


# ---- sweep / explain / eval (analysis) ----------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

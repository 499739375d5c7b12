"""The `write` session: stream continuations into a story file, and the `--interactive` loop.

Every piece is written to the file before it is echoed, inside a `SignalGuard` critical section,
so the file always holds the original story plus exactly the text shown. No tensor code here.

Interactive input, one line at a time (read from stdin, so a script can drive it):

    Enter          continue the story
    text           add the text to the story, then continue (see `join_typed`)
    /retry         replace the last continuation with a new one
    /undo          take back the last change (a continuation or added text)
    /scale X       set the CFG scale          /opposing TEXT   set the opposing prompt ("" if none)
    /preset NAME   switch preset              /tokens N        set the continuation length
    /show          print the settings         /help            this list
    /quit          leave (also end of input, or Ctrl-C at the prompt)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import CFGTextgenError
from .story import SignalGuard, Story

HELP = """\
  Enter          continue the story
  text           add the text to the story, then continue. It is joined with one space unless
                 the story ends in whitespace or the text starts with whitespace or , . ; : ! ? ) ]
                 "\\n" in the text is a line break ("\\n\\nChapter 2" starts a paragraph);
                 start a line with "//" to add text that begins with "/"
  /retry         replace the last continuation with a new one
  /undo          take back the last change (a continuation or added text)
  /scale X       set the CFG scale (1 = off)
  /opposing TEXT set the opposing prompt (/opposing alone: a blank story)
  /preset NAME   switch to a preset (all its settings)
  /tokens N      set the continuation length
  /show          print the current settings
  /quit          leave (also Ctrl-D or Ctrl-C at the prompt)"""

NO_SPACE_BEFORE = tuple(",.;:!?)]}'\"…")
UNDO_LIMIT = 200


def join_typed(story_text: str, typed: str) -> str:
    """The text to add for a typed line: `\\n` escapes become line breaks; one space joins it to the
    story unless the story is empty or ends in whitespace, or the text starts with whitespace or
    closing punctuation."""
    text = typed.replace("\\n", "\n")
    if text.startswith("//"):
        text = text[1:]
    if story_text and not story_text[-1].isspace() and text and not text[0].isspace() \
            and not text.startswith(NO_SPACE_BEFORE):
        text = " " + text
    return text


def describe(preset) -> str:
    cfg = preset.cfg
    opposing = "last prompt token" if cfg.opposing_mode == "last-token" else (
        repr(cfg.opposing_prompt) if cfg.opposing_prompt else "blank story")
    samplers = ", ".join(s.name for s in preset.samplers) or "none"
    return (f"preset {preset.name}: CFG scale {cfg.scale:g} (opposing: {opposing}); samplers: {samplers}; "
            f"{preset.max_new_tokens} tokens; {'sampling' if preset.do_sample else 'greedy'}"
            + (f"; stop {list(preset.stop)!r}" if preset.stop else "") + ("; grammar" if preset.grammar else "")
            + (f"; banned phrases {list(preset.banned_strings)!r}" if preset.banned_strings else ""))


def summary(stream) -> str:
    s = stream.stats
    reason = {"eos": "end of text", "max_tokens": "token limit", "stop": "stop sequence"}.get(
        stream.stop_reason, "interrupted")
    return (f"{s.tokens} tokens in {s.seconds:.1f} s ({s.tokens_per_second:.1f} tokens/s, "
            f"{s.forwards} forward passes of batch {s.batch}; CFG scale {stream.scale:g}); "
            f"stopped: {reason}" + (f"; rewinds for banned phrases: {s.rewinds}" if s.rewinds else ""))


@dataclass
class WriteSession:
    """Continue a story with a model and a preset. `make_stream(prompt, preset)` builds an
    engine `Stream`; `echo(text)` shows story text (stdout), `say(text)` status (stderr)."""

    story: Story
    preset: object
    make_stream: Callable
    echo: Callable[[str], None]
    say: Callable[..., None]  # say(text, nl=True)
    guard: SignalGuard
    load_preset: Callable = None
    undo: list = field(default_factory=list)  # (kind, text before the change)

    def continue_story(self):
        """Stream one continuation into the file and to the screen; returns the finished Stream."""
        before = self.story.text
        stream = self.make_stream(self.story.prompt, self.preset)
        self._push("continuation", before)
        with self.story.appender() as out:
            try:
                for piece in stream:
                    with self.guard.critical():
                        out.write(piece)
                        self.echo(piece)
            finally:
                self.say("")
                self.say(summary(stream))
        return stream

    def _push(self, kind: str, before: str) -> None:
        self.undo.append((kind, before))
        del self.undo[:-UNDO_LIMIT]

    def add_text(self, typed: str) -> None:
        text = join_typed(self.story.text, typed)
        if not text:
            return
        before = self.story.text
        with self.story.appender() as out, self.guard.critical():
            out.write(text)
            self.echo(text)
        self._push("text", before)

    def undo_last(self) -> bool:
        if not self.undo:
            self.say("nothing to undo")
            return False
        kind, before = self.undo.pop()
        removed = len(self.story.text) - len(before)
        self.story.rewrite(before)
        tail = before[-60:].replace("\n", "\\n")
        self.say(f"undone: the last {'continuation' if kind == 'continuation' else 'added text'} "
                 f"({removed} characters); the story now ends with: …{tail}")
        return True

    # ---- the interactive loop -------------------------------------------------------------

    def interactive(self, lines: Iterable[str]) -> None:
        """Run commands from `lines` (stdin) until /quit or the end of input."""
        self.say("interactive: Enter continues, typed text is added, /help lists the commands")
        if self.story.prompt.strip():
            self._continue_interruptible()
        lines = iter(lines)
        while True:
            self.say("> ", nl=False)
            try:
                line = next(lines, None)
            except KeyboardInterrupt:
                line = None
            if line is None:
                self.say("")
                return
            line = line.rstrip("\r\n")
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return
                continue
            if line:
                self.add_text(line)
            self._continue_interruptible()

    def _continue_interruptible(self) -> None:
        try:
            self.continue_story()
        except KeyboardInterrupt:
            self.say("interrupted; the text shown is in the story")
        except CFGTextgenError as err:
            self.say(f"error: {err}")

    def command(self, line: str) -> bool:
        """Apply one /command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        try:
            if name in ("quit", "exit", "q"):
                return False
            if name == "help":
                self.say(HELP)
            elif name == "show":
                self.say(describe(self.preset))
            elif name == "undo":
                self.undo_last()
            elif name == "retry":
                if self.undo and self.undo[-1][0] == "continuation":
                    self.undo_last()
                    self._continue_interruptible()
                else:
                    self.say("nothing to retry: the last change was not a continuation")
            elif name == "scale":
                self._set_cfg(scale=_finite(arg, "/scale"))
            elif name == "opposing":
                self._set_cfg(opposing_prompt=arg, opposing_mode="text")
            elif name == "tokens":
                if not arg.isdigit() or int(arg) < 1:
                    raise CFGTextgenError(f"/tokens needs an integer >= 1, got {arg!r}")
                self.preset = dataclasses.replace(self.preset, max_new_tokens=int(arg))
                self.say(describe(self.preset))
            elif name == "preset":
                if not arg:
                    raise CFGTextgenError("/preset needs a preset name or file")
                self.preset = self.load_preset(arg)
                self.say(describe(self.preset))
            else:
                self.say(f"unknown command /{name}; /help lists the commands")
        except CFGTextgenError as err:
            self.say(f"error: {err}")
        return True

    def _set_cfg(self, **changes) -> None:
        self.preset = dataclasses.replace(self.preset, cfg=dataclasses.replace(self.preset.cfg, **changes))
        self.say(describe(self.preset))


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CFGTextgenError(f"{what} needs a finite number, got {text!r}")
    return value

"""The one exception family the CLI turns into a clear message and a non-zero exit.

An error about one setting carries that setting as data, not only in its words: `field` (the
library's own name for it: "prompt", "opposing_prompt", "max_new_tokens", "scale", a preset's
JSON path, an imported file's key), `rule` (what the setting must be, or what is wrong with it)
and `value` (what it was). The server names the request field from `field` and never reads the
message, so rewording a message cannot change which field an API error names.
"""

from __future__ import annotations

from dataclasses import dataclass

UNSET = object()  # `value` when the error is not about one value


class CFGTextgenError(Exception):
    """A user-facing error: bad input, a missing file or model. The message says what and where;
    `field`, `rule` and `value` say it as data when the error is about one setting."""

    def __init__(self, message: str = "", *, field: str | None = None, rule: str | None = None,
                 value=UNSET):
        super().__init__(message)
        self.field, self.rule, self.value = field, rule, value


class SettingError(CFGTextgenError, ValueError):
    """A generation setting is invalid (a ValueError, as transformers raises for its arguments):
    "`field` has to be RULE, but is VALUE"."""

    def __init__(self, field: str, rule: str, value=UNSET, message: str | None = None):
        if message is None:
            message = f"`{field}` has to be {rule}, but is {value!r}"
        super().__init__(message, field=field, rule=rule, value=value)


class ContextError(CFGTextgenError):
    """A story, an opposing prompt or a length does not fit the model's window. `field` is the
    setting to change: "prompt" (too long to keep whole), "max_new_tokens" (leaves no room)."""


class SchedulerClosed(CFGTextgenError):
    """The scheduler is shutting down (or its decode thread died) and takes no new requests."""


class GenerationFailed(CFGTextgenError):
    """A decode step failed; every job in that step ends with this error (its `__cause__` is the
    backend's own exception). Jobs not in the step are unaffected."""


@dataclass(frozen=True)
class PresetProblem:
    """One problem of a preset: `path` the JSON path as keys and indexes (`("samplers", 2, "p")`;
    empty for the whole preset), `message` what is wrong ("must be a number in (0, 1], got 1.5")."""

    path: tuple
    message: str


class PresetError(CFGTextgenError, ValueError):
    """A preset file or dict is invalid. The message names the file and the JSON path.

    Validation errors hold every problem in `problems` (JSON paths as data); an importer's error
    about one source key has `field` = that key (as written in the source, prefix included) and
    `rule` = what is wrong with it."""

    def __init__(self, message: str = "", *, problems: tuple = (), **about):
        super().__init__(message, **about)
        self.problems: tuple[PresetProblem, ...] = tuple(problems)

    def within(self, context: str) -> "PresetError":
        """The same error (field, rule, value, problems) with `context: ` before its message."""
        err = PresetError(f"{context}: {self}", problems=self.problems, field=self.field, rule=self.rule,
                          value=self.value)
        if hasattr(self, "errors"):
            err.errors = self.errors
        return err


class ModelNotFoundError(CFGTextgenError, FileNotFoundError):
    """The model (or the embedded default) is not installed; the message says how to get it."""

"""The one exception family the CLI turns into a clear message and a non-zero exit."""


class CFGTextgenError(Exception):
    """A user-facing error: bad input, a missing file or model. The message says what and where."""


class PresetError(CFGTextgenError, ValueError):
    """A preset file or dict is invalid. The message names the file and the JSON path."""


class ModelNotFoundError(CFGTextgenError, FileNotFoundError):
    """The model (or the embedded default) is not installed; the message says how to get it."""

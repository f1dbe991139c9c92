"""The project's expected failures, at the bottom of the import graph: every module may raise them, and the
command line (``python -m vcm``) reports them as one line without a traceback."""

from __future__ import annotations


class StageError(Exception):
    """An expected failure (bad input, bad config): reported as one line, without a traceback."""


class ConfigError(StageError):
    """A config value that does not fit the schema; the message names the key."""

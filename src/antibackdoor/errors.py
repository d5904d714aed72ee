"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class AntibackdoorError(Exception):
    """Base class of every error caused by user input (files, options, data) rather than a bug."""


class DataError(AntibackdoorError):
    """A dataset file is missing, truncated or malformed."""


class ConfigError(AntibackdoorError):
    """An option or config-file value is invalid."""


class TrainingDivergedError(AntibackdoorError):
    """The loss became NaN or infinite; the run cannot produce a meaningful model."""


class RunStateError(AntibackdoorError):
    """A run directory is in a state the requested action cannot handle (e.g. unfinished, no --resume)."""

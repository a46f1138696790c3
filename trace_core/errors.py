"""Errors a user can cause (bad config, bad data row, unreachable judge).

They carry one line that names the file, row or setting; the CLI prints that line and exits
non-zero, without a traceback.
"""


class TraceError(Exception):
    """A problem in the user's input or environment, reported as one clear line."""


class DataError(TraceError):
    """A data file or row that cannot be used."""


class ConfigError(TraceError):
    """A setting that is missing, misspelt or of the wrong type."""

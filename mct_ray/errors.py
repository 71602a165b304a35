"""Project errors. Each carries the process exit code the CLI uses for it.

Bad input (config, data, files) exits 2 with one line on stderr; anything the run itself
detects later (divergence) exits 1, also with one line.
"""

from __future__ import annotations


class MctRayError(Exception):
    """Base class: a problem we can describe in one line to the user."""

    exit_code = 2


class ConfigError(MctRayError):
    """A config key or value is unknown or out of range."""


class DataError(MctRayError):
    """A data set is absent, malformed or inconsistent with the config."""


class FormatError(MctRayError):
    """A stored file is corrupt, of another version, or does not match the config."""


class DivergenceError(MctRayError):
    """The distillation produced non-finite losses too many times in a row."""

    exit_code = 1


class StorageError(MctRayError):
    """A storage URI cannot be used: endpoint unreachable, bucket missing, access denied."""

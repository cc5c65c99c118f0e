"""errors.py — the one exception family for mistakes a user can cause.

The CLI turns any ``UserError`` into one clear line on stderr and exit code 2 (no
traceback). Programming errors stay ordinary exceptions with full tracebacks.
"""
from __future__ import annotations


class UserError(Exception):
    """A bad config, missing file, bad sample or bad argument: reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config file or override that does not match its schema."""


class DataError(UserError):
    """A data source that cannot be used (nothing decodes, missing folder, bad format)."""


class RunMismatchError(UserError):
    """A checkpoint that this run cannot resume exactly (other world size, strategy, or frozen decoder weights)."""

"""toy/scenes/errors.py — the one error the scene generator raises for bad arguments.

The leaf cannot import ``vilex.errors``; ``toy.cli`` turns this into a ``vilex.errors.UserError`` (one line, exit 2).
"""
from __future__ import annotations


class ToyWorldError(ValueError):
    """A bad argument to the scene generator or the contact sheet (a count, a split list, an existing folder)."""

"""The ``vilex`` command line: one console script, one module per subcommand group."""
from vilex.cli.main import main

__all__ = ["main"]

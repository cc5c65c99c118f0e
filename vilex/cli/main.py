"""cli/main.py — the ``vilex`` console script.

Each subcommand is a ``Command`` registered in ``COMMANDS`` by a command module. The command modules are the
``vilex.commands`` entry points of the installed packages (pyproject.toml), so each package (``vilex``, ``vlm``,
``benchmarks``, ``toy``) adds its own commands and this module names none of them. Modules keep heavy imports
(torch, diffusers) inside their ``run`` functions so ``vilex --help`` stays instant.

User errors (``vilex.errors.UserError``: bad config, missing file, bad data; and any type a package adds with
``register_user_errors``) print one line ``error: …`` to stderr and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from vilex.errors import UserError
from vilex.registry import Registry


@dataclass
class Command:
    """One subcommand: its help line, how to add its arguments, and what it runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    group: str | None = None  # e.g. "toy" for "vilex toy generate"
    aliases: list[str] = field(default_factory=list)


COMMANDS: Registry[Command] = Registry("command")

COMMAND_ENTRY_POINTS = "vilex.commands"  # entry-point group: NAME = "package.module" whose import registers commands
# Exception types (besides UserError) that mean "the user's input was wrong": one line, exit code 2.
USER_ERRORS: list[type[Exception]] = [UserError]


def register_user_errors(*types: type[Exception]) -> None:
    """Let a package's own argument-error types read as user errors in the CLI (one line, exit code 2)."""
    USER_ERRORS.extend(t for t in types if t not in USER_ERRORS)


GROUP_HELP: dict[str, str] = {}  # "vilex GROUP …" -> its help line (see command_group)


def command_group(name: str, help: str) -> None:
    """Describe a command group (``vilex NAME SUBCOMMAND``) for ``vilex --help``."""
    GROUP_HELP[name] = help


def command(name: str, help: str, group: str | None = None):
    """Decorator: register ``run(args)``; the decorated function's ``configure`` attribute adds args."""

    def deco(configure: Callable[[argparse.ArgumentParser], None]):
        def wrap(run: Callable[[argparse.Namespace], int | None]):
            key = f"{group} {name}" if group else name
            COMMANDS.register(key, Command(name=name, help=help, configure=configure, run=run, group=group))
            return run

        return wrap

    return deco


def add_config_args(p: argparse.ArgumentParser, example: str, required: bool = False) -> None:
    """The ``--config FILE`` + repeated ``--set a.b=value`` pair shared by config-driven commands; ``example`` is a
    valid override of this command's config (tests/test_cli_help_examples.py loads each one)."""
    p.add_argument("--config", required=required, help="experiment YAML under configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (repeatable)")


def add_dry_run_args(p: argparse.ArgumentParser) -> None:
    """``--dry-run`` (build on the meta device, check every name and path, print the effective values; exit 2 on any
    problem) and the process count it plans for."""
    p.add_argument("--dry-run", action="store_true",
                   help="check everything the run would read and build (models on the meta device), print the "
                        "effective values (resolutions, global batch, steps, optimizer groups); exit 2 on problems")
    p.add_argument("--processes", type=int, default=int(os.environ.get("WORLD_SIZE", "1")), metavar="N",
                   help="with --dry-run: plan for N processes, e.g. nodes × GPUs per node (default: $WORLD_SIZE or 1)")


def _load_command_modules() -> None:
    """Import every registered command module, sorted by entry-point name (= the order in ``vilex --help``)."""
    from importlib.metadata import entry_points

    found = entry_points(group=COMMAND_ENTRY_POINTS)
    if not found:
        raise RuntimeError(f"no '{COMMAND_ENTRY_POINTS}' entry points: the package is not installed; run `make install` "
                           "(or `pip install -e .`)")
    for ep in sorted(found, key=lambda ep: ep.name):
        importlib.import_module(ep.value)


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="vilex",
        description="ViLex suite: pretrain the ViLex tokenizer, train the VLM, run benchmarks, play in the toy world.",
    )
    parser.add_argument("--log-level", default=os.environ.get("VILEX_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for key in [k for k in COMMANDS._entries]:  # registration order
        cmd = COMMANDS.get(key)
        target = sub
        if cmd.group:
            if cmd.group not in groups:
                gp = sub.add_parser(cmd.group, help=GROUP_HELP.get(cmd.group, cmd.group),
                                    description=GROUP_HELP.get(cmd.group))
                groups[cmd.group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
                gp.set_defaults(_group_parser=gp)
            target = groups[cmd.group]
        p = target.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def setup_logging(level: str) -> None:
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # logs go to stderr: stdout is for results (JSON, paths) that scripts parse
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="[%X]", handlers=[handler], force=True)
    if level != "DEBUG":  # the libraries' per-file loading/saving bars drown our own progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for lib in ("transformers", "diffusers"):
            try:
                mod = importlib.import_module(f"{lib}.utils.logging")
                mod.disable_progress_bar()
                mod.set_verbosity_error()
            except ImportError:  # pragma: no cover
                pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 0 if args.command is None else 2
    setup_logging(args.log_level)
    try:
        return int(run(args) or 0)
    except tuple(USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

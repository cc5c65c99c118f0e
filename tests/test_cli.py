"""The `vilex` console script: every subcommand is listed and has --help; `python -m vilex` works too."""
import subprocess
import sys
from pathlib import Path

import pytest

from vilex.cli.main import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    top = {k.split()[0] for k in COMMANDS.names()}
    assert {"pretrain", "reconstruct", "compose", "encode", "eval-recon", "cache-latents", "demo", "toy", "data"} <= top
    for name in top:
        assert name in out


@pytest.mark.parametrize("key", sorted(build_parser() and COMMANDS.names()))
def test_every_subcommand_has_help(key, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*key.split(), "--help"])
    assert ei.value.code == 0
    assert "usage: vilex" in capsys.readouterr().out


def test_python_dash_m_and_unknown_command():
    r = subprocess.run([sys.executable, "-m", "vilex", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "pretrain" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vilex", "pretrian"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "invalid choice: 'pretrian'" in r.stderr

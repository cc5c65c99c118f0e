"""The ``--set`` example each config-driven command shows in ``--help`` is a valid override of that command's config."""
import re
from pathlib import Path

import pytest

from vilex.cli.main import build_parser
from vilex.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _config_classes():
    from benchmarks.sweep import SweepConfig
    from toy.cli import STAGE0_COMMANDS, _import
    from toy.pretrain_decoder import DecoderPretrainConfig
    from vilex.train.config import PretrainConfig
    from vlm.config import VLMConfig

    found = {"pretrain": (PretrainConfig, "configs/vilex/tiny.yaml"),
             "cache-latents": (PretrainConfig, "configs/vilex/tiny.yaml"),
             "train-vlm": (VLMConfig, "configs/vlm/tiny.yaml"),
             "eval": (SweepConfig, "configs/benchmarks/toy.yaml"),
             "eval prepare": (SweepConfig, "configs/benchmarks/toy.yaml"),
             "toy gate-decoder": (DecoderPretrainConfig, "configs/toy/decoder.yaml")}
    stage0_files = {"train-probe": "probe", "pretrain-decoder": "decoder", "pretrain-siglip": "siglip",
                    "pretrain-text-encoder": "text_encoder", "pretrain-llm": "llm", "pretrain-vae": "sd_vae"}
    for spec in STAGE0_COMMANDS:
        found[f"toy {spec.name}"] = (_import(spec.config), f"configs/toy/{stage0_files[spec.name]}.yaml")
    return found


def _subparser(parser, words):
    for word in words:
        action = next(a for a in parser._actions if getattr(a, "choices", None) and word in a.choices)
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("command", sorted(_config_classes()))
def test_the_help_example_override_loads(command):
    cls, config = _config_classes()[command]
    text = _subparser(build_parser(), command.split()).format_help()
    [example] = re.findall(r"e\.g\.\s+--set\s+(\S+)", text)
    cfg = load_config(cls, REPO / config, [example])
    key, value = example.split("=", 1)
    got = cfg
    for part in key.split("."):
        got = getattr(got, part)
    import yaml

    expected = yaml.safe_load(value)
    if isinstance(got, float):
        expected = float(value)  # YAML 1.1 reads "1e-4" as a string; the config loader converts it
    assert got == expected or str(got) == value


def _commands(parser, prefix=""):
    """(name, parser) of every command and subcommand."""
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                yield full, sub
                yield from _commands(sub, full)


def test_every_config_driven_command_is_checked():
    with_set = {name for name, p in _commands(build_parser())
                if any("--set" in a.option_strings for a in p._actions)}
    assert with_set == set(_config_classes())


def test_every_command_line_shown_in_help_parses():
    """Each ``vilex ...`` example line of any --help is accepted by the parser as written, the config file it
    names exists and its --set overrides are keys of that config (tests/test_bench_docs.py runs `vilex eval`'s examples for real)."""
    import shlex

    parser = build_parser()
    examples = sorted({line.strip() for _, sub in _commands(parser) for line in sub.format_help().splitlines()
                       if line.strip().startswith("vilex ")})
    assert len(examples) >= 7, examples
    for line in examples:
        try:
            args = parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"--help example does not parse: {line}")
        if getattr(args, "config", None):
            assert (REPO / args.config).is_file(), line
            cls, _ = _config_classes()[args.command]
            load_config(cls, REPO / args.config, args.overrides)  # every --set key is one of the config's

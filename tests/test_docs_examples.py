"""Every example command in vlm/README.md, scripts/toy/README.md and docs/PERFORMANCE.md is checked, and run where
this machine can.

Collected from the markdown (``documented``):
* code blocks (```bash / sh / console / shell / plain): each line that starts with ``vilex``, ``python``,
  ``torchrun``, ``bash scripts/``, ``scripts/`` or ``make`` (after ``NAME=value`` prefixes and ``nohup``); lines
  joined across a trailing ``\\``; split at ``&&`` / ``;`` / ``|`` / ``&``; trailing comments and redirections
  removed. These are the commands a reader copies: every one is run (or dry-run) below, except the ``ALLOWED`` ones.
* inline code spans of the prose that start with ``vilex`` or ``python``: often fragments of a code-block command
  (``vilex toy ship-vlm --llm-storage-dtype bfloat16``), so they are checked statically only; a complete one that
  differs from every code-block command would need its own line in a code block to be run.
``MIN_EXAMPLES`` asserts a minimum count per file, so a broken collector cannot pass by finding nothing.

Static checks (``test_every_documented_command_is_valid``): the subcommand exists and argparse accepts the line as
written (``vilex.cli.main.build_parser``; for ``python scripts/X.py`` the script's own parser, run up to its
``parse_args`` and stopped there); every ``--config`` file exists and loads with the line's ``--set`` overrides (so
every key is one of that config's), the ``--stage`` is one of the config's; every repository path in the line exists
(``configs/``, ``assets/``, ``scripts/``, ...; ``runs/`` and ``exported/`` are outputs); shell scripts pass
``bash -n``; ``scripts/launch.sh N COMMAND ...`` checks the ``vilex COMMAND ...`` it launches.

Execution (``test_documented_commands_run``, one per file, in document order): in a sandbox repository root — a
temp folder with ``configs/``, ``assets/`` and ``scripts/`` linked in and an empty ``runs/`` — so every command runs
exactly as written and whatever it writes under ``runs/`` lands in the temp folder. Per command:
* a config-driven ``vilex`` command with ``--dry-run`` (``train-vlm``, ``pretrain``, ``eval``) runs with it: every
  path, registry name and batch checked, the models built on the meta device; it must report no problem, except the
  ones ``EXPECTED_DRY_RUN_PROBLEMS`` names for configs whose weights and data cannot be here;
* ``scripts/launch.sh N ...`` dry-runs its ``vilex`` command with ``--processes N × NNODES``;
* ``RUN`` commands run for real (cheap ones), edited only as ``RUN`` says (smaller ``--n``; an output that would
  overwrite a shipped asset goes under ``runs/``);
* ``ALLOWED`` commands (the explicit allow-list, each with its reason: a GPU, hub weights, a finished long run, a
  benchmark of minutes) are only checked statically.
A command that fits none of these fails the test until it is classified here.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from vilex.cli.main import build_parser, main
from vilex.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DOCS = ("vlm/README.md", "scripts/toy/README.md", "docs/PERFORMANCE.md")
# the fewest code-block commands each file has (so a collector that finds nothing fails)
MIN_EXAMPLES = {"vlm/README.md": 20, "scripts/toy/README.md": 13, "docs/PERFORMANCE.md": 5}
# the fewest inline `vilex ...` / `python ...` spans each file has
MIN_INLINE = {"vlm/README.md": 4, "scripts/toy/README.md": 8, "docs/PERFORMANCE.md": 0}
STARTS = ("vilex ", "python ", "torchrun ", "bash scripts/", "scripts/", "make ")
SANDBOX_LINKS = ("configs", "assets", "scripts")  # what a command may read from the repository; runs/ stays empty
# paths under these are outputs of the commands (made by an earlier command, or written by this one)
OUTPUT_ROOTS = ("runs/", "exported/", "/data/", "data/")

# ---------------------------------------------------------------------------------------------------------------
# How each command that is neither dry-run nor a launch line is exercised.
# RUN: run for real in the sandbox; the edits (old text -> new text) only shrink a size or move an output off a
#      shipped asset.
RUN: dict[str, dict[str, str]] = {
    # vlm/README.md, "Toy VLMs": the data, made as documented (40 scenes: 32 train, 4 test)
    "vilex toy generate --out runs/toy/data --n 6000 --seed 0 --size 32": {"--n 6000": "--n 40"},
    "vilex toy vlm-data --split runs/toy/data/train --out runs/toy/vlm_data/train": {},
    "vilex eval toy-tasks --split runs/toy/data/test --out runs/toy/tasks": {},
    # the align stages train for real (64 align samples: one step of the recipe's global batch of 64), so the
    # instruct dry-runs after them find the align checkpoint their init_from: previous needs
    "vilex train-vlm --config configs/vlm/toy_siglip.yaml --stage align": {},
    "vilex train-vlm --config configs/vlm/toy_vilex.yaml --stage align": {},
    "vilex train-vlm --config configs/vlm/toy_vilex-tokens.yaml --stage align": {},
    # scripts/toy/README.md: the tokenizer as documented (seconds), written beside the shipped one
    "vilex toy train-tokenizer --out assets/toy/tokenizer --n-scenes 4000 --seed 0":
        {"--out assets/toy/tokenizer": "--out runs/toy/tokenizer"},
    # the toy ViLex data, 20 scenes instead of 20000 (the `vilex pretrain --dry-run` after it lists them)
    "vilex toy generate --out runs/toy/vilex_data --n 20000 --seed 1 --size 32": {"--n 20000": "--n 20"},
    "vilex toy generate --out runs/toy/vilex_data_64 --n 20000 --seed 1 --size 64": {"--n 20000": "--n 20"},
}

# ALLOWED: cannot run here; checked statically only (flags, config keys, paths). Each with the reason.
_STAGE0 = "a stage-0 training of minutes that writes a shipped asset; tests/test_toy_pretrain.py and " \
          "tests/test_toy_resume.py run each trainer for a few steps"
ALLOWED: dict[str, str] = {
    # vlm/README.md
    "vilex export-hf --checkpoint runs/vlm/qwen2.5-7b_siglip-so400m/instruct --out exported/siglip":
        "needs the trained 7B instruct checkpoint; tests/test_bench_docs.py exports a shipped toy VLM for real",
    "vilex toy pretrain-llm --config configs/toy/llm.yaml --out assets/toy/llm": _STAGE0 + " (27 min; also in "
                                                                                   "scripts/toy/README.md)",
    "vilex eval report runs/bench/toy":
        "needs the finished toy sweep (lmms-eval, 3 VLMs x 6 tasks: minutes); tests/test_bench_docs.py runs "
        "`vilex eval report` on a stand-in sweep",
    "python scripts/toy/tower_probe.py --tower siglip:assets/toy/siglip/vision --tower vilex:assets/toy/vilex":
        "needs the 6000-scene toy data (1200 + 300 single-object scenes) and minutes of probing",
    "python scripts/bench/vlm_packing.py": "a benchmark (minutes of timed forward/backward passes)",
    # scripts/toy/README.md
    "vilex toy train-probe --config configs/toy/probe.yaml --out assets/toy/probe --log-file runs/logs/probe_train.txt":
        _STAGE0 + " (16 min)",
    "vilex toy pretrain-siglip --config configs/toy/siglip.yaml --out assets/toy/siglip": _STAGE0 + " (19 min)",
    "vilex toy pretrain-text-encoder --config configs/toy/text_encoder.yaml --out runs/toy/text_encoder_lit_asset":
        _STAGE0 + " (20 min)",
    "vilex toy pretrain-text-encoder --config configs/toy/text_encoder_attributes.yaml --out "
    "runs/toy/text_encoder_attr_a": _STAGE0 + " (5 min; reads the LiT run's output)",
    "vilex toy pretrain-text-encoder --config configs/toy/text_encoder_attributes.yaml --out assets/toy/text_encoder "
    "--set text_encoder.pretrained=runs/toy/text_encoder_attr_a --set train.swap_margin=0.6 "
    "--set train.swap_margin_weight=4 --set train.attribute_weight=2": _STAGE0 + " (5 min)",
    "vilex toy pretrain-decoder --config configs/toy/decoder.yaml --out assets/toy/decoder": _STAGE0 + " (36 min)",
    "vilex toy train-probe --config configs/toy/probe_64.yaml --out assets/toy/probe_64": _STAGE0 + " (16 min)",
    "vilex toy pretrain-vae --config configs/toy/sd_vae.yaml --out assets/toy/sd_vae": _STAGE0 + " (~45 min; "
                                                                                    "tests/test_toy_sd.py)",
    "vilex toy pretrain-decoder --config configs/toy/sd.yaml --out runs/toy/sd_asset": _STAGE0 + " (~60 min; "
                                                                                  "tests/test_toy_sd.py)",
    "vilex toy pretrain-siglip --config configs/toy/siglip_web.yaml --out assets/toy/siglip_web": _STAGE0 + " (~40 min)",
    "vilex toy pretrain-decoder --config configs/toy/decoder.yaml --out assets/toy/decoder --resume auto":
        _STAGE0 + " (the resume of a killed decoder run)",
    "vilex toy decoder-commitment --decoder checkpoints/toy/sd --strengths 0.5 0.7 0.85 1.0":
        "minutes of sampling from the committed mini SD; tests/test_toy_sd.py runs it on a stand-in and on that SD",
    "vilex toy claims --checkpoint runs/toy/vilex_64 --test-split runs/toy/vilex_data_64/test --out "
    "runs/toy/claims_64 --decoder checkpoints/toy/sd --probe assets/toy/probe_64":
        "needs the 64-px ViLex run against a mini SD that passed its gate; tests/test_toy_sd.py runs it on stand-ins",
    "vilex pretrain --config configs/vilex/toy_64.yaml --resume checkpoints/toy/vilex_64_resume/checkpoint-3446 "
    "--set train.max_minutes=118": "two hours of training against the committed mini SD, which the sandbox does not "
                                   "link; tests/test_toy_sd.py runs this config on stand-ins",
    "vilex toy claims --checkpoint runs/toy/vilex_64 --test-split runs/toy/vilex_data_64/val --out "
    "runs/toy/claims_64_val --n 64 --decoder checkpoints/toy/sd --probe assets/toy/probe_64 --tfg-scale 1.25":
        "needs the 64-px ViLex run; tests/test_toy_sd.py runs the claims on stand-ins",
    "python scripts/toy/tfg_sweep.py --checkpoint runs/toy/vilex_64 --split runs/toy/vilex_data_64/val --decoder "
    "checkpoints/toy/sd --probe assets/toy/probe_64 --tokens 16 --scales 1 1.25 1.5 2 3":
        "needs the 64-px ViLex run and minutes of sampling",
    "python scripts/toy/conditioning_loss.py --checkpoint runs/toy/vilex_64 --decoder checkpoints/toy/sd --split "
    "runs/toy/vilex_data_64/val --n 64 --tokens 1 4 16":
        "needs the 64-px ViLex run; tests/test_conditioning_loss.py checks the pairing of its draws",
    "python scripts/toy/conditioning_loss.py --checkpoint runs/toy/vilex_64 --decoder checkpoints/toy/sd --split "
    "runs/toy/vilex_data_64/val --n 16 --tokens 1 16 --fit-steps 300":
        "needs the 64-px ViLex run (2 min); tests/test_conditioning_loss.py fits tokens on a stand-in decoder",
    "vilex toy ship-vilex --run runs/toy/vilex --out assets/toy/vilex --n 128":
        "needs the finished toy ViLex run (80 min on CPU) and writes the shipped asset",
    "vilex toy ship-vlm --run runs/toy/vlm/siglip --out assets/toy/vlm/siglip --llm-storage-dtype bfloat16":
        "needs the finished instruct stage of the toy SigLIP VLM and writes the shipped asset",
    # docs/PERFORMANCE.md: benchmarks
    "python scripts/bench/stage1_step.py --threads 1 --ours-fp32 --ours-cpu":
        "a benchmark (minutes of timed steps)",
    "python scripts/bench/decoder_costs.py": "meta-device builds of the four real-scale configs (a minute); "
                                             "tests/test_dry_run.py and the decoder tests build them the same way",
    "bash scripts/bench/gpu_all.sh": "needs a GPU (bf16 peak, real shapes); its --cpu mode runs in "
                                     "tests/test_gpu_bench_scripts.py",
    "bash scripts/bench/gpu_all.sh --prepare": "packs the installed diffusers / transformers into runs/ (a 16 MB "
                                               "tarball; seconds, but it writes outside the sandbox's venv)",
    "bash scripts/toy/gpu_sd.sh --cpu": "minutes of two mini-SD trainings and gates; tests/test_toy_gpu_scripts.py "
                                        "runs it (slow)",
    "python scripts/bench/sweep_overhead.py": "a benchmark (lmms-eval workers over rounds: minutes)",
    "python scripts/bench/vlm_packing.py --threads 1": "a benchmark (minutes of timed forward/backward passes)",
}

# Dry-run problems that are expected where the weights or data cannot be on this machine (config prefix -> regexes)
_NOT_HERE = [
    r"is neither a local folder nor a model in the local Hugging Face cache",  # the hub weights (7B LLM, so400m)
    r"conversation file not found: data/llava/",  # LLaVA's own data release
    r"init_from is 'previous' but stage 'align' has no checkpoint",  # align of the 7B recipe cannot run here
]
EXPECTED_DRY_RUN_PROBLEMS: dict[str, list[str]] = {"configs/vlm/qwen2.5-7b_": _NOT_HERE}


# --------------------------------------------------------------------------------------------------- collecting
@dataclass
class Example:
    doc: str
    text: str  # the command as documented (one line, whitespace normalised)
    inline: bool  # from a `span` of the prose (possibly a fragment)
    env: dict[str, str] = field(default_factory=dict)  # NAME=value prefixes

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _split_outside_quotes(line: str, seps: tuple[str, ...]) -> list[str]:
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        else:
            sep = next((s for s in seps if line.startswith(s, i)), None)
            if sep:
                parts.append(current)
                current, i = "", i + len(sep)
                continue
        current += ch
        i += 1
    return parts + [current]


def _clean(segment: str) -> tuple[str, dict[str, str]]:
    """A shell segment -> (command, env prefixes): redirections, ``nohup`` and NAME=value prefixes removed."""
    segment = re.sub(r"\s+\d*>>?\s*&?\s*\S+", "", segment)  # > file, 2>&1, >> file
    words = segment.split()
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words and words[0] == "nohup":
        words.pop(0)
    return " ".join(words), env


def _code_block_commands(doc: str, text: str) -> list[Example]:
    found = []
    for lang, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        body = re.sub(r"\\\n\s*", " ", body)  # continuation lines
        for line in body.splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\s+#(\s.*)?$", "", line)  # trailing comment
            for chain in _split_outside_quotes(line, ("&&", "||", ";")):
                pipeline = _split_outside_quotes(chain, ("|",))[0]  # `cmd 2>&1 | tee log`: the command
                command, env = _clean(pipeline.strip().rstrip("&").strip())
                if command.startswith(STARTS) or f"{command} ".startswith(STARTS):
                    found.append(Example(doc, command, inline=False, env=env))
    return found


def _inline_commands(doc: str, text: str) -> list[Example]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    spans = (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose))
    return [Example(doc, s, inline=True) for s in spans if s.startswith(("vilex ", "python "))]


def documented(doc: str) -> tuple[list[Example], list[Example]]:
    text = (REPO / doc).read_text()
    return _code_block_commands(doc, text), _inline_commands(doc, text)


# ------------------------------------------------------------------------------------------------ static checks
def _config_class(words: tuple[str, ...]):
    from benchmarks.sweep import SweepConfig
    from toy.cli import STAGE0_COMMANDS, _import
    from toy.pretrain_decoder import DecoderPretrainConfig
    from vilex.train.config import PretrainConfig
    from vlm.config import VLMConfig

    known = {("pretrain",): PretrainConfig, ("cache-latents",): PretrainConfig, ("train-vlm",): VLMConfig,
             ("eval",): SweepConfig, ("toy", "gate-decoder"): DecoderPretrainConfig}
    known.update({("toy", spec.name): _import(spec.config) for spec in STAGE0_COMMANDS})
    assert words in known, f"`vilex {' '.join(words)}` takes --config but this test does not know its config class"
    return known[words]


def _subcommand(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    """The subcommand words at the start of ``argv`` and their parser."""
    words: list[str] = []
    for word in argv:
        sub = next((a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)), None)
        if sub is None or word not in sub.choices:
            break
        words.append(word)
        parser = sub.choices[word]
    return tuple(words), parser


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def check_paths(ex: Example, words: list[str]) -> None:
    """Every repository path the command names exists (outputs under runs/ etc. excepted)."""
    for word in words:
        for piece in re.split(r"[=:,]", word):
            if "/" not in piece or piece.startswith(OUTPUT_ROOTS) or "://" in word or piece.startswith("-"):
                continue
            if piece.split("/")[0] in {"configs", "assets", "scripts", "vilex", "vlm", "toy", "benchmarks", "tests",
                                       "docs"}:
                exists = any(REPO.glob(piece)) if "*" in piece else (REPO / piece).exists()
                assert exists, f"{ex.doc}: `{ex.text}` names {piece}, which does not exist"


def check_vilex(ex: Example, argv: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace | None:
    """argv = the arguments after ``vilex``. Complete commands must parse as written; fragments (inline spans)
    must name a subcommand and only options it has."""
    words, sub = _subcommand(parser, argv)
    assert words, f"{ex.doc}: `{ex.text}`: no such vilex subcommand"
    unknown = [w.split("=")[0] for w in argv[len(words):]
               if w.startswith("--") and w.split("=")[0] not in _option_strings(sub)]
    assert not unknown, f"{ex.doc}: `{ex.text}`: `vilex {' '.join(words)}` has no option {unknown}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            error = err.getvalue().strip().splitlines()[-1]
            # a fragment of the prose may leave out required arguments, or end at an option's name
            # (`vilex eval --config`); every value it does give was checked by argparse before these errors
            fragment = "the following arguments are required" in error or (
                "expected one argument" in error and argv[-1].startswith("--"))
            if ex.inline and fragment:
                return None
            pytest.fail(f"{ex.doc}: `{ex.text}` does not parse: {error}")
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), f"{ex.doc}: `{ex.text}`: no config {args.config}"
        cfg = load_config(_config_class(words), REPO / args.config, args.overrides)  # every --set key is valid
        if getattr(args, "stage", None):
            cfg.stage(args.stage)
    return args


class _Parsed(Exception):
    pass


def parse_script_args(ex: Example, script: str, args: list[str]) -> argparse.Namespace:
    """Run ``script`` up to its own ``parse_args(args)`` and stop there: the flags and values are the script's."""
    original, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    got: dict[str, argparse.Namespace] = {}
    inside = []

    def parse_args(self, a=None, namespace=None):
        inside.append(1)
        got["args"] = original(self, a, namespace)
        raise _Parsed

    def parse_known_args(self, a=None, namespace=None):
        result = original_known(self, a, namespace)
        if not inside:  # a script that only parses known args: stop here too
            got["args"] = result[0]
            raise _Parsed
        return result

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args), \
            mock.patch.object(sys, "argv", [script, *args]), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except _Parsed:
            return got["args"]
        except SystemExit:
            pytest.fail(f"{ex.doc}: `{ex.text}` is refused by the script: {err.getvalue().strip()[-500:]}")
    pytest.fail(f"{ex.doc}: `{ex.text}`: the script ended without parsing arguments with argparse")


def check_static(ex: Example, parser: argparse.ArgumentParser) -> None:
    argv = ex.argv
    check_paths(ex, argv)
    if argv[0] == "vilex":
        check_vilex(ex, argv[1:], parser)
    elif argv[0] == "python" and argv[1:3] == ["-m", "vilex"]:
        check_vilex(ex, argv[3:], parser)
    elif argv[0] == "python" and argv[1] == "-m":
        import importlib.util

        assert importlib.util.find_spec(argv[2]) is not None, f"{ex.doc}: `{ex.text}`: no module {argv[2]}"
    elif argv[0] == "python":
        assert (REPO / argv[1]).is_file(), f"{ex.doc}: `{ex.text}`: no script {argv[1]}"
        if not ex.inline or len(argv) > 2:
            parse_script_args(ex, argv[1], argv[2:])
    elif argv[0] == "bash" or argv[0].endswith(".sh"):
        script = argv[1] if argv[0] == "bash" else argv[0]
        assert (REPO / script).is_file(), f"{ex.doc}: `{ex.text}`: no script {script}"
        syntax = subprocess.run(["bash", "-n", str(REPO / script)], check=False, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{ex.doc}: {script}: {syntax.stderr}"
        if script == "scripts/launch.sh":
            assert os.access(REPO / script, os.X_OK), f"{script} is not executable"
            assert re.fullmatch(r"[1-9]\d*", argv[1]), f"{ex.doc}: `{ex.text}`: NPROC must be a number"
            check_vilex(ex, argv[2:], parser)
    elif argv[0] == "torchrun":
        module = argv.index("-m")
        assert argv[module + 1] == "vilex", f"{ex.doc}: `{ex.text}`: only `-m vilex` is checked here"
        check_vilex(ex, argv[module + 2:], parser)
    elif argv[0] == "make":
        targets = re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
        assert set(argv[1:]) <= set(targets), f"{ex.doc}: `{ex.text}`: no such make target"
    else:  # pragma: no cover - the collector only returns the starts above
        pytest.fail(f"{ex.doc}: `{ex.text}`: not a command this test knows how to check")


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("doc", DOCS)
def test_the_collector_finds_the_examples(doc):
    blocks, inline = documented(doc)
    assert len(blocks) >= MIN_EXAMPLES[doc], [e.text for e in blocks]
    assert len(inline) >= MIN_INLINE[doc], [e.text for e in inline]


def test_every_allow_list_and_run_entry_is_documented():
    """A stale entry (its command changed or gone from the docs) fails, so the lists stay what the docs show."""
    commands = {e.text for doc in DOCS for e in documented(doc)[0]}
    assert not set(ALLOWED) - commands, set(ALLOWED) - commands
    assert not set(RUN) - commands, set(RUN) - commands
    assert not set(ALLOWED) & set(RUN)
    assert all(ALLOWED.values()), "every allowed command says why it cannot run here"


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_is_valid(doc, parser):
    blocks, inline = documented(doc)
    for ex in blocks + inline:
        check_static(ex, parser)


def test_set_overrides_in_the_prose_are_keys_of_every_stage0_config():
    """scripts/toy/README.md: "any config value can be overridden with --set ...": its examples load with every
    stage-0 config, and the form it calls rejected is rejected."""
    from toy.cli import STAGE0_COMMANDS, _import

    text = re.sub(r"^```.*?^```", "", (REPO / "scripts/toy/README.md").read_text(), flags=re.DOTALL | re.MULTILINE)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)]
    examples = [s for s in spans if re.fullmatch(r"(--set \S+=\S+)( --set \S+=\S+)*", s) and "key=value" not in s]
    assert examples
    files = {"train-probe": "probe", "pretrain-decoder": "decoder", "pretrain-siglip": "siglip",
             "pretrain-text-encoder": "text_encoder", "pretrain-llm": "llm", "pretrain-vae": "sd_vae"}
    for spec in STAGE0_COMMANDS:
        for span in examples:
            load_config(_import(spec.config), REPO / f"configs/toy/{files[spec.name]}.yaml", shlex.split(span)[1::2])
    assert "`--set a=1 b=2` is rejected" in " ".join(text.split())
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["toy", "pretrain-llm", "--config", "configs/toy/llm.yaml", "--set", "a=1", "b=2"])


# ---------------------------------------------------------------------------------------------------- execution
@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A repository root whose configs/, assets/ and scripts/ are the real ones (read-only use) and whose runs/ is
    new: the documented relative paths work as written and every output stays in the temp folder."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in SANDBOX_LINKS:
        (root / name).symlink_to(REPO / name)
    monkeypatch.chdir(root)
    return root


def _vilex(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def _dry_run(ex: Example, argv: list[str], capsys) -> None:
    """``vilex ... --dry-run``: no problems, or only those expected for its config."""
    if "--dry-run" not in argv:
        argv = [*argv, "--dry-run"]
    rc, out = _vilex(argv, capsys)
    problems = re.findall(r"^  - (.*)$", out.split("the run would stop:")[-1], flags=re.MULTILINE) if rc else []
    config = argv[argv.index("--config") + 1] if "--config" in argv else ""
    allowed = next((v for k, v in EXPECTED_DRY_RUN_PROBLEMS.items() if config.startswith(k)), [])
    unexpected = [p for p in problems if not any(re.search(a, p) for a in allowed)]
    assert rc in (0, 2) and not unexpected and (rc == 0 or problems), \
        f"{ex.doc}: `{ex.text}` --dry-run (exit {rc}):\n{out[-3000:]}"


def _has_dry_run(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    return "--dry-run" in _option_strings(_subcommand(parser, argv)[1])


def _run_for_real(ex: Example, parser: argparse.ArgumentParser, capsys) -> None:
    text = ex.text
    for old, new in RUN[ex.text].items():
        assert old in text, f"RUN edit {old!r} no longer matches `{ex.text}`"
        text = text.replace(old, new)
    argv = shlex.split(text)
    outputs = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--out", "--output", "--run")]
    assert not [o for o in outputs if not o.startswith("runs/")], f"`{text}` would write outside runs/"
    assert argv[0] == "vilex", f"RUN only runs vilex commands in-process; `{text}`"
    rc, out = _vilex(argv[1:], capsys)
    assert rc == 0, f"{ex.doc}: `{text}` (exit {rc}):\n{out[-3000:]}"


def _assets_state() -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in (REPO / "assets" / "toy").rglob("*"))


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, sandbox, parser, capsys):
    blocks, _ = documented(doc)
    before = _assets_state()
    for ex in blocks:
        argv = ex.argv
        if ex.text in ALLOWED:
            continue  # checked statically (test_every_documented_command_is_valid); the reason is in ALLOWED
        if ex.text in RUN:
            _run_for_real(ex, parser, capsys)
        elif argv[0] == "scripts/launch.sh":
            processes = int(argv[1]) * int(ex.env.get("NNODES", "1"))
            _dry_run(ex, [*argv[2:], "--processes", str(processes)], capsys)
        elif argv[0] == "vilex" and _has_dry_run(parser, argv[1:]):
            _dry_run(ex, argv[1:], capsys)
        else:
            pytest.fail(f"{doc}: `{ex.text}` is not classified: add it to RUN (cheap: it runs here) or ALLOWED "
                        "(with the reason it cannot)")
    assert _assets_state() == before, "a documented command changed the shipped assets"


def test_readme_training_at_scale_data_block_is_a_valid_data_section(tmp_path):
    """The YAML data block of README's "Training at scale" loads into a stage-1 config with its values kept."""
    import yaml

    from vilex.train.config import PretrainConfig

    text = (REPO / "README.md").read_text()
    section = text.split("## Training at scale", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    data = yaml.safe_load(block)["data"]
    config = tmp_path / "scale.yaml"
    config.write_text((REPO / "configs/vilex/sd15_siglip_so400m.yaml").read_text())
    overrides = [f"data.train.{k}={v}" for k, v in data["train"].items() if k != "remote"]
    overrides += [f"data.train.remote.{k}={v}" for k, v in data["train"]["remote"].items()]
    cfg = load_config(PretrainConfig, str(config), [o.replace("'", '"') for o in overrides])
    assert cfg.data.train.type == "webdataset" and cfg.data.train.paths[0].startswith("s3://")
    assert cfg.data.train.num_workers == 6 and cfg.data.train.remote.retries == 3

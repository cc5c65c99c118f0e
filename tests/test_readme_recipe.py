"""README.md's "Real data, end to end" recipe, run command for command with tiny models and tiny data.

The recipe's ```bash blocks are read from README.md (from its heading to the next ``## ``) and split into
statements. Assignments of plain variables (``DATA=…``, ``export HF_HOME=…``) are replaced by the test's own values;
every command then runs as written, in bash, from the repository root, after these mechanical substitutions only:

* the variables point at a tiny world built here: a folder of PNGs with ``metadata.jsonl`` (plus one broken file), a
  held-out folder without captions, LLaVA JSON at the paths the recipe names (plus one sample whose image is missing),
  the toy-world benchmark task ``vilex_toy_colour``; ``NGPU=2`` (``scripts/launch.sh`` starts 2 CPU processes, gloo)
  and ``STEPS=2``;
* the REAL configs are used (configs/vilex/sd15_siglip_so400m.yaml, configs/vlm/qwen2.5-7b_vilex.yaml,
  configs/benchmarks/paper15.yaml, DeepSpeed ZeRO-2/3 included); ``tiny_overrides`` are appended to the recipe's
  option arrays (``STAGE1``, ``STAGE2``, ``SWEEP``): tiny SigLIP / SD / Qwen2 folders, fp32, small batches, the toy
  task on CPU. A later ``--set`` wins, so the recipe's own values are overridden only where listed there;
* ``appended`` flags follow two commands (eval-recon: fewer tokens, images, steps, ``--device cpu``; eval prepare:
  the toy task instead of the 15 hub tasks).

``SKIPPED`` commands are not run: the ``hf download`` lines need the network; the fast test checks that their flags
exist in ``hf download --help`` and that they download exactly the hub ids the configs name.

Fast tests: the recipe has exactly ``EXPECTED_COMMANDS`` (so deleting one fails) and its variables; every command,
expanded with the recipe's own variables, names an existing subcommand, spells out flags it accepts and ``--set``s
valid keys and values of the real config (and of the SD 2.1 one it names); every config key the section's prose
names exists.
test_recipe_runs_end_to_end (slow, ~2 min on 2 cores) runs the recipe and checks what the README says it leaves:
the layouts of its ```text blocks, pipeline/training.json, the reconstruction table, the export, the sweep's table.
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## Real data, end to end"

# The recipe's commands, in order ("launch" = scripts/launch.sh NPROC ...): deleting, adding or reordering one fails.
EXPECTED_COMMANDS = [
    "vilex data inspect",
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5",
    "hf download stabilityai/stable-diffusion-2-1-base",
    "hf download google/siglip-so400m-patch14-224",
    "hf download Qwen/Qwen2.5-7B-Instruct",
    "vilex eval prepare",
    "vilex pretrain --dry-run",
    "vilex cache-latents",
    "launch pretrain",
    "vilex eval-recon",
    "vilex train-vlm --stage align --dry-run",
    "launch train-vlm --stage align",
    "launch train-vlm --stage instruct",
    "vilex export-hf",
    "vilex eval --dry-run",
    "vilex eval",
    "vilex eval report",
]
SKIPPED = {name: "downloads from the Hugging Face hub (this test is offline; tiny local folders stand in for the "
                 "weights, and test_recipe_commands_parse checks the command's flags and hub id)"
           for name in EXPECTED_COMMANDS if name.startswith("hf download")}
VARIABLES = {"DATA", "HELDOUT", "LLAVA", "BENCH", "RUN", "STEPS", "VLM", "EVAL", "NGPU", "HF_HOME", "HF_HUB_OFFLINE"}
ARRAYS = {"SD_FILES", "STAGE1", "STAGE2", "SWEEP"}
TASK = "vilex_toy_colour"
STEPS = 2
NGPU = 2


def tiny_overrides(w: Path) -> dict[str, list[str]]:
    """``--set`` overrides appended to each option array of the recipe: the real configs on tiny models."""
    def sets(*pairs: str) -> list[str]:
        return [word for pair in pairs for word in ("--set", pair)]

    return {
        "STAGE1": sets(f"model.vit.name_or_path={w / 'siglip'}", "model.pooler.num_tokens=8", "model.pooler.depth=1",
                       "model.pooler.heads=2", "model.pooler.width=32", f"model.decoder.name_or_path={w / 'sd'}",
                       "model.decoder.resolution=null", "model.decoder.dtype=float32", "train.precision=fp32",
                       "train.global_batch_size=4", "train.micro_batch_size=1", "train.checkpoint_every=1",
                       "train.optim.warmup_steps=0", f"val.every={STEPS}", "val.num_images=2",
                       "val.num_inference_steps=2", "val.token_counts=[1,-1]"),
        "STAGE2": sets(f"model.llm.name_or_path={w / 'llm'}", "model.llm.dtype=float32",
                       *(f"{stage}.{key}" for stage in ("align", "instruct")
                         for key in ("precision=fp32", f"max_steps={STEPS}", "global_batch_size=4",
                                     "micro_batch_size=1", "data.num_workers=0"))),
        "SWEEP": sets(f"tasks=[{TASK}]", "limit=2", "devices=[cpu]"),
    }


def appended(w: Path) -> dict[str, list[str]]:
    return {"vilex eval-recon": ["--num-tokens", "1", "8", "--num-images", "4", "--steps", "2", "--device", "cpu"],
            "vilex eval prepare": ["--set", f"tasks=[{TASK}]", "--set", f"include_path={w / 'toy_tasks'}"]}


# ----------------------------------------------------------------------------------------------- reading the recipe
def section() -> str:
    text = README.read_text()
    assert text.count(HEADING + "\n") == 1, f"README.md has no (or more than one) '{HEADING}' section"
    body = text.split(HEADING + "\n", 1)[1]
    return body.split("\n## ", 1)[0]


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#(\s.*)?$", "", line).rstrip()


def statements() -> list[str]:
    """The bash blocks' statements, comments removed; an array's lines and ``\\``-continued lines joined."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section(), flags=re.DOTALL):
        pending = ""
        for line in block.splitlines():
            line = _strip_comment(line)
            if not line.strip() and not pending:
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\") or pending.count("(") > pending.count(")"):
                continue
            out.append(pending.strip())
            pending = ""
        assert not pending, f"unfinished statement in a bash block: {pending!r}"
    return out


ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Z_][A-Z0-9_]*)=")


def assignments(stmt: str) -> list[str]:
    """Names a statement assigns (``A=1``, ``export A=1 B=2``, ``A=(...)``); [] for a command."""
    if not ASSIGNMENT.match(stmt):
        return []
    if re.match(r"^[A-Z_][A-Z0-9_]*=\(", stmt):
        return [stmt.split("=", 1)[0]]
    return [word.split("=", 1)[0] for word in shlex.split(stmt) if "=" in word]


def signature(stmt: str) -> str:
    words = shlex.split(stmt)
    if words[0] == "hf":
        return " ".join(words[:3])
    if words[0] == "scripts/launch.sh":
        words = ["launch", *words[2:]]
    head = []
    for word in words:
        if word.startswith(("-", "$")):
            break
        head.append(word)
    if "--stage" in words:
        head += ["--stage", words[words.index("--stage") + 1]]
    if "--dry-run" in words:
        head.append("--dry-run")
    return " ".join(head)


def commands() -> list[str]:
    return [s for s in statements() if not assignments(s)]


def text_blocks() -> list[str]:
    return re.findall(r"```text\n(.*?)```", section(), flags=re.DOTALL)


# ----------------------------------------------------------------------------------------------- fast checks
def test_recipe_has_the_expected_statements():
    stmts = statements()
    assert [signature(c) for c in commands()] == EXPECTED_COMMANDS
    names = [name for s in stmts for name in assignments(s)]
    assert set(names) == VARIABLES | ARRAYS and len(names) == len(set(names)), names
    arrays = [s.split("=", 1)[0] for s in stmts if re.match(r"^[A-Z_][A-Z0-9_]*=\(", s)]
    assert set(arrays) == ARRAYS
    roots = [block.splitlines()[0].split()[0] for block in text_blocks()]
    assert roots == ["$RUN/", "$VLM/instruct/"]


def _expand(stmts: list[str], cwd: Path) -> list[list[str]]:
    """argv of every command, as bash expands it after the recipe's own assignments (nothing is run)."""
    script = ["set -euo pipefail"]
    for stmt in stmts:
        if assignments(stmt):
            script.append(stmt)
        else:
            script.append(f"set -- {stmt}\nprintf '%s\\0' \"$@\"; printf '\\1\\0'")
    out = subprocess.run(["bash", "-c", "\n".join(script)], check=False, capture_output=True, text=True, cwd=cwd,
                         env={k: v for k, v in os.environ.items() if k not in VARIABLES})
    assert out.returncode == 0, out.stderr
    argvs, current = [], []
    for word in out.stdout.split("\0")[:-1]:
        if word == "\1":
            argvs.append(current)
            current = []
        else:
            current.append(word)
    return argvs


def _option_strings(parser, words: list[str]) -> set[str]:
    """The option strings of the command ``words`` names (its subcommand chain, e.g. ``eval prepare``)."""
    found = set()
    for word in [None, *words]:
        if word is not None:
            if word.startswith("-"):
                break
            sub = next((a.choices[word] for a in parser._actions if isinstance(getattr(a, "choices", None), dict)
                        and word in a.choices), None)
            if sub is None:
                break
            parser = sub
        found |= {s for a in parser._actions for s in a.option_strings}
    return found


def _config_class(args):
    from benchmarks.sweep import SweepConfig
    from vilex.train.config import PretrainConfig
    from vlm.config import VLMConfig

    if args.command in ("pretrain", "cache-latents"):
        return PretrainConfig, args.config
    if args.command == "train-vlm":
        return VLMConfig, args.config
    if args.command == "eval" and args.eval_action == "prepare":
        return SweepConfig, args.suite
    if args.command == "eval" and args.eval_action is None:
        return SweepConfig, args.config
    return None, None


def test_recipe_commands_parse(tmp_path):
    """Every command: the subcommand exists, argparse takes every flag, every --set key and value loads into the
    real config; the hf download lines use flags `hf download` has and fetch exactly the hub ids the configs name."""
    import yaml

    from vilex.cli.main import build_parser
    from vilex.config import load_config

    stmts = statements()
    argvs = _expand(stmts, ROOT)
    assert len(argvs) == len(EXPECTED_COMMANDS)
    hub_ids, hf_flags = [], set()
    for name, argv in zip(EXPECTED_COMMANDS, argvs):
        if argv[0] == "hf":
            assert argv[1] == "download"
            hub_ids.append(argv[2])
            hf_flags |= {a for a in argv[3:] if a.startswith("--")}
            continue
        if argv[0] == "scripts/launch.sh":
            assert (ROOT / argv[0]).is_file() and os.access(ROOT / argv[0], os.X_OK)
            assert argv[1] == "8"  # NGPU
            argv = ["vilex", *argv[2:]]
        assert argv[0] == "vilex", argv
        parser = build_parser()
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"{name}: argparse refused {argv} (exit {e.code})")
        flags = _option_strings(parser, argv[1:])  # argparse takes abbreviations; the recipe spells flags out
        assert {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")} <= flags, (name, argv)
        cls, config = _config_class(args)
        if cls is None:
            continue
        assert Path(config).parts[0] == "configs" and (ROOT / config).is_file(), config
        configs = [config]
        if args.command in ("pretrain", "cache-latents"):  # the SD 2.1 alternative the recipe names
            assert "configs/vilex/sd21base_siglip_so400m.yaml" in section()
            configs.append("configs/vilex/sd21base_siglip_so400m.yaml")
        for path in configs:
            load_config(cls, ROOT / path, args.overrides)  # an unknown key or a bad value raises here

    # pre-caching: the hub ids the real configs name, no more, no less
    named = set()
    for path in ("configs/vilex/sd15_siglip_so400m.yaml", "configs/vilex/sd21base_siglip_so400m.yaml"):
        model = yaml.safe_load((ROOT / path).read_text())["model"]
        named |= {model["decoder"]["name_or_path"], model["vit"]["name_or_path"]}
    named.add(yaml.safe_load((ROOT / "configs/vlm/qwen2.5-7b_vilex.yaml").read_text())["model"]["llm"]["name_or_path"])
    assert sorted(hub_ids) == sorted(named)
    hf = Path(sys.executable).with_name("hf")
    help_text = subprocess.run([str(hf), "download", "--help"], check=False, capture_output=True, text=True,
                               env=dict(os.environ, NO_COLOR="1", COLUMNS="200")).stdout
    assert hf_flags and all(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) for flag in hf_flags), \
        (hf_flags, help_text[-2000:])


def _is_key(cls, dotted: str) -> bool:
    """Whether ``dotted`` names a field of config dataclass ``cls`` (through nested and Optional sections)."""
    import dataclasses
    import typing

    for i, part in enumerate(dotted.split(".")):
        if not dataclasses.is_dataclass(cls):
            return False
        if part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        hint = typing.get_type_hints(cls)[part]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        cls = inner[0] if inner else hint
    return True


def test_recipe_config_vocabulary_exists():
    """Every config key the section names, in code or prose (`train.max_steps`, `instruct.data.on_bad_image`,
    `latent_cache.enabled=false` ...), is a key of the stage-1 or the stage-2 config."""
    from vilex.train.config import PretrainConfig
    from vlm.config import VLMConfig

    keys = set(re.findall(r"(?<![\w./$-])((?:model|data|train|latent_cache|val|log|align|instruct)\.[A-Za-z_][\w.]*\w)",
                          section()))
    keys -= {"data.skipped"}  # a field of stage 2's summary.json, not a config key
    assert {"train.max_steps", "train.global_batch_size", "train.micro_batch_size", "model.decoder.resolution",
            "train.pipeline_weights", "train.ema_decay", "latent_cache.enabled"} <= keys
    unknown = sorted(k for k in keys if not (_is_key(PretrainConfig, k) or _is_key(VLMConfig, k)))
    assert not unknown, f"README's recipe names config keys that do not exist: {unknown}"


# ----------------------------------------------------------------------------------------------- the tiny world
def _png(path: Path, colour: tuple[int, int, int], size=(20, 18)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (250, 250, 250))
    image.paste(colour, (2, 2, 12, 12))
    image.save(path)


def build_world(w: Path) -> dict[str, str]:
    """Tiny weights, data and benchmark task under ``w``; returns the recipe's variables pointing at them."""
    from benchmarks.toy_tasks import materialize_toy_tasks
    from toy.scenes.generate import generate_dataset
    from vilex.models.tiny import build_tiny_sd
    from vlm.tiny import build_tiny_llm, build_tiny_siglip_folder, write_tiny_llava_data

    build_tiny_sd(w / "sd", image_size=16)
    build_tiny_siglip_folder(w / "siglip", width=32, layers=2, image_size=16, patch_size=4)
    build_tiny_llm(w / "llm")
    rng = random.Random(0)
    rows = []
    for i in range(8):  # training images: a folder with metadata.jsonl
        colour = tuple(rng.randrange(256) for _ in range(3))
        _png(w / "images" / "shop" / f"{i:04d}.png", colour)
        rows.append({"file_name": f"shop/{i:04d}.png", "caption": f"a square of colour {colour}", "source": "shop"})
    (w / "images" / "shop" / "broken.png").write_bytes(b"not a png")  # counted, skipped
    rows.append({"file_name": "shop/broken.png", "caption": "broken", "source": "shop"})
    (w / "images" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(4):  # held-out images without captions
        _png(w / "heldout" / f"{i:04d}.png", tuple(rng.randrange(256) for _ in range(3)))

    llava = w / "llava"  # LLaVA JSON where the recipe's overrides look for it
    write_tiny_llava_data(llava / "pretrain" / "images", n=8, kind="align")
    (llava / "pretrain" / "images" / "data.json").rename(llava / "pretrain" / "blip_laion_cc_sbu_558k.json")
    write_tiny_llava_data(llava / "finetune", n=8, kind="instruct")
    records = json.loads((llava / "finetune" / "data.json").read_text())
    records[0]["image"] = "images/missing.png"  # on_bad_image: skip drops it, counted as 'unreadable'
    (llava / "finetune" / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    (llava / "finetune" / "data.json").unlink()

    generate_dataset(w / "toy", n=8, seed=0, size=32, splits={"train": 0.5, "test": 0.5}, progress=False)
    materialize_toy_tasks(w / "toy" / "test", w / "toy_tasks")
    return {"DATA": str(w / "images"), "HELDOUT": str(w / "heldout"), "LLAVA": str(llava),
            "BENCH": str(w / "bench_cache"), "RUN": str(w / "runs" / "vilex-mine"), "STEPS": str(STEPS),
            "VLM": str(w / "runs" / "vlm-mine"), "EVAL": str(w / "runs" / "bench"), "NGPU": str(NGPU),
            "HF_HOME": str(w / "hf"), "HF_HUB_OFFLINE": "1"}


def _with_extra(array_stmt: str, extra: list[str]) -> str:
    """``NAME=(... )`` with ``extra`` words added before the closing parenthesis."""
    assert array_stmt.endswith(")"), array_stmt
    return array_stmt[:-1] + "\n  " + " ".join(shlex.quote(word) for word in extra) + ")"


def layout(block: str, subs: dict[str, str]) -> list[tuple[Path, str]]:
    """(path, comment) of every name in a ```text layout block: indentation (2 spaces) nests names under the folder
    named alone on the line above; ``N`` in ``checkpoint-N`` is the step, ``<R>`` each rank."""
    parents: list[Path] = []
    out = []
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        if not code.strip():
            continue
        depth = (len(code) - len(code.lstrip())) // 2
        names = code.split()
        for name in names:
            name = name.replace("checkpoint-N", f"checkpoint-{subs['STEPS']}")
            for var, value in subs.items():
                name = name.replace(f"${var}", value)
            ranks = [name.replace("<R>", str(r)) for r in range(int(subs["NGPU"]))] if "<R>" in name else [name]
            for item in ranks:
                path = Path(item) if depth == 0 else parents[depth - 1] / item
                out.append((path, comment.strip()))
        if len(names) == 1 and names[0].endswith("/"):
            parents[depth:] = [out[-1][0]]
    return out


def _run(stmt: str, arrays: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    script = "\n".join(["set -euo pipefail", *arrays, stmt])
    env = dict(env, MASTER_PORT=str(random.randint(20000, 40000)))
    return subprocess.run(["bash", "-c", script], check=False, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path):
    subs = build_world(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(subs, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               VILEX_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    extra_arrays, extra_flags = tiny_overrides(tmp_path), appended(tmp_path)

    arrays: list[str] = []
    stdout: dict[str, str] = {}
    for stmt in statements():
        names = assignments(stmt)
        if names:
            if names[0] in ARRAYS:
                arrays.append(_with_extra(stmt, extra_arrays[names[0]]) if names[0] in extra_arrays else stmt)
            continue  # plain variables: the test's values (subs) are in the environment
        name = signature(stmt)
        if name in SKIPPED:
            continue
        command = " ".join([stmt, *map(shlex.quote, extra_flags.get(name, []))])
        done = _run(command, arrays, env)
        assert done.returncode == 0, f"{name} failed:\n{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        stdout[name] = done.stdout
    assert sorted(stdout) == sorted(set(EXPECTED_COMMANDS) - set(SKIPPED))  # every other command ran

    run, vlm, bench = Path(subs["RUN"]), Path(subs["VLM"]), Path(subs["EVAL"])
    # 1. the data as the data layer sees it: 9 files named in metadata.jsonl, the broken one counted
    inspected = json.loads(stdout["vilex data inspect"])
    assert inspected["samples"] == 9 and inspected["skipped_total"] == 1
    # 2. the benchmark task saved for offline use
    assert _last_json(stdout["vilex eval prepare"]) == {TASK: "saved"}
    # 3. stage 1
    assert "no problems found" in stdout["vilex pretrain --dry-run"]
    assert json.loads(stdout["vilex cache-latents"])["entries"] == 8
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    # 5. the layout the README states (deepspeed, as the configs run; the torch-only files absent)
    for block in text_blocks():
        for path, comment in layout(block, subs):
            if "strategy torch" in comment:
                assert not path.exists(), path
            else:
                assert path.exists(), f"README's layout names {path}, which the run did not write"
    training = json.loads((run / "checkpoints" / f"checkpoint-{STEPS}" / "pipeline" / "training.json").read_text())
    assert training == {"step": STEPS, "encoder_weights": "ema", "ema_decay": 0.9999}
    assert all(f'"{key}"' in section() for key in training)
    # 4. the reconstruction table from the run folder; held-out images without captions: the note
    table = (run / "recon" / "recon_table.md").read_text()
    assert "| ViLex, 1 token(s) |" in table and "| ViLex, 8 token(s) |" in table
    assert "Caption baseline skipped: 4 of 4 images have no 'caption' field" in table
    assert (run / "recon" / "recon_table.json").is_file() and (run / "recon" / "recon_examples.png").is_file()
    # 6. the VLM: both stages, the tower on the stage-1 checkpoint, the missing image skipped and counted
    assert "no problems found" in stdout["vilex train-vlm --stage align --dry-run"]
    for stage in ("align", "instruct"):
        assert json.loads((vlm / stage / "summary.json").read_text())["steps"] == STEPS
    assert json.loads((vlm / "instruct" / "summary.json").read_text())["data"]["skipped"] == {"unreadable": 1}
    meta = json.loads((vlm / "instruct" / "checkpoints" / f"checkpoint-{STEPS}" / "vlm_config.json").read_text())
    assert meta["model"]["tower"] == {**meta["model"]["tower"], "type": "vilex",
                                      "name_or_path": str(run / "checkpoints" / f"checkpoint-{STEPS}" / "pipeline")}
    # 7. the export
    exported = json.loads((vlm / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["LlavaForConditionalGeneration"]
    # 8. the sweep: the plan, the run, the table
    assert _last_json(stdout["vilex eval --dry-run"])["pairs"] == 1
    assert _last_json(stdout["vilex eval"]) == {"done": 1, "skipped": 0, "failed": 0, "elsewhere": 0}
    results = (bench / "results.md").read_text()
    assert results.splitlines()[0] == "| task | metric | vilex |" and f"| {TASK} | exact_match |" in results

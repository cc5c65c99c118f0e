"""cli/demo_cmd.py — ``vilex demo``: the end-to-end demo on the toy world, written up in report.md.

The demo is an ordered list of steps (``DEMO_STEPS``). Each step is one function taking the shared
``DemoContext``: it writes its files under ``ctx.out``, hands results to later steps through
``ctx.artifacts`` and appends one markdown section to the report. The report is rewritten after
every step, so a failure late in the demo still leaves the earlier sections readable.

Adding a stage to the demo = one function decorated with ``@demo_step("name")`` in a module listed
in ``DEMO_STEP_MODULES`` (imported when the demo runs; missing optional modules are skipped).
Today the steps are: generate the toy dataset, write its contact sheet and statistics, then the stage-1
sections (vilex/toy/demo_stage1.py): a short ViLex run and the shipped full run, each measured.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vilex.cli.main import command

log = logging.getLogger(__name__)

# Modules whose import registers further demo steps (later stages append theirs here).
DEMO_STEP_MODULES: list[str] = ["vilex.toy.demo_stage1", "vilex.toy.demo_stage2"]


@dataclass
class DemoContext:
    """What the steps share: the output folder, the CLI options, results, and the report sections."""

    out: Path
    options: argparse.Namespace
    artifacts: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    title: str = "ViLex demo report"

    def add_section(self, markdown: str) -> None:
        self.sections.append(markdown.strip() + "\n")

    def write_report(self) -> Path:
        path = self.out / "report.md"
        header = (f"# {self.title}\n\n"
                  f"`vilex demo --out {self.out} --n {self.options.n} --seed {self.options.seed} "
                  f"--size {self.options.size}`\n")
        path.write_text("\n".join([header, *self.sections]), encoding="utf-8")
        return path


@dataclass
class DemoStep:
    name: str
    run: Callable[[DemoContext], None]


DEMO_STEPS: list[DemoStep] = []


def demo_step(name: str, after: str | None = None) -> Callable[[Callable[[DemoContext], None]], Callable]:
    """Register ``fn(ctx)`` as a demo step, at the end or right after the step named ``after``."""

    def deco(fn: Callable[[DemoContext], None]) -> Callable[[DemoContext], None]:
        if any(s.name == name for s in DEMO_STEPS):
            raise ValueError(f"demo step '{name}' is already registered")
        step = DemoStep(name, fn)
        names = [s.name for s in DEMO_STEPS]
        DEMO_STEPS.insert(names.index(after) + 1 if after in names else len(DEMO_STEPS), step)
        return fn

    return deco


# --- the toy-world steps ----------------------------------------------------------------------------
@demo_step("toy data")
def step_toy_data(ctx: DemoContext) -> None:
    """Generate the toy dataset under out/data and write out/dataset_stats.json."""
    from vilex.toy.generate import generate_dataset

    data = ctx.out / "data"
    stats = generate_dataset(data, n=ctx.options.n, seed=ctx.options.seed, size=ctx.options.size,
                             overwrite=True)
    (ctx.out / "dataset_stats.json").write_text(json.dumps(stats, sort_keys=True, indent=2) + "\n",
                                                encoding="utf-8")
    ctx.artifacts["toy_data"] = data
    ctx.artifacts["toy_stats"] = stats
    ctx.add_section("## Toy dataset\n\n"
                    f"{stats['scenes']} procedural scenes at {ctx.options.size}px in `{data}` "
                    "(images, label-map masks, coarse and fine captions, QA, scene graphs; "
                    "`metadata.jsonl` + `metadata.parquet` per split).\n\n" + stats_table(stats))


@demo_step("contact sheet")
def step_contact_sheet(ctx: DemoContext) -> None:
    """The first training scenes with their coarse captions -> out/contact_sheet.png."""
    from vilex.toy.contact_sheet import contact_sheet_from_split

    data: Path = ctx.artifacts["toy_data"]
    first_split = next(iter(ctx.artifacts["toy_stats"]["scenes_per_split"]))
    sheet = contact_sheet_from_split(data / first_split, ctx.out / "contact_sheet.png", n=24)
    ctx.add_section(f"## Contact sheet\n\nThe first {first_split} scenes with their coarse captions.\n\n"
                    f"![contact sheet]({sheet.name})")


def stats_table(stats: dict[str, Any]) -> str:
    """A two-column markdown table of the toy dataset statistics."""

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {v2}" for k, v2 in v.items())
        return str(v)

    rows = [("scenes", stats["scenes"]), ("scenes per split", stats["scenes_per_split"]),
            ("objects", stats["objects"]), ("objects per scene", stats["objects_per_scene"]),
            ("shapes", stats["shapes"]), ("colours", stats["colours"]), ("backgrounds", stats["backgrounds"]),
            ("QA pairs", stats["qa_total"]), ("QA types", stats["qa_types"]),
            ("existence answers", stats["existence_answers"]),
            ("mean caption words", stats["caption_words_mean"]),
            ("caption vocabulary", stats["caption_vocab_size"]),
            ("redrawn scenes", stats.get("redrawn", {}))]
    return "\n".join(["| statistic | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in rows)])


# --- the command ------------------------------------------------------------------------------------
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n", type=int, default=512, help="toy scenes to generate (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=32, help="toy image side in pixels (default 32)")
    p.add_argument("--short-steps", type=int, default=120,
                   help="steps of the short stage-1 ViLex run (default 120; 0 = skip it)")
    p.add_argument("--short-batch", type=int, default=16, help="batch of the short stage-1 run (default 16)")
    p.add_argument("--eval-scenes", type=int, default=32,
                   help="held-out scenes per stage-1 measurement (default 32; 0 = skip the shipped-run section)")
    p.add_argument("--vlm-steps", type=int, default=60,
                   help="instruct steps of the short stage-2 VLM run (align gets a third; default 60, 0 = skip)")
    p.add_argument("--suite-docs", type=int, default=40,
                   help="docs per toy-suite task for the shipped toy VLMs (default 40, 0 = skip)")


@command("demo", help="run the demo on the toy world and write OUT/report.md")(_configure)
def run_demo(args: argparse.Namespace) -> int:
    for mod in DEMO_STEP_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise
            log.info("demo: optional step module %s not present, its steps are skipped", mod)
    ctx = DemoContext(out=Path(args.out), options=args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(DEMO_STEPS, start=1):
        t0 = time.perf_counter()
        log.info("demo step %d/%d: %s", i, len(DEMO_STEPS), step.name)
        step.run(ctx)
        ctx.write_report()
        log.info("demo step %s done in %.1f s", step.name, time.perf_counter() - t0)
    print(f"report: {ctx.write_report()}")
    return 0

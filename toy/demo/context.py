"""toy/demo/context.py — what the steps of ``vilex demo`` share, and the ordered list of steps.

The demo is an ordered list of steps (``DEMO_STEPS``). Each step is one function taking the shared
``DemoContext``: it writes its files under ``ctx.out``, hands results to later steps through
``ctx.artifacts`` and appends one markdown section to the report. The report is rewritten after
every step, so a failure late in the demo still leaves the earlier sections readable.

Adding a stage to the demo = one function decorated with ``@demo_step("name")`` in a module listed
in ``DEMO_STEP_MODULES`` (imported, in that order, when the demo runs). The steps: the toy dataset, its
statistics and contact sheet (data_steps.py); the stage-1 sections (stage1.py): a short ViLex run and the shipped
full run, each measured; the stage-2 sections (stage2.py): a short toy VLM run and the shipped toy VLMs on the toy
benchmark suite.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose import registers the demo steps, in report order.
DEMO_STEP_MODULES: list[str] = ["toy.demo.data_steps", "toy.demo.stage1", "toy.demo.stage2"]


@dataclass
class DemoContext:
    """What the steps share: the output folder, the CLI options, results, and the report sections."""

    out: Path
    options: argparse.Namespace
    artifacts: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)
    title: str = "ViLex demo report"

    def add_section(self, markdown: str, lead: bool = False) -> None:
        """Append a report section; ``lead`` puts it right under the title, before every other section (the
        shipped run's claims lead the report whichever step measures them)."""
        (self.lead if lead else self.sections).append(markdown.strip() + "\n")

    def write_report(self) -> Path:
        path = self.out / "report.md"
        header = (f"# {self.title}\n\n"
                  f"`vilex demo --out {self.out} --n {self.options.n} --seed {self.options.seed} "
                  f"--size {self.options.size}`\n")
        path.write_text("\n".join([header, *self.lead, *self.sections]), encoding="utf-8")
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

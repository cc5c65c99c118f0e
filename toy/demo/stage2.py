"""toy/demo/stage2.py — the stage-2 sections of `vilex demo`: a short toy VLM run and the toy benchmark suite.

* "stage 2 short run": trains the toy SigLIP-tower VLM briefly (``--vlm-steps``: align, then instruct) with the SAME
  trainer and config as the shipped toy VLMs (configs/vlm/toy_siglip.yaml) on the demo's own toy data, so a user
  sees the loop work; reports the losses.
* "stage 2 toy suite": the shipped toy VLMs (assets/toy/vlm/<tower>: SigLIP, ViLex, ViLex + tokens; plus the short
  run) through the lmms-eval toy suite (benchmarks/toy_tasks.py) on the demo's held-out test scenes, with the
  resumable sweep runner (one worker process per model) and `vilex eval report`; the table and plot go into the
  report, with each question type's chance level.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from toy.demo.context import DemoContext, demo_step
from toy.demo.stage1 import ASSETS, REPO

log = logging.getLogger(__name__)

TOY_VLM_CONFIG = REPO / "configs" / "vlm" / "toy_siglip.yaml"
SHIPPED_TOWERS = ("siglip", "vilex", "vilex_tokens")  # assets/toy/vlm/<name>; the first is the report's baseline


def _short_run_config(ctx: DemoContext, data: Path, out: Path, steps: int, samples: dict[str, int]):
    """configs/vlm/toy_siglip.yaml on the demo data; a batch larger than a small demo dataset is cut to fit."""
    from vilex.config import load_config
    from vlm.config import VLMConfig

    align_steps = max(1, steps // 3)
    base = load_config(VLMConfig, TOY_VLM_CONFIG)
    batches = []
    for stage in ("align", "instruct"):
        b = min(base.stage(stage).global_batch_size, samples[stage])
        batches += [f"{stage}.global_batch_size={b}", f"{stage}.micro_batch_size={b}"]
    return load_config(VLMConfig, TOY_VLM_CONFIG, batches + [
        f"model.tower.name_or_path={ASSETS / 'siglip' / 'vision'}", f"model.llm.name_or_path={ASSETS / 'llm'}",
        f"align.data.json={data / 'align.json'}", f"align.data.image_root={ctx.artifacts['toy_data'] / 'train'}",
        f"instruct.data.json={data / 'instruct.json'}",
        f"instruct.data.image_root={ctx.artifacts['toy_data'] / 'train'}",
        f"align.max_steps={align_steps}", f"instruct.max_steps={steps}", "align.log_every=5", "instruct.log_every=10",
        f"align.checkpoint_every={align_steps}", f"instruct.checkpoint_every={steps}", f"output_dir={out}",
    ])


@demo_step("stage 2 short run")
def step_vlm_short_run(ctx: DemoContext) -> None:
    """Align + instruct the toy SigLIP VLM for a few steps on the demo data (same trainer and config as shipped)."""
    from toy.vlm_data import write_vlm_data
    from vlm.train import train_vlm

    title = "## Stage 2: short toy VLM run"
    steps = ctx.options.vlm_steps
    if steps == 0:
        ctx.add_section(f"{title}\n\nSkipped (`--vlm-steps 0`).")
        return
    missing = [p for p in (ASSETS / "siglip" / "vision", ASSETS / "llm") if not p.exists()]
    if missing:
        ctx.add_section(f"{title}\n\nSkipped: {', '.join(map(str, missing))} not found (make them with `vilex toy "
                        "pretrain-siglip` and `vilex toy pretrain-llm`; see scripts/toy/README.md).")
        return
    data = ctx.out / "vlm_data"
    info = write_vlm_data(ctx.artifacts["toy_data"] / "train", data)
    out = ctx.out / "vlm_short"
    cfg = _short_run_config(ctx, data, out, steps, {k: v["samples"] for k, v in info["files"].items()})
    rows = []
    for stage in ("align", "instruct"):
        summary = train_vlm(cfg, stage, resume="auto")
        losses = summary["losses"]
        k = max(1, len(losses) // 5)
        rows.append(f"| {stage} | {summary['steps']} | {cfg.stage(stage).global_batch_size} | "
                    f"{sum(losses[:k]) / k:.3f} | {sum(losses[-k:]) / k:.3f} |")
    ctx.artifacts["vlm_short"] = out / "instruct"
    ctx.add_section(
        f"{title}\n\n`vilex train-vlm --config configs/vlm/toy_siglip.yaml` on the demo's "
        f"{info['files']['instruct']['samples']} instruct / {info['files']['align']['samples']} align samples "
        f"(toy SigLIP tower, 0.5M-parameter toy chat LLM); losses averaged over the first and last fifth of the "
        f"steps.\n\n| stage | steps | batch | loss (start) | loss (end) |\n|---|---|---|---|---|\n" + "\n".join(rows))


@demo_step("stage 2 toy suite", after="stage 2 short run")
def step_vlm_toy_suite(ctx: DemoContext) -> None:
    """The shipped toy VLMs (+ the short run) on the lmms-eval toy suite over the demo's test scenes."""
    from benchmarks.report import write_report
    from benchmarks.sweep import SweepConfig, run_sweep
    from benchmarks.toy_tasks import TOY_TASKS, materialize_toy_tasks
    from vilex.config import from_dict
    from toy.vlm_data import qa_chance, read_split

    title = "## Stage 2: toy VLMs on the toy benchmark suite (lmms-eval)"
    if ctx.options.suite_docs == 0:
        ctx.add_section(f"{title}\n\nSkipped (`--suite-docs 0`).")
        return
    models = {name: str(ASSETS / "vlm" / name) for name in SHIPPED_TOWERS
              if (ASSETS / "vlm" / name / "vlm_config.json").is_file()}
    if "vlm_short" in ctx.artifacts:
        models["siglip_demo_short_run"] = str(ctx.artifacts["vlm_short"])
    absent = [name for name in SHIPPED_TOWERS if name not in models]
    if not models:
        ctx.add_section(f"{title}\n\nNo toy VLM to evaluate: assets/toy/vlm/ is empty and the short run was skipped.")
        return
    test = ctx.artifacts["toy_data"] / "test"
    tasks_dir = ctx.out / "toy_tasks"
    materialize_toy_tasks(test, tasks_dir, max_per_task=ctx.options.suite_docs)
    bench = ctx.out / "bench"
    cfg = from_dict(SweepConfig, {"models": models, "tasks": list(TOY_TASKS), "include_path": str(tasks_dir),
                                  "output_dir": str(bench), "process_per": "model",
                                  "baseline": next(iter(models))})
    summary = run_sweep(cfg)
    paths = write_report(bench, out_dir=ctx.out / "toy_suite")
    # results.md's own sections (CIs, paired differences) sit under this section of the demo report
    table = Path(paths["md"]).read_text().replace("\n## ", "\n### ")
    png = Path(paths["png"])
    chance = qa_chance(read_split(test))
    chance_rows = "\n".join(f"| {t} | {c['uniform']:.3f} | {c['majority']:.3f} |" for t, c in sorted(chance.items()))
    failed = [f"{o.model} / {o.task}: {o.error}" for o in summary.outcomes if o.status == "failed"]
    note = ("" if not absent else f"\n\nNot shipped in this checkout: {', '.join(absent)} (see vlm/README.md, "
            "\"Toy VLMs\", to train and ship them).")
    note += "" if not failed else "\n\nFailed pairs: " + "; ".join(failed)
    (ctx.out / "toy_suite" / "chance.json").write_text(json.dumps(chance, indent=2))
    ctx.add_section(
        f"{title}\n\n{len(models)} models x {len(TOY_TASKS)} tasks, the first {ctx.options.suite_docs} docs of each "
        f"task from the demo's held-out test scenes (`vilex eval`, one lmms-eval worker per model, results in "
        f"`{bench}`). QA tasks: exact match; captioning: CIDEr (headline) against the coarse and fine caption.\n\n"
        f"{table.strip()}\n\n![toy suite]({png.relative_to(ctx.out)})\n\nChance per question type on these scenes "
        f"(uniform guess over the answers seen, and always the most frequent answer):\n\n"
        f"| type | uniform | majority |\n|---|---|---|\n{chance_rows}{note}")

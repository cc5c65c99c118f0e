"""toy/demo/stage1.py — the stage-1 sections of `vilex demo`: a short ViLex run and the shipped full run.

* "stage 1 short run": trains ViLex for a few minutes (``--short-steps``) with the SAME trainer and config as
  the shipped run (configs/vilex/toy.yaml), initialised from the toy SigLIP, against the frozen toy decoder,
  on the demo's own toy data — so a user sees the loop work — then measures the claims on held-out scenes.
* "stage 1 shipped run": the same measurements for the fully trained toy ViLex shipped in assets/toy/vilex; this
  section leads the report.

Each writes PNGs (originals | ViLex at 1, 4, 16 tokens | coarse caption | fine caption; Text-Free Guidance
edits) and a metrics table with the claim verdicts (toy/claims.py) into the report. Missing assets give
a report section saying how to make them, not a crash.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path


from toy.demo.context import DemoContext, demo_step
from vilex.errors import RunMismatchError
from toy.claims_report import REPO_ROOT as REPO
from toy.claims_report import measure_checkpoint, repo_relative

log = logging.getLogger(__name__)

# The shipped toy assets; VILEX_TOY_ASSETS points elsewhere (tests use stand-ins made in a temp folder).
ASSETS = Path(os.environ.get("VILEX_TOY_ASSETS", REPO / "assets" / "toy"))
TOY_CONFIG = REPO / "configs" / "vilex" / "toy.yaml"


def evaluate_checkpoint(ctx: DemoContext, checkpoint: Path, name: str, title: str, n: int, lead: bool = False) -> dict:
    """Claims on the demo's test split for one checkpoint; PNGs + a report section (``lead``: at the report's top)."""
    results, body = measure_checkpoint(checkpoint, ASSETS / "decoder", ASSETS / "probe",
                                       ctx.artifacts["toy_data"] / "test", ctx.out, name, n, ctx.options.seed)
    shown = repo_relative(checkpoint) or checkpoint
    ctx.add_section(f"## {title}\n\nCheckpoint `{shown}`; {n} held-out test scenes of the demo data.\n\n"
                    + body, lead=lead)
    return results


def _missing_assets() -> list[str]:
    need = {"decoder": ASSETS / "decoder" / "unet", "siglip": ASSETS / "siglip" / "vision",
            "probe": ASSETS / "probe" / "model.safetensors"}
    return [k for k, p in need.items() if not p.exists()]


@demo_step("stage 1 short run")
def step_short_run(ctx: DemoContext) -> None:
    """Train ViLex briefly on the demo data (same trainer and config as the shipped run) and measure it."""
    from vilex.config import load_config
    from vilex.train.config import PretrainConfig
    from vilex.train.loop import pretrain

    if ctx.options.short_steps == 0:
        ctx.add_section("## Stage 1: short ViLex run\n\nSkipped (`--short-steps 0`).")
        return
    missing = _missing_assets()
    if missing:
        ctx.add_section("## Stage 1: short ViLex run\n\nSkipped: the toy assets " + ", ".join(missing) +
                        " are not in assets/toy/ (make them with `vilex toy pretrain-decoder`, `vilex toy "
                        "pretrain-siglip`, `vilex toy train-probe`; see scripts/toy/README.md).")
        return
    data = ctx.artifacts["toy_data"]
    out = ctx.out / "vilex_short"
    steps = ctx.options.short_steps
    cfg = load_config(PretrainConfig, TOY_CONFIG, [
        f"model.vit.name_or_path={ASSETS / 'siglip' / 'vision'}", f"model.decoder.name_or_path={ASSETS / 'decoder'}",
        f"data.train.path={data / 'train'}", f"data.val.path={data / 'val'}", f"train.output_dir={out}",
        f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 10)}",
        f"train.global_batch_size={ctx.options.short_batch}",
        f"train.optim.warmup_steps={min(50, steps // 5)}", f"val.every={steps}", f"train.seed={ctx.options.seed}",
    ])
    try:
        summary = pretrain(cfg, resume="auto")  # continues a killed demo
    except RunMismatchError as e:  # a run from before the assets changed: start it over
        log.warning("%s: %s — removing it and training the short run from scratch", out, e)
        shutil.rmtree(out)
        summary = pretrain(cfg, resume="auto")
    losses = summary["losses"]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    ckpt = Path(summary["checkpoint"]) / "pipeline"
    ctx.add_section(f"## Stage 1: short ViLex run ({steps} steps)\n\n`vilex pretrain --config configs/vilex/toy.yaml` "
                    f"with the demo data, {steps} steps of batch {cfg.train.global_batch_size}: training loss "
                    f"{first:.4f} (first {k} steps) -> {last:.4f} (last {k}). Validation grid: "
                    f"`{out / 'val'}`.")
    if ctx.options.eval_scenes:
        evaluate_checkpoint(ctx, ckpt, "short_run", f"Stage 1 short run: measurements ({steps} steps)",
                            ctx.options.eval_scenes)


@demo_step("stage 1 shipped run")
def step_shipped_run(ctx: DemoContext) -> None:
    """The claims measured on the fully trained toy ViLex shipped in assets/toy/vilex."""
    shipped = ASSETS / "vilex"
    if ctx.options.eval_scenes == 0:
        ctx.add_section("## Stage 1: shipped full toy run\n\nSkipped (`--eval-scenes 0`).")
        return
    if _missing_assets() or not (shipped / "vilex_config.json").is_file():
        ctx.add_section("## Stage 1: shipped full toy run\n\nNot available: assets/toy/vilex is not shipped in this "
                        "checkout (train it with `vilex pretrain --config configs/vilex/toy.yaml`; "
                        "see scripts/toy/README.md).", lead=True)
        return
    recipe = shipped / "recipe.json"
    note = ""
    if recipe.is_file():
        r = json.loads(recipe.read_text())
        note = (f" (recipe: {r.get('metrics', {}).get('steps_done', '?')} steps, commit "
                f"{str(r.get('git_commit'))[:10]}; its own measurements on 128 scenes are in "
                f"`{repo_relative(shipped) or shipped}/claims.md`)")
    evaluate_checkpoint(ctx, shipped, "shipped_run", "Stage 1 shipped full run: the claims" + note,
                        ctx.options.eval_scenes, lead=True)

"""toy/claims_report.py — measure the ViLex claims of one checkpoint and write them as files, and ship a toy run.

``measure_checkpoint`` is what the demo's stage-1 sections and ``vilex toy claims`` both call: it loads a ViLex
pipeline folder against the toy decoder, runs every arm of toy/claims.py on held-out scenes, and writes
``<name>_claims.json``, ``<name>_reconstructions.png`` (originals | ViLex at 1/4/16 tokens | coarse caption | fine
caption) and ``<name>_compose.png`` (Text-Free Guidance background edits). ``ship_vilex_run`` turns a finished
``vilex pretrain`` run into the shipped asset folder (assets/toy/vilex) with a recipe holding those measurements.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vilex.errors import UserError
from vilex.train.distributed import resolve_device

log = logging.getLogger(__name__)


def labelled_grid(columns: list[torch.Tensor], titles: list[str], rows: int = 8, scale: int = 3):
    """Columns of (N,3,H,W) images in [0,1] -> one PIL grid (nearest-upscaled) with a title row."""
    from PIL import Image, ImageDraw

    n = min(rows, min(len(c) for c in columns))
    h, w = columns[0].shape[-2:]
    cell_w, cell_h, pad, head = w * scale, h * scale, 4, 28
    width = max(len(columns) * (cell_w + pad), 1) + pad
    sheet = Image.new("RGB", (width, head + n * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, (col, title) in enumerate(zip(columns, titles)):
        x = pad + j * (cell_w + pad)
        for k, line in enumerate(title.split("\n")[:2]):
            draw.text((x, 2 + 12 * k), line, fill=(0, 0, 0))
        for i in range(n):
            arr = (col[i].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (x, head + pad + i * (cell_h + pad)))
    return sheet


def measure_checkpoint(checkpoint: str | Path, decoder: str | Path, probe: str | Path, test_split: str | Path,
                       out_dir: str | Path, name: str, n: int, seed: int = 0, device: str = "auto",
                       tfg_scale: float | None = None) -> tuple[dict[str, Any], str]:
    """Claims of one checkpoint on ``n`` scenes of ``test_split``; writes the JSON and PNGs into ``out_dir``.

    ``device``: where the pipeline samples ("auto" = CUDA when there is one). The initial noise is drawn on the
    CPU from the same seeds, so a GPU measures the same samples up to float rounding.

    Returns (results, a markdown body: the paragraph saying what each claim means and whether it holds, the two
    images and the claims tables, with image paths relative to ``out_dir``)."""
    from vilex.pipeline import ViLexPipeline
    from toy.claims import TFG_SCALE, claims_summary, claims_table, evaluate_claims
    from toy.probe import load_probe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = ViLexPipeline.from_pretrained(checkpoint, decoder_name_or_path=decoder,
                                         device=resolve_device(device, "--device"))
    pipe.set_progress_bar_config(disable=True)
    counts = [k for k in (1, 4, 16, 32) if k <= pipe.num_tokens]  # 32 where the pooler makes 32 (claim B)
    results, images = evaluate_claims(pipe, load_probe(probe), test_split, n=n, token_counts=counts,
                                      n_tfg=min(16, n), seed=seed,
                                      tfg_scale=TFG_SCALE if tfg_scale is None else tfg_scale)
    (out_dir / f"{name}_claims.json").write_text(json.dumps(results, indent=2))
    recon_png = out_dir / f"{name}_reconstructions.png"
    cols = [images["_originals"]] + [images[f"vilex_{k}"] for k in counts] + [images["caption_coarse"],
                                                                              images["caption_fine"]]
    titles = ["original"] + [f"ViLex\n{k} token{'s' if k > 1 else ''}" for k in counts] + ["coarse\ncaption",
                                                                                            "fine\ncaption"]
    labelled_grid(cols, titles).save(recon_png)
    tfg_png = out_dir / f"{name}_compose.png"
    labelled_grid([images["_tfg_sources"], images["_tfg"], images["_tfg_caption"]],
                  ["source", "tokens + 'on a\n<new> background' TFG", "edited caption\nonly"]).save(tfg_png)
    body = (f"{claims_summary(results)}\n\n![reconstructions]({recon_png.name})\n\n![compose]({tfg_png.name})\n\n"
            + claims_table(results))
    return results, body


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_relative(path: str | Path, root: Path = REPO_ROOT) -> str | None:
    """``path`` relative to the repository ``root`` when it lies inside it (``assets/toy/decoder``), else None."""
    resolved, root = Path(path).resolve(), root.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else None


def repo_relative_references(config_path: Path, root: Path = REPO_ROOT) -> None:
    """Rewrite absolute ``name_or_path`` references inside the repository as repository-relative ones (as the
    shipped configs write them: ``assets/toy/decoder``), so a shipped folder works from any clone."""
    config = json.loads(config_path.read_text())
    for section in ("vit", "decoder"):
        ref = (config.get(section) or {}).get("name_or_path")
        if ref and Path(ref).is_absolute() and repo_relative(ref, root) is not None:
            config[section]["name_or_path"] = repo_relative(ref, root)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _probe_vit_and_init(pipeline_dir: Path, n_train: int) -> dict[str, Any] | None:
    """Feature probes of ``pipeline_dir/vit`` and of the tower it was initialised from (None when that is gone)."""
    from toy.feature_probe import compare_towers

    init = json.loads((pipeline_dir / "vilex_config.json").read_text())["vit"]["name_or_path"]
    folder = Path(init) if Path(init).is_absolute() else REPO_ROOT / init  # shipped references are repo-relative
    if not (folder / "config.json").is_file():
        log.warning("feature probe skipped: the ViT's initialisation %s is not a local folder", init)
        return None
    n_test = max(1, n_train // 3)
    results = compare_towers({"vilex_vit": pipeline_dir / "vit", "init_vit": folder}, n_train, n_test)
    return {"init": init, "n_train": n_train, "n_test": n_test, **results}


def ship_vilex_run(run_dir: str | Path, out: str | Path, decoder: str | Path, probe: str | Path,
                   test_split: str | Path, n: int, seed: int = 0, device: str = "auto", note: str | None = None,
                   tfg_scale: float | None = None, feature_probe_scenes: int = 1500) -> dict[str, Any]:
    """Copy the last checkpoint's ``pipeline/`` of a ``vilex pretrain`` run to ``out`` with its measurements, made
    against ``decoder`` (the frozen decoder it was trained against) and judged by ``probe``.

    ``out`` gets the pipeline folder (vit/, pooler/, vilex_config.json), ``claims.md``, the claims PNGs and
    ``recipe.json`` (the run's config, seed, commit, steps, wall time and the claims). Unless
    ``feature_probe_scenes`` is 0, linear probes fitted on that many held-out scenes (scored on a third as many
    more) compare the trained ViT's features with its initialisation's (toy/feature_probe.py): what stage 1 taught
    the ViT."""
    import yaml

    from vilex.checkpoint import CheckpointManager, atomic_dir, write_manifest
    from toy.feature_probe import probe_table
    from toy.recipe import write_recipe

    if feature_probe_scenes < 0:
        raise UserError(f"feature_probe_scenes must be >= 0 (0 skips the probes), got {feature_probe_scenes}")
    run_dir = Path(run_dir)
    ckpt = CheckpointManager(run_dir / "checkpoints").resolve("auto")
    if ckpt is None or not (ckpt / "pipeline" / "vilex_config.json").is_file():
        raise UserError(f"{run_dir}: no finished checkpoint with a pipeline/ folder (is it a `vilex pretrain` run?)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    started = time.time()
    with atomic_dir(out) as tmp:
        shutil.copytree(ckpt / "pipeline", tmp, dirs_exist_ok=True)
        repo_relative_references(tmp / "vilex_config.json")
        write_manifest(tmp)  # the copied manifest describes the config before its references were rewritten
        results, body = measure_checkpoint(tmp, decoder, probe, test_split, tmp, "shipped", n, seed, device,
                                           tfg_scale)
        probes = _probe_vit_and_init(tmp, feature_probe_scenes) if feature_probe_scenes else None
        if probes is not None:
            body += ("\n\n## What stage 1 taught the ViT\n\nLinear probes (accuracy on held-out scenes) of the "
                     "ViT's final patch features, all patches side by side, after ViLex training and at its "
                     f"initialisation `{probes['init']}`:\n\n"
                     + probe_table({"vilex_vit": probes["vilex_vit"], "init": probes["init_vit"]}))
        (tmp / "claims.md").write_text(f"# Toy ViLex ({ckpt.name}): claims on {n} held-out scenes of "
                                       f"`{test_split}`\n\n{body}")
        losses = state.get("losses", [])
        k = max(1, len(losses) // 10)
        metrics = {"steps_done": state.get("step"), "checkpoint": str(ckpt),
                   # what the claims were measured against: a toy ViLex is only meaningful with its decoder
                   "decoder": repo_relative(decoder) or str(decoder), "probe": repo_relative(probe) or str(probe),
                   "last_invocation": summary.get("this_run"),
                   "loss_first_10pct": sum(losses[:k]) / k if losses else None,
                   "loss_last_10pct": sum(losses[-k:]) / k if losses else None,
                   "claims": results, "claims_minutes": round((time.time() - started) / 60, 2)}
        if probes is not None:
            metrics["feature_probe"] = probes
        if note:
            metrics["note"] = note
        wall = (summary.get("this_run") or {}).get("loop_seconds") or 0.0
        write_recipe(tmp, "vilex", config, int(config.get("train", {}).get("seed", 0)), wall, metrics)
    return metrics

"""toy/ship_vlm.py — ship a finished toy VLM run (align + instruct) as an asset folder (assets/toy/vlm/<tower>).

What is shipped is the instruct stage's last checkpoint WITHOUT its training state (optimizer, RNG/data state):
``projector/``, ``llm/``, ``tokenizer/``, ``vlm_config.json`` — what ``VLM.from_checkpoint``, the ``vilex_vlm``
lmms-eval plugin and ``vilex export-hf`` load. Training writes absolute references to the untrained parts (the
tower, the base LLM); they are rewritten relative to the shipped folder ("../../siglip/vision"), so the asset loads
from any clone and working directory (vlm.config.resolve_relative_references). ``recipe.json`` records both
stages' configs, steps, losses and the commit.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from vilex.errors import UserError
from vlm.model import is_training_state

def relative_references(model: dict[str, Any], out: Path) -> dict[str, Any]:
    """Absolute local references of a saved model config rewritten relative to ``out`` (hub ids kept)."""
    from vlm.config import REFERENCE_FIELDS

    model = {k: dict(v) if isinstance(v, dict) else v for k, v in model.items()}
    for section, key in REFERENCE_FIELDS:
        ref = model.get(section, {}).get(key)
        if isinstance(ref, str) and Path(ref).is_absolute() and Path(ref).exists():
            rel = os.path.relpath(ref, out.resolve())
            model[section][key] = rel if rel.startswith("..") else "./" + rel
    return model


def _stage_summary(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    losses = s.get("losses", [])
    k = max(1, len(losses) // 10)
    return {"steps": s.get("steps"), "final_loss": s.get("final_loss"),
            "loss_first_10pct": sum(losses[:k]) / k if losses else None,
            "loss_last_10pct": sum(losses[-k:]) / k if losses else None,
            "config": yaml.safe_load((stage_dir / "config.yaml").read_text())
            if (stage_dir / "config.yaml").is_file() else None}


def _store_weights_as(folder: Path, dtype_name: str) -> None:
    """Rewrite the floating-point tensors of every ``*.safetensors`` under ``folder`` in ``dtype_name``."""
    import torch
    from safetensors.torch import load_file, save_file

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    for path in folder.rglob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


def ship_vlm_run(run_dir: str | Path, out: str | Path, stage: str = "instruct",
                 llm_storage_dtype: str | None = None) -> dict[str, Any]:
    """Copy ``run_dir/<stage>``'s last checkpoint (no training state) to ``out`` with relative references and a
    recipe; returns the recipe's metrics. ``llm_storage_dtype`` ("bfloat16") stores the trained LLM's weights in
    half the bytes (the model still loads in its configured dtype; evaluate the shipped folder, not the run)."""
    from vilex.checkpoint import atomic_dir
    from toy.recipe import write_recipe
    from vlm.model import CONFIG_FILE, resolve_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / stage).is_dir():
        raise UserError(f"{run_dir}: no {stage}/ stage folder (is it a `vilex train-vlm` output_dir?)")
    ckpt = resolve_checkpoint(run_dir / stage)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    metrics = {"checkpoint": str(ckpt), "llm_storage_dtype": llm_storage_dtype or "as trained",
               "stages": {s: _stage_summary(run_dir / s) for s in ("align", "instruct", "full")
                          if (run_dir / s).is_dir()}}
    with atomic_dir(out) as tmp:
        for item in ckpt.iterdir():
            if is_training_state(item.name):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if llm_storage_dtype and (tmp / "llm").is_dir():
            _store_weights_as(tmp / "llm", llm_storage_dtype)
        meta["model"] = relative_references(meta["model"], out)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        cfg = (metrics["stages"].get(stage) or {}).get("config") or {}
        write_recipe(tmp, f"vlm-{meta['model']['tower']['type']}", cfg, int(cfg.get(stage, {}).get("seed", 0) or 0),
                     0.0, metrics)
    return metrics

"""benchmarks/tiny.py — tiny VLM checkpoints for tests and the overhead script (the tiny toy suite they are evaluated
on is ``toy.tiny_suite``: it needs the toy world, which sits above this package).

A checkpoint here is an untrained ``vlm.model.VLM`` (tiny Qwen2 + tiny SigLIP from ``vlm.tiny``) saved with
``save_components`` — the same folder layout training writes, so the plugin loads it through the real
``VLM.from_checkpoint`` path. ``seed`` sets the projector weights, so two seeds give two different models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_tiny_vlm_checkpoints(root: str | Path, seeds: tuple[int, ...] = (0, 1),
                               tower_type: str = "siglip") -> list[Path]:
    """``root/world`` (tiny LLM, towers) + one checkpoint folder ``root/vlm-seed<k>`` per seed."""
    from vlm.model import VLM
    from vlm.tiny import build_tiny_world

    root = Path(root)
    world = build_tiny_world(root / "world", n_align=2, n_instruct=2)
    folders = []
    for seed in seeds:
        cfg = world.config(root / f"run-seed{seed}", tower_type=tower_type)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VLM.build(cfg.model)
        folder = root / f"vlm-seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        model.save_components(folder, components=("projector",), stage="instruct")
        folders.append(folder)
    return folders

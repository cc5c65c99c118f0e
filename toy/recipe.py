"""toy/recipe.py — how a toy asset is made reproducibly: seed streams, the on-the-fly scene batches, recipe.json.

Shared by the stage-0 pretraining scripts (tokenizer, probe, decoder, SigLIP):

* Seed streams. Every random draw is keyed by ``(seed, stream, index)`` through numpy's ``SeedSequence``:
  training batches use ``Stream.TRAIN`` with the step as index, held-out evaluation scenes
  ``Stream.HELDOUT``, trainer-side choices (caption granularity, caption dropout) ``Stream.CHOICES``.
  Different streams are independent generators, so held-out scenes are never training scenes (scenes have
  continuous sizes and positions: a repeat would need every float to coincide), and because batch ``k``
  depends only on ``(seed, k)`` a resumed run sees exactly the data the uninterrupted run would have seen.
* ``SceneBatches``: an ``IterableDataset`` of ``(step, images uint8 [B,3,H,W], scenes)`` for a range of
  steps. Rendering costs ~3 ms a scene on one core, so trainers load it through a ``DataLoader`` with one
  worker to overlap rendering with the optimizer step; with several workers each takes every n-th step and
  the DataLoader's round-robin keeps the step order.
* ``write_recipe``: ``recipe.json`` beside an asset — config, seed, git commit, wall time, final metrics.
"""
from __future__ import annotations

import enum
import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toy.scenes import world

RECIPE_NAME = "recipe.json"
RECIPE_KEYS = ("asset", "config", "seed", "git_commit", "git_dirty", "wall_time_s", "metrics")


class Stream(enum.IntEnum):
    """Independent random streams of one seed (see the module docstring)."""

    TRAIN = 0
    HELDOUT = 1
    CHOICES = 2


def toy_rng(seed: int, stream: Stream, index: int = 0) -> np.random.Generator:
    """The generator for draw ``index`` of ``stream`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


def render_batch(scenes: list[world.Scene], size: int) -> np.ndarray:
    """uint8 ``[B, 3, size, size]`` renders of ``scenes``."""
    return np.stack([np.asarray(world.render(s, size)[0]).transpose(2, 0, 1) for s in scenes])


def images_to_unit_range(images: Any) -> torch.Tensor:
    """uint8 images (numpy or torch) -> float32 torch tensor in [-1, 1] (the toy models' input range)."""
    return torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0)


def heldout_scenes(seed: int, n: int, scene_options: dict[str, Any] | None = None) -> list[world.Scene]:
    """``n`` scenes of the held-out stream (the same ``n`` scenes for the same seed, whoever asks)."""
    rng = toy_rng(seed, Stream.HELDOUT)
    return [world.sample_scene(rng, **(scene_options or {})) for _ in range(n)]


class SceneBatches(IterableDataset):
    """Batches of freshly sampled and rendered training scenes for steps ``start .. stop-1``.

    Each item is ``(step, images uint8 [B,3,H,W], scenes)``.
    """

    def __init__(self, seed: int, start: int, stop: int, batch_size: int, image_size: int,
                 scene_options: dict[str, Any] | None = None) -> None:
        self.seed, self.start, self.stop = seed, start, stop
        self.batch_size, self.image_size = batch_size, image_size
        self.scene_options = dict(scene_options or {})

    def batch(self, step: int) -> tuple[int, np.ndarray, list[world.Scene]]:
        rng = toy_rng(self.seed, Stream.TRAIN, step)
        scenes = [world.sample_scene(rng, **self.scene_options) for _ in range(self.batch_size)]
        return step, render_batch(scenes, self.image_size), scenes

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, list[world.Scene]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + worker, self.stop, workers):
            yield self.batch(step)


def scene_loader(batches: SceneBatches, num_workers: int) -> DataLoader:
    """A DataLoader over ``batches`` (items are whole batches; ``num_workers`` 0 = render in this process)."""
    return DataLoader(batches, batch_size=None, num_workers=num_workers,
                      collate_fn=_keep_as_is, prefetch_factor=2 if num_workers else None,
                      persistent_workers=False)


def _keep_as_is(item: Any) -> Any:  # a module-level function: worker processes must pickle it
    return item


def git_commit(repo: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(HEAD commit, working tree dirty?)`` of the repository holding this file (None, None outside git)."""
    cwd = str(repo or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30)
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def write_recipe(folder: str | Path, asset: str, config: dict[str, Any], seed: int, wall_time_s: float,
                 metrics: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/recipe.json`` (keys ``RECIPE_KEYS`` plus ``extra``); returns its path."""
    commit, dirty = git_commit()
    recipe = {"asset": asset, "config": config, "seed": int(seed), "git_commit": commit, "git_dirty": dirty,
              "wall_time_s": round(float(wall_time_s), 1), "metrics": metrics, **extra}
    path = Path(folder) / RECIPE_NAME
    path.write_text(json.dumps(recipe, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_recipe(folder: str | Path) -> dict[str, Any]:
    """The ``recipe.json`` of an asset folder."""
    return json.loads((Path(folder) / RECIPE_NAME).read_text())

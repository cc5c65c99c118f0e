"""toy/scenes/generate.py — write a toy-world dataset to disk (``vilex toy generate``).

Layout (read by the data layer's folder and parquet sources and by lmms-eval local tasks)::

    DIR/dataset_info.json            seed, n, size, splits, generator version, palette, formats
    DIR/dataset_stats.json           counts per split/shape/colour/background, QA types, caption stats
    DIR/<split>/images/<id>.png      RGB, size×size
    DIR/<split>/masks/<id>.png       label map, mode "L": 0 = background or mixed edge, i = object i
                                     (1-based, scene order; i.e. ``scene.objects[i-1]``)
    DIR/<split>/metadata.jsonl       one JSON object per scene (HF imagefolder style, "file_name"
                                     relative to the split folder)
    DIR/<split>/metadata.parquet     the same rows; "file_name" is the image path column

Each row: file_name, mask_file_name, id ("scene_000123", global index), index, split, width, height,
n_objects, caption, caption_fine, caption_web (alt-text style: no positions, sizes or counts), qa [{question, answer, type}], scene {background, background_rgb,
objects [{shape, colour, rgb, shade, size, cx, cy, bbox, bbox_px, area_px}]}.

Loading with HF datasets: both metadata files sit in each split folder, so name the one to use:
``load_dataset("imagefolder", data_dir=DIR, metadata_filenames=["metadata.jsonl"])`` gives the splits
train/validation/test with decoded "image" and "mask" columns (without ``metadata_filenames`` the
imagefolder builder stops at "metadata files with different extensions"). The mask PNGs under
``masks/`` are only reached through ``mask_file_name``: a folder reader should list the files that
metadata.jsonl names (or read ``<split>/images``), not every PNG below the split folder.

Decisions:
- Determinism: scene ``i`` draws from its own RNG seeded by ``(seed, i, attempt)``, PNGs are written
  with fixed settings and no metadata chunks, JSON with sorted keys. Same seed -> identical bytes.
- Splits are contiguous index ranges (train first); sizes by largest remainder, so they sum to n.
- No scene appears twice anywhere (hence never in two splits): a scene whose quantised graph
  (``Scene.dedupe_key``) was already drawn is redrawn with the next attempt, and so is a scene with
  an empty mask at this resolution. Both redraw counts are reported in the stats, never silent.
- The dataset is built in a hidden temp folder beside ``DIR`` and renamed into place at the end,
  so an interrupted run never leaves a half-written dataset under ``DIR``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toy.scenes.errors import ToyWorldError
from toy.scenes import world

log = logging.getLogger(__name__)

DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
MIN_SIZE, MAX_SIZE = 16, 512
MAX_ATTEMPTS_PER_SCENE = 1000
INFO_NAME = "dataset_info.json"
STATS_NAME = "dataset_stats.json"
MASK_FORMAT = ("label map PNG (mode L): 0 = background or mixed edge pixel, i = scene.objects[i-1]; a pixel "
               f"belongs to an object when > {world.MASK_COVERAGE} of its area is that object's visible surface")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, ...}``; fractions must be > 0 and sum to 1."""
    splits: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not sep or not _SPLIT_NAME.match(name) or not fraction > 0:
            raise ToyWorldError(f"bad split '{part}' in --splits '{text}': expected NAME=FRACTION with FRACTION > 0")
        if name in splits:
            raise ToyWorldError(f"split '{name}' appears twice in --splits '{text}'")
        splits[name] = fraction
    if not splits:
        raise ToyWorldError(f"--splits '{text}' names no split")
    return _check_fractions(splits)


def _check_fractions(splits: dict[str, float]) -> dict[str, float]:
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ToyWorldError(f"split fractions must sum to 1, got {total:g} for {splits}")
    return dict(splits)


def split_counts(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Scenes per split (largest remainder, sums to ``n``); every split must get at least one."""
    raw = {k: n * f for k, f in splits.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    by_remainder = sorted(splits, key=lambda k: (-(raw[k] - counts[k]), list(splits).index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    empty = [k for k, c in counts.items() if c == 0]
    if empty:
        names = ", ".join(f"'{k}'" for k in empty)
        raise ToyWorldError(f"n={n} leaves split{'s' if len(empty) > 1 else ''} {names} empty; raise n or drop "
                        f"{'those splits' if len(empty) > 1 else 'that split'}")
    return counts


def scene_rng(seed: int, index: int, attempt: int, stream: int) -> np.random.Generator:
    """The RNG of one scene draw; ``stream`` 0 samples the scene, 1 its questions."""
    return np.random.default_rng([seed, index, attempt, stream])


def generate_dataset(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = 32,
    splits: dict[str, float] | str | None = None,
    *,
    max_objects: int = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``n`` scenes of ``size``×``size`` under ``out`` (layout in the module docstring).

    ``splits`` is a ``{name: fraction}`` dict or ``"train=0.8,val=0.1,test=0.1"`` (the default).
    ``overwrite`` replaces an existing toy dataset at ``out`` (never a folder that is not one).
    Returns the statistics that are also written to ``out/dataset_stats.json``.
    """
    out = Path(out)
    splits = parse_splits(splits) if isinstance(splits, str) else _check_fractions(splits or DEFAULT_SPLITS)
    _validate(n, seed, size, max_objects)
    counts = split_counts(n, splits)
    _check_target(out, overwrite)

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows_by_split: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    redraws = Counter({"duplicate": 0, "empty_mask": 0})
    bar = _progress(n, progress)
    try:
        index = 0
        for split, count in counts.items():
            split_dir = tmp / split
            (split_dir / "images").mkdir(parents=True)
            (split_dir / "masks").mkdir()
            rows = rows_by_split.setdefault(split, [])
            for _ in range(count):
                rows.append(_write_scene(split_dir, split, index, seed, size, max_objects, seen, redraws))
                index += 1
                if bar is not None:
                    bar.update(1)
            _write_jsonl(split_dir / "metadata.jsonl", rows)
            _write_parquet(split_dir / "metadata.parquet", rows)
        stats = compute_stats(rows_by_split)
        stats["redrawn"] = dict(sorted(redraws.items()))
        info = _dataset_info(n, seed, size, splits, counts, max_objects)
        _write_json(tmp / INFO_NAME, info)
        _write_json(tmp / STATS_NAME, stats)
        _publish(tmp, out)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("toy dataset: %d scenes (%s) at %dpx -> %s; redrawn: %d duplicate, %d empty-mask",
             n, ", ".join(f"{k} {v}" for k, v in counts.items()), size, out,
             redraws["duplicate"], redraws["empty_mask"])
    return stats


def _validate(n: int, seed: int, size: int, max_objects: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ToyWorldError(f"n (number of scenes) must be an integer >= 1, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ToyWorldError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ToyWorldError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    if not isinstance(max_objects, int) or not 1 <= max_objects <= 3:
        raise ToyWorldError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ToyWorldError(f"output path {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ToyWorldError(f"output folder {out} is not empty; pass --overwrite to replace a toy dataset there")
    if not (out / INFO_NAME).is_file():
        raise ToyWorldError(f"refusing to overwrite {out}: it is not a toy dataset (no {INFO_NAME})")


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing ``out`` (checked by ``_check_target``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        trash = out.parent / f".trash-{out.name}-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _write_scene(split_dir: Path, split: str, index: int, seed: int, size: int, max_objects: int,
                 seen: set[str], redraws: Counter) -> dict[str, Any]:
    for attempt in range(MAX_ATTEMPTS_PER_SCENE):
        scene = world.sample_scene(scene_rng(seed, index, attempt, 0), max_objects=max_objects)
        key = scene.dedupe_key()
        if key in seen:
            redraws["duplicate"] += 1
            continue
        image, masks = world.render(scene, size)
        if not masks.any(axis=(1, 2)).all():
            redraws["empty_mask"] += 1
            continue
        seen.add(key)
        qa = world.questions(scene, scene_rng(seed, index, attempt, 1))
        break
    else:
        raise ToyWorldError(f"could not draw a new distinct scene for index {index} in {MAX_ATTEMPTS_PER_SCENE} "
                        f"attempts ({len(seen)} drawn); the toy world is exhausted at these settings")
    scene_id = f"scene_{index:06d}"
    _save_png(image, split_dir / "images" / f"{scene_id}.png")
    _save_png(Image.fromarray(world.label_map(masks), "L"), split_dir / "masks" / f"{scene_id}.png")
    graph = scene.to_dict()
    for obj, mask in zip(graph["objects"], masks):
        obj["area_px"] = int(mask.sum())
        obj["bbox_px"] = [round(v * size, 2) for v in obj["bbox"]]
    return {
        "file_name": f"images/{scene_id}.png",
        "mask_file_name": f"masks/{scene_id}.png",
        "id": scene_id,
        "index": index,
        "split": split,
        "width": size,
        "height": size,
        "n_objects": len(scene.objects),
        "caption": world.caption_coarse(scene),
        "caption_fine": world.caption_fine(scene),
        "caption_web": world.caption_web(scene, scene_rng(seed, index, attempt, 2)),
        "qa": [asdict(q) for q in qa],
        "scene": graph,
    }


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False, compress_level=6)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([json.loads(json.dumps(r, sort_keys=True)) for r in rows])
    pq.write_table(table, path, compression="zstd")


def _progress(n: int, enabled: bool):
    if not enabled or os.environ.get("DISABLE_TQDM"):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=n, desc="toy scenes", unit="scene", disable=None)


def _dataset_info(n: int, seed: int, size: int, splits: dict[str, float], counts: dict[str, int],
                  max_objects: int) -> dict[str, Any]:
    return {
        "generator": "vilex.toy",  # the generator's published name in dataset_info.json (datasets stay byte-identical)
        "generator_version": world.GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "splits": splits,
        "split_counts": counts,
        "max_objects": max_objects,
        "shapes": list(world.SHAPES),
        "palette": {"objects": {k: list(v) for k, v in world.OBJECT_COLOURS.items()},
                    "backgrounds": {k: list(v) for k, v in world.BACKGROUND_COLOURS.items()}},
        "size_range": list(world.SIZE_RANGE),
        "mask_format": MASK_FORMAT,
        "coordinates": "cx, cy, size, bbox in [0, 1] image units, y down; size = half-width of the bbox; "
                       "bbox_px = bbox * image size; area_px = mask pixel count",
    }


def read_metadata(split_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``split_dir/metadata.jsonl``, in file order."""
    path = Path(split_dir) / "metadata.jsonl"
    if not path.is_file():
        raise ToyWorldError(f"no toy metadata at {path}")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def compute_stats(rows_by_split: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Dataset statistics from metadata rows (what ``dataset_stats.json`` holds)."""
    rows = [r for split_rows in rows_by_split.values() for r in split_rows]
    objects = [o for r in rows for o in r["scene"]["objects"]]
    qa = [q for r in rows for q in r["qa"]]
    coarse_words = [r["caption"].split() for r in rows]
    fine_words = [r["caption_fine"].split() for r in rows]

    def full_counter(keys, values) -> dict[str, int]:
        c = Counter(values)
        return {k: c.get(k, 0) for k in keys}

    def mean(xs) -> float:
        return round(float(np.mean(xs)), 4) if xs else 0.0

    return {
        "scenes": len(rows),
        "scenes_per_split": {k: len(v) for k, v in rows_by_split.items()},
        "objects": len(objects),
        "objects_per_scene": {str(k): v for k, v in sorted(Counter(len(r["scene"]["objects"]) for r in rows).items())},
        "shapes": full_counter(world.SHAPES, (o["shape"] for o in objects)),
        "colours": full_counter(world.OBJECT_COLOURS, (o["colour"] for o in objects)),
        "backgrounds": full_counter(world.BACKGROUND_COLOURS, (r["scene"]["background"] for r in rows)),
        "qa_types": full_counter(world.QA_TYPES, (q["type"] for q in qa)),
        "qa_total": len(qa),
        "existence_answers": full_counter(("yes", "no"), (q["answer"] for q in qa if q["type"] == "existence")),
        "caption_words_mean": {"coarse": mean([len(w) for w in coarse_words]),
                               "fine": mean([len(w) for w in fine_words])},
        "caption_vocab_size": {"coarse": len({w for ws in coarse_words for w in ws}),
                               "fine": len({w for ws in fine_words for w in ws}),
                               "all": len({w for ws in coarse_words + fine_words for w in ws})},
    }

"""gallery.py — the toy scenes a visitor can pick: held-out scenes, that no shipped model trained on.

The scenes come from the toy world generator exactly as ``vilex toy generate`` writes them (image, coarse and fine
caption, questions with their answers), drawn with ``GALLERY_SEED``. Why that seed: a toy scene is fixed by
(seed, index) whatever the dataset's size or splits, and the shipped models trained on seed 0 (the toy VLMs: the
train split of 6000 scenes) and seed 1 (the toy ViLex: the train split of 20000), so no scene of seed 2 is in any of
their training data. The gallery is one split named ``test`` holding scenes 0..count-1, so a larger gallery only adds
scenes after the same first ones.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

GALLERY_SEED = 2
SCENE_SIZES = (16, 512)  # the sides the toy generator can render


@dataclass(frozen=True)
class ToyScene:
    """One pickable scene: its render, captions and the toy world's questions with their true answers."""

    id: str
    image: Image.Image
    caption: str  # coarse, alt-text-like: what a caption baseline gets
    caption_fine: str
    questions: tuple[tuple[str, str], ...]  # (question, answer)


def toy_test_scenes(count: int, size: int, seed: int = GALLERY_SEED) -> list[ToyScene]:
    """The first ``count`` scenes of seed ``seed``, rendered at ``size`` px (clamped to what the generator draws:
    16..512; pass the decoder's resolution, so a scene is the size of what the decoder makes)."""
    from toy.scenes import generate_dataset, read_metadata

    if count < 1:
        return []
    size = min(max(size, SCENE_SIZES[0]), SCENE_SIZES[1])
    with tempfile.TemporaryDirectory(prefix="vilex-serve-gallery-") as tmp:
        data = Path(tmp) / "toy"
        generate_dataset(data, n=count, seed=seed, size=size, splits={"test": 1.0}, progress=False)
        rows = read_metadata(data / "test")[:count]
        scenes = []
        for row in rows:
            with Image.open(data / "test" / row["file_name"]) as im:
                image = im.convert("RGB")
            questions = tuple((qa["question"], str(qa["answer"])) for qa in row["qa"])
            scenes.append(ToyScene(row["id"], image, row["caption"], row["caption_fine"], questions))
    return scenes

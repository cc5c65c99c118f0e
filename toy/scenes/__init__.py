"""toy.scenes — the procedural toy world's scenes: coloured shapes with exact scene graphs.

A leaf: it needs only numpy and PIL (no other part of the project), so the tests may use it on its own. Like all of
``toy`` it sits above ``benchmarks``: packages below never import it.

Public API (stable; the data layer, stage-0 pretraining, the judge and the probes call it):

- ``sample_scene(rng, **options) -> Scene``; ``render(scene, size) -> (PIL.Image, masks[K, H, W])``
- ``caption_coarse(scene)``, ``caption_fine(scene)``, ``questions(scene, rng) -> list[QA]``
- word functions: ``grid3_name``, ``grid3_cell``, ``grid5_cell``, ``size_word_coarse``,
  ``size_word_fine``, ``shade_word``, ``nearest_colour_name``, ``allowed_object_colours``
- palettes and vocabularies: ``OBJECT_COLOURS``, ``BACKGROUND_COLOURS``, ``SHAPES``, ``QA_TYPES``…
- ``generate_dataset(out, n, seed, size, splits) -> stats``; ``read_metadata(split_dir)``
- ``make_contact_sheet(images, captions)``, ``contact_sheet_from_split(split_dir, out_png)``
"""
from toy.scenes.contact_sheet import contact_sheet_from_split, make_contact_sheet
from toy.scenes.errors import ToyWorldError
from toy.scenes.generate import (
    DEFAULT_SPLITS,
    compute_stats,
    generate_dataset,
    parse_splits,
    read_metadata,
    split_counts,
)
from toy.scenes.world import (
    ACHROMATIC_COLOURS,
    BACKGROUND_COLOURS,
    COARSE_SIZE_WORDS,
    FINE_SIZE_WORDS,
    GENERATOR_VERSION,
    GRID3_COLS,
    GRID3_ROWS,
    OBJECT_COLOURS,
    QA,
    QA_TYPES,
    SHAPES,
    SIZE_RANGE,
    Scene,
    ToyObject,
    allowed_object_colours,
    caption_coarse,
    caption_fine,
    grid3_cell,
    grid3_name,
    grid5_cell,
    label_map,
    masks_from_label_map,
    nearest_colour_name,
    questions,
    render,
    sample_scene,
    shade_word,
    size_word_coarse,
    size_word_fine,
    visible_fractions,
)

__all__ = [
    "ToyWorldError",
    "ACHROMATIC_COLOURS", "BACKGROUND_COLOURS", "COARSE_SIZE_WORDS", "DEFAULT_SPLITS", "FINE_SIZE_WORDS",
    "GENERATOR_VERSION", "GRID3_COLS", "GRID3_ROWS", "OBJECT_COLOURS", "QA", "QA_TYPES", "SHAPES", "SIZE_RANGE",
    "Scene", "ToyObject", "allowed_object_colours", "caption_coarse", "caption_fine", "compute_stats",
    "contact_sheet_from_split", "generate_dataset", "grid3_cell", "grid3_name", "grid5_cell", "label_map",
    "make_contact_sheet", "masks_from_label_map", "nearest_colour_name", "parse_splits", "questions",
    "read_metadata", "render", "sample_scene", "shade_word", "size_word_coarse", "size_word_fine",
    "split_counts", "visible_fractions",
]

"""toy/demo/data_steps.py — the first sections of `vilex demo`: the toy dataset, its statistics and contact sheet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toy.demo.context import DemoContext, demo_step


@demo_step("toy data")
def step_toy_data(ctx: DemoContext) -> None:
    """Generate the toy dataset under out/data and write out/dataset_stats.json."""
    from toy.scenes import generate_dataset

    data = ctx.out / "data"
    stats = generate_dataset(data, n=ctx.options.n, seed=ctx.options.seed, size=ctx.options.size,
                             overwrite=True)
    (ctx.out / "dataset_stats.json").write_text(json.dumps(stats, sort_keys=True, indent=2) + "\n",
                                                encoding="utf-8")
    ctx.artifacts["toy_data"] = data
    ctx.artifacts["toy_stats"] = stats
    ctx.add_section("## Toy dataset\n\n"
                    f"{stats['scenes']} procedural scenes at {ctx.options.size}px in `{data}` "
                    "(images, label-map masks, coarse and fine captions, QA, scene graphs; "
                    "`metadata.jsonl` + `metadata.parquet` per split).\n\n" + stats_table(stats))


@demo_step("contact sheet")
def step_contact_sheet(ctx: DemoContext) -> None:
    """The first training scenes with their coarse captions -> out/contact_sheet.png."""
    from toy.scenes import contact_sheet_from_split

    data: Path = ctx.artifacts["toy_data"]
    first_split = next(iter(ctx.artifacts["toy_stats"]["scenes_per_split"]))
    sheet = contact_sheet_from_split(data / first_split, ctx.out / "contact_sheet.png", n=24)
    ctx.add_section(f"## Contact sheet\n\nThe first {first_split} scenes with their coarse captions.\n\n"
                    f"![contact sheet]({sheet.name})")


def stats_table(stats: dict[str, Any]) -> str:
    """A two-column markdown table of the toy dataset statistics."""

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {v2}" for k, v2 in v.items())
        return str(v)

    rows = [("scenes", stats["scenes"]), ("scenes per split", stats["scenes_per_split"]),
            ("objects", stats["objects"]), ("objects per scene", stats["objects_per_scene"]),
            ("shapes", stats["shapes"]), ("colours", stats["colours"]), ("backgrounds", stats["backgrounds"]),
            ("QA pairs", stats["qa_total"]), ("QA types", stats["qa_types"]),
            ("existence answers", stats["existence_answers"]),
            ("mean caption words", stats["caption_words_mean"]),
            ("caption vocabulary", stats["caption_vocab_size"]),
            ("redrawn scenes", stats.get("redrawn", {}))]
    return "\n".join(["| statistic | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in rows)])



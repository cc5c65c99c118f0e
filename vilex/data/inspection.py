"""inspection.py — one pass over a source in stored order: sample count, decode stats, skip counts.

Backs ``vilex data inspect``. It decodes every sample (no resizing, no tensors) with the same
``decode_image`` and skip reasons the loader uses, so what it reports is what training will see.
Local webdataset shards written by img2dataset also get its ``*_stats.json`` download counts, summed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from vilex.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, BadSample, decode_image_with_info
from vilex.data.skips import SkipCounter
from vilex.data.sources import ImageSource, MapImageSource, RawSample, ShardedImageSource
from vilex.data.tar_source import TarShardSource, img2dataset_stats


def iter_stored_order(source: ImageSource, skips: SkipCounter) -> Iterator[tuple[str, Callable[[], RawSample]]]:
    """(key, reader) for every sample in stored order; a broken shard is counted in ``skips``."""
    if isinstance(source, MapImageSource):
        for index in range(len(source)):
            yield source.key(index), lambda index=index: source.read(index)
    elif isinstance(source, ShardedImageSource):
        for shard in range(len(source.shards)):
            with source.open_shard(shard) as reader:
                if reader.error:
                    skips.add("bad_shard")
                for position, key in enumerate(reader.keys):
                    yield key, lambda position=position, reader=reader: reader.read(position)
    else:  # pragma: no cover
        raise TypeError(f"{type(source).__name__} is neither a map nor a sharded source")


def inspect_source(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    limit: int | None = None,
) -> dict[str, Any]:
    """Decode the first ``limit`` samples (all when None) and return JSON-safe statistics."""
    skips = SkipCounter()
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    samples = 0
    for _key, read in iter_stored_order(source, skips):
        if limit is not None and samples >= limit:
            break
        samples += 1
        try:
            _, info = decode_image_with_info(read().data, max_pixels=max_pixels, min_side=min_side)
        except BadSample as bad:
            skips.add(bad.reason)
            continue
        formats[info.format] += 1
        modes[info.mode] += 1
        widths.append(info.width)
        heights.append(info.height)
    report: dict[str, Any] = {
        "source": source.name,
        "samples": samples,
        "decoded": len(widths),
        "skipped_total": skips.total,
        "skipped": skips.counts,
        "formats": dict(sorted(formats.items())),
        "modes": dict(sorted(modes.items())),
        "width": _stats(widths),
        "height": _stats(heights),
    }
    downloads = img2dataset_stats(source.shards) if isinstance(source, TarShardSource) else None
    if downloads is not None:  # img2dataset output: what failed to download never reached the tars
        report["img2dataset"] = downloads
    return report


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)}

"""loader.py — ``ImageLoader``: deterministic, rank-sharded, exactly resumable batches of decoded images.

Order. Epoch e's order is a permutation seeded by (seed, e) — the same on every rank and every
run. Map sources (folder, hf) permute sample indices and rank r takes every world_size-th one
(disjoint, complete; ranks differ by at most one sample). Sharded sources (webdataset) permute
shards, rank r takes every world_size-th SHARD, and inside each shard samples are permuted by
(seed, e, shard). ``shuffle=False`` keeps stored order.

Batches. A batch is the next ``batch_size`` samples that DECODE: a bad sample is skipped, counted
by reason (``SkipCounter``) and logged (the first few per reason at WARNING, then DEBUG), and the
next one fills its place, so batches keep their size. An epoch's last partial batch is yielded, or
counted in ``dropped_last`` with ``drop_last=True``. An epoch in which nothing decodes raises
``DataError("no decodable images in <source>: 5 skipped (empty=3, truncated=2)")``.

Resume. The loader's position (epoch, index into the rank's order — or (shard, sample) for
sharded sources) moves only when a batch is handed out, and the generator is suspended right
there, so ``state_dict()`` taken between batches describes exactly what has been consumed, and a fresh loader given
``load_state_dict(state)`` yields exactly the remaining batches (same samples, order, tensors) and
ends with the same summary. Nothing before the position is read or decoded again.

Workers (``num_workers=N``, vilex/data/parallel.py). "The next batch_size samples that decode" makes
batch boundaries depend on every earlier sample, so workers never decide anything: this process walks
the order above, reads each sample's bytes and hands them out, at most ``prefetch`` samples ahead; N
worker processes (not threads: PIL's bomb warning becomes an error through the process-global warnings
filter, which threads would race on) decode them; outcomes are consumed strictly in order, and each
decoded sample is copied by its worker into its row of the batch, a tensor in shared memory. Skips,
batch boundaries, counts and ``state_dict()`` are therefore those of ``num_workers=0`` — the same
batches, bit for bit — and a saved state resumes with any worker count (read-ahead not yet consumed is
simply decoded again). ``num_workers=0`` decodes in this process, as always. Call ``close()`` (or use
the loader as a context manager) to stop the workers early; they also stop when the loader is
garbage-collected, at exit, or when this process dies.

Iterating a loader continues from its current position through the remaining epochs
(``epochs=None``: forever). Use one iterator at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from vilex.data.config import DataConfig, ViewConfig
from vilex.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, BadSample, decode_image
from vilex.data.parallel import DecodePool, default_window
from vilex.data.skips import SkipCounter
from vilex.data.sources import ImageSource, MapImageSource, RawSample, ShardedImageSource, build_source
from vilex.data.views import render_view
from vilex.errors import DataError

log = logging.getLogger(__name__)

STATE_FORMAT = "vilex.data.ImageLoader/1"
LOG_FIRST_SKIPS = 5  # per reason, at WARNING; later ones at DEBUG so a bad dataset cannot flood the log

Position = int | tuple[int, int]  # map: index into the rank's order; sharded: (shard slot, sample slot)
# Where a sample lives in its source, whatever the order: (shard index, position in the shard) for a sharded source;
# a map source is one shard whose positions are its indices, (0, index). Per-shard derived data (the latent cache's
# sidecars) is looked up by it without a global key index.
Location = tuple[int, int]
_Item = tuple[Position, str, Callable[[], RawSample], Location]  # position after the item, key, reader, location


@dataclass
class Batch:
    """``images[view]`` is a ``(B, 3, size, size)`` float32 tensor; ``keys``/``meta``/``locations`` are per sample
    (``locations``: each sample's ``Location`` in its source)."""

    images: dict[str, torch.Tensor]
    keys: list[str]
    meta: list[dict[str, Any]]
    locations: list[Location] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Sample:
    key: str
    images: dict[str, torch.Tensor]
    meta: dict[str, Any]
    location: Location


def epoch_permutation(n: int, seed: int, epoch: int, *salt: int) -> np.ndarray:
    """The permutation of ``range(n)`` for (seed, epoch[, salt...]): identical on every rank and run."""
    return np.random.default_rng([seed, epoch, *salt]).permutation(n)


def _raise(error: BaseException) -> RawSample:
    raise error


class ImageLoader:
    """Batches of decoded, resized, normalised images from an ``ImageSource`` (see the module docstring)."""

    def __init__(
        self,
        source: ImageSource,
        *,
        views: Mapping[str, ViewConfig] | None = None,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        epochs: int | None = 1,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
        num_workers: int = 0,
        prefetch: int | None = None,
    ) -> None:
        if batch_size < 1 or seed < 0 or (epochs is not None and epochs < 1):
            raise ValueError(f"need batch_size >= 1, seed >= 0, epochs >= 1 or None; got {batch_size}, {seed}, {epochs}")
        if num_workers < 0 or (prefetch is not None and prefetch < 1):
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1 or None; got {num_workers}, {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if source.size < world_size:
            unit = "shards" if isinstance(source, ShardedImageSource) else "samples"
            raise DataError(f"{source} has {source.size} {unit}, fewer than world_size {world_size}: "
                            f"every rank needs at least one")
        self.source = source
        self.views = dict(views) if views is not None else {"encoder": ViewConfig()}
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epochs, self.rank, self.world_size = epochs, rank, world_size
        self.max_pixels, self.min_side = max_pixels, min_side
        # Workers start on the first iteration and live until close(); ``prefetch``: samples read ahead.
        self.num_workers = num_workers
        self.prefetch = prefetch or (default_window(num_workers, batch_size, self.views) if num_workers else 0)
        self._pool: DecodePool | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        # What state_dict() saves; consistent whenever the iterator is paused at a yield.
        self._epoch = 0
        self._position: Position = self._start_position()
        self._skips, self._epoch_skips = SkipCounter(), SkipCounter()
        self._samples = self._batches = self._dropped_last = 0
        self._epoch_good = self._epoch_batches = 0

    # ------------------------------------------------------------------ public
    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (= completed epochs)."""
        return self._epoch

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self._epoch < self.epochs:
            yield from self._epoch_batches_from_position()
            self._end_epoch()

    def close(self) -> None:
        """Stop and reap the decode workers, if any (idempotent; iterating again starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """A JSON-safe snapshot of the position and counters after the last batch handed out."""
        position = list(self._position) if isinstance(self._position, tuple) else self._position
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "epoch": self._epoch,
            "position": position,
            "epoch_good": self._epoch_good,
            "epoch_batches": self._epoch_batches,
            "epoch_skips": self._epoch_skips.counts,
            "samples": self._samples,
            "batches": self._batches,
            "dropped_last": self._dropped_last,
            "skips": self._skips.counts,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict`` of a loader over the same source and settings)."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"not an ImageLoader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        mismatches = [f"{name} {state.get(name)!r} in the state, {value!r} here"
                      for name, value in self._identity().items() if state.get(name) != value]
        if mismatches:
            raise DataError("loader state does not match this loader: " + "; ".join(mismatches))
        position = state["position"]
        self._position = tuple(position) if isinstance(position, list) else int(position)
        self._epoch = int(state["epoch"])
        self._epoch_good, self._epoch_batches = int(state["epoch_good"]), int(state["epoch_batches"])
        self._epoch_skips, self._skips = SkipCounter(state["epoch_skips"]), SkipCounter(state["skips"])
        self._samples, self._batches = int(state["samples"]), int(state["batches"])
        self._dropped_last = int(state["dropped_last"])

    def summary(self) -> dict[str, Any]:
        """Counts for the run summary: samples and batches handed out, skips by reason, drops."""
        return {
            "source": self.source.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "epochs_completed": self._epoch,
            "samples": self._samples,
            "batches": self._batches,
            "skipped": self._skips.counts,
            "skipped_total": self._skips.total,
            "dropped_last": self._dropped_last,
        }

    # ------------------------------------------------------------------ order
    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same samples."""
        return {"source": self.source.name, "source_size": self.source.size, "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size}

    def _start_position(self) -> Position:
        return (0, 0) if isinstance(self.source, ShardedImageSource) else 0

    def _rank_order(self, epoch: int, n: int) -> np.ndarray:
        """This rank's share of the epoch's permutation of ``range(n)`` (cached for the current epoch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order[self.rank :: self.world_size])
        return self._order_cache[1]

    def _items(self, epoch: int, position: Position) -> Iterator[_Item]:
        if isinstance(self.source, MapImageSource):
            yield from self._map_items(self.source, epoch, int(position))  # type: ignore[arg-type]
        elif isinstance(self.source, ShardedImageSource):
            yield from self._sharded_items(self.source, epoch, position)  # type: ignore[arg-type]
        else:  # pragma: no cover - a new source kind must say how it is ordered
            raise TypeError(f"{type(self.source).__name__} is neither a map nor a sharded source")

    def _map_items(self, source: MapImageSource, epoch: int, start: int) -> Iterator[_Item]:
        order = self._rank_order(epoch, len(source))
        for slot in range(start, len(order)):
            index = int(order[slot])
            yield slot + 1, source.key(index), partial(source.read, index), (0, index)

    def _sharded_items(self, source: ShardedImageSource, epoch: int, start: tuple[int, int]) -> Iterator[_Item]:
        shard_order = self._rank_order(epoch, len(source.shards))
        first_slot, first_sample = start
        for shard_slot in range(first_slot, len(shard_order)):
            shard = int(shard_order[shard_slot])
            sample_start = first_sample if shard_slot == first_slot else 0
            with source.open_shard(shard) as reader:
                # counted when the shard is first opened, or on a resume into a shard whose listing now fails
                if reader.error and (sample_start == 0 or not reader.keys):
                    # An item whose read fails, so the skip is counted when the consumer reaches it, in order
                    # (the workers' read-ahead opens shards before earlier samples are consumed).
                    yield ((shard_slot, 0), source.shards[shard], partial(_raise, BadSample("bad_shard", reader.error)),
                           (shard, -1))
                n = len(reader.keys)
                order = epoch_permutation(n, self.seed, epoch, shard) if self.shuffle else np.arange(n)
                for sample_slot in range(sample_start, n):
                    index = int(order[sample_slot])
                    after = (shard_slot, sample_slot + 1) if sample_slot + 1 < n else (shard_slot + 1, 0)
                    yield after, reader.keys[index], partial(reader.read, index), (shard, index)

    # ------------------------------------------------------------------ batches
    def _epoch_batches_from_position(self) -> Iterator[Batch]:
        if self.num_workers:
            yield from self._epoch_batches_in_workers()
            return
        pending: list[_Sample] = []
        for position_after, key, read, location in self._items(self._epoch, self._position):
            sample = self._load(key, read, location)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._hand_out(pending, position_after)
                pending = []
        if pending and self.drop_last:
            self._dropped_last += len(pending)
            log.debug("%s: dropped the last %d samples of epoch %d (drop_last)", self.source, len(pending), self._epoch)
        elif pending:
            yield self._hand_out(pending, self._end_position())

    def _epoch_batches_in_workers(self) -> Iterator[Batch]:
        """``_epoch_batches_from_position`` with decoding in the pool: the same loop over the same order; the
        workers write each decoded sample straight into its batch's row (vilex/data/parallel.py)."""
        if self._pool is None or self._pool.closed:
            self._pool = DecodePool(self.num_workers, self.views, max_pixels=self.max_pixels, min_side=self.min_side,
                                    window=self.prefetch, name=str(self.source))
        # the pool carries a position through opaquely: the location travels inside it
        items = (((after, location), key, read)
                 for after, key, read, location in self._items(self._epoch, self._position))
        run = self._pool.decode_in_order(items, self.batch_size)
        keys: list[str] = []
        metas: list[dict[str, Any]] = []
        locations: list[Location] = []
        try:
            for (position_after, location), key, outcome in run:
                if isinstance(outcome, BadSample):
                    self._skip(outcome.reason, key, outcome.detail)
                    continue
                self._epoch_good += 1
                keys.append(outcome.key)
                metas.append(outcome.meta)
                locations.append(location)
                if len(keys) == self.batch_size:
                    yield self._batch(run.take_batch(), keys, metas, position_after, locations)
                    keys, metas, locations = [], [], []
            if keys and self.drop_last:
                self._dropped_last += len(keys)
                log.debug("%s: dropped the last %d samples of epoch %d (drop_last)", self.source, len(keys), self._epoch)
            elif keys:
                yield self._batch(run.take_batch(), keys, metas, self._end_position(), locations)
        finally:
            run.close()

    def _end_position(self) -> Position:
        if isinstance(self.source, ShardedImageSource):
            return (len(self._rank_order(self._epoch, len(self.source.shards))), 0)
        return len(self._rank_order(self._epoch, len(self.source)))  # type: ignore[arg-type]

    def _load(self, key: str, read: Callable[[], RawSample], location: Location) -> _Sample | None:
        try:
            raw = read()
            image = decode_image(raw.data, max_pixels=self.max_pixels, min_side=self.min_side)
        except BadSample as bad:
            self._skip(bad.reason, key, bad.detail)
            return None
        self._epoch_good += 1
        return _Sample(raw.key, {name: render_view(image, view) for name, view in self.views.items()}, raw.meta,
                       location)

    def _skip(self, reason: str, key: str, detail: str) -> None:
        self._skips.add(reason)
        self._epoch_skips.add(reason)
        seen = self._skips.counts[reason]
        level = logging.WARNING if seen <= LOG_FIRST_SKIPS else logging.DEBUG
        more = f" (further '{reason}' skips are logged at DEBUG level)" if seen == LOG_FIRST_SKIPS else ""
        log.log(level, "skipped %s in %s: %s%s%s", key, self.source, reason, f" ({detail})" if detail else "", more)

    def _hand_out(self, samples: list[_Sample], position_after: Position) -> Batch:
        images = {name: torch.stack([s.images[name] for s in samples]) for name in self.views}
        return self._batch(images, [s.key for s in samples], [s.meta for s in samples], position_after,
                           [s.location for s in samples])

    def _batch(self, images: dict[str, torch.Tensor], keys: list[str], metas: list[dict[str, Any]],
               position_after: Position, locations: list[Location]) -> Batch:
        """Move the position past the batch's last sample and count it: the only place the position moves."""
        self._position = position_after
        self._samples += len(keys)
        self._batches += 1
        self._epoch_batches += 1
        return Batch(images=images, keys=keys, meta=metas, locations=locations)

    def _end_epoch(self) -> None:
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        if self._epoch_good == 0:
            raise DataError(f"no decodable images in {self.source}{where}: {self._epoch_skips.describe()}")
        if self._epoch_batches == 0:
            raise DataError(f"{self.source}{where}: only {self._epoch_good} decodable samples, fewer than "
                            f"batch_size {self.batch_size} with drop_last: an epoch yields no batch")
        level = logging.WARNING if self._epoch_skips.total else logging.INFO
        log.log(level, "%s%s epoch %d: %d decodable samples, %d batches, %s", self.source, where, self._epoch,
                self._epoch_good, self._epoch_batches, self._epoch_skips.describe())
        self._epoch += 1
        self._position = self._start_position()
        self._epoch_good = self._epoch_batches = 0
        self._epoch_skips = SkipCounter()


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> ImageLoader:
    """The loader an experiment's data section describes, for one rank of ``world_size``."""
    return ImageLoader(
        build_source(cfg),
        views=cfg.views,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        drop_last=cfg.drop_last,
        epochs=cfg.epochs,
        rank=rank,
        world_size=world_size,
        max_pixels=cfg.max_pixels,
        min_side=cfg.min_side,
        num_workers=cfg.num_workers,
    )


def first_images(source_cfg: DataConfig, size: int, n: int, fit: str = "crop") -> Batch:
    """The first ``n`` decodable samples of a source in file order, one view ``"image"`` (N,3,S,S) in [0, 1].

    The fixed image sets of validation grids and reconstruction evaluation.
    """
    view = ViewConfig(size=size, fit=fit, mean=(0, 0, 0), std=(1, 1, 1))
    loader = ImageLoader(build_source(source_cfg), views={"image": view}, batch_size=n, shuffle=False, epochs=1,
                         drop_last=False)
    return next(iter(loader))


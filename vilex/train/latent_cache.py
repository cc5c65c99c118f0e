"""latent_cache.py — cache the VAE posterior (mean, std) of every training image, per shard, built by every process.

Encoding images with the frozen VAE every step costs as much as a good part of the UNet step (the diffusers
textual-inversion example does exactly that). The posterior of an image does not change during training, so we store
its mean and std once and SAMPLE ``z = mean + std * eps`` each step — the same distribution
``vae.encode(x).latent_dist.sample()`` gives, without the encoder pass; and the decoder view (e.g. 512 px) of a
training image is then never decoded at all (vilex/train/loop.py leaves it out of the loader).

Key. The folder ``<latent_cache.dir>/<key>/`` is named by a hash of what determines every latent in it: the VAE's
config and weights, the decoder view (resolution, crop/letterbox, pad colour, normalisation), the source's type and
decoding limits, the storage dtype. What the data holds is NOT in the key, so opening a cache never lists every
sample: the cache is a set of units (vilex/train/latent_sidecars.py), each carrying the fingerprint of the data it
was encoded from, and a unit whose data changed is re-encoded on its own.

* Sharded sources (webdataset): one unit per shard, named from the shard's path or URL and fingerprinted by
  ``ShardedImageSource.shard_fingerprint`` (size + mtime for a local file); the shard list is not part of the key
  either, so adding shards encodes only the new ones.
* Map sources (folder, hf): one unit per ``latent_cache.chunk_rows`` consecutive indices, fingerprinted by those
  samples' keys and file sizes/mtimes. The source path is part of the key here. Checking the chunks at start stats
  every sample, O(dataset) like the source's own listing: map sources are single folders or tables, small enough.

Building. Every process of the launch (``vilex cache-latents`` or the training start, under torchrun/deepspeed:
vilex.train.distributed) takes units ``u % world == rank``, checks each one's marker (a stat and a small read) and
encodes those that are missing, broken or stale, writing sidecar then marker. Latents are bit-identical whoever
encodes a unit: a unit is always encoded alone, in batches from its first sample. A killed build resumes by redoing
only unmarked units. Each process then reports in ``<key>/progress/<run token>/`` and waits at most
``latent_cache.wait_timeout_min`` for the others' reports (a file, not a collective, so the wait has its own clear
limit, and it proves the folder is shared: processes on several nodes need a cache folder they all see).

Reading. Training looks a sample up by its ``Batch.locations`` entry — (shard, position), or (0, index) for a map
source — so there is no global index: the one sidecar the loader is in (a few, for a shuffled map source) is open
(``safe_open``: rows are read lazily) and closed when the loader moves on; memory is O(one shard) whatever the
dataset size. The key stored for that row must match the batch's key.

Verified, never trusted. A broken unit (marker unreadable, sidecar missing or resized, marked by a reader) is
re-encoded at start with a warning. Each sidecar's content hash is checked against its marker the first time a
process reads it, and every read is checked for NaN/inf; a failure marks that unit (``<name>.corrupt``, marker
withdrawn) so the next start re-encodes it, and stops the run with one line (--resume auto continues).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from vilex.config import to_dict
from vilex.errors import UserError
from vilex.train import distributed as D
from vilex.train.latent_sidecars import (OpenSidecar, SidecarDamaged, Unit, mark_corrupt, read_marker, shard_unit_name,
                                         unit_state, write_unit)

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # images per VAE call; a unit's batches always start at its first sample (identical latents)
FACTS_FILE = "facts.json"
PROGRESS_DIR = "progress"
OPEN_SHARDS = 2  # a batch can straddle a shard boundary
OPEN_CHUNKS = 64  # a shuffled map source jumps between chunks
# Test hook: SIGKILL this process after it has written this many units (a precompute killed at a known point).
KILL_AFTER_UNITS_ENV = "VILEX_TEST_KILL_AFTER_UNITS"


class CorruptCacheError(UserError):
    """A latent cache whose files do not match what was written."""


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- units of a source
class ShardLayout:
    """One unit per shard; a sample's location (shard, position) is its (unit, row)."""

    kind = "sharded"

    def __init__(self, source: Any) -> None:
        self.source = source

    @property
    def count(self) -> int:
        return len(self.source.shards)

    def unit(self, u: int) -> Unit:
        return Unit(u, shard_unit_name(self.source.shards[u]), f"shard {self.source.shards[u]}")

    def fingerprint(self, u: int) -> str:
        return self.source.shard_fingerprint(u)

    def where(self, location: Sequence[int]) -> tuple[int, int]:
        return int(location[0]), int(location[1])

    @contextmanager
    def samples(self, u: int) -> Iterator[tuple[list[str], Callable[[int], Any], str | None]]:
        """(keys by position, read(position), why the shard could not be listed to its end or None)."""
        with self.source.open_shard(u) as reader:
            yield list(reader.keys), reader.read, reader.error


class ChunkLayout:
    """A map source in units of ``rows`` indices; location (0, index) is (index // rows, index % rows)."""

    kind = "map"

    def __init__(self, source: Any, rows: int) -> None:
        self.source, self.rows = source, rows

    @property
    def count(self) -> int:
        return -(-len(self.source) // self.rows)

    def _range(self, u: int) -> range:
        return range(u * self.rows, min((u + 1) * self.rows, len(self.source)))

    def unit(self, u: int) -> Unit:
        span = self._range(u)
        return Unit(u, f"chunk-{u:06d}", f"samples {span.start}-{span.stop - 1} of {self.source}")

    def fingerprint(self, u: int) -> str:
        """The chunk's keys, with each file's size and mtime when the source is a folder (no decoding)."""
        h = hashlib.sha256()
        root = getattr(self.source, "root", None)
        for i in self._range(u):
            key = self.source.key(i)
            h.update(key.encode() + b"\0")
            if root is not None:
                try:
                    st = os.stat(Path(root) / key)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
                except OSError:
                    h.update(b"missing\0")
        return h.hexdigest()

    def where(self, location: Sequence[int]) -> tuple[int, int]:
        return divmod(int(location[1]), self.rows)

    @contextmanager
    def samples(self, u: int) -> Iterator[tuple[list[str], Callable[[int], Any], str | None]]:
        span = self._range(u)
        yield [self.source.key(i) for i in span], lambda p: self.source.read(span.start + p), None


Layout = ShardLayout | ChunkLayout


def layout_for(source: Any, chunk_rows: int) -> Layout:
    """How ``source`` is cut into units (``chunk_rows``: samples per unit of a map source)."""
    from vilex.data.sources import MapImageSource, ShardedImageSource

    if isinstance(source, ShardedImageSource):
        return ShardLayout(source)
    if isinstance(source, MapImageSource):
        return ChunkLayout(source, chunk_rows)
    raise TypeError(f"{type(source).__name__} is neither a map nor a sharded source")  # pragma: no cover


def cache_key(decoder: Any, data_cfg: Any, view: Any, layout: Layout, dtype: str) -> tuple[str, dict]:
    """The folder name of a cache and the facts it was made from (``facts.json`` in it, for people)."""
    named = ("type", "hf_format", "image_column", "split", "max_pixels", "min_side")
    if layout.kind == "map":
        named += ("path",)  # a sharded source's units are named and fingerprinted by their shards instead
    vae = decoder.vae
    facts = {
        "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
        "vae_weights_sha256": _weights_hash(vae),
        "vae_dtype": str(decoder.dtype),
        "view": to_dict(view),
        "source": {k: v for k, v in to_dict(data_cfg).items() if k in named},
        "layout": layout.kind,
        "chunk_rows": layout.rows if isinstance(layout, ChunkLayout) else None,
        "dtype": dtype,
        "format": 2,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, facts


# ----------------------------------------------------------------------------- reading
@dataclass
class BuildReport:
    """What a precompute found and did, summed over every process."""

    units: int = 0
    encoded: int = 0  # units (re-)encoded by this launch
    entries: int = 0  # decodable samples in the whole cache
    skipped: dict[str, int] = field(default_factory=dict)  # by reason, in the units encoded now

    def add(self, other: dict[str, Any]) -> None:
        self.units += other["units"]
        self.encoded += other["encoded"]
        self.entries += other["entries"]
        for reason, n in other["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n


class LatentCache:
    """Read side: ``sample(keys, locations, decoder, generator)`` -> model-space latents for those samples."""

    def __init__(self, folder: Path, layout: Layout, report: BuildReport | None = None) -> None:
        self.folder = Path(folder)
        self.layout = layout
        self.report = report
        self._open: OrderedDict[int, OpenSidecar] = OrderedDict()
        self._capacity = OPEN_SHARDS if self.layout.kind == "sharded" else OPEN_CHUNKS
        self._verified = bytearray(layout.count)  # 1 = this process has checked the unit's content hash
        self.hits = 0

    def __len__(self) -> int:
        """Decodable samples in the cache (from the build report, else from every unit's marker)."""
        if self.report is not None:
            return self.report.entries
        return sum((read_marker(self.folder, self.layout.unit(u)) or {"entries": 0})["entries"]
                   for u in range(self.layout.count))

    def _sidecar(self, u: int) -> OpenSidecar:
        """Unit ``u``'s sidecar, opened on first use (its hash checked on this process's first open); the least
        recently used one is closed when more than a few are open."""
        if u in self._open:
            self._open.move_to_end(u)
            return self._open[u]
        unit = self.layout.unit(u)
        try:
            side = OpenSidecar(self.folder, unit, verify=not self._verified[u])
        except SidecarDamaged as e:
            self._corrupt(unit, str(e))
        self._verified[u] = 1
        self._open[u] = side
        while len(self._open) > self._capacity:
            self._open.popitem(last=False)[1].close()
        return side

    def _corrupt(self, unit: Unit, problem: str) -> None:
        """Mark the unit so the next start re-encodes it, and stop in one line."""
        mark_corrupt(self.folder, unit, problem)
        raise CorruptCacheError(f"latent cache {self.folder} is corrupt: {problem}; it is marked and will be rebuilt "
                                f"when the run restarts (--resume auto continues from the last checkpoint)")

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def posterior(self, keys: Sequence[str], locations: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each sample, float32, in order; ``locations`` as ``Batch.locations``."""
        if len(keys) != len(locations):
            raise ValueError(f"{len(keys)} keys but {len(locations)} locations")
        wanted: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()  # unit -> [(slot in the batch, row)]
        for slot, location in enumerate(locations):
            u, row = self.layout.where(location)
            wanted.setdefault(u, []).append((slot, row))
        means: list[torch.Tensor | None] = [None] * len(keys)
        stds: list[torch.Tensor | None] = [None] * len(keys)
        for u, picks in wanted.items():
            side = self._sidecar(u) if 0 <= u < self.layout.count else None
            for slot, row in picks:
                if side is None or not side.holds(row, keys[slot]):
                    raise UserError(f"latent cache {self.folder} has no entry for sample '{keys[slot]}': the data "
                                    f"changed after the cache was built; delete that folder or set "
                                    f"latent_cache.enabled=false")
            mean, std = side.rows([row for _, row in picks])
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                self._corrupt(self.layout.unit(u), f"non-finite latents in {self.layout.unit(u).name} for samples "
                                                   f"{[keys[slot] for slot, _ in picks][:3]}")
            for i, (slot, _) in enumerate(picks):
                means[slot], stds[slot] = mean[i:i + 1], std[i:i + 1]
        self.hits += len(keys)
        return torch.cat(means).float(), torch.cat(stds).float()

    def sample(self, keys: Sequence[str], locations: Sequence[Sequence[int]], decoder: Any,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 in model space: the decoder's own posterior sampling, from the cached (mean, std)."""
        mean, std = self.posterior(keys, locations)
        return decoder.model_space_from_posterior(mean.to(decoder.device), std.to(decoder.device), generator)

    # ------------------------------------------------------------------ building
    @classmethod
    def open_or_build(cls, cfg: Any, decoder: Any, data_cfg: Any, view: Any, rank: int = 0, world_size: int = 1,
                      source: Any = None) -> "LatentCache":
        """Complete the cache for (VAE, view, data) — this process's share of the units — wait for the other
        processes' shares, and open it. ``source``: the training loader's (so locations mean the same shards)."""
        from vilex.data import build_source

        layout = layout_for(source if source is not None else build_source(data_cfg), cfg.chunk_rows)
        key, facts = cache_key(decoder, data_cfg, view, layout, cfg.dtype)
        folder = Path(cfg.dir).expanduser() / key
        if world_size > 1:
            D.init_process_group_if_needed()
        token = _run_token(world_size)
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not (folder / FACTS_FILE).is_file():
            tmp = folder / f".{FACTS_FILE}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(facts, indent=1, default=str))
            os.replace(tmp, folder / FACTS_FILE)
        mine = build_share(folder, layout, decoder, view, data_cfg, cfg.dtype, rank, world_size)
        report = BuildReport()
        for part in _gather(folder, token, rank, world_size, mine, wait_minutes(cfg)):
            report.add(part)
        if rank == 0:
            log.info("latent cache %s: %d units, %d encoded now, %d images", folder, report.units, report.encoded,
                     report.entries)
        return cls(folder, layout, report)


# ----------------------------------------------------------------------------- building
def build_share(folder: Path, layout: Layout, decoder: Any, view: Any, data_cfg: Any, dtype: str,
                rank: int, world: int) -> dict[str, Any]:
    """Check this process's units (``u % world == rank``) and encode the missing, broken or stale ones."""
    report: dict[str, Any] = {"rank": rank, "units": 0, "encoded": 0, "entries": 0, "skipped": {}}
    todo: list[tuple[Unit, str]] = []
    for u in range(rank, layout.count, world):
        unit, fingerprint = layout.unit(u), layout.fingerprint(u)
        state, detail = unit_state(folder, unit, fingerprint)
        report["units"] += 1
        if state == "done":
            report["entries"] += detail["entries"]
            continue
        if state == "broken":
            log.warning("latent cache: %s is broken (%s): rebuilding it in %s", unit.name, detail, folder)
        elif detail:
            log.info("latent cache %s: %s", folder, detail)
        todo.append((unit, fingerprint))
    if todo:
        log.info("latent cache %s: encoding %d of this process's %d units", folder, len(todo), report["units"])
        with _Decoding(view, data_cfg) as decoding:
            for unit, fingerprint in todo:
                marker, skipped = _encode_unit(folder, layout, unit, fingerprint, decoder, decoding, dtype)
                report["encoded"] += 1
                report["entries"] += marker["entries"]
                for reason in skipped.values():
                    report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
                _test_kill_hook(report["encoded"])
    return report


class _Decoding:
    """Decode + render the decoder view of a unit's samples, in order: in this process, or in the data layer's
    decode workers (``data.num_workers``), started once for all units."""

    def __init__(self, view: Any, data_cfg: Any) -> None:
        self.views = {"decoder": view}
        self.max_pixels, self.min_side = data_cfg.max_pixels, data_cfg.min_side
        self.workers = data_cfg.num_workers
        self.pool = None

    def __enter__(self) -> "_Decoding":
        if self.workers:
            from vilex.data.parallel import DecodePool, default_window

            self.pool = DecodePool(self.workers, self.views, max_pixels=self.max_pixels, min_side=self.min_side,
                                   window=default_window(self.workers, ENCODE_BATCH, self.views), name="latent cache")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()

    def batches(self, keys: Sequence[str], read: Callable[[int], Any]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(positions, images)`` for consecutive decodable samples, ``ENCODE_BATCH`` at a time, and
        ``(position, BadSample)`` for each sample that does not decode, in position order."""
        if self.pool is not None:
            yield from self._batches_in_workers(keys, read)
        else:
            yield from self._batches_here(len(keys), read)

    def _batches_here(self, n: int, read: Callable[[int], Any]) -> Iterator[tuple[Any, Any]]:
        from vilex.data.decode import BadSample, decode_image
        from vilex.data.views import render_view

        positions, images = [], []
        for p in range(n):
            try:
                image = decode_image(read(p).data, max_pixels=self.max_pixels, min_side=self.min_side)
            except BadSample as bad:
                yield p, bad
                continue
            positions.append(p)
            images.append(render_view(image, self.views["decoder"]))
            if len(positions) == ENCODE_BATCH:
                yield positions, torch.stack(images)
                positions, images = [], []
        if positions:
            yield positions, torch.stack(images)

    def _batches_in_workers(self, keys: Sequence[str], read: Callable[[int], Any]) -> Iterator[tuple[Any, Any]]:
        from vilex.data.decode import BadSample

        run = self.pool.decode_in_order(((p, key, partial(read, p)) for p, key in enumerate(keys)), ENCODE_BATCH)
        try:
            positions: list[int] = []
            for p, _, outcome in run:
                if isinstance(outcome, BadSample):
                    yield p, outcome
                    continue
                positions.append(p)
                if len(positions) == ENCODE_BATCH:
                    yield positions, run.take_batch()["decoder"]  # encoded before the buffer is reused
                    positions = []
            if positions:
                yield positions, run.take_batch()["decoder"]
        finally:
            run.close()


@torch.no_grad()
def _encode_unit(folder: Path, layout: Layout, unit: Unit, fingerprint: str, decoder: Any,
                 decoding: _Decoding, dtype: str) -> tuple[dict[str, Any], dict[int, str]]:
    """Encode one unit alone (batches from its first sample, so latents do not depend on who encodes it) and write
    its sidecar and marker. Returns the marker and the skipped positions with their reasons."""
    store = torch.float16 if dtype == "float16" else torch.float32
    skipped: dict[int, str] = {}
    rows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    with layout.samples(unit.index) as (keys, read, error):
        for positions, out in decoding.batches(keys, read):
            if isinstance(positions, int):
                skipped[positions] = out.reason
                log.debug("latent cache: skipped %s in %s: %s (%s)", keys[positions], unit.covers, out.reason,
                          out.detail)
                continue
            mean, std = decoder.encode_posterior(out)
            rows.append((positions, mean.to("cpu", store), std.to("cpu", store)))
    if error is not None:
        log.warning("latent cache: %s could not be listed to its end (%s): %d samples listed", unit.covers, error,
                    len(keys))
    if rows:
        shape = rows[0][1].shape[1:]
        mean_all, std_all = torch.zeros(len(keys), *shape, dtype=store), torch.zeros(len(keys), *shape, dtype=store)
        for positions, mean, std in rows:
            mean_all[positions], std_all[positions] = mean, std
    else:
        mean_all, std_all = torch.zeros(0, dtype=store), torch.zeros(0, dtype=store)
    if skipped:
        log.warning("latent cache: %d of %d samples of %s do not decode (%s)", len(skipped), len(keys), unit.covers,
                    ", ".join(sorted(set(skipped.values()))))
    return write_unit(folder, unit, fingerprint, mean_all, std_all, keys, skipped, error), skipped


def _test_kill_hook(written: int) -> None:
    limit = os.environ.get(KILL_AFTER_UNITS_ENV)
    if limit and written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- waiting for the other processes
def wait_minutes(cfg: Any) -> float:
    """latent_cache.wait_timeout_min, else the collective timeout vilex.train.distributed gives process groups."""
    if cfg.wait_timeout_min is not None:
        return float(cfg.wait_timeout_min)
    return float(os.environ.get("VILEX_COLLECTIVE_TIMEOUT_MIN", "120"))


def _run_token(world: int) -> str | None:
    """A name all processes of this launch share (rank 0's, broadcast), so reports of earlier launches are ignored."""
    if world == 1:
        return None
    import torch.distributed as dist

    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(folder: Path, token: str | None, rank: int, world: int, mine: dict[str, Any],
            minutes: float) -> list[dict[str, Any]]:
    """Every process's report: this one's is written to the shared folder, the others' are awaited there for at most
    ``minutes`` (counted from when this process finished its own share)."""
    if world == 1:
        return [mine]
    where = folder / PROGRESS_DIR / str(token)
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".rank-{rank:05d}.json.tmp"
    tmp.write_text(json.dumps(mine))
    os.replace(tmp, where / f"rank-{rank:05d}.json")
    deadline, pause = time.monotonic() + minutes * 60, 0.1
    names = [f"rank-{r:05d}.json" for r in range(world)]
    while True:
        present = set(os.listdir(where))
        missing = [r for r, name in enumerate(names) if name not in present]
        if not missing:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise UserError(f"latent cache {folder}: process(es) {shown} did not finish their share of the cache "
                            f"within {minutes:g} min (latent_cache.wait_timeout_min): give a large cache more time "
                            f"or build it first with `vilex cache-latents`; processes on several nodes need a "
                            f"latent_cache.dir they all share")
        time.sleep(min(pause, left))
        pause = min(pause * 1.5, 5.0)
    reports = [json.loads((where / name).read_text()) for name in names]
    D.barrier()  # every process has read every report (an instant: all are here): the folder can go
    if rank == 0:
        shutil.rmtree(where, ignore_errors=True)
    return reports

"""What finding a sample's latents costs in memory: per-shard sidecars against one global JSON index.

A synthetic listing of ``--samples`` samples (default 1,000,000) in ``--shards`` shards is written twice, with no
image: (a) as the global ``index.json`` a single-file cache keeps (every key -> [shard, row]), and (b) as per-shard
sidecars with their completion markers (vilex/train/latent_sidecars.py; 1-element latents, since only the lookup
structures are measured, not the latents, which both read lazily). Each is then opened the way training opens it, in
a fresh process: (a) parse the index into a dict, look samples up; (b) ``LatentCache`` over the shard listing, look
one batch up in every shard in turn (the loader moves shard by shard) and every sample of the first shard. Printed:
the process's peak RSS over its baseline after imports, and, in another fresh process (tracing slows and inflates
it), the peak of Python allocations (tracemalloc) while opening and looking up.

    python scripts/bench/latent_index_memory.py                     # 1M samples in 100 shards
    python scripts/bench/latent_index_memory.py --samples 1000000 --shards 1000
    python scripts/bench/latent_index_memory.py --every-sample   # look every sample up, in batches (an epoch)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BATCH = 32


class SyntheticShards:
    """A sharded listing with nothing behind it: what ``ShardLayout`` needs (paths and fingerprints)."""

    def __init__(self, shards: int) -> None:
        self.shards = [f"/synthetic/shard-{i:05d}.tar" for i in range(shards)]

    def shard_fingerprint(self, index: int) -> str:
        return "synthetic"


def _keys(shard: int, rows: int) -> list[str]:
    return [f"shard-{shard:05d}/{shard * rows + i:09d}" for i in range(rows)]


def write(root: Path, samples: int, shards: int) -> None:
    import torch

    from vilex.train.latent_cache import ShardLayout
    from vilex.train.latent_sidecars import write_unit

    rows = samples // shards
    layout = ShardLayout(SyntheticShards(shards))
    index = {}
    (root / "sidecars").mkdir(parents=True)
    for s in range(shards):
        keys = _keys(s, rows)
        index.update((k, [s, r]) for r, k in enumerate(keys))
        tiny = torch.zeros(rows, 1, 1, 1, dtype=torch.float16)
        write_unit(root / "sidecars", layout.unit(s), "synthetic", tiny, tiny.clone(), keys, {}, None)
    (root / "index.json").write_text(json.dumps({"index": index, "shards": [f"shard-{s:05d}.safetensors"
                                                                            for s in range(shards)],
                                                 "facts": {}, "skipped": {}}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_baseline() -> int:
    """Current RSS, with the peak reset to it (Linux: clear_refs 5), so the peak after is this phase's own; elsewhere
    the process's peak so far (which importing torch may already have set above the phase's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _peak_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(kind: str, root: Path, samples: int, shards: int, trace: bool, every: bool) -> dict:
    """Run in a fresh process: open the cache as training does, look samples up, report the memory it took."""
    import safetensors.torch  # noqa: F401 - the baseline includes what training has imported anyway
    import torch  # noqa: F401
    import xxhash  # noqa: F401

    from vilex.train.latent_cache import LatentCache, ShardLayout

    rows = samples // shards
    base = _rss_baseline()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    if kind == "old":  # what the single-file cache did at open: the whole index, as a dict of tuples
        meta = json.loads((root / "index.json").read_text())
        index = {k: (int(s), int(r)) for k, (s, r) in meta["index"].items()}
        del meta
        found = sum(index[k][1] >= 0 for s in range(shards) for k in _keys(s, rows)[:rows if every else BATCH])
        found += 0 if every else sum(index[k][1] >= 0 for k in _keys(0, rows))
    else:
        cache = LatentCache(root / "sidecars", ShardLayout(SyntheticShards(shards)))
        found = 0
        for s in range(shards):
            keys = _keys(s, rows)
            for start in range(0, rows if every or s == 0 else BATCH, BATCH):
                part = keys[start:start + BATCH]
                found += len(cache.posterior(part, [(s, r) for r in range(start, start + len(part))])[0])
        cache.close()
    seconds = time.perf_counter() - t0
    if trace:
        return {"tracemalloc_peak_mib": round(tracemalloc.get_traced_memory()[1] / 2**20, 1)}
    return {"lookups": found, "seconds": round(seconds, 2),
            "peak_rss_over_baseline_mib": round((_peak_kib() - base) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--dir", default=None, help="where to write the synthetic caches (default: a temp folder)")
    ap.add_argument("--measure", choices=["old", "new"], help=argparse.SUPPRESS)  # the child processes
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--every-sample", action="store_true", help="look every sample up (default: one batch per shard, "
                                                                "and all of the first shard)")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.dir), args.samples, args.shards, args.trace,
                                 args.every_sample)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        write(root, args.samples, args.shards)
        sidecar_bytes = sum(p.stat().st_size for p in (root / "sidecars").iterdir())
        index_mib = (root / "index.json").stat().st_size / 2**20
        print(f"{args.samples:,} samples in {args.shards} shards: index.json {index_mib:.1f} MiB; sidecars + markers "
              f"{sidecar_bytes / 2**20:.1f} MiB (keys included; 1-element latents)")
        for kind in ("old", "new"):
            result = {}
            for trace in ([], ["--trace"]):
                out = subprocess.run([sys.executable, __file__, "--measure", kind, "--dir", str(root), "--samples",
                                      str(args.samples), "--shards", str(args.shards), *trace,
                                      *(["--every-sample"] if args.every_sample else [])], check=True,
                                     capture_output=True, text=True)
                result.update(json.loads(out.stdout.strip().splitlines()[-1]))
            label = "global index.json" if kind == "old" else "per-shard sidecars"
            print(f"{label:>20}: peak RSS +{result['peak_rss_over_baseline_mib']} MiB, Python allocations peak "
                  f"{result['tracemalloc_peak_mib']} MiB, {result['lookups']:,} lookups in {result['seconds']} s")


if __name__ == "__main__":
    main()

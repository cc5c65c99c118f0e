"""What checkpoint verification costs: hashing a real-scale-sized checkpoint for its manifest, next to writing it.

A stage-1 checkpoint at real scale holds the SigLIP-so400m encoder (~1.7 GB in fp32) and its AdamW state (~3.4 GB).
This writes a tensor file of ``--gib`` GiB with ``torch.save`` (as a checkpoint does, fsync included), then times
``write_manifest`` (the hash at save time) and ``folder_problem`` (the check at resume) on it, and prints the ratios.

    python scripts/bench/checkpoint_manifest.py --gib 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from vilex.checkpoint import folder_problem, write_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (default 1)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder; use the training disk)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        folder = Path(root) / "checkpoint-1"
        folder.mkdir()
        n = int(args.gib * 2**30 / 4)
        tensor = torch.randn(n)
        t0 = time.perf_counter()
        torch.save({"w": tensor}, folder / "optimizer.pt")
        with open(folder / "optimizer.pt", "rb") as fh:
            os.fsync(fh.fileno())
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_manifest(folder)
        hash_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert folder_problem(folder) is None
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        load_s = time.perf_counter() - t0
    size = n * 4 / 2**30
    print(f"checkpoint {size:.2f} GiB: write {write_s:.2f} s, manifest hash {hash_s:.2f} s "
          f"({size / hash_s:.2f} GiB/s), verify {verify_s:.2f} s, load {load_s:.2f} s")
    print(f"ratio manifest/write {hash_s / write_s:.2f}; ratio verify/load {verify_s / load_s:.2f}")


if __name__ == "__main__":
    main()

"""latent_sidecars.py — one unit of the latent cache on disk: a sidecar of VAE posteriors and its completion marker.

A unit is one shard of a sharded source (a webdataset tar), or ``latent_cache.chunk_rows`` consecutive indices of a
map source (folder, hf). Its files sit side by side in the cache folder (never beside the data: a source may be
remote or read-only):

    <name>.safetensors  ``mean``, ``std``: (positions, C, h, w); row p is the sample at position p of the unit (zeros
                        where it did not decode). Header metadata (one JSON entry): the key of every position,
                        the skipped positions and why, the unit's source fingerprint.
    <name>.done.json    the completion marker, written last and atomically (tmp + rename): what the unit covers, the
                        source fingerprint it was encoded from, counts, and the sidecar's size and xxh3-128 hash.
    <name>.corrupt      left by a reader that found the sidecar damaged; its marker is removed at the same time, so
                        the next start re-encodes this unit alone and says why.

A unit is done exactly when its marker parses, names the current source fingerprint and its sidecar has the recorded
size: anything else is encoded again, so a killed precompute redoes only the units it had not marked. The content
hash is checked by each process's first read of a sidecar (a web-scale cache is not re-hashed at every start).

A shard's unit name is its file stem plus a hash of its full path or URL (``s-000123-3fa2b1c9d0e4``): readable, and
distinct for same-named shards in different folders. A killed write can leave a hidden ``.<name>…tmp-<host>-<pid>``
file; it is never read and can be deleted.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from vilex.checkpoint import file_hash
from vilex.errors import UserError

SIDECAR = ".safetensors"
MARKER = ".done.json"
CORRUPT_NOTE = ".corrupt"
FORMAT = 1
HEADER_KEY = "vilex_latent_unit"


@dataclass(frozen=True)
class Unit:
    """One sidecar's worth of samples: ``index`` (shard index or chunk number), file ``name``, what it ``covers``."""

    index: int
    name: str
    covers: str


def shard_unit_name(shard: str) -> str:
    """A file name from a shard's identity: its stem, for people, and a hash of its full path or URL, for uniqueness."""
    identity = shard if "://" in shard or shard.startswith("pipe:") else os.path.abspath(shard)
    stem = PurePosixPath(urlsplit(identity).path).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:48] or "shard"
    return f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _paths(folder: Path, unit: Unit) -> tuple[Path, Path, Path]:
    return folder / f"{unit.name}{SIDECAR}", folder / f"{unit.name}{MARKER}", folder / f"{unit.name}{CORRUPT_NOTE}"


def _write_atomically(path: Path, data: bytes) -> None:
    """Bytes on disk under ``path`` in full or not at all (a hidden temp file, flushed, renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable before anything that depends on it is written
    finally:
        os.close(fd)


def read_marker(folder: Path, unit: Unit) -> dict[str, Any] | None:
    """The unit's completion marker (None when there is none); ``ValueError`` when it does not parse."""
    try:
        marker = json.loads(_paths(folder, unit)[1].read_text())
    except FileNotFoundError:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("sidecar"), dict):
        raise ValueError("not a completion marker")
    for field in ("fingerprint", "entries"):
        if field not in marker:
            raise ValueError(f"no {field!r}")
    if not {"size", "xxh3_128"} <= set(marker["sidecar"]):
        raise ValueError("no sidecar size or hash")
    return marker


def unit_state(folder: Path, unit: Unit, fingerprint: str) -> tuple[str, Any]:
    """``("done", marker)``, ``("todo", why or None)`` (never encoded, or its source changed) or ``("broken",
    problem)`` (damaged or marked by a reader): a stat and a small read, no hashing."""
    sidecar, marker_path, note = _paths(folder, unit)
    if note.is_file():
        return "broken", f"marked corrupt by a reader ({note.read_text().strip()})"
    try:
        marker = read_marker(folder, unit)
    except (ValueError, OSError):
        return "broken", f"{marker_path.name} is unreadable"
    if marker is None:
        return "todo", None
    if marker["fingerprint"] != fingerprint:
        return "todo", f"{unit.covers} changed since it was encoded"
    if not sidecar.is_file():
        return "broken", f"{sidecar.name} is missing"
    size, want = sidecar.stat().st_size, marker["sidecar"]["size"]
    if size != want:
        return "broken", f"{sidecar.name} is {'truncated' if size < want else 'longer than written'} ({size} of " \
                         f"{want} bytes)"
    return "done", marker


def write_unit(folder: Path, unit: Unit, fingerprint: str, mean: torch.Tensor, std: torch.Tensor, keys: Sequence[str],
               skipped: dict[int, str], error: str | None) -> dict[str, Any]:
    """Write the sidecar, then (last) its completion marker; returns the marker."""
    from safetensors.torch import save
    import xxhash

    sidecar, marker_path, note = _paths(folder, unit)
    # one metadata entry: safetensors writes several in no fixed order, and equal units must be equal bytes
    header = {"format": FORMAT, "fingerprint": fingerprint, "keys": list(keys),
              "skipped": {str(p): reason for p, reason in sorted(skipped.items())}}
    data = save({"mean": mean.contiguous(), "std": std.contiguous()}, metadata={HEADER_KEY: json.dumps(header)})
    _write_atomically(sidecar, data)
    note.unlink(missing_ok=True)  # before the marker: a note beside a marker would mark the new sidecar broken
    marker = {"format": FORMAT, "unit": unit.name, "covers": unit.covers, "fingerprint": fingerprint,
              "positions": len(keys), "entries": len(keys) - len(skipped), "skipped": len(skipped), "error": error,
              "sidecar": {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}}
    _write_atomically(marker_path, json.dumps(marker, indent=1).encode())
    return marker


def mark_corrupt(folder: Path, unit: Unit, problem: str) -> None:
    """Note the problem and withdraw the unit's marker, so the next start re-encodes it (best effort: the caller
    stops the run either way)."""
    _, marker_path, note = _paths(folder, unit)
    try:
        note.write_text(problem + "\n")
        marker_path.unlink(missing_ok=True)
    except OSError:
        pass


class SidecarDamaged(Exception):
    """A sidecar that does not match its marker (changed bytes, unreadable): the reader marks it and stops."""


class OpenSidecar:
    """A unit's sidecar opened for lazy reads: its header is parsed, its tensors are memory-mapped and only the rows
    asked for are read. (Not safetensors' ``get_slice``: each of its reads leaks a few bytes, which a run that looks up
    billions of samples would accumulate.)"""

    def __init__(self, folder: Path, unit: Unit, verify: bool) -> None:
        self.unit = unit
        sidecar = _paths(folder, unit)[0]
        try:
            marker = read_marker(folder, unit)
        except (ValueError, OSError) as e:
            raise SidecarDamaged(f"{unit.name}{MARKER} is unreadable ({e})") from None
        if marker is None:
            raise UserError(f"latent cache {folder} has no completed sidecar for {unit.covers}: it was not built for "
                            f"this data (or is being rebuilt); restart the run, or run `vilex cache-latents` first")
        if verify and file_hash(sidecar) != marker["sidecar"]["xxh3_128"]:
            raise SidecarDamaged(f"{sidecar.name} has changed bytes (content hash differs from its marker)")
        try:
            header, self._map, self._arrays = _map_safetensors(sidecar, ("mean", "std"))
            self.keys: list[str] = header["keys"]
            self.skipped: set[int] = {int(p) for p in header["skipped"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SidecarDamaged(f"{sidecar.name} cannot be read ({type(e).__name__}: {e})") from None

    def holds(self, row: int, key: str) -> bool:
        """Whether row ``row`` is the decoded posterior of sample ``key``."""
        return 0 <= row < len(self.keys) and self.keys[row] == key and row not in self.skipped

    def rows(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [torch.from_numpy(np.ascontiguousarray(self._arrays[name][list(rows)])) for name in ("mean", "std")]
        return picked[0], picked[1]

    def close(self) -> None:
        self._arrays = {}
        if self._map is not None:
            self._map.close()


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32}


def _map_safetensors(path: Path, names: Sequence[str]) -> tuple[dict[str, Any], mmap.mmap | None,
                                                                  dict[str, np.ndarray]]:
    """(our header, the file's read-only memory map, arrays of the named tensors over it) of a safetensors file,
    checked against its size. The format: 8 bytes of header length, the JSON header (dtype, shape, byte offsets per
    tensor), the data."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        length = struct.unpack("<Q", fh.read(8))[0]
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file")
        header = json.loads(fh.read(length))
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + length else None
    arrays = {}
    for name in names:
        info = header[name]
        dtype, shape, (start, end) = np.dtype(_NUMPY_DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
        count = int(np.prod(shape))
        if end - start != dtype.itemsize * count or 8 + length + end > size:
            raise ValueError(f"tensor {name} does not fit the file")
        arrays[name] = (np.frombuffer(data, dtype, count, 8 + length + start).reshape(shape) if count
                        else np.zeros(shape, dtype))
    return json.loads(header["__metadata__"][HEADER_KEY]), data, arrays

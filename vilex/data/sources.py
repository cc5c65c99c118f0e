"""sources.py — what an image source is, the ``IMAGE_SOURCES`` registry, and path expansion.

A source only finds samples and reads their raw bytes; decoding, counting skips, order, batching
and resume live in the loader, so every source type is treated identically. Two kinds:

* ``MapImageSource``: N samples with random access by index (a folder, a ``datasets`` table). The
  loader shuffles indices and splits them across ranks sample by sample.
* ``ShardedImageSource``: a list of shards read one at a time (webdataset tars). The loader
  shuffles shard order and splits SHARDS across ranks; inside a shard a sample is addressed by its
  position, so a resume reopens one shard and seeks, without reading or decoding what came before.

A concrete source registers itself under its ``type`` name and builds from a ``DataConfig``::

    @IMAGE_SOURCES.register("folder")
    class FolderSource(MapImageSource):
        @classmethod
        def from_config(cls, cfg): ...
"""
from __future__ import annotations

import glob
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vilex.errors import DataError
from vilex.registry import Registry

if TYPE_CHECKING:
    from vilex.data.config import DataConfig


@dataclass
class RawSample:
    """A sample's undecoded image bytes plus the metadata that travels with it (caption, ...)."""

    key: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


class ImageSource(ABC):
    """Base of all sources. ``name`` (e.g. ``"folder /data/imgs"``) appears in every message."""

    name: str

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DataConfig) -> ImageSource:
        """Build the source from the data section of an experiment config."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of samples (map sources) or shards (sharded sources): checked on resume."""

    def __str__(self) -> str:
        return self.name


class MapImageSource(ImageSource):
    """N samples, random access by index."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def key(self, index: int) -> str:
        """A stable, human-readable id of sample ``index`` (no I/O)."""

    @abstractmethod
    def read(self, index: int) -> RawSample:
        """The raw sample; raises ``BadSample`` (e.g. ``unreadable``) when its bytes cannot be had."""

    @property
    def size(self) -> int:
        return len(self)


class ShardReader(ABC):
    """One open shard: the keys of its samples in stored order, read by position."""

    keys: list[str]
    error: str | None  # set when the shard could not be opened or listed to its end

    @abstractmethod
    def read(self, position: int) -> RawSample: ...

    def close(self) -> None:
        """Release the shard's file (optional)."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedImageSource(ImageSource):
    """A list of shards, each opened on its own."""

    shards: list[str]

    @abstractmethod
    def open_shard(self, index: int) -> ShardReader:
        """Open shard ``index`` and list its samples (headers only, no image data)."""

    def shard_fingerprint(self, index: int) -> str:
        """What changes when shard ``index``'s bytes do, without reading them: here the local file's size and
        modification time (``"missing"`` if there is none). Derived data (the latent cache) is keyed per shard with
        it, so a rewritten shard is re-encoded on its own. Sources of remote shards override it."""
        try:
            st = os.stat(self.shards[index])
        except OSError:
            return "missing"
        return f"{st.st_size}:{st.st_mtime_ns}"

    @property
    def size(self) -> int:
        return len(self.shards)


IMAGE_SOURCES: Registry[type[ImageSource]] = Registry("image source")


def build_source(cfg: DataConfig) -> ImageSource:
    """The source named by ``cfg.type``, built from ``cfg``."""
    if not cfg.paths:
        raise DataError(f"data.path is empty: set the {cfg.type} source's path")
    return IMAGE_SOURCES.get(cfg.type).from_config(cfg)


# ----------------------------------------------------------------------------- paths
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``"s-{000..002}.tar"`` -> ``["s-000.tar", "s-001.tar", "s-002.tar"]``; ``{a,b}`` lists too.

    A numeric range keeps the zero padding of its first bound; groups expand left to right.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.lstrip("-").startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_paths(patterns: list[str], what: str, *, urls: bool = False,
                 folder_glob: str | None = None) -> list[Path | str]:
    """Expand braces and globs; every local pattern must match something. Order: as given, globs sorted.

    Local entries come back as ``Path``. With ``urls=True`` an fsspec URL (``s3://``, ``https://``, ...) stays a
    ``str``: braces expand as text, globs go through its filesystem's ``glob`` (vilex/data/remote.py), and a
    plain URL is not checked here (one request per shard before the first batch; a missing one fails when
    opened). Without it a URL is refused in one line. With ``folder_glob`` (e.g. ``"*.tar"``) a folder, or a
    URL ending in ``/``, stands for its matching files, sorted.
    """
    from vilex.data import remote  # here: it imports the data config, which this module otherwise only type-checks

    paths: list[Path | str] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            if remote.is_url(expanded):
                if not urls:
                    raise DataError(f"{what}: {expanded} is a URL; this source reads local files only")
                paths.extend(remote.expand_url(expanded, what, folder_glob))
            elif glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise DataError(f"{what}: no files match {expanded}")
                paths.extend(Path(m) for m in matches)
            elif not Path(expanded).exists():
                raise DataError(f"{what}: file not found: {expanded}")
            elif folder_glob and Path(expanded).is_dir():
                inside = sorted(p for p in Path(expanded).glob(folder_glob) if p.is_file())
                if not inside:
                    raise DataError(f"{what}: no {folder_glob} files in the folder {expanded}")
                paths.extend(inside)
            else:
                paths.append(Path(expanded))
    return paths

"""folder_source.py — the ``folder`` source: every image file under a folder, recursively.

Listing: every entry whose name ends in an image extension (case-insensitive), in sorted order of
its path relative to the root. Entries that merely LOOK like images — a broken symlink, a folder
named ``x.jpg`` — are listed too, so they are counted as ``unreadable`` instead of vanishing.
Symlinked folders are followed once (a link cycle is not re-entered).

Metadata: an optional ``metadata.jsonl`` at the root (the HF ``imagefolder`` convention), one JSON
object per line with a ``file_name`` relative to the root; its other fields (caption, ...) travel
with that sample. When it exists it DEFINES the dataset: exactly the files it names are listed (so
side files such as the toy world's ``masks/*.png`` are not mistaken for samples; how many image files
it leaves out is logged). A file named there but absent from disk is still listed (and counted as
``unreadable``), so a stale metadata file cannot shrink a dataset silently.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vilex.data.decode import BadSample
from vilex.data.sources import IMAGE_SOURCES, MapImageSource, RawSample
from vilex.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
METADATA_FILE = "metadata.jsonl"


@IMAGE_SOURCES.register("folder")
class FolderSource(MapImageSource):
    """Images under ``root`` (recursive), with optional ``metadata.jsonl`` fields per file."""

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        self.name = f"folder {self.root}"
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.metadata = _read_metadata(self.root / METADATA_FILE)
        found = set(_list_image_paths(self.root, tuple(e.lower() for e in extensions)))
        if self.metadata:
            self.files: list[str] = sorted(self.metadata)
            ignored = len(found - set(self.metadata))
            if ignored:
                log.debug("%s: %d image files not named in %s are not samples", self.name, ignored, METADATA_FILE)
        else:
            self.files = sorted(found)
        if not self.files:
            raise DataError(f"no images found in {self.name} (extensions: {' '.join(extensions)})")

    @classmethod
    def from_config(cls, cfg: Any) -> FolderSource:
        if len(cfg.paths) != 1:
            raise DataError(f"the folder source takes one folder, got {len(cfg.paths)} paths: {cfg.paths}")
        return cls(cfg.paths[0])

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index]

    def read(self, index: int) -> RawSample:
        relative = self.files[index]
        try:
            data = (self.root / relative).read_bytes()
        except OSError as e:  # missing, broken link, a directory, permission, I/O error
            raise BadSample("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
        meta = {"file_name": relative, **self.metadata.get(relative, {})}
        return RawSample(key=relative, data=data, meta=meta)


def _list_image_paths(root: Path, extensions: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    visited: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink cycle: list it once
            dirnames[:] = []
            continue
        visited.add(real)
        # Folders named like images are listed as samples too (they will count as 'unreadable').
        for name in filenames + dirnames:
            if name.lower().endswith(extensions):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return found


def _read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """``file_name`` -> the row's other fields. A malformed file is a DataError naming the line."""
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{path}:{number}: each line needs a 'file_name' string")
        file_name = Path(row.pop("file_name")).as_posix()
        if file_name in rows:
            raise DataError(f"{path}:{number}: file_name '{file_name}' appears twice")
        rows[file_name] = row
    return rows

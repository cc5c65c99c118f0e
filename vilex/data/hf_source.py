"""hf_source.py — the ``hf`` source: a Hugging Face ``datasets`` table with an image column.

Inputs: parquet or json/jsonl files (globs allowed), or a ``save_to_disk`` folder
(``datasets.load_from_disk``; a saved DatasetDict needs ``split``). Each file is loaded as its own
``Dataset`` so a relative image path can be resolved against the file it came from.

The image column may hold:

* an ``Image`` feature — read with ``decode=False``, so the bytes reach our ``decode_image`` (one
  decoder and one set of skip reasons for every source) instead of being decoded by ``datasets``;
* raw bytes (a binary column, or a ``{"bytes", "path"}`` struct without the feature);
* a path string, relative to the data file's folder (or to the ``save_to_disk`` folder).

A null value or empty bytes is ``empty``; a path that cannot be read is ``unreadable``.
The other columns (or ``meta_columns``) travel with each sample as metadata.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vilex.data.decode import BadSample
from vilex.data.sources import IMAGE_SOURCES, MapImageSource, RawSample, expand_paths
from vilex.errors import DataError

_SUFFIX_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


@dataclass
class _Part:
    """One loaded file or saved folder: its rows and the folder relative image paths start from."""

    label: str  # the file or folder name, used in sample keys
    dataset: Any  # datasets.Dataset with the image column not decoded
    base_dir: Path
    column_kind: str  # "image" | "bytes" | "path"


@IMAGE_SOURCES.register("hf")
class HFDatasetSource(MapImageSource):
    """Rows of one or more ``datasets`` tables; see the module docstring for the image column."""

    def __init__(
        self,
        paths: list[str | Path],
        *,
        hf_format: str = "auto",
        image_column: str = "image",
        meta_columns: list[str] | None = None,
        split: str = "train",
    ) -> None:
        resolved = expand_paths([str(p) for p in paths], "hf source")
        count = f" ({len(resolved)} files)" if len(resolved) > 1 else ""
        self.name = f"hf {' '.join(str(p) for p in paths)}{count}"
        self.image_column = image_column
        self.meta_columns = meta_columns
        self.parts = [self._load_part(p, hf_format, split) for p in resolved]
        self._starts: list[int] = []
        total = 0
        for part in self.parts:
            self._starts.append(total)
            total += len(part.dataset)
        self._length = total
        if total == 0:
            raise DataError(f"no rows in {self.name}")

    @classmethod
    def from_config(cls, cfg: Any) -> HFDatasetSource:
        return cls(cfg.paths, hf_format=cfg.hf_format, image_column=cfg.image_column,
                   meta_columns=cfg.meta_columns, split=cfg.split)

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[_Part, int]:
        part_index = bisect_right(self._starts, index) - 1
        return self.parts[part_index], index - self._starts[part_index]

    def key(self, index: int) -> str:
        part, row = self._locate(index)
        return f"{part.label}[{row}]"

    def read(self, index: int) -> RawSample:
        part, row_index = self._locate(index)
        row = part.dataset[row_index]
        value = row.pop(self.image_column)
        if self.meta_columns is not None:
            row = {name: row[name] for name in self.meta_columns if name in row}
        return RawSample(key=f"{part.label}[{row_index}]", data=_image_bytes(value, part), meta=row)

    # ------------------------------------------------------------------ loading
    def _load_part(self, path: Path, hf_format: str, split: str) -> _Part:
        import datasets  # heavy; only when an hf source is used

        fmt = hf_format if hf_format != "auto" else _guess_format(path)
        try:
            if fmt == "disk":
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise DataError(f"{path}: no split '{split}'; splits: {', '.join(loaded)}")
                    loaded = loaded[split]
                base_dir = path
            elif fmt == "parquet":
                loaded, base_dir = datasets.Dataset.from_parquet(str(path)), path.parent
            else:
                loaded, base_dir = datasets.Dataset.from_json(str(path)), path.parent
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a malformed file
            raise DataError(f"cannot load {path} as {fmt}: {type(e).__name__}: {e}") from None
        columns = list(loaded.column_names)
        if self.image_column not in columns:
            raise DataError(f"{path}: no image column '{self.image_column}'; columns: {', '.join(columns)}")
        missing = [c for c in (self.meta_columns or []) if c not in columns]
        if missing:
            raise DataError(f"{path}: meta_columns not found: {', '.join(missing)}; columns: {', '.join(columns)}")
        feature = loaded.features[self.image_column]
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(self.image_column, datasets.Image(decode=False))
            kind = "image"
        else:
            kind = _column_kind(feature, path, self.image_column)
        return _Part(label=path.name, dataset=loaded, base_dir=base_dir, column_kind=kind)


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "disk"
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path}; set hf_format to parquet, json or disk")
    return fmt


def _column_kind(feature: Any, path: Path, column: str) -> str:
    dtype = getattr(feature, "dtype", None)
    if dtype in ("binary", "large_binary"):
        return "bytes"
    if dtype in ("string", "large_string"):
        return "path"
    if isinstance(feature, dict) and ("bytes" in feature or "path" in feature):
        return "image"  # a {"bytes", "path"} struct written without the Image feature
    raise DataError(f"{path}: column '{column}' has type {feature}; expected an Image feature, bytes or a path string")


def _image_bytes(value: Any, part: _Part) -> bytes:
    """The image bytes a cell stands for (reading a file for a path)."""
    if value is None:
        raise BadSample("empty", "null image value")
    if part.column_kind == "bytes":
        return bytes(value)
    if part.column_kind == "image":
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if not value.get("path"):
            raise BadSample("empty", "image value with neither bytes nor path")
        value = value["path"]
    path = Path(value)
    if not path.is_absolute():
        path = part.base_dir / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadSample("unreadable", f"{path}: {type(e).__name__}: {e.strerror or e}") from None

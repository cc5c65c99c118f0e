"""config.py — the data section other stages embed in their experiment configs.

``SourceConfig`` names a source (``type`` is a name in ``IMAGE_SOURCES``), its path(s) and columns, and the
bad-sample limits. ``DataConfig`` adds what a loader on its own needs: the views (one decoded image -> one
tensor per view, e.g. the encoder at 224 px and the decoder's target at 64 px) and the order (seed, shuffle,
epochs, batch). A trainer embeds a ``SourceConfig`` plus only what it lets the user choose (stage 1:
vilex/train/config.py), since its model sets the views' sizes and its schedule sets batch and steps.

Normalisation is explicit per view: ``tensor = (pixel / 255 - mean) / std``. The default
mean = std = 0.5 maps pixels to [-1, 1] (the diffusion VAE convention and SigLIP's own
preprocessing); mean 0, std 1 gives [0, 1]; CLIP wants its own mean/std.

Fields that only one source type reads (``hf_format``, ``image_column``, ``meta_columns``,
``split``) live here flat rather than in per-source sections: a data section stays one screen.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from vilex.config import cfg_field
from vilex.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from vilex.errors import ConfigError

URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")  # fsspec's "protocol://..." (vilex.data.remote)


@dataclass
class ViewFit:
    """How one view fits an image into its square: what a training config chooses when the model sets the size."""

    fit: Literal["crop", "letterbox"] = cfg_field(
        "crop", help="crop: resize the short side to size, centre-crop; letterbox: resize the long side, pad"
    )
    pad_color: tuple[int, int, int] = cfg_field((0, 0, 0), ge=0, le=255, help="letterbox padding colour (RGB 0-255)")


@dataclass
class ViewConfig(ViewFit):
    """One output view of a sample: a square size, how to fit the image in it, and the normalisation."""

    size: int = cfg_field(224, ge=1, help="output side in pixels (square)")
    mean: tuple[float, float, float] = cfg_field((0.5, 0.5, 0.5), help="per-channel mean on the [0, 1] scale")
    std: tuple[float, float, float] = cfg_field((0.5, 0.5, 0.5), gt=0, help="per-channel std on the [0, 1] scale")


def _default_views() -> dict[str, ViewConfig]:
    return {"encoder": ViewConfig()}


@dataclass
class RemoteConfig:
    """How shards given as URLs are read (webdataset only; vilex/data/remote.py says why these caches)."""

    block_size: int = cfg_field(
        1 << 20, ge=4096, le=1 << 30, help="bytes per range request while listing a remote shard's tar headers; "
        "the listing's read-ahead cache holds at most this + 512 bytes per open shard. Larger: fewer requests "
        "(small members); smaller: fewer bytes (members much larger than it are skipped over)"
    )
    retries: int = cfg_field(3, ge=0, le=20, help="retries of a failed range request (network errors, 5xx, 408, "
                             "429; not 403/404) before it counts as failed")
    backoff_s: float = cfg_field(1.0, ge=0, le=60, help="wait before the first retry; doubles on each (at most 30 s)")
    on_error: Literal["skip", "raise"] = cfg_field(
        "skip", help="a read still failing after the retries: skip = count the shard's remaining samples as "
        "skipped ('remote_error'; a failed listing is one 'bad_shard') and go on with the next shard; raise = stop "
        "the run with the error"
    )


@dataclass
class SourceConfig:
    """Where the images are and which of them are usable (see the module docstring)."""

    type: str = cfg_field("folder", help="image source type: folder | hf | webdataset (a name in IMAGE_SOURCES)")
    path: str | list[str] = cfg_field(
        "", help="folder: the image folder; hf: parquet/json file(s), globs, or a save_to_disk folder; "
        "webdataset: .tar shards, globs or brace patterns like shard-{000..009}.tar, a folder (its *.tar: "
        "img2dataset output as it is), or fsspec URLs (s3://, gs://, hf://, https://) of the same forms"
    )
    remote: RemoteConfig = cfg_field(default_factory=RemoteConfig, help="webdataset only: reading shards given as URLs")
    hf_format: Literal["auto", "parquet", "json", "disk"] = cfg_field(
        "auto", help="hf only: file format; auto = from the suffix (.parquet, .json/.jsonl) or a folder = disk"
    )
    image_column: str = cfg_field("image", help="hf only: column with an Image feature, bytes, or a relative path")
    meta_columns: list[str] | None = cfg_field(None, help="hf only: columns passed along as metadata (None = all)")
    split: str = cfg_field("train", help="hf only: the split of a saved DatasetDict")
    max_pixels: int = cfg_field(DEFAULT_MAX_PIXELS, ge=1, help="images with more pixels are 'decompression_bomb'")
    min_side: int = cfg_field(DEFAULT_MIN_SIDE, ge=1, help="images with a shorter side are 'too_small'")
    num_workers: int = cfg_field(
        0, ge=0, help="decode in N worker processes (same batches, skips and resume as 0 = in this process)"
    )

    def validate(self) -> None:
        from vilex.data.sources import IMAGE_SOURCES  # the package import registers every source

        if self.type not in IMAGE_SOURCES:
            raise ConfigError(f"type: unknown image source '{self.type}'; registered: {', '.join(IMAGE_SOURCES.names())}")
        urls = [p for p in self.paths if URL_PATTERN.match(p)]
        if urls and self.type in ("folder", "hf"):
            raise ConfigError(f"path: {urls[0]} is a URL; the {self.type} source reads local files only "
                              f"(remote data: webdataset shards, type: webdataset)")

    @property
    def paths(self) -> list[str]:
        """``path`` as a list (a single string is one entry; empty strings are dropped)."""
        entries = [self.path] if isinstance(self.path, str) else list(self.path)
        return [p for p in entries if p]


@dataclass
class DataConfig(SourceConfig):
    """An image source and how to read it into batches on its own (``vilex data inspect``, ``build_loader``)."""

    views: dict[str, ViewConfig] = field(default_factory=_default_views)
    batch_size: int = cfg_field(8, ge=1, help="samples per batch on each rank")
    drop_last: bool = cfg_field(False, help="drop each epoch's last partial batch (the count is reported)")
    shuffle: bool = cfg_field(True, help="per-epoch shuffle derived from seed + epoch")
    seed: int = cfg_field(0, ge=0)
    epochs: int | None = cfg_field(1, ge=1, help="passes over the data; null = repeat forever")

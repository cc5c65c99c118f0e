"""vilex.data — the image data layer every stage uses.

    source (folder | hf | webdataset)  ->  raw bytes  ->  decode_image  ->  views  ->  ImageLoader batches
         sources.py + *_source.py           decode.py         views.py       loader.py

Typical use::

    from vilex.data import DataConfig, build_loader
    loader = build_loader(cfg.data, rank=rank, world_size=world_size)
    for batch in loader:                    # batch.images["encoder"]: (B, 3, 224, 224) in [-1, 1]
        ...
        state = loader.state_dict()         # save beside the checkpoint; load_state_dict() resumes exactly
    run_summary["data"] = loader.summary()  # skip counts by reason

Importing this package registers every source in ``IMAGE_SOURCES``. The torch-dependent names
(``ImageLoader``, ``Batch``, ``build_loader``, ``render_view``, ``fit_image``) load on first use, so a
config that embeds ``DataConfig`` does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from vilex.data import folder_source, hf_source, tar_source  # noqa: F401 - registers the sources
from vilex.data.config import DataConfig, SourceConfig, ViewConfig, ViewFit
from vilex.data.decode import SKIP_REASONS, BadSample, ImageInfo, decode_image, decode_image_with_info
from vilex.data.folder_source import FolderSource
from vilex.data.hf_source import HFDatasetSource
from vilex.data.inspection import inspect_source
from vilex.data.skips import SkipCounter
from vilex.data.sources import IMAGE_SOURCES, ImageSource, MapImageSource, RawSample, ShardedImageSource, build_source
from vilex.data.tar_source import TarShardSource

_LAZY = {
    "ImageLoader": "vilex.data.loader",
    "Batch": "vilex.data.loader",
    "build_loader": "vilex.data.loader",
    "first_images": "vilex.data.loader",
    "epoch_permutation": "vilex.data.loader",
    "render_view": "vilex.data.views",
    "fit_image": "vilex.data.views",
    "to_tensor": "vilex.data.views",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vilex.data' has no attribute {name!r}")


__all__ = [
    "IMAGE_SOURCES", "SKIP_REASONS", "BadSample", "DataConfig", "FolderSource", "HFDatasetSource", "ImageInfo",
    "ImageSource", "MapImageSource", "RawSample", "ShardedImageSource", "SkipCounter", "TarShardSource",
    "SourceConfig", "ViewConfig", "ViewFit", "build_source", "decode_image", "decode_image_with_info", "inspect_source",
    # loaded lazily (torch):
    "Batch", "ImageLoader", "build_loader", "epoch_permutation", "first_images", "fit_image", "render_view", "to_tensor",
]

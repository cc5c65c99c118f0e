"""registry.py — the Stage-1 registries and the one loader every pretrained component goes through.

* ``VISION_TOWERS``   type name -> VisionTower class   ("siglip", "timm"; see towers.py): the ViT of the ViLex
                      encoder. Its ``feature_layer=-1`` is the last block PLUS the final norm (``last_hidden_state``);
                      stage 2 keeps its own towers in ``vlm.towers.VLM_TOWERS``, where -1 is HF Llava's (no norm).
* ``FROZEN_DECODERS`` type name -> FrozenDecoder class ("stable_diffusion", "pixel_unet"; see decoders.py)

``load_pretrained(load, name_or_path, what)`` is THE real-weights path: a hub id and a local folder go
through the same ``from_pretrained(name_or_path)`` call; the only thing added is turning the libraries'
long ``OSError`` messages (no network, not cached, missing file) into one ``UserError`` line that names
the component and says what was tried.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vilex.errors import UserError
from vilex.registry import Registry

T = TypeVar("T")

VISION_TOWERS: Registry[Any] = Registry("vision tower")
FROZEN_DECODERS: Registry[Any] = Registry("frozen decoder")


def _looks_like_local_path(name_or_path: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything starting like a filesystem path is meant to be local."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def load_pretrained(load: Callable[..., T], name_or_path: str | os.PathLike, what: str, **kwargs: Any) -> T:
    """Call ``load(name_or_path, **kwargs)`` (a ``from_pretrained``); failures become one-line UserErrors."""
    name = str(name_or_path)
    if not Path(name).expanduser().exists() and _looks_like_local_path(name):
        raise UserError(f"{what}: folder not found: {name}")
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser())
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if Path(name).exists():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{what}: cannot load from folder {name}: {first}") from None
        mode = " (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline else ""
        raise UserError(f"{what}: '{name}' is neither a local folder nor a model in the local Hugging Face "
                        f"cache{mode}") from None

"""registry.py — the Stage-1 registries and the one loader every pretrained component goes through.

* ``VISION_TOWERS``   type name -> VisionTower class   ("siglip", "timm"; see towers.py): the ViT of the ViLex
                      encoder. Its ``feature_layer=-1`` is the last block PLUS the final norm (``last_hidden_state``);
                      stage 2 keeps its own towers in ``vlm.towers.VLM_TOWERS``, where -1 is HF Llava's (no norm).
* ``FROZEN_DECODERS`` type name -> FrozenDecoder class ("stable_diffusion", "pixel_unet"; see decoders.py)

``load_pretrained(load, name_or_path, what)`` is THE real-weights path: a hub id and a local folder go
through the same ``from_pretrained(name_or_path)`` call; the only thing added is turning the libraries'
long ``OSError`` messages (no network, not cached, missing file) into one ``UserError`` line that names
the component and says what was tried.

Inside ``weightless()`` (what ``--dry-run`` uses) the same call reads only each component's config and builds
the model on the meta device: every path and hub-cache entry is checked and every shape is real, but no weight
is read or allocated, so a 7B LLM "loads" in a second on a laptop. Tokenizers and schedulers (small, and
needed for real by the checks) load normally.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
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


_WEIGHTLESS: contextvars.ContextVar[bool] = contextvars.ContextVar("weightless", default=False)


@contextlib.contextmanager
def weightless() -> Iterator[None]:
    """Build models from their configs on the meta device: ``load_pretrained`` reads configs only."""
    import torch

    token = _WEIGHTLESS.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _WEIGHTLESS.reset(token)


def _load_weightless(load: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """What ``load(name, **kwargs)`` would build, from the config alone, on the meta device."""
    import torch

    owner = getattr(load, "__self__", None)
    subfolder = kwargs.get("subfolder") or ""
    if isinstance(owner, type):
        from diffusers import ConfigMixin
        from transformers import AutoConfig, PreTrainedModel

        if issubclass(owner, PreTrainedModel):
            config = owner.config_class.from_pretrained(name, subfolder=subfolder)
            return owner._from_config(config, **{k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation")})
        if issubclass(owner, ConfigMixin) and issubclass(owner, torch.nn.Module):
            return owner.from_config(owner.load_config(name, subfolder=subfolder or None))
        if hasattr(owner, "from_config") and owner.__name__.startswith("AutoModel"):
            config = AutoConfig.from_pretrained(name, subfolder=subfolder)
            return owner.from_config(config, **{k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation")})
    with torch.device("cpu"):  # tokenizers, schedulers: read for real, their tensors (if any) are real
        return load(name, **kwargs)


def load_pretrained(load: Callable[..., T], name_or_path: str | os.PathLike, what: str, **kwargs: Any) -> T:
    """Call ``load(name_or_path, **kwargs)`` (a ``from_pretrained``); failures become one-line UserErrors.
    Inside ``weightless()``: the config only, built on the meta device."""
    name = str(name_or_path)
    if not Path(name).expanduser().exists() and _looks_like_local_path(name):
        raise UserError(f"{what}: folder not found: {name}")
    if Path(name).expanduser().exists():
        name = str(Path(name).expanduser())
    try:
        return _load_weightless(load, name, **kwargs) if _WEIGHTLESS.get() else load(name, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if Path(name).exists():
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{what}: cannot load from folder {name}: {first}") from None
        mode = " (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline else ""
        raise UserError(f"{what}: '{name}' is neither a local folder nor a model in the local Hugging Face "
                        f"cache{mode}") from None

"""vlm/towers.py — the VLM's vision towers, registered by type name in ``VLM_TOWERS`` (stage 1's ViT towers are a
different registry, ``vilex.models.registry.VISION_TOWERS``, with a different ``feature_layer=-1``: see below).

* ``siglip``       an HF ``SiglipVisionModel`` (hub id or folder); patch tokens of ``feature_layer``.
* ``vilex``        the same class, weights from a stage-1 ViLex checkpoint's ``vit/`` folder.
* ``vilex_tokens`` ``vilex`` patch tokens PLUS the first m ViLex tokens of the checkpoint's attention pooler, as a
                   second feature group with its own projector; the VLM appends them after the patch tokens.

A tower returns ``{group name: features (B, count, width)}`` in a fixed order (``feature_groups``); the VLM projects
each group with its own projector and concatenates them in that order.

``feature_layer`` indexes ``hidden_states`` exactly as HF ``LlavaForConditionalGeneration`` does
(``vision_feature_layer``): 0 = patch embeddings, k = output of block k, -1 = last block, -2 = penultimate; the
final ``post_layernorm`` is never applied. Keeping HF's convention is what makes the export a plain
``LlavaForConditionalGeneration`` with ``vision_feature_select_strategy="full"`` (SigLIP has no CLS token, so every
token is a patch token and none is dropped). Note that stage 1 (vilex/models/towers.py) uses -1 to mean "last block +
final norm"; for ``vilex_tokens`` the pooler gets the features it was trained on, read from the stage-1 config.

Parameters that cannot influence the output (blocks after the used layer, the final norm unless the pooler needs it,
SigLIP's MAP head) are reported by ``unused_parameters()`` and kept frozen even when the tower trains, so optimizers
and DDP never hold parameters that can never get a gradient. They are still saved: a saved tower is a complete
``SiglipVisionModel``. There is no ``torch.no_grad`` anywhere in ``forward``: a frozen tower builds no graph anyway
(no parameter requires grad), and a trained one must.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilex.errors import UserError
from vilex.models.registry import load_pretrained
from vilex.models.towers import enable_activation_checkpointing
from vilex.registry import Registry
from vlm.config import TowerConfig

log = logging.getLogger(__name__)

VLM_TOWERS: Registry[Any] = Registry("VLM vision tower")

PATCH_GROUP = "patch"
VILEX_TOKEN_GROUP = "vilex_tokens"
VIT_SUBFOLDER = "vit"  # the SiglipVisionModel inside a stage-1 checkpoint (and inside a saved vilex_tokens tower)
POOLER_SUBFOLDER = "pooler"
TOWER_META = "vlm_tower.json"


def _hidden_index(feature_layer: int, num_layers: int) -> int:
    """``feature_layer`` (python-style index into hidden_states[0..num_layers]) -> a non-negative index."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise UserError(f"tower.feature_layer={feature_layer} is out of range for a tower with {num_layers} layers "
                        f"(valid: {-(num_layers + 1)}..{num_layers})")
    return index


def _load_siglip(folder_or_id: str | Path, what: str, dtype: torch.dtype | None = None):
    from transformers import SiglipVisionModel

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return load_pretrained(SiglipVisionModel.from_pretrained, folder_or_id, what, **kwargs)


class SiglipPatchTower(nn.Module):
    """``siglip``: the patch tokens of one hidden layer of an HF ``SiglipVisionModel``."""

    # Every SigLIP checkpoint's processor normalises with mean = std = 0.5 (pixels in [-1, 1]).
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    exportable = True

    def __init__(self, vit: Any, feature_layer: int = -2, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.feature_layer = feature_layer
        self.num_layers = int(vit.config.num_hidden_layers)
        self._index = _hidden_index(feature_layer, self.num_layers)
        self.image_size = int(vit.config.image_size)
        self.patch_size = int(vit.config.patch_size)
        self.hidden_size = int(vit.config.hidden_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        if gradient_checkpointing:
            enable_activation_checkpointing(vit)

    @classmethod
    def pinned_reference(cls, name_or_path: str) -> str:
        """The reference a training run records for this tower: a hub id or folder as given."""
        return name_or_path

    # ---- construction
    @classmethod
    def from_config(cls, cfg: TowerConfig, dtype: torch.dtype | None = None) -> SiglipPatchTower:
        return cls(_load_siglip(cfg.name_or_path, "vision tower (siglip)", dtype), cfg.feature_layer,
                   cfg.gradient_checkpointing)

    @classmethod
    def from_saved(cls, folder: str | Path, cfg: TowerConfig, dtype: torch.dtype | None = None) -> SiglipPatchTower:
        """The tower saved by ``save_pretrained`` (a trained tower inside a VLM checkpoint)."""
        return cls(_load_siglip(folder, "vision tower (saved)", dtype), cfg.feature_layer, cfg.gradient_checkpointing)

    def save_pretrained(self, folder: str | Path) -> None:
        self.vit.save_pretrained(str(folder))

    # ---- shape of the output
    @property
    def feature_groups(self) -> OrderedDict[str, tuple[int, int]]:
        """``{group: (token count, width)}`` in output order."""
        return OrderedDict([(PATCH_GROUP, (self.num_patches, self.hidden_size))])

    @property
    def num_image_tokens(self) -> int:
        return sum(count for count, _ in self.feature_groups.values())

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that cannot reach the selected layer (kept frozen)."""
        modules: list[nn.Module] = [self.vit.post_layernorm, *self.vit.encoder.layers[self._index:]]
        if getattr(self.vit, "head", None) is not None:
            modules.append(self.vit.head)
        return [p for m in modules for p in m.parameters()]

    def _hidden_states(self, pixel_values: torch.Tensor):
        return self.vit(pixel_values.to(self.vit.dtype), output_hidden_states=True)

    def forward(self, pixel_values: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self._hidden_states(pixel_values)
        return OrderedDict([(PATCH_GROUP, out.hidden_states[self._index])])


VLM_TOWERS.register("siglip", SiglipPatchTower)


def _stage1_config(checkpoint: str | Path):
    """(folder, ViLexConfig) of a ViLex checkpoint; a `vilex pretrain` checkpoint-<step> or run folder works too
    (``vilex.pipeline.resolve_vilex_checkpoint``: a run folder means its latest checkpoint when the tower is built)."""
    from vilex.models.vilex_model import read_vilex_config
    from vilex.pipeline import resolve_vilex_checkpoint

    path = resolve_vilex_checkpoint(checkpoint)
    stage1 = read_vilex_config(path)
    if stage1.vit.type != "siglip":
        raise UserError(f"{path}: the ViLex ViT is a '{stage1.vit.type}' tower; VLM towers need a SigLIP ViT")
    if not (path / VIT_SUBFOLDER).is_dir():
        raise UserError(f"{path} is not a ViLex checkpoint: {VIT_SUBFOLDER}/ missing")
    return path, stage1


@VLM_TOWERS.register("vilex")
class ViLexPatchTower(SiglipPatchTower):
    """``vilex``: the stage-1 ViLex ViT (``<checkpoint>/vit``, a ``SiglipVisionModel``) as a plain patch tower."""

    @classmethod
    def pinned_reference(cls, name_or_path: str) -> str:
        """The resolved checkpoint folder: a stage-1 run folder means its latest checkpoint NOW, and the VLM must
        keep reading that one even if the stage-1 run trains on."""
        return str(_stage1_config(name_or_path)[0])

    @classmethod
    def from_config(cls, cfg: TowerConfig, dtype: torch.dtype | None = None) -> ViLexPatchTower:
        path, _ = _stage1_config(cfg.name_or_path)
        return cls(_load_siglip(path / VIT_SUBFOLDER, "vision tower (vilex)", dtype), cfg.feature_layer,
                   cfg.gradient_checkpointing)


@VLM_TOWERS.register("vilex_tokens")
class ViLexTokensTower(SiglipPatchTower):
    """``vilex_tokens``: ViLex ViT patch tokens, then the first ``num_tokens`` ViLex tokens of the stage-1 pooler.

    The pooler reads the stage-1 feature layer (stage-1 convention: -1 = last block + final norm), so its tokens are
    exactly those the ViLex encoder produces. TailDrop trained the pooler so that any prefix is meaningful, which is
    why "a chosen count" is the first m tokens. Saved as ``vit/`` + ``pooler/`` + ``vlm_tower.json``.
    """

    exportable = False

    def __init__(self, vit: Any, pooler: nn.Module, pooler_feature_layer: int, num_tokens: int | None,
                 feature_layer: int = -2, gradient_checkpointing: bool = False) -> None:
        super().__init__(vit, feature_layer, gradient_checkpointing)
        self.pooler = pooler
        available = int(pooler.config.num_tokens)
        self.num_vilex_tokens = available if num_tokens is None else int(num_tokens)
        if not 1 <= self.num_vilex_tokens <= available:
            raise UserError(f"tower.num_vilex_tokens={num_tokens}: this pooler makes {available} tokens")
        self.pooler_feature_layer = pooler_feature_layer
        # stage-1 convention: -1 is the last block AFTER post_layernorm; other values index hidden_states
        self._pooler_index = None if pooler_feature_layer == -1 else _hidden_index(pooler_feature_layer,
                                                                                  self.num_layers)

    pinned_reference = ViLexPatchTower.pinned_reference

    @classmethod
    def from_config(cls, cfg: TowerConfig, dtype: torch.dtype | None = None) -> ViLexTokensTower:
        path, stage1 = _stage1_config(cfg.name_or_path)
        return cls._build(path, stage1.vit.feature_layer, cfg, dtype)

    @classmethod
    def from_saved(cls, folder: str | Path, cfg: TowerConfig, dtype: torch.dtype | None = None) -> ViLexTokensTower:
        meta = json.loads((Path(folder) / TOWER_META).read_text())
        return cls._build(Path(folder), int(meta["pooler_feature_layer"]), cfg, dtype)

    @classmethod
    def _build(cls, folder: Path, pooler_feature_layer: int, cfg: TowerConfig,
               dtype: torch.dtype | None) -> ViLexTokensTower:
        from vilex.models.encoder import AttentionPooler

        vit = _load_siglip(folder / VIT_SUBFOLDER, "vision tower (vilex_tokens)", dtype)
        pooler = load_pretrained(AttentionPooler.from_pretrained, folder / POOLER_SUBFOLDER, "ViLex pooler")
        if dtype is not None and dtype != torch.float32:
            pooler = pooler.to(dtype)
        return cls(vit, pooler, pooler_feature_layer, cfg.num_vilex_tokens, cfg.feature_layer,
                   cfg.gradient_checkpointing)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.vit.save_pretrained(str(folder / VIT_SUBFOLDER))
        self.pooler.save_pretrained(str(folder / POOLER_SUBFOLDER))
        (folder / TOWER_META).write_text(json.dumps({"pooler_feature_layer": self.pooler_feature_layer}))

    @property
    def feature_groups(self) -> OrderedDict[str, tuple[int, int]]:
        groups = super().feature_groups
        groups[VILEX_TOKEN_GROUP] = (self.num_vilex_tokens, int(self.pooler.config.output_width))
        return groups

    def unused_parameters(self) -> list[nn.Parameter]:
        used_by_pooler = (self.num_layers if self._pooler_index is None else self._pooler_index)
        last_used = max(self._index, used_by_pooler)
        modules: list[nn.Module] = list(self.vit.encoder.layers[last_used:])
        if self._pooler_index is not None:
            modules.append(self.vit.post_layernorm)
        if getattr(self.vit, "head", None) is not None:
            modules.append(self.vit.head)
        return [p for m in modules for p in m.parameters()]

    def forward(self, pixel_values: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self._hidden_states(pixel_values)
        pooler_in = out.last_hidden_state if self._pooler_index is None else out.hidden_states[self._pooler_index]
        tokens = self.pooler(pooler_in)[:, : self.num_vilex_tokens]
        return OrderedDict([(PATCH_GROUP, out.hidden_states[self._index]), (VILEX_TOKEN_GROUP, tokens)])


def build_tower(cfg: TowerConfig, dtype: torch.dtype | None = None) -> SiglipPatchTower:
    """The tower named by ``cfg.type`` (an unknown type lists the registered ones)."""
    return VLM_TOWERS.get(cfg.type).from_config(cfg, dtype)


def load_saved_tower(folder: str | Path, cfg: TowerConfig, dtype: torch.dtype | None = None) -> SiglipPatchTower:
    """A trained tower saved inside a VLM checkpoint (``<ckpt>/tower``)."""
    return VLM_TOWERS.get(cfg.type).from_saved(folder, cfg, dtype)

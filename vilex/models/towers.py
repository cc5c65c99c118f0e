"""towers.py — vision towers (the ViT of the ViLex encoder) behind one interface, registered by type name in
``VISION_TOWERS``.

Interface (``VisionTower``): ``forward(pixel_values (B,3,H,W)) -> patch tokens (B, L, C)`` taken from the
configured layer, plus ``hidden_size``, ``image_size``, ``image_mean``/``image_std`` (the normalisation the
tower expects), ``save_pretrained(folder)``, ``from_config(cfg)`` (pretrained or random init) and
``from_saved(folder, cfg)`` (the fine-tuned tower inside a ViLex checkpoint).

``feature_layer`` follows the HF ``hidden_states`` convention: index k is the output of block k-1
(0 = patch embeddings), -2 the penultimate block; -1 is special: the LAST block followed by the tower's
final norm (SigLIP's ``post_layernorm``), i.e. ``last_hidden_state`` (stage 2's towers, ``vlm.towers.VLM_TOWERS``,
follow HF Llava instead: there -1 is the last block without the norm). Parameters that cannot influence
the selected layer (later blocks, final norm, SigLIP's MAP head) are frozen (requires_grad=False) so the
optimizer never holds parameters that can never get a gradient; they are still saved, so the saved ViT
is a complete ``SiglipVisionModel`` (stage 2 loads it with plain ``from_pretrained``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilex.errors import UserError
from vilex.models.configs import VisionTowerConfig
from vilex.models.registry import VISION_TOWERS, load_pretrained

log = logging.getLogger(__name__)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of an HF model (works with frozen inputs; the API renamed in 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class VisionTower(nn.Module):
    """Base class: a ViT that returns patch tokens from one configured layer."""

    hidden_size: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig) -> VisionTower:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, folder: str | Path, cfg: VisionTowerConfig) -> VisionTower:
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def build_vision_tower(cfg: VisionTowerConfig) -> VisionTower:
    """The tower named by ``cfg.type``, pretrained (``name_or_path``) or randomly initialised (``init``)."""
    return VISION_TOWERS.get(cfg.type).from_config(cfg)


def _resolve_hidden_index(feature_layer: int, num_layers: int) -> int:
    """Map ``feature_layer`` (-1 = last + final norm) to an index into hidden_states[0..num_layers]."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise UserError(f"vit.feature_layer={feature_layer} is out of range for a tower with {num_layers} layers "
                        f"(valid: {-(num_layers + 1)}..{num_layers})")
    return index


@VISION_TOWERS.register("siglip")
class SiglipTower(VisionTower):
    """HF ``SiglipVisionModel`` (kept as is, so the fine-tuned ViT is saved in the HF layout)."""

    # Every SigLIP checkpoint's processor normalises with mean = std = 0.5, i.e. pixels in [-1, 1].
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self, model: Any, feature_layer: int = -1, image_size: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        num_layers = model.config.num_hidden_layers
        self._hidden_index = _resolve_hidden_index(feature_layer, num_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.image_size = int(image_size or model.config.image_size)
        self._interpolate = self.image_size != int(model.config.image_size)
        self._freeze_unused(num_layers)
        if gradient_checkpointing:
            enable_activation_checkpointing(model)

    def _freeze_unused(self, num_layers: int) -> None:
        unused: list[nn.Module] = [self.model.head] if getattr(self.model, "use_head", False) else []
        if self.feature_layer != -1:
            unused.append(self.model.post_layernorm)
            unused.extend(self.model.encoder.layers[self._hidden_index:])
        for module in unused:
            module.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig) -> SiglipTower:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if cfg.init is not None:
            model = SiglipVisionModel(SiglipVisionConfig(**cfg.init))
        else:
            model = load_pretrained(SiglipVisionModel.from_pretrained, cfg.name_or_path, "vision tower (siglip)",
                                    attn_implementation="sdpa")
        return cls(model, cfg.feature_layer, cfg.image_size, cfg.gradient_checkpointing)

    @classmethod
    def from_saved(cls, folder: str | Path, cfg: VisionTowerConfig) -> SiglipTower:
        from transformers import SiglipVisionModel

        model = load_pretrained(SiglipVisionModel.from_pretrained, folder, "vision tower (siglip)",
                                attn_implementation="sdpa")
        return cls(model, cfg.feature_layer, cfg.image_size, cfg.gradient_checkpointing)

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(str(folder))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.model.dtype)
        if self.feature_layer == -1:
            return self.model(pixel_values, interpolate_pos_encoding=self._interpolate).last_hidden_state
        out = self.model(pixel_values, interpolate_pos_encoding=self._interpolate, output_hidden_states=True)
        return out.hidden_states[self._hidden_index]


_TIMM_CONFIG_NAME = "timm_config.json"
_TIMM_WEIGHTS_NAME = "model.safetensors"


@VISION_TOWERS.register("timm")
class TimmTower(VisionTower):
    """A timm ViT built with ``timm.create_model(name, pretrained=False)`` plus an optional local checkpoint.

    Saved as ``timm_config.json`` (architecture + create_model kwargs) and ``model.safetensors``.
    Prefix tokens (CLS, registers) are dropped: the pooler sees patch tokens only.
    """

    def __init__(self, model: Any, architecture: str, create_kwargs: dict[str, Any], feature_layer: int = -1,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        self.model = model
        self.architecture = architecture
        self.create_kwargs = dict(create_kwargs)
        self.feature_layer = feature_layer
        num_layers = len(model.blocks)
        self._hidden_index = _resolve_hidden_index(feature_layer, num_layers)
        if self._hidden_index == 0:
            raise UserError("vit.feature_layer=0 (patch embeddings) is not supported for timm towers")
        self.hidden_size = int(model.embed_dim)
        img_size = model.patch_embed.img_size
        self.image_size = int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
        data_cfg = resolve_data_config({}, model=model)
        self.image_mean = tuple(float(v) for v in data_cfg["mean"])  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in data_cfg["std"])  # type: ignore[assignment]
        if feature_layer != -1:
            model.norm.requires_grad_(False)
            for block in model.blocks[self._hidden_index:]:
                block.requires_grad_(False)
        if gradient_checkpointing:
            model.set_grad_checkpointing(True)

    @staticmethod
    def _create(architecture: str, kwargs: dict[str, Any]) -> Any:
        import timm

        try:
            return timm.create_model(architecture, pretrained=False, **kwargs)
        except RuntimeError as e:  # timm raises RuntimeError for an unknown architecture
            raise UserError(f"vision tower (timm): {e}") from None

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig) -> TimmTower:
        kwargs: dict[str, Any] = {"num_classes": 0, **(cfg.init or {})}
        if cfg.image_size is not None:
            kwargs["img_size"] = cfg.image_size
        model = cls._create(str(cfg.name_or_path), kwargs)
        if cfg.checkpoint is not None:
            if not Path(cfg.checkpoint).is_file():
                raise UserError(f"vision tower (timm): checkpoint file not found: {cfg.checkpoint}")
            from timm.models import load_state_dict

            result = model.load_state_dict(load_state_dict(cfg.checkpoint), strict=False)
            if result.missing_keys:
                raise UserError(f"vision tower (timm): {cfg.checkpoint} lacks {len(result.missing_keys)} weights of "
                                f"{cfg.name_or_path}, e.g. {result.missing_keys[0]}")
            if result.unexpected_keys:  # e.g. a classifier head we built without (num_classes=0)
                log.warning("vision tower (timm): ignored %d weights of %s not in the model (e.g. %s)",
                            len(result.unexpected_keys), cfg.checkpoint, result.unexpected_keys[0])
        return cls(model, str(cfg.name_or_path), kwargs, cfg.feature_layer, cfg.gradient_checkpointing)

    @classmethod
    def from_saved(cls, folder: str | Path, cfg: VisionTowerConfig) -> TimmTower:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file = folder / _TIMM_CONFIG_NAME
        if not meta_file.is_file():
            raise UserError(f"vision tower (timm): {meta_file} not found")
        meta = json.loads(meta_file.read_text())
        model = cls._create(meta["architecture"], meta["kwargs"])
        model.load_state_dict(load_file(str(folder / _TIMM_WEIGHTS_NAME)))
        return cls(model, meta["architecture"], meta["kwargs"], cfg.feature_layer, cfg.gradient_checkpointing)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                  str(folder / _TIMM_WEIGHTS_NAME))
        meta = {"architecture": self.architecture, "kwargs": self.create_kwargs}
        (folder / _TIMM_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == -1:
            return self.model.forward_features(pixel_values)[:, self.model.num_prefix_tokens:]
        return self.model.forward_intermediates(pixel_values, indices=[self._hidden_index - 1], output_fmt="NLC",
                                                intermediates_only=True)[0]

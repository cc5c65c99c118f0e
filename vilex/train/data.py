"""train/data.py — the training loader: the model decides each view's resolution and normalisation.

The encoder view gets the ViT's input size and its own normalisation (SigLIP: mean = std = 0.5); the
decoder view gets the decoder's image size (``model.decoder.resolution``, else its own) in [-1, 1] (what
diffusers models are trained on). The experiment config holds only ``fit`` (crop | letterbox) and ``pad_color``
of each view, so a config can never feed a model the wrong resolution.
"""
from __future__ import annotations

from vilex.data import ImageLoader, build_source
from vilex.data.config import DataConfig, ViewConfig, ViewFit
from vilex.train.config import TrainingSourceConfig


def model_views(model, data_cfg: TrainingSourceConfig | DataConfig) -> dict[str, ViewConfig]:
    tower = model.encoder.vit
    user = data_cfg.views or {}

    def view(name: str, size: int, mean, std) -> ViewConfig:
        base = user.get(name, ViewFit())
        return ViewConfig(size=int(size), fit=base.fit, pad_color=base.pad_color, mean=tuple(mean), std=tuple(std))

    return {
        "encoder": view("encoder", tower.image_size, tower.image_mean, tower.image_std),
        "decoder": view("decoder", model.decoder.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    }


def training_loader(model, data_cfg: TrainingSourceConfig | DataConfig, batch_size: int, seed: int, rank: int, world_size: int,
                    views: dict[str, ViewConfig] | None = None, shuffle: bool | None = None,
                    epochs: int | None = None, drop_last: bool = True) -> ImageLoader:
    """Endless (``epochs=None``), deterministic, resumable loader of one rank's share of the data."""
    return ImageLoader(
        build_source(data_cfg),
        views=views or model_views(model, data_cfg),
        batch_size=batch_size,
        seed=seed,
        shuffle=data_cfg.shuffle if shuffle is None else shuffle,
        drop_last=drop_last,
        epochs=epochs,
        rank=rank,
        world_size=world_size,
        max_pixels=data_cfg.max_pixels,
        min_side=data_cfg.min_side,
        num_workers=data_cfg.num_workers,
    )

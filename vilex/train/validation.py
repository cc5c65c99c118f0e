"""validation.py — the fixed validation grid: originals, then reconstructions at each token count.

Same images, same seeds at every validation step, so grids from different steps (and runs) are
comparable side by side. Token count -1 means the model's maximum.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vilex.data import first_images
from vilex.data.config import ViewFit


def validation_images(cfg, size: int) -> torch.Tensor:
    """The first ``val.num_images`` decodable images of the val source (or train), (N,3,S,S) in [0,1]."""
    source_cfg = cfg.data.val or cfg.data.train
    fit = source_cfg.views.get("decoder", ViewFit()).fit
    return first_images(source_cfg, size, cfg.val.num_images, fit).images["image"]


def make_grid(columns: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Columns of (N,3,H,W) images in [0,1] -> one (3, N*(H+pad), C*(W+pad)) grid image."""
    import torchvision

    n = columns[0].shape[0]
    tiles = torch.stack([col[i] for i in range(n) for col in columns])  # row-major: image i, column j
    return torchvision.utils.make_grid(tiles, nrow=len(columns), padding=pad, pad_value=1.0)


@torch.no_grad()
def reconstruct_grid(model, cfg, out_dir: Path, step: int) -> tuple[Path, torch.Tensor]:
    """Write ``out_dir/step-XXXXXXX.png`` (rows: images; columns: original, then one per token count)."""
    import torchvision

    from vilex.pipeline import ViLexPipeline

    was_training = model.encoder.training
    pipe = ViLexPipeline(model.encoder, model.decoder, model.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        images = validation_images(cfg, model.decoder.image_size)
        n = pipe.num_tokens
        counts = sorted({n if k == -1 else min(k, n) for k in cfg.val.token_counts})
        columns = [images]
        for k in counts:
            rec = pipe.reconstruct(images, num_tokens=k, guidance_scale=cfg.val.guidance_scale,
                                   num_inference_steps=cfg.val.num_inference_steps, seed=cfg.val.seed,
                                   output_type="pt")
            columns.append(rec.cpu())
    finally:
        model.encoder.train(was_training)
    grid = make_grid(columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step-{step:07d}.png"
    torchvision.utils.save_image(grid, str(path))
    return path, grid

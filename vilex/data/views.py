"""views.py — one decoded RGB image -> a normalised ``(3, size, size)`` float tensor per view.

The encoder and the decoder may want different resolutions (e.g. a 224 px ViT input and a 64 px
diffusion target), so each view is resized from the decoded image itself, never from another view.

* ``crop``: resize so the SHORT side equals ``size`` (bicubic, antialiased by Pillow), then take
  the centre square — fills the frame, loses the borders of non-square images.
* ``letterbox``: resize so the LONG side equals ``size``, paste centred on a ``pad_color`` square
  — keeps the whole image, adds bars.

Normalisation: ``(pixel / 255 - mean) / std`` per channel (see ``ViewConfig``).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vilex.data.config import ViewConfig


def fit_image(img: Image.Image, size: int, fit: str = "crop", pad_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize + centre-crop (``fit="crop"``) or letterbox (``fit="letterbox"``) ``img`` to ``size`` x ``size``."""
    width, height = img.size
    if fit == "crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return img.crop((left, top, left + size, top + size))
    if fit == "letterbox":
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size), tuple(pad_color))
        canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    raise ValueError(f"unknown fit {fit!r}; expected 'crop' or 'letterbox'")


def to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB image -> ``(3, H, W)`` float32 tensor ``(pixel / 255 - mean) / std``."""
    pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    chw = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (chw - mean_t) / std_t


def render_view(img: Image.Image, view: ViewConfig) -> torch.Tensor:
    """The tensor of one view of a decoded image."""
    return to_tensor(fit_image(img, view.size, view.fit, view.pad_color), view.mean, view.std)

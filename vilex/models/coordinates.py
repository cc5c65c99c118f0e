"""coordinates.py — coordinate input channels for pixel-space UNets (CoordConv).

A convolutional UNet whose spatial self-attention has no positional embedding (diffusers'
``Transformer2DModel`` on continuous inputs) knows where a pixel is only through zero padding, which
fades a few pixels from the border. The toy decoder trained that way drew colour, count and
background from its caption but put objects wherever the initial noise put them (3×3 cell accuracy at
chance). Two extra input channels holding each pixel's (x, y) in [-1, 1] give every layer the absolute
position, so a caption's "top left" can be drawn there.

The UNet stays a plain diffusers ``UNet2DConditionModel``: its ``in_channels`` is the image channels
plus 2, exactly as an inpainting UNet's ``in_channels`` carries its extra mask channels, and the
caller concatenates them. ``coordinate_channels(unet)`` reads that difference and ``with_coordinates``
appends the grid; ``unet_forward`` does both around a UNet call (the toy decoder's pretraining and placement
check). In ViLex only the "pixel_unet" frozen decoder takes coordinates; the latent "stable_diffusion"
decoder calls its UNet plainly and never uses this module.
"""
from __future__ import annotations

from typing import Any

import torch

from vilex.errors import ConfigError

COORDINATE_CHANNELS = 2  # (x, y); the only layout besides none


def coordinate_channels(unet: Any) -> int:
    """Extra input channels of ``unet`` beyond the ones it predicts: 0, or 2 for (x, y) coordinates."""
    extra = int(unet.config.in_channels) - int(unet.config.out_channels)
    if extra not in (0, COORDINATE_CHANNELS):
        raise ConfigError(f"the UNet takes {unet.config.in_channels} input channels and predicts "
                          f"{unet.config.out_channels}: only 0 or {COORDINATE_CHANNELS} extra (coordinate) "
                          f"input channels are supported")
    return extra


def coordinate_grid(batch: int, height: int, width: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 2, H, W): channel 0 = x (left -1 → right +1), channel 1 = y (top -1 → bottom +1), pixel centres."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
    grid = torch.stack([xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)])
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


def with_coordinates(sample: torch.Tensor, n_channels: int) -> torch.Tensor:
    """``sample`` (B, C, H, W) with the coordinate grid appended when ``n_channels`` is 2."""
    if n_channels == 0:
        return sample
    b, _, h, w = sample.shape
    return torch.cat([sample, coordinate_grid(b, h, w, sample.device, sample.dtype)], dim=1)


def unet_forward(unet: Any, sample: torch.Tensor, timestep: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """``unet(sample, t, encoder_hidden_states).sample``, with coordinate channels added when the UNet takes them."""
    x = with_coordinates(sample, coordinate_channels(unet))
    return unet(x, timestep, encoder_hidden_states=encoder_hidden_states).sample

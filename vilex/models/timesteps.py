"""timesteps.py — the training-timestep draw shared by ViLex's frozen-decoder loss and the toy decoder pretraining.

Uniform over [0, T), except that a share ``high_noise_fraction`` of each batch (its first samples) is drawn from
[high_noise_min_t, T). Why: below the noisiest steps the noisy image itself shows the layout, so only those steps
make the UNet (and, through it, ViLex's tokens) carry where things are; uniform sampling gives them a few percent of
the samples; in the toy world a decoder trained on uniform timesteps never placed objects by their caption, and a
few hundred steps at the noisiest ones made it (docs/EXPERIMENTS.md). SD3 shifts its timesteps toward high noise
for the same reason. With the share at 0 the draw is exactly one ``randint`` call over [0, T), so a run without
the option draws the same timesteps as plain uniform sampling.
"""
from __future__ import annotations

import torch

from vilex.errors import ConfigError


def draw_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                   high_noise_fraction: float = 0.0, high_noise_min_t: int = 950,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) int64 timesteps drawn on the generator's device, returned on ``device`` (default: that device)."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator, device=gen_device)
    k = round(n * high_noise_fraction)
    if k:
        if not 0 <= high_noise_min_t < num_train_timesteps:
            raise ConfigError(f"high_noise_min_t={high_noise_min_t} is outside [0, {num_train_timesteps})")
        t[:k] = torch.randint(high_noise_min_t, num_train_timesteps, (k,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t

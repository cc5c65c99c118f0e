"""taildrop.py — TailDrop: per sample, keep only the first m of the n ViLex tokens.

With probability ``prob`` a sample gets a kept length m in [min_tokens, n], otherwise m = n. The dropped
tail is not masked or zeroed here: the conditioning function (conditioning.py) places EOS right after
token m and pads the rest exactly like a shorter text prompt, so training sees the same layout as
inference with m tokens. Everything is drawn from an optional ``torch.Generator`` (reproducible runs).

Distributions of m:
* "uniform": m ~ U{min_tokens..n}.
* "short":   log-uniform on [min_tokens, n + 1), floored — P(m) ∝ log((m+1)/m), so short prefixes are
  trained as often as long ones per octave (1, 2–3, 4–7, ... get equal mass), which is where the
  "1 token = coarse semantics" behaviour comes from.
"""
from __future__ import annotations

import math

import torch

from vilex.models.configs import TailDropConfig


def sample_num_keep(batch_size: int, num_tokens: int, config: TailDropConfig,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """Kept lengths m (B,) int64 in [min_tokens, num_tokens] (``num_tokens`` where TailDrop does not apply)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    low = min(config.min_tokens, num_tokens)
    applies = torch.rand(batch_size, generator=generator, device=gen_device) < config.prob
    u = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    if config.distribution == "uniform":
        m = low + torch.floor(u * (num_tokens - low + 1))
    elif config.distribution == "short":
        m = torch.floor(torch.exp(math.log(low) + u * (math.log(num_tokens + 1) - math.log(low))))
    else:  # the config Literal makes this unreachable from YAML
        raise ValueError(f"unknown TailDrop distribution {config.distribution!r}")
    m = m.long().clamp(low, num_tokens)
    m = torch.where(applies, m, torch.full_like(m, num_tokens))
    return m.to(device) if device is not None else m

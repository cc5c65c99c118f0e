"""Stage-1 training: `vilex pretrain` (loop, strategies, EMA, latent cache, validation, metrics)."""

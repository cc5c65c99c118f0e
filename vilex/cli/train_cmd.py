"""cli/train_cmd.py — `vilex pretrain`, `vilex cache-latents`, `vilex eval-recon`, `vilex config`.

Every config-driven command takes ``--config FILE`` plus repeated ``--set key=value``; bad configs are
reported in one line with exit code 2 (see vilex.config).
"""
from __future__ import annotations

import argparse
import json
import sys

from vilex.cli.main import add_config_args, command


def _load_pretrain_config(args: argparse.Namespace):
    from vilex.config import load_config
    from vilex.train.config import PretrainConfig

    return load_config(PretrainConfig, args.config, args.overrides)


# ----------------------------------------------------------------------------- vilex pretrain
def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=True)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto' = latest checkpoint under train.output_dir (fresh start if none); or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")


@command("pretrain", help="Stage 1: train the ViLex encoder against a frozen T2I decoder")(_pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    cfg = _load_pretrain_config(args)
    if args.dry_run:
        import yaml

        from vilex.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from vilex.train import distributed as D
    from vilex.train.loop import pretrain

    summary = pretrain(cfg, resume=args.resume)
    if D.env_world()[0] == 0:
        print(json.dumps(summary, indent=2, default=str))
    if D.env_world()[1] > 1:
        D.shutdown_and_exit(0)
    return 0


# ----------------------------------------------------------------------------- vilex cache-latents
def _cache_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, required=True)


@command("cache-latents", help="precompute the VAE posterior (mean, std) of every training image")(_cache_args)
def _cache_latents(args: argparse.Namespace) -> int:
    from vilex.models import build_vilex_model
    from vilex.train.data import model_views
    from vilex.train.latent_cache import LatentCache

    cfg = _load_pretrain_config(args)
    model = build_vilex_model(cfg.model)
    if not model.decoder.has_vae:
        print(f"decoder '{cfg.model.decoder.type}' works in pixel space: nothing to cache", file=sys.stderr)
        return 0
    views = model_views(model, cfg.data.train)
    cache = LatentCache.open_or_build(cfg.latent_cache, model.decoder, cfg.data.train, views["decoder"])
    print(json.dumps({"cache": str(cache.folder), "entries": len(cache)}, indent=2))
    return 0

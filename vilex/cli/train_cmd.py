"""cli/train_cmd.py — `vilex pretrain`, `vilex cache-latents`, `vilex eval-recon`, `vilex config`.

Every config-driven command takes ``--config FILE`` plus repeated ``--set key=value``; bad configs are
reported in one line with exit code 2 (see vilex.config).
"""
from __future__ import annotations

import argparse
import json
import sys

from vilex.cli.main import add_config_args, add_dry_run_args, command


def _load_pretrain_config(args: argparse.Namespace):
    from vilex.config import load_config
    from vilex.train.config import PretrainConfig

    return load_config(PretrainConfig, args.config, args.overrides)


# ----------------------------------------------------------------------------- vilex pretrain
# shown by `vilex pretrain --help`; tests/test_cli_help_examples.py parses each line
PRETRAIN_EXAMPLES = """\
examples:
  vilex pretrain --config configs/vilex/sd15_siglip_so400m.yaml --dry-run --processes 64
  vilex pretrain --config configs/vilex/sd15_siglip_so400m.yaml --set model.decoder.resolution=256 --dry-run
  vilex pretrain --config configs/vilex/tiny.yaml --set train.max_steps=50 --resume auto

On N GPUs / nodes: scripts/launch.sh N pretrain --config ... (see its header). --dry-run checks every path and
builds the models on the meta device: run it first, with --processes = the job's total process count.
"""


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.epilog = PRETRAIN_EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(p, "train.optim.lr_pooler=1e-4", required=True)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto' = latest checkpoint under train.output_dir (fresh start if none); or a checkpoint folder")
    add_dry_run_args(p)


@command("pretrain", help="Stage 1: train the ViLex encoder against a frozen T2I decoder")(_pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    cfg = _load_pretrain_config(args)
    if args.dry_run:
        from vilex.train.dry_run import plan_pretrain

        return plan_pretrain(cfg, args.resume, args.processes).report()
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
    from vilex.cli.stage1_cmd import add_device_arg

    add_config_args(p, "latent_cache.dtype=float16", required=True)
    add_device_arg(p)


@command("cache-latents", help="precompute the VAE posterior (mean, std) of every training image")(_cache_args)
def _cache_latents(args: argparse.Namespace) -> int:
    """Runs as one process or under the training launchers (scripts/launch.sh N cache-latents ...): every process
    encodes its share of the shards (vilex/train/latent_cache.py), each on its own device."""
    from vilex.models import ViLexModel
    from vilex.train import distributed as D
    from vilex.train.data import model_views
    from vilex.train.latent_cache import LatentCache

    cfg = _load_pretrain_config(args)
    rank, world, _ = D.env_world()
    D.init_process_group_if_needed()
    # under a launcher, "auto" is this process's own GPU (LOCAL_RANK), as in training
    device = D.default_device() if args.device == "auto" else D.resolve_device(args.device, "--device")
    model = ViLexModel.from_config(cfg.model)
    model.decoder.to(device)  # the VAE encodes this process's share there
    if not model.decoder.has_vae:
        if rank == 0:
            print(f"decoder '{cfg.model.decoder.type}' works in pixel space: nothing to cache", file=sys.stderr)
    else:
        views = model_views(model, cfg.data.train)
        cache = LatentCache.open_or_build(cfg.latent_cache, model.decoder, cfg.data.train, views["decoder"],
                                          rank=rank, world_size=world)
        if rank == 0:
            report = cache.report
            print(json.dumps({"cache": str(cache.folder), "entries": len(cache), "units": report.units,
                              "encoded_units": report.encoded, "skipped": report.skipped}, indent=2))
    if world > 1:
        D.shutdown_and_exit(0)
    return 0


# ----------------------------------------------------------------------------- vilex eval-recon
def _eval_recon_args(p: argparse.ArgumentParser) -> None:
    from vilex.cli.stage1_cmd import add_checkpoint_arg, add_device_arg

    add_checkpoint_arg(p)
    p.add_argument("--data", required=True, help="held-out images: a folder of images (captions, for the caption "
                                                 "baseline, from its metadata.jsonl), or --data-type hf | webdataset")
    p.add_argument("--data-type", default="folder", help="image source type (folder | hf | webdataset)")
    p.add_argument("--caption-field", default="caption", help="the metadata field holding each image's caption")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[1, 16, 75])
    p.add_argument("--baseline", nargs="*", default=["caption"],
                   help="baselines to compare against: caption (skipped, with a note, when images have no caption); "
                        "give --baseline alone for none")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception-weights", default=None,
                   help="LOCAL torchvision inception_v3 state_dict for FID/IS (never downloaded)")
    p.add_argument("--out", required=True, help="output folder for recon_table.{md,json} and recon_examples.png")
    add_device_arg(p)


@command("eval-recon", help="reconstruction table: ViLex at k tokens vs the decoder prompted with captions")(_eval_recon_args)
def _eval_recon(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vilex.errors import UserError
    from vilex.eval_recon import (evaluate_reconstruction, format_table, load_eval_images, runnable_baselines,
                                  write_report)
    from vilex.pipeline import ViLexPipeline
    from vilex.train.distributed import resolve_device

    if args.num_images < 2:
        raise UserError("--num-images must be >= 2 (confidence intervals need two)")
    runnable_baselines(args.baseline, [], args.caption_field)  # an unknown name fails before anything loads
    pipe = ViLexPipeline.from_pretrained(args.checkpoint, device=resolve_device(args.device, "--device"))
    pipe.set_progress_bar_config(disable=True)
    images, captions, _ = load_eval_images(args.data, pipe.decoder.image_size, args.caption_field, args.num_images,
                                           args.data_type)
    baselines, caption_note = runnable_baselines(args.baseline, captions, args.caption_field)
    notes = [caption_note] if caption_note else []
    if args.inception_weights is None:
        notes.append("FID/IS not computed: no local Inception-v3 weights given (--inception-weights PATH); "
                     "nothing is downloaded.")
    rows, arms = evaluate_reconstruction(pipe, images, captions, args.num_tokens, baselines, args.guidance_scale,
                                         args.steps, args.seed, args.batch_size, args.inception_weights)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_report(Path(args.out), rows, arms, images, settings, notes)
    print(format_table(rows, notes))
    return 0

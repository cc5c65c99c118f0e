"""Placement test (toy/placement.py) on a decoder run's training checkpoints, while it trains.

The decoder gate runs the placement test once, at the end; a from-scratch run is worth watching earlier:

    python scripts/toy/placement_check.py --config configs/toy/decoder.yaml [--checkpoint N] [--raw] [--set work_dir=...]

Reads ``<work_dir>/checkpoints/checkpoint-N`` (default: every checkpoint there), the EMA weights unless ``--raw``,
and prints one line per checkpoint: hit rate (chance 0.25) and opposite-corner centroid shift per caption kind.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vilex.checkpoint import load_tensors
from vilex.config import load_config
from toy.placement import MIN_ALPHA_BAR, placement_test
from toy.decoder_model import build_noise_scheduler, build_unet, load_or_build_text_encoder
from toy.pretrain_decoder import DecoderPretrainConfig, _Parts
from toy.tokenizer import load_toy_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", type=int, action="append", help="step(s); default: all saved")
    ap.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-alpha-bar", type=float, action="append",
                    help="read E[x0 | caption] at the noisiest step with this signal share (repeatable; default 0.1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides the run was started with (e.g. work_dir=...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DecoderPretrainConfig, args.config, args.overrides)
    tokenizer = load_toy_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    parts = _Parts(build_unet(cfg.unet, cfg.image_size, cfg.text_encoder.width),
                   load_or_build_text_encoder(cfg.text_encoder, tokenizer)).eval()
    noise_scheduler = build_noise_scheduler(cfg.noise)
    folder = Path(cfg.work_dir) / "checkpoints"
    steps = args.checkpoint or sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))
    for step in steps:
        if args.raw:
            tensors, _ = load_tensors(folder / f"checkpoint-{step}")
        else:  # the EMA is saved beside the live weights as "ema.<name>" (toy.pretrain_decoder.DecoderTrainer)
            extra, _ = load_tensors(folder / f"checkpoint-{step}", weights_name="extra.safetensors")
            tensors = {k[len("ema."):]: v for k, v in extra.items() if k.startswith("ema.")}
        parts.load_state_dict(tensors, strict=args.raw)
        for min_alpha_bar in args.min_alpha_bar or [MIN_ALPHA_BAR]:
            with torch.no_grad():
                result = placement_test(parts.unet, parts.text_encoder, tokenizer, noise_scheduler, seed=cfg.seed,
                                        min_alpha_bar=min_alpha_bar)
            print(json.dumps({"step": step, "weights": "raw" if args.raw else "ema",
                              "timestep": result["coarse"]["timestep"],
                              **{k: {"hit_rate": v["hit_rate"], "shift": v["shift"]} for k, v in result.items()}}),
                  flush=True)


if __name__ == "__main__":
    main()

"""cli/toy_pretrain_cmd.py — the stage-0 commands of `vilex toy`.

`train-tokenizer`, `train-probe`, `pretrain-siglip`, `pretrain-text-encoder`, `pretrain-decoder`, `gate-decoder`,
`claims`, `ship-vilex`, `ship-vlm`.

Stage 0 of the toy world: the project's own tiny stand-ins for the pretrained models it cannot download
(a BPE tokenizer, a pixel-space T2I decoder, a SigLIP), plus the attribute probe that judges generated
images. Each command writes one asset folder with a ``recipe.json`` (see scripts/toy/README.md for the
order and the exact commands that made assets/toy/). Heavy imports stay inside the run functions.
"""
from __future__ import annotations

import argparse
import json
import time

from vilex.cli.main import add_config_args, command


def _print_summary(metrics: dict) -> None:
    print(json.dumps(metrics, indent=2, default=str))


# ----------------------------------------------------------------------------- train-tokenizer
def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="assets/toy/tokenizer", help="tokenizer folder to write")
    p.add_argument("--n-scenes", type=int, default=4000, help="scenes whose captions/questions form the corpus")
    p.add_argument("--seed", type=int, default=0)


@command("train-tokenizer", help="train the toy BPE tokenizer (a CLIPTokenizer folder)", group="toy")(_tokenizer_args)
def _train_tokenizer(args: argparse.Namespace) -> int:
    from vilex.checkpoint import atomic_dir
    from vilex.errors import UserError
    from vilex.toy.recipe import write_recipe
    from vilex.toy.tokenizer import tokenizer_stats, toy_corpus, train_toy_tokenizer

    if args.n_scenes < 1:
        raise UserError(f"--n-scenes must be >= 1, got {args.n_scenes}")
    started = time.time()
    with atomic_dir(args.out) as tmp:
        tokenizer = train_toy_tokenizer(tmp, n_scenes=args.n_scenes, seed=args.seed)
        # measured on texts of OTHER scenes than the training corpus (seed + 1)
        metrics = tokenizer_stats(tokenizer, toy_corpus(500, args.seed + 1))
        write_recipe(tmp, "tokenizer", {"n_scenes": args.n_scenes, "seed": args.seed}, args.seed,
                     time.time() - started, metrics)
    _print_summary(metrics)
    return 0


# ----------------------------------------------------------------------------- train-probe
def _probe_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default="assets/toy/probe", help="probe folder to write")
    p.add_argument("--log-file", default=None, help="also append the training log to this file")


@command("train-probe", help="train the attribute probe that judges toy images", group="toy")(_probe_args)
def _train_probe(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.probe import ProbeConfig, train_probe

    cfg = load_config(ProbeConfig, args.config, args.overrides)
    _print_summary(train_probe(cfg, args.out, log_file=args.log_file))
    return 0


# ----------------------------------------------------------------------------- pretrain-decoder
def _decoder_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default="assets/toy/decoder", help="decoder folder to write (pixel_unet layout)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto' = latest checkpoint under work_dir/checkpoints (fresh start if none); or a folder")


@command("pretrain-decoder", help="train the toy pixel-space T2I decoder (UNet + CLIP text encoder)",
         group="toy")(_decoder_args)
def _pretrain_decoder(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.pretrain_decoder import DecoderPretrainConfig, pretrain_decoder

    cfg = load_config(DecoderPretrainConfig, args.config, args.overrides)
    _print_summary(pretrain_decoder(cfg, args.out, resume=args.resume))
    return 0


def _gate_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--decoder", default="assets/toy/decoder", help="decoder folder to judge")


@command("gate-decoder", help="(re)run the decoder quality gate on a saved toy decoder (uses the config's gate.*)",
         group="toy")(_gate_args)
def _gate_decoder(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.pretrain_decoder import DecoderPretrainConfig, gate_decoder_folder

    cfg = load_config(DecoderPretrainConfig, args.config, args.overrides)
    _print_summary(gate_decoder_folder(args.decoder, cfg.gate, cfg.seed))
    return 0


# ----------------------------------------------------------------------------- pretrain-siglip
def _siglip_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default="assets/toy/siglip", help="SigLIP folder to write (vision tower in vision/)")


@command("pretrain-siglip", help="train the tiny toy SigLIP (sigmoid image-text contrastive)",
         group="toy")(_siglip_args)
def _pretrain_siglip(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.pretrain_siglip import SiglipPretrainConfig, pretrain_siglip

    cfg = load_config(SiglipPretrainConfig, args.config, args.overrides)
    _print_summary(pretrain_siglip(cfg, args.out))
    return 0


# ----------------------------------------------------------------------------- pretrain-text-encoder
def _text_encoder_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default="assets/toy/text_encoder", help="CLIPTextModel folder to write")


@command("pretrain-text-encoder", help="pretrain the toy decoder's CLIP text encoder against the frozen toy "
         "SigLIP image tower (LiT)", group="toy")(_text_encoder_args)
def _pretrain_text_encoder(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.pretrain_text_encoder import TextEncoderPretrainConfig, pretrain_text_encoder

    cfg = load_config(TextEncoderPretrainConfig, args.config, args.overrides)
    _print_summary(pretrain_text_encoder(cfg, args.out))
    return 0


# ----------------------------------------------------------------------------- pretrain-llm
def _llm_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default="assets/toy/llm", help="LLM folder to write (HF causal LM + tokenizer)")


@command("pretrain-llm", help="train the toy chat LLM (byte-level BPE + ChatML, tiny Qwen2) on toy text",
         group="toy")(_llm_args)
def _pretrain_llm(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.toy.pretrain_llm import LLMPretrainConfig, pretrain_llm

    cfg = load_config(LLMPretrainConfig, args.config, args.overrides)
    _print_summary(pretrain_llm(cfg, args.out))
    return 0


# ----------------------------------------------------------------------------- claims / ship-vilex
def _claims_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a ViLex pipeline folder (vit/, pooler/, vilex_config.json)")
    p.add_argument("--test-split", required=True, help="a toy split folder (vilex toy generate), e.g. .../test")
    p.add_argument("--out", required=True, help="folder for <name>_claims.json and the PNGs")
    p.add_argument("--name", default="checkpoint", help="file name prefix")
    p.add_argument("--n", type=int, default=128, help="held-out scenes (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default="assets/toy", help="folder with decoder/ and probe/")
    p.add_argument("--device", default="auto", help="where to sample: auto (cuda when there is one) | cpu | cuda[:N]")
    p.add_argument("--tfg-scale", type=float, default=None,
                   help="w of the Text-Free Guidance edit (claim D); default vilex.toy.claims.TFG_SCALE")


@command("claims", help="measure ViLex's claims (A: 1 token vs caption, B: monotone, D: TFG) for one checkpoint",
         group="toy")(_claims_args)
def _claims(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vilex.toy.claims_report import measure_checkpoint

    assets = Path(args.assets)
    results, body = measure_checkpoint(args.checkpoint, assets / "decoder", assets / "probe", args.test_split,
                                       args.out, args.name, args.n, args.seed, args.device,
                                       args.tfg_scale)
    (Path(args.out) / f"{args.name}_claims.md").write_text(body)
    print(json.dumps(results["verdicts"], indent=2))
    return 0


def _ship_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/toy/vilex", help="the `vilex pretrain` output_dir")
    p.add_argument("--out", default="assets/toy/vilex", help="asset folder to write")
    p.add_argument("--test-split", default="runs/toy/vilex_data/test", help="held-out toy split for the claims")
    p.add_argument("--n", type=int, default=128, help="held-out scenes (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default="assets/toy", help="folder with decoder/ and probe/")
    p.add_argument("--device", default="auto", help="where to sample: auto (cuda when there is one) | cpu | cuda[:N]")
    p.add_argument("--tfg-scale", type=float, default=None,
                   help="w of the Text-Free Guidance edit (claim D); default vilex.toy.claims.TFG_SCALE")
    p.add_argument("--note", default=None, help="a line for the recipe: how the run was made, if not plainly")


@command("ship-vilex", help="ship a finished toy `vilex pretrain` run as assets/toy/vilex, with its claims",
         group="toy")(_ship_args)
def _ship_vilex(args: argparse.Namespace) -> int:
    from vilex.toy.claims_report import ship_vilex_run

    metrics = ship_vilex_run(args.run, args.out, args.assets, args.test_split, args.n, args.seed, args.device,
                             args.note, args.tfg_scale)
    print(json.dumps({"steps_done": metrics["steps_done"], "verdicts": metrics["claims"]["verdicts"]}, indent=2))
    return 0


def _ship_vlm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the `vilex train-vlm` output_dir (with align/ and instruct/)")
    p.add_argument("--out", required=True, help="asset folder to write, e.g. assets/toy/vlm/siglip")
    p.add_argument("--llm-storage-dtype", choices=["bfloat16", "float16"], default=None,
                   help="store the trained LLM's weights in this dtype (half the bytes; loads in its configured dtype)")


@command("ship-vlm", help="ship a finished toy VLM run (instruct checkpoint, no training state, relative references)",
         group="toy")(_ship_vlm_args)
def _ship_vlm(args: argparse.Namespace) -> int:
    from vilex.toy.ship_vlm import ship_vlm_run

    metrics = ship_vlm_run(args.run, args.out, llm_storage_dtype=args.llm_storage_dtype)
    print(json.dumps({k: {"steps": v["steps"], "final_loss": v["final_loss"]} for k, v in metrics["stages"].items()
                      if v}, indent=2))
    return 0

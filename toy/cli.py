"""toy/cli.py — the ``vilex toy …`` commands: make the toy world's data and its stage-0 assets, measure and ship.

* ``generate`` / ``vlm-data``: a toy dataset on disk; LLaVA JSON for the toy VLMs from one of its splits.
* ``train-tokenizer`` and the config-driven stage-0 trainers (``STAGE0_COMMANDS``, one table row each): the project's
  own tiny stand-ins for the pretrained models it cannot download, plus the attribute probe that judges generated
  images. Each writes one asset folder with a ``recipe.json`` (scripts/toy/README.md lists the commands that made
  assets/toy/). Every trainer resumes with ``--resume auto``.
* ``claims`` / ``ship-vilex`` / ``ship-vlm``: measure the paper's claims for a checkpoint; ship finished runs.

Heavy imports stay inside the run functions so ``vilex --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from toy.scenes.errors import ToyWorldError
from vilex.cli.main import add_config_args, command, command_group, register_user_errors

command_group("toy", "the procedural toy world: generate data, pretrain the toy models")
register_user_errors(ToyWorldError)  # the scene generator's argument errors read as one line, exit code 2


def _print_summary(metrics: dict) -> None:
    print(json.dumps(metrics, indent=2, default=str))


# ----------------------------------------------------------------------------- data
_DEFAULT_SPLITS = "train=0.8,val=0.1,test=0.1"


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--n", type=int, default=512, help="number of scenes over all splits (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (16..512, default 32)")
    p.add_argument("--splits", default=_DEFAULT_SPLITS, help=f"NAME=FRACTION list (default {_DEFAULT_SPLITS})")
    p.add_argument("--max-objects", type=int, default=3, help="objects per scene: 1..this (1..3, default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy dataset at --out")
    p.add_argument("--contact-sheet", type=int, default=0, metavar="N",
                   help="also write DIR/contact_sheet.png with the first N training scenes")


@command("generate", help="write a procedural toy-world dataset (images, masks, captions, QA, scene graphs)",
         group="toy")(_configure)
def _run(args: argparse.Namespace) -> int:
    from toy.scenes.contact_sheet import contact_sheet_from_split
    from toy.scenes.generate import generate_dataset

    stats = generate_dataset(args.out, n=args.n, seed=args.seed, size=args.size, splits=args.splits,
                             max_objects=args.max_objects, overwrite=args.overwrite)
    if args.contact_sheet > 0:
        first_split = next(iter(stats["scenes_per_split"]))
        contact_sheet_from_split(Path(args.out) / first_split, Path(args.out) / "contact_sheet.png",
                                 n=args.contact_sheet)
    print(json.dumps({"out": str(args.out), "scenes_per_split": stats["scenes_per_split"]}))
    return 0


def _vlm_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", required=True, help="a split folder written by `vilex toy generate` (e.g. DIR/train)")
    p.add_argument("--out", required=True, help="folder for align.json / instruct.json (+ vlm_data.json)")
    p.add_argument("--kind", choices=("align", "instruct", "both"), default="both", help="which file(s) to write")
    p.add_argument("--seed", type=int, default=0, help="question order and sample mixing")
    p.add_argument("--caption-prob", type=float, default=0.25,
                   help="instruct: probability of a one-turn caption sample per scene")
    p.add_argument("--text-only-prob", type=float, default=0.1,
                   help="instruct: probability of a text-only sample (caption in the prompt) per scene")


@command("vlm-data", help="LLaVA JSON (align captions / instruct QA) for train-vlm from a toy split",
         group="toy")(_vlm_data_args)
def _vlm_data(args: argparse.Namespace) -> int:
    from toy.vlm_data import KINDS, write_vlm_data

    kinds = KINDS if args.kind == "both" else (args.kind,)
    info = write_vlm_data(args.split, args.out, kinds, seed=args.seed, caption_prob=args.caption_prob,
                          text_only_prob=args.text_only_prob)
    print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------- train-tokenizer
def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="assets/toy/tokenizer", help="tokenizer folder to write")
    p.add_argument("--n-scenes", type=int, default=4000, help="scenes whose captions/questions form the corpus")
    p.add_argument("--seed", type=int, default=0)


@command("train-tokenizer", help="train the toy BPE tokenizer (a CLIPTokenizer folder)", group="toy")(_tokenizer_args)
def _train_tokenizer(args: argparse.Namespace) -> int:
    from vilex.checkpoint import atomic_dir
    from vilex.errors import UserError
    from toy.recipe import write_recipe
    from toy.tokenizer import tokenizer_stats, toy_corpus, train_toy_tokenizer

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


# ----------------------------------------------------------------------------- the config-driven stage-0 trainers
@dataclass(frozen=True)
class Stage0Command:
    """``vilex toy NAME --config … [--set …] --out DIR [--resume auto]``: its config class and trainer, by name."""

    name: str
    help: str
    config: str  # "module:Class" of the config dataclass
    run: str  # "module:function" called as function(cfg, out, resume=…, **extra)
    out_default: str
    out_help: str
    extra: dict[str, dict] = field(default_factory=dict)  # further options: --flag -> argparse kwargs (dest = kwarg)


def _import(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


STAGE0_COMMANDS: tuple[Stage0Command, ...] = (
    Stage0Command("train-probe", "train the attribute probe that judges toy images",
                  "toy.probe:ProbeConfig", "toy.probe:train_probe", "assets/toy/probe", "probe folder to write",
                  extra={"--log-file": {"dest": "log_file", "default": None,
                                        "help": "also append the training log to this file"}}),
    Stage0Command("pretrain-vae", "train the miniature Stable Diffusion's autoencoder (AutoencoderKL) on toy scenes",
                  "toy.pretrain_vae:VAEPretrainConfig", "toy.pretrain_vae:pretrain_vae", "assets/toy/sd_vae",
                  "AutoencoderKL folder to write (the mini SD's decoder run copies it into its vae/)"),
    Stage0Command("pretrain-decoder", "train the toy pixel-space T2I decoder (UNet + CLIP text encoder)",
                  "toy.pretrain_decoder:DecoderPretrainConfig", "toy.pretrain_decoder:pretrain_decoder",
                  "assets/toy/decoder", "decoder folder to write (pixel_unet layout)"),
    Stage0Command("pretrain-siglip", "train the tiny toy SigLIP (sigmoid image-text contrastive)",
                  "toy.pretrain_siglip:SiglipPretrainConfig", "toy.pretrain_siglip:pretrain_siglip",
                  "assets/toy/siglip", "SigLIP folder to write (vision tower in vision/)"),
    Stage0Command("pretrain-text-encoder", "pretrain the toy decoder's CLIP text encoder against the frozen toy "
                  "SigLIP image tower (LiT)", "toy.pretrain_text_encoder:TextEncoderPretrainConfig",
                  "toy.pretrain_text_encoder:pretrain_text_encoder", "assets/toy/text_encoder",
                  "CLIPTextModel folder to write"),
    Stage0Command("pretrain-llm", "train the toy chat LLM (byte-level BPE + ChatML, tiny Qwen2) on toy text",
                  "toy.pretrain_llm:LLMPretrainConfig", "toy.pretrain_llm:pretrain_llm", "assets/toy/llm",
                  "LLM folder to write (HF causal LM + tokenizer)"),
)


def _register_stage0(spec: Stage0Command) -> None:
    def configure(p: argparse.ArgumentParser) -> None:
        add_config_args(p, "train.lr=1e-4")
        p.add_argument("--out", default=spec.out_default, help=spec.out_help)
        p.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="'auto' = the latest checkpoint under the config's work_dir (fresh start if none); "
                            "or a checkpoint folder")
        for flag, kwargs in spec.extra.items():
            p.add_argument(flag, **kwargs)

    def run(args: argparse.Namespace) -> int:
        from vilex.config import load_config

        cfg = load_config(_import(spec.config), args.config, args.overrides)
        extra = {kwargs["dest"]: getattr(args, kwargs["dest"]) for kwargs in spec.extra.values()}
        _print_summary(_import(spec.run)(cfg, args.out, resume=args.resume, **extra))
        return 0

    command(spec.name, help=spec.help, group="toy")(configure)(run)


for _spec in STAGE0_COMMANDS:
    _register_stage0(_spec)


def _gate_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, "gate.n_scenes=64")
    p.add_argument("--decoder", default="assets/toy/decoder", help="decoder folder to judge")


@command("gate-decoder", help="(re)run the decoder quality gate on a saved toy decoder (uses the config's gate.*)",
         group="toy")(_gate_args)
def _gate_decoder(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from toy.decoder_gate import gate_decoder_folder
    from toy.pretrain_decoder import DecoderPretrainConfig

    cfg = load_config(DecoderPretrainConfig, args.config, args.overrides)
    _print_summary(gate_decoder_folder(args.decoder, cfg.gate, cfg.seed))
    return 0


# ----------------------------------------------------------------------------- decoder-commitment
def _commitment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", required=True, help="decoder folder to diagnose (vilex toy pretrain-decoder)")
    p.add_argument("--probe", default="assets/toy/probe_64", help="attribute-probe folder that judges the samples")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 1.0],
                   help="noise levels to start from, as fractions of T (1.0: pure noise, the gate's sampling)")
    p.add_argument("--n", type=int, default=128, help="held-out scenes (default 128)")
    p.add_argument("--seed", type=int, default=1,
                   help="held-out scenes' seed (default 1: not the gate's seed 0, so choices made here stay off it)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps over the whole range (default 25)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")


@command("decoder-commitment", help="at which noise level the toy decoder decides each attribute: held-out captions "
         "sampled from their own renders noised to several strengths, judged by the probe", group="toy"
         )(_commitment_args)
def _decoder_commitment(args: argparse.Namespace) -> int:
    from toy.decoder_commitment import attribute_commitment, commitment_table

    result = attribute_commitment(args.decoder, args.probe, args.strengths, args.n, args.seed, args.steps,
                                  args.guidance_scale)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(commitment_table(result))
    return 0


# ----------------------------------------------------------------------------- llm-qa
LLM_QA_CONTEXTS = ("coarse", "fine", "both")  # toy.pretrain_llm.QA_CONTEXTS, not imported: it would load torch


def _llm_qa_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", default="assets/toy/llm", help="toy LLM folder (vilex toy pretrain-llm)")
    p.add_argument("--questions", type=int, default=600, help="held-out questions per context (default 600)")
    p.add_argument("--context", nargs="+", choices=LLM_QA_CONTEXTS, default=list(LLM_QA_CONTEXTS),
                   help="what stands in for the image: the coarse caption, the fine one, or both (default: each)")
    p.add_argument("--seed", type=int, default=0, help="the held-out scenes' seed (the LLM recipe's seed)")


@command("llm-qa", help="the toy LLM's text-only QA accuracy per question type, a caption in place of the image "
         "(the ceiling a VLM on this LLM can reach)", group="toy")(_llm_qa_args)
def _llm_qa(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toy.pretrain_llm import text_qa_accuracy
    from vilex.errors import UserError

    if not (Path(args.llm) / "config.json").is_file():
        raise UserError(f"--llm: no toy LLM at {args.llm} (config.json missing; train one with "
                        f"`vilex toy pretrain-llm`)")
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    model = AutoModelForCausalLM.from_pretrained(args.llm)
    _print_summary({ctx: text_qa_accuracy(model, tokenizer, args.seed, args.questions, context=ctx)
                    for ctx in args.context})
    return 0


# ----------------------------------------------------------------------------- claims / ship-vilex
def _add_decoder_probe_args(p: argparse.ArgumentParser) -> None:
    """--assets / --decoder / --probe: what a ViLex checkpoint's claims are measured with (``_decoder_and_probe``)."""
    p.add_argument("--assets", default="assets/toy", help="folder with decoder/ and probe/")
    p.add_argument("--decoder", default=None,
                   help="the frozen decoder the checkpoint was trained against, a toy decoder or a Stable Diffusion "
                        "folder such as the mini SD (default: ASSETS/decoder)")
    p.add_argument("--probe", default=None, help="the attribute probe for the decoder's image size "
                                                 "(default: ASSETS/probe; ASSETS/probe_64 judges 64-px scenes)")


def _decoder_and_probe(args: argparse.Namespace) -> tuple[Path, Path]:
    assets = Path(args.assets)
    return (Path(args.decoder) if args.decoder else assets / "decoder",
            Path(args.probe) if args.probe else assets / "probe")


def _claims_args(p: argparse.ArgumentParser) -> None:
    from vilex.cli.stage1_cmd import add_checkpoint_arg, add_device_arg

    add_checkpoint_arg(p)
    p.add_argument("--test-split", required=True, help="a toy split folder (vilex toy generate), e.g. .../test")
    p.add_argument("--out", required=True, help="folder for <name>_claims.json and the PNGs")
    p.add_argument("--name", default="checkpoint", help="file name prefix")
    p.add_argument("--n", type=int, default=128, help="held-out scenes (default 128)")
    p.add_argument("--seed", type=int, default=0)
    _add_decoder_probe_args(p)
    add_device_arg(p)
    p.add_argument("--tfg-scale", type=float, default=None,
                   help="w of the Text-Free Guidance edit (claim D); default toy.claims.TFG_SCALE")


@command("claims", help="measure ViLex's claims (A: 1 token vs caption, B: monotone, D: TFG) for one checkpoint",
         group="toy")(_claims_args)
def _claims(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toy.claims_report import measure_checkpoint

    decoder, probe = _decoder_and_probe(args)
    results, body = measure_checkpoint(args.checkpoint, decoder, probe, args.test_split,
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
    _add_decoder_probe_args(p)
    p.add_argument("--device", default="auto", help="where to sample: auto (cuda when there is one) | cpu | cuda[:N]")
    p.add_argument("--tfg-scale", type=float, default=None,
                   help="w of the Text-Free Guidance edit (claim D); default toy.claims.TFG_SCALE")
    p.add_argument("--note", default=None, help="a line for the recipe: how the run was made, if not plainly")
    p.add_argument("--feature-probe-scenes", type=int, default=1500,
                   help="held-out scenes that fit the linear probes comparing the trained ViT's features with its "
                        "initialisation's (scored on a third as many more; 0 skips them; default 1500)")


@command("ship-vilex", help="ship a finished toy `vilex pretrain` run as assets/toy/vilex, with its claims",
         group="toy")(_ship_args)
def _ship_vilex(args: argparse.Namespace) -> int:
    from toy.claims_report import ship_vilex_run

    decoder, probe = _decoder_and_probe(args)
    metrics = ship_vilex_run(args.run, args.out, decoder, probe, args.test_split, args.n, args.seed, args.device,
                             args.note, args.tfg_scale, args.feature_probe_scenes)
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
    from toy.ship_vlm import ship_vlm_run

    metrics = ship_vlm_run(args.run, args.out, llm_storage_dtype=args.llm_storage_dtype)
    print(json.dumps({k: {"steps": v["steps"], "final_loss": v["final_loss"]} for k, v in metrics["stages"].items()
                      if v}, indent=2))
    return 0

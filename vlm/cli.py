"""vlm/cli.py — the stage-2 commands of the ``vilex`` CLI (imported by vilex/cli/main.py as an optional module).

    vilex train-vlm  --config configs/vlm/qwen2.5-7b_siglip-so400m.yaml --stage align    [--resume auto] [--set k=v]
    vilex train-vlm  --config ... --stage instruct   (starts from the align stage's latest checkpoint by default)
    vilex export-hf  --checkpoint runs/vlm/.../instruct --out exported/   (a checkpoint or a stage/run folder)

Multi-process: ``torchrun --nproc_per_node N -m vilex train-vlm ...`` (strategy torch = DDP, or deepspeed). Heavy
imports stay inside the run functions so ``vilex --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json

from vilex.cli.main import add_config_args, add_dry_run_args, command
from vlm.config import STAGE_ORDER


# shown by `vilex train-vlm --help`; tests/test_cli_help_examples.py parses each line
TRAIN_EXAMPLES = """\
examples:
  vilex train-vlm --config configs/vlm/qwen2.5-7b_vilex.yaml --stage align --dry-run --processes 8
  vilex train-vlm --config configs/vlm/qwen2.5-7b_vilex.yaml --stage instruct --resume auto
  vilex train-vlm --config configs/vlm/tiny.yaml --stage align --set align.max_steps=4

On N GPUs / nodes: scripts/launch.sh N train-vlm --config ... --stage ... (see its header).
"""


def _train_args(p: argparse.ArgumentParser) -> None:
    p.epilog = TRAIN_EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(p, "align.lr=1e-4", required=True)
    p.add_argument("--stage", required=True, choices=STAGE_ORDER, help="which stage of the recipe to run")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto' = latest checkpoint of this stage (fresh start if none); or a checkpoint folder")
    add_dry_run_args(p)


@command("train-vlm", help="Stage 2: train the LLaVA-style VLM (align, instruct or full stage)")(_train_args)
def _train(args: argparse.Namespace) -> int:
    from vilex.config import load_config
    from vilex.train import distributed as D
    from vlm.config import VLMConfig

    cfg = load_config(VLMConfig, args.config, args.overrides)
    cfg.stage(args.stage)  # a missing stage section is an error before anything loads
    if args.dry_run:
        from vlm.dry_run import plan_vlm

        return plan_vlm(cfg, args.stage, args.resume, args.processes).report()
    from vlm.train import train_vlm

    summary = train_vlm(cfg, args.stage, resume=args.resume)
    if D.env_world()[0] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
    if D.env_world()[1] > 1:
        D.shutdown_and_exit(0)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a VLM checkpoint folder, or a stage folder (its latest)")
    p.add_argument("--out", required=True, help="output folder (HF LlavaForConditionalGeneration + LlavaProcessor)")


@command("export-hf", help="export a VLM checkpoint (siglip / vilex tower) as a standard HF Llava model")(_export_args)
def _export(args: argparse.Namespace) -> int:
    from vlm.export import export_hf

    print(export_hf(args.checkpoint, args.out))
    return 0

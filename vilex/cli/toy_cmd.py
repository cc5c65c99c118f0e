"""cli/toy_cmd.py — ``vilex toy generate``: write a toy-world dataset (see vilex/toy/generate.py);
``vilex toy vlm-data``: LLaVA JSON for the toy VLMs from one of its splits (see vilex/toy/vlm_data.py).

Argument values are validated by ``generate_dataset`` itself (one ``UserError`` line, exit code 2),
so the Python API and the CLI refuse the same inputs with the same messages.
"""
from __future__ import annotations

import argparse
import json

from vilex.cli.main import command

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
    from pathlib import Path

    from vilex.toy.contact_sheet import contact_sheet_from_split
    from vilex.toy.generate import generate_dataset

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
    from vilex.toy.vlm_data import KINDS, write_vlm_data

    kinds = KINDS if args.kind == "both" else (args.kind,)
    info = write_vlm_data(args.split, args.out, kinds, seed=args.seed, caption_prob=args.caption_prob,
                          text_only_prob=args.text_only_prob)
    print(json.dumps(info, indent=1))
    return 0

"""data_cmd.py — ``vilex data inspect``: count a source's samples, decode them all, print stats as JSON.

    vilex data inspect --source-type folder --path imgs/
    vilex data inspect --source-type hf --path data/*.parquet --image-column jpg
    vilex data inspect --source-type webdataset --path 'shards/s-{000..009}.tar' --limit 1000
    vilex data inspect --source-type webdataset --path /data/cc12m        # img2dataset output folder
    vilex data inspect --source-type webdataset --path 'https://host/wds/s-{000..009}.tar' --limit 100

Prints one JSON object (samples, decoded, skips by reason, formats, modes, sizes; for img2dataset output also
its summed ``_stats.json`` download counts). A source where nothing decodes prints the JSON and then fails with
the one-line DataError (exit code 2).
"""
from __future__ import annotations

import argparse
import json

from vilex.cli.main import command, command_group

command_group("data", "inspect image sources through the data layer")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-type", default="folder", help="folder | hf | webdataset (default: folder)")
    p.add_argument("--path", nargs="+", required=True,
                   help="folder; parquet/json files or a save_to_disk folder; .tar shards, a folder of them or their "
                        "URLs (globs/braces allowed)")
    p.add_argument("--hf-format", default="auto", choices=["auto", "parquet", "json", "disk"], help="hf only")
    p.add_argument("--image-column", default="image", help="hf only: the image column (default: image)")
    p.add_argument("--split", default="train", help="hf only: split of a saved DatasetDict")
    p.add_argument("--max-pixels", type=int, default=None, help="images above are 'decompression_bomb'")
    p.add_argument("--min-side", type=int, default=None, help="images with a shorter side are 'too_small'")
    p.add_argument("--limit", type=int, default=None, help="inspect only the first N samples")


@command("inspect", help="count a source's samples, decode them, print decode stats and skip counts (JSON)",
         group="data")(_configure)
def _run(args: argparse.Namespace) -> int:
    from vilex.config import from_dict
    from vilex.data import DataConfig, build_source, inspect_source
    from vilex.errors import DataError

    fields = {"type": args.source_type, "path": args.path, "hf_format": args.hf_format,
              "image_column": args.image_column, "split": args.split}
    if args.max_pixels is not None:
        fields["max_pixels"] = args.max_pixels
    if args.min_side is not None:
        fields["min_side"] = args.min_side
    cfg = from_dict(DataConfig, fields)
    source = build_source(cfg)
    report = inspect_source(source, max_pixels=cfg.max_pixels, min_side=cfg.min_side, limit=args.limit)
    print(json.dumps(report, indent=2))
    if report["samples"] and not report["decoded"]:
        skipped = ", ".join(f"{reason}={count}" for reason, count in report["skipped"].items())
        raise DataError(f"no decodable images in {source}: {report['skipped_total']} skipped ({skipped})")
    return 0

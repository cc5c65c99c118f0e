"""Claim D's trade-off: the TFG background edit at several TFG scales and token counts, on held-out toy scenes.

Claim D asks two things of "the tokens of a scene + 'on a <new> background'" sampled with Text-Free Guidance: the
background changes as asked, and the objects stay closer to the source than a generation from the edited caption
alone. `vilex toy claims` measures one setting (toy.claims.TFG_SCALE, 16 tokens, CFG 3); this script measures the
curve, with the same metrics (toy.claims.tfg_metrics, the paired object-region difference and D's verdicts) and the
same seeds, so a setting is chosen by its trade-off and not by one number. Run it on the VAL split: the claims
report the test split once, with the setting chosen here.

    python scripts/toy/tfg_sweep.py --checkpoint assets/toy/vilex --n 32 --scales 1 1.5 2 3 --tokens 4 16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.no_grad()
def main() -> None:
    from vilex.pipeline import ViLexPipeline
    from toy.claims import D_MIN_EDITS_AS_ASKED, mean_and_ci95, load_test_scenes, tfg_arms, tfg_metrics
    from toy.probe import load_probe
    from vilex.train.distributed import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="assets/toy/vilex")
    ap.add_argument("--assets", type=Path, default=Path("assets/toy"), help="folder with decoder/ and probe/")
    ap.add_argument("--decoder", type=Path, default=None, help="decoder folder (default ASSETS/decoder)")
    ap.add_argument("--probe", type=Path, default=None, help="attribute probe of the images' size (default ASSETS/probe)")
    ap.add_argument("--split", default="runs/toy/vilex_data/val", help="generated split (default: the val split)")
    ap.add_argument("--n", type=int, default=32, help="held-out scenes (those with an allowed other background)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    pipe = ViLexPipeline.from_pretrained(args.checkpoint, decoder_name_or_path=args.decoder or args.assets / "decoder",
                                         device=resolve_device(args.device, "--device"))
    pipe.set_progress_bar_config(disable=True)
    probe = load_probe(args.probe or args.assets / "probe")
    images, _, scenes, labels = load_test_scenes(args.split, args.n)
    rows = []
    for m in args.tokens:
        for w in args.scales:
            arms, edited, keep = tfg_arms(pipe, images, scenes, m, w, args.guidance_scale, args.steps, args.seed)
            metrics, rmse = tfg_metrics(arms, images[keep], edited, labels[keep], probe)
            closer = mean_and_ci95(rmse["tfg"] - rmse["caption_edited"])  # paired: same sources, same noise
            t, c = metrics["tfg"], metrics["caption_edited"]
            holds = {"as_asked": t["background_changed_as_asked"] >= D_MIN_EDITS_AS_ASKED,
                     "closer": closer["mean"] + closer["ci95"] < 0}
            row = {"tokens": m, "tfg_scale": w, **{f"{arm}/{k}": v for arm, d in metrics.items() for k, v in d.items()},
                   "object_region_rmse_tfg_minus_caption_edited": closer, "D_holds": holds}
            rows.append(row)
            print(f"tokens {m:2d}  tfg {w:4.1f}  background as asked {t['background_changed_as_asked']:.2f} "
                  f"(caption {c['background_changed_as_asked']:.2f})  largest object kept "
                  f"{t['largest_object_kept']:.2f} ({c['largest_object_kept']:.2f})  object-region RMSE "
                  f"{t['object_region_rmse']['mean']:.3f} ± {t['object_region_rmse']['ci95']:.3f} "
                  f"({c['object_region_rmse']['mean']:.3f}; paired {closer['mean']:+.3f} ± {closer['ci95']:.3f})  "
                  f"n {t['n']}  D {'holds' if all(holds.values()) else 'fails'}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""eval_recon.py — `vilex eval-recon`: how well do ViLex tokens reconstruct images, vs prompting with captions?

For held-out images, the frozen decoder is run (a) from the image's first k ViLex tokens, for each k, and (b)
prompted with each image's caption (the paper's "Imagen text -> image" baseline) when every image has one: on an
uncaptioned folder the caption baseline is skipped and the table says so. Every arm uses the same initial noise
(seed) and sampler. Per-image PSNR and SSIM against the original (at the decoder's resolution) give means with 95%
confidence intervals; FID and IS are added when a LOCAL Inception-v3 state_dict is passed (never downloaded — without
it the table says so). Writes ``recon_table.md``, ``recon_table.json`` and ``recon_examples.png`` into ``--out``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from vilex.errors import UserError
from vilex.metrics import InceptionFeatures, frechet_distance, inception_score, mean_ci95, psnr, ssim

log = logging.getLogger(__name__)

BASELINES = ("caption",)


def load_eval_images(data: str | Path, size: int, caption_field: str, limit: int, source_type: str = "folder"
                     ) -> tuple[torch.Tensor, list[str | None], list[str]]:
    """The first ``limit`` decodable images (N,3,S,S) in [0,1], their captions (None where a sample has none) and
    keys."""
    from vilex.config import from_dict
    from vilex.data import first_images
    from vilex.data.config import DataConfig

    batch = first_images(from_dict(DataConfig, {"type": source_type, "path": str(data)}), size, limit)
    captions = [None if meta.get(caption_field) is None else str(meta[caption_field]) for meta in batch.meta]
    return batch.images["image"], captions, batch.keys


def runnable_baselines(baselines: Sequence[str], captions: Sequence[str | None], caption_field: str
                       ) -> tuple[list[str], str | None]:
    """The baselines that can run, and a note when the caption baseline cannot: it needs a caption for EVERY image,
    because all arms are compared on the same images. An unknown baseline name is a UserError."""
    for name in baselines:
        if name not in BASELINES:
            raise UserError(f"unknown baseline '{name}' (known: {', '.join(BASELINES)})")
    missing = sum(c is None for c in captions)
    if "caption" not in baselines or not missing:
        return list(baselines), None
    note = (f"Caption baseline skipped: {missing} of {len(captions)} images have no '{caption_field}' field (captions "
            "come from the data's metadata; --caption-field names another field).")
    return [b for b in baselines if b != "caption"], note


def _arm_metrics(pred: torch.Tensor, ref: torch.Tensor, inception: InceptionFeatures | None,
                 ref_feats: torch.Tensor | None) -> dict[str, Any]:
    p_mean, p_ci = mean_ci95(psnr(pred, ref))
    s_mean, s_ci = mean_ci95(ssim(pred, ref))
    out = {"psnr": p_mean, "psnr_ci95": p_ci, "ssim": s_mean, "ssim_ci95": s_ci}
    if inception is not None:
        feats, logits = inception(pred)
        out["fid"] = frechet_distance(feats, ref_feats)
        out["is"] = inception_score(logits)
    return out


@torch.no_grad()
def evaluate_reconstruction(pipe, images: torch.Tensor, captions: Sequence[str | None], num_tokens: Sequence[int],
                            baselines: Sequence[str] = ("caption",), guidance_scale: float = 3.0,
                            num_inference_steps: int = 50, seed: int = 0, batch_size: int = 16,
                            inception_weights: str | Path | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows of the table (one per arm) and the generated images per arm (for example grids). ``baselines`` must be
    runnable (``runnable_baselines``)."""
    inception = InceptionFeatures(inception_weights) if inception_weights else None
    ref_feats = inception(images)[0] if inception is not None else None
    arms: dict[str, torch.Tensor] = {}

    def run(fn) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), batch_size):
            outs.append(fn(slice(i, i + batch_size), seed + i).cpu())
        return torch.cat(outs)

    for name in baselines:
        if name not in BASELINES:
            raise UserError(f"unknown baseline '{name}' (known: {', '.join(BASELINES)})")
        if any(c is None for c in captions):
            raise UserError("the caption baseline needs a caption for every image (see runnable_baselines)")
        arms[name] = run(lambda sl, s: pipe.generate(list(captions[sl]), guidance_scale=guidance_scale,
                                                     num_inference_steps=num_inference_steps, seed=s,
                                                     output_type="pt"))
    for k in num_tokens:
        arms[f"vilex_{k}"] = run(lambda sl, s, k=k: pipe.reconstruct(images[sl], num_tokens=k,
                                                                       guidance_scale=guidance_scale,
                                                                       num_inference_steps=num_inference_steps,
                                                                       seed=s, output_type="pt"))
    rows = []
    for name, pred in arms.items():
        row = {"arm": name, "tokens": None if name == "caption" else int(name.split("_")[1]), "n": len(pred)}
        row.update(_arm_metrics(pred, images, inception, ref_feats))
        rows.append(row)
    return rows, arms


def format_table(rows: list[dict], notes: Sequence[str] = ()) -> str:
    has_fid = any("fid" in r for r in rows)
    head = "| conditioning | PSNR (dB) ↑ | SSIM ↑ |" + (" FID ↓ | IS ↑ |" if has_fid else "")
    sep = "|---|---|---|" + ("---|---|" if has_fid else "")
    lines = [head, sep]
    for r in rows:
        name = "caption (text → image)" if r["arm"] == "caption" else f"ViLex, {r['tokens']} token(s)"
        cells = [name, f"{r['psnr']:.2f} ± {r['psnr_ci95']:.2f}", f"{r['ssim']:.3f} ± {r['ssim_ci95']:.3f}"]
        if has_fid:
            cells += [f"{r['fid']:.2f}", f"{r['is']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"n = {rows[0]['n']} images; ± is the 95% confidence interval of the mean.")
    lines.extend(notes)
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], arms: dict[str, torch.Tensor], images: torch.Tensor,
                 settings: dict, notes: Sequence[str] = (), examples: int = 8) -> None:
    import torchvision

    from vilex.train.validation import make_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "recon_table.md").write_text(format_table(rows, notes))
    (out / "recon_table.json").write_text(json.dumps({"settings": settings, "rows": rows, "notes": list(notes)},
                                                     indent=2))
    n = min(examples, len(images))
    grid = make_grid([images[:n]] + [a[:n] for a in arms.values()])
    torchvision.utils.save_image(grid, str(out / "recon_examples.png"))

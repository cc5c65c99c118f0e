"""toy/claims.py — measure the paper's claims in the toy world, against the world's ground truth.

On held-out test scenes (their images, masks and exact scene graphs from ``vilex toy generate``):

* A — one ViLex token reconstructs better than the full (coarse) caption: PSNR/SSIM against the original,
      attribute agreement judged by the attribute probe, the continuous position error of the largest object
      (probe regression) and its colour error (mean generated RGB inside its true mask vs its exact RGB) —
      continuous facts a coarse caption cannot carry. The fine caption is reported as an upper reference.
* B — reconstruction improves monotonically with the token count (1 < 4 < 16).
* D — Text-Free Guidance: with the scene's ViLex tokens + "on a <new> background", the background changes as asked
      (probe) while the objects stay closer to the source (pixel error inside the source's object masks, and probe
      agreement on the largest object) than a caption-only generation of the edited caption.

Every arm uses the same initial noise per image (seed + index), the same sampler and guidance.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vilex.metrics import mean_ci95, psnr, ssim
from toy.scenes import world
from toy.probe import AttributeProbe, judge, largest_object, summarize


# ----------------------------------------------------------------------------- held-out scenes
def load_test_scenes(split_dir: str | Path, n: int) -> tuple[torch.Tensor, list[dict], list[world.Scene], np.ndarray]:
    """First ``n`` scenes of a generated split: images (n,3,S,S) in [0,1], metadata rows, scenes, label maps."""
    split_dir = Path(split_dir)
    rows = [json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines()[:n]]
    images = np.stack([np.asarray(Image.open(split_dir / r["file_name"]).convert("RGB")) for r in rows])
    labels = np.stack([np.asarray(Image.open(split_dir / r["mask_file_name"])) for r in rows])
    scenes = [world.Scene.from_dict(r["scene"]) for r in rows]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, rows, scenes, labels


def largest_mask(scene: world.Scene, label_map: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest object's visible pixels (label maps store object index + 1)."""
    big = largest_object(scene)
    index = next(i for i, o in enumerate(scene.objects) if o is big)
    return label_map == index + 1


def colour_error(images: torch.Tensor, scenes: Sequence[world.Scene], label_maps: np.ndarray) -> np.ndarray:
    """Per image: |mean generated RGB inside the largest object's true mask - its exact RGB| (0..255, L2)."""
    out = []
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0)
    for img, scene, labels in zip(arr, scenes, label_maps):
        mask = largest_mask(scene, labels)
        if not mask.any():
            out.append(np.nan)
            continue
        out.append(float(np.linalg.norm(img[mask].mean(0) - np.array(largest_object(scene).rgb, dtype=np.float64))))
    return np.array(out)


def object_region_error(images: torch.Tensor, source: torch.Tensor, label_maps: np.ndarray) -> np.ndarray:
    """Per image: RMS pixel error (0..1) against the source inside ALL of the source's object masks."""
    out = []
    for img, src, labels in zip(images, source, label_maps):
        mask = torch.from_numpy(labels > 0)
        if not mask.any():
            out.append(np.nan)
            continue
        diff = (img - src)[:, mask]
        out.append(float(diff.pow(2).mean().sqrt()))
    return np.array(out)


def mean_and_ci95(values: np.ndarray) -> dict[str, float]:
    v = torch.tensor(values[~np.isnan(values)], dtype=torch.float64)
    m, ci = mean_ci95(v)
    return {"mean": round(m, 4), "ci95": round(ci, 4)}


# ----------------------------------------------------------------------------- generation arms
def _batched(fn, n: int, batch_size: int, seed: int) -> torch.Tensor:
    outs = []
    for i in range(0, n, batch_size):
        outs.append(fn(slice(i, min(n, i + batch_size)), seed + i).float().cpu())
    return torch.cat(outs)


def reconstruction_arms(pipe, images: torch.Tensor, rows: list[dict], token_counts: Sequence[int],
                        guidance_scale: float, steps: int, seed: int, batch_size: int = 32) -> dict[str, torch.Tensor]:
    arms = {}
    for field_name, arm in (("caption", "caption_coarse"), ("caption_fine", "caption_fine")):
        prompts = [r[field_name] for r in rows]
        arms[arm] = _batched(lambda sl, s: pipe.generate(prompts[sl], guidance_scale=guidance_scale,
                                                         num_inference_steps=steps, seed=s, output_type="pt"),
                             len(rows), batch_size, seed)
    for k in token_counts:
        arms[f"vilex_{k}"] = _batched(lambda sl, s, k=k: pipe.reconstruct(images[sl], num_tokens=k,
                                                                         guidance_scale=guidance_scale,
                                                                         num_inference_steps=steps, seed=s,
                                                                         output_type="pt"),
                                      len(rows), batch_size, seed)
    return arms


def per_image_metrics(pred: torch.Tensor, images: torch.Tensor, scenes: list[world.Scene], label_maps: np.ndarray,
                      probe: AttributeProbe) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(per-image PSNR, SSIM, centre and colour errors; the probe's attribute accuracies) of one arm."""
    judgement = judge(probe, pred * 2 - 1, scenes)
    per_image = {"psnr": psnr(pred, images).numpy(), "ssim": ssim(pred, images).numpy(),
                 "center_error": np.asarray(judgement["center_error"], dtype=np.float64),
                 "colour_error": colour_error(pred, scenes, label_maps)}
    return per_image, summarize(judgement)


def arm_metrics(per_image: dict[str, np.ndarray], attributes: dict[str, float]) -> dict[str, Any]:
    return {"attributes": attributes, **{k: mean_and_ci95(per_image[k])
                                         for k in ("psnr", "ssim", "center_error", "colour_error")}}


# ----------------------------------------------------------------------------- claim D: Text-Free Guidance
# w_tfg of the claims. No value from the paper (Wang et al., arXiv 2412.06774) was available to us, so it is
# chosen on the VAL split, not the test scenes the claims report, as the least text steering that makes the edit.
# A larger w steers harder and the objects drift (colours shift, shapes swell; at w = 3 they end further from the
# source than with the edited caption alone). 1.25 is the smallest w whose edits the probe read as asked in half the
# val edits for the 32-px toy ViLex (assets/toy/vilex); D now asks for D_MIN_EDITS_AS_ASKED, so a checkpoint is
# measured at the w that scripts/toy/tfg_sweep.py finds on its val split (`vilex toy claims --tfg-scale`).
# The curves are in docs/EXPERIMENTS.md.
TFG_SCALE = 1.25


def edited_background(scene: world.Scene) -> str | None:
    """A background different from the scene's on which every object colour stays allowed (None if none)."""
    names = list(world.BACKGROUND_COLOURS)
    start = names.index(scene.background)
    for step in range(1, len(names)):
        cand = names[(start + step) % len(names)]
        if all(o.colour in world.allowed_object_colours(cand) for o in scene.objects):
            return cand
    return None


def tfg_arms(pipe, images: torch.Tensor, scenes: list[world.Scene], num_tokens: int, tfg_scale: float,
             guidance_scale: float, steps: int, seed: int) -> tuple[dict[str, torch.Tensor], list[world.Scene], list[int]]:
    """(generated images per arm, the edited scenes, the indices used) for the background edit."""
    keep, edited = [], []
    for i, s in enumerate(scenes):
        bg = edited_background(s)
        if bg is not None:
            keep.append(i)
            edited.append(replace(s, background=bg, background_rgb=world.BACKGROUND_COLOURS[bg]))
    tfg, cap = [], []
    for j, i in enumerate(keep):
        prompt = f"on a {edited[j].background} background"
        tfg.append(pipe.compose(images[i:i + 1], prompt, tfg_scale=tfg_scale, num_tokens=num_tokens,
                                guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed + i,
                                output_type="pt").cpu())
    captions = [world.caption_coarse(s) for s in edited]
    cap = _batched(lambda sl, s: pipe.generate(captions[sl], guidance_scale=guidance_scale,
                                               num_inference_steps=steps, seed=s, output_type="pt"),
                   len(captions), 32, seed)
    return {"tfg": torch.cat(tfg) if tfg else torch.zeros(0), "caption_edited": cap}, edited, keep


def tfg_metrics(arms: dict[str, torch.Tensor], source: torch.Tensor, edited: list[world.Scene],
                label_maps: np.ndarray, probe: AttributeProbe) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(per-arm summary of the edit, per-arm per-image object-region RMSE to the source)."""
    out, rmse = {}, {}
    for name, pred in arms.items():
        j = judge(probe, pred * 2 - 1, edited)  # truth = the edited scene: new background, same objects
        rmse[name] = object_region_error(pred, source, label_maps)
        out[name] = {
            "background_changed_as_asked": round(float(j["background"].mean()), 4),
            "largest_object_kept": round(float((j["shape"] & j["colour"] & j["cell"]).mean()), 4),
            "object_region_rmse": mean_and_ci95(rmse[name]),
            "n": len(edited),
        }
    return out, rmse


# ----------------------------------------------------------------------------- the verdicts
# The claims' targets (docs: scripts/toy/README.md, "The claims"). A paired per-image difference counts only when its
# 95% CI excludes 0; A also needs the mean PSNR gain to reach A_MIN_PSNR_GAIN_DB, so a significant but tiny gain
# does not read as "one token carries more than a caption".
A_MIN_PSNR_GAIN_DB = 1.0
D_MIN_EDITS_AS_ASKED = 0.8


def paired_differences(per_image: dict[str, dict[str, np.ndarray]], counts: Sequence[int],
                       tfg_rmse: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and 95% CI of every paired per-image difference the claims read (same images, same noise)."""
    one = f"vilex_{counts[0]}"

    def diff(a: str, b: str, metric: str) -> dict[str, float]:
        return mean_and_ci95(per_image[a][metric] - per_image[b][metric])

    diffs = {f"psnr_{one}_minus_caption_coarse": diff(one, "caption_coarse", "psnr"),
             f"center_error_{one}_minus_caption_coarse": diff(one, "caption_coarse", "center_error"),
             f"colour_error_{one}_minus_caption_coarse": diff(one, "caption_coarse", "colour_error")}
    for a, b in zip(counts, counts[1:]):
        diffs[f"psnr_vilex_{b}_minus_vilex_{a}"] = diff(f"vilex_{b}", f"vilex_{a}", "psnr")
    diffs["object_region_rmse_tfg_minus_caption_edited"] = mean_and_ci95(tfg_rmse["tfg"] - tfg_rmse["caption_edited"])
    return diffs


def claim_verdicts(diffs: dict[str, dict[str, float]], counts: Sequence[int], edits_as_asked: float
                   ) -> dict[str, bool]:
    """The claims' verdicts from the paired differences and the share of TFG edits the probe reads as asked."""
    above = lambda d: d["mean"] - d["ci95"] > 0  # noqa: E731 - the whole CI above 0
    below = lambda d: d["mean"] + d["ci95"] < 0  # noqa: E731 - the whole CI below 0
    one = f"vilex_{counts[0]}"
    gain = diffs[f"psnr_{one}_minus_caption_coarse"]
    return {
        "A_psnr_1token_beats_coarse_caption": above(gain) and gain["mean"] >= A_MIN_PSNR_GAIN_DB,
        "A_center_error_1token_below_coarse_caption": below(diffs[f"center_error_{one}_minus_caption_coarse"]),
        "A_colour_error_1token_below_coarse_caption": below(diffs[f"colour_error_{one}_minus_caption_coarse"]),
        "B_monotone_psnr": all(above(diffs[f"psnr_vilex_{b}_minus_vilex_{a}"]) for a, b in zip(counts, counts[1:])),
        "D_background_changes_as_asked": edits_as_asked >= D_MIN_EDITS_AS_ASKED,
        "D_objects_closer_to_source_than_caption": below(diffs["object_region_rmse_tfg_minus_caption_edited"]),
    }


def evaluate_claims(pipe, probe: AttributeProbe, test_dir: str | Path, n: int = 64,
                    token_counts: Sequence[int] = (1, 4, 16), guidance_scale: float = 3.0, steps: int = 25,
                    tfg_scale: float = TFG_SCALE, tfg_tokens: int | None = None, n_tfg: int = 32, seed: int = 0
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run every arm, compute the metrics and the claim verdicts. Returns (results, images per arm)."""
    images, rows, scenes, labels = load_test_scenes(test_dir, n)
    arms = reconstruction_arms(pipe, images, rows, token_counts, guidance_scale, steps, seed)
    counts = sorted(token_counts)
    per_image, metrics = {}, {}
    for name, pred in arms.items():
        per_image[name], attributes = per_image_metrics(pred, images, scenes, labels, probe)
        metrics[name] = arm_metrics(per_image[name], attributes)
    m = min(n_tfg, n)
    tfg_images, edited, keep = tfg_arms(pipe, images[:m], scenes[:m], tfg_tokens or counts[-1], tfg_scale,
                                        guidance_scale, steps, seed)
    tfg, tfg_rmse = tfg_metrics(tfg_images, images[:m][keep], edited, labels[:m][keep], probe)
    diffs = paired_differences(per_image, counts, tfg_rmse)
    verdicts = claim_verdicts(diffs, counts, tfg["tfg"]["background_changed_as_asked"])
    results = {"n": n, "token_counts": list(counts), "guidance_scale": guidance_scale, "steps": steps,
               "seed": seed, "tfg_scale": tfg_scale, "arms": metrics, "paired_differences": diffs,
               "tfg": tfg, "verdicts": verdicts}
    all_images = dict(arms)
    all_images["_originals"] = images
    all_images["_tfg"] = tfg_images["tfg"]
    all_images["_tfg_caption"] = tfg_images["caption_edited"]
    all_images["_tfg_sources"] = images[:m][keep]
    return results, all_images


def claims_table(results: dict[str, Any]) -> str:
    """Markdown tables of the reconstruction arms and the TFG edit, plus the verdicts."""
    lines = ["| conditioning | PSNR ↑ | SSIM ↑ | background | count | shape | colour | 3×3 cell | centre err ↓ | colour err ↓ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"caption_coarse": "coarse caption (baseline)", "caption_fine": "fine caption (upper reference)"}
    for arm, m in results["arms"].items():
        a = m["attributes"]
        label = names.get(arm, f"ViLex, {arm.split('_')[1]} token(s)")
        lines.append(f"| {label} | {m['psnr']['mean']:.2f} ± {m['psnr']['ci95']:.2f} | "
                     f"{m['ssim']['mean']:.3f} ± {m['ssim']['ci95']:.3f} | {a['background_accuracy']:.2f} | "
                     f"{a['count_accuracy']:.2f} | {a['shape_accuracy']:.2f} | {a['colour_accuracy']:.2f} | "
                     f"{a['cell_accuracy']:.2f} | {m['center_error']['mean']:.3f} | {m['colour_error']['mean']:.1f} |")
    lines += ["", f"n = {results['n']} held-out test scenes; ± = 95% CI; attribute columns are probe-judged accuracy "
              "(largest object); centre error in image units, colour error in RGB units (0-255).", "",
              f"| background edit (TFG, w = {results['tfg_scale']:g}) | background as asked ↑ | largest object kept ↑ | object-region RMSE to source ↓ |",
              "|---|---|---|---|"]
    for arm, m in results["tfg"].items():
        label = "ViLex tokens + text, TFG" if arm == "tfg" else "edited coarse caption only"
        lines.append(f"| {label} | {m['background_changed_as_asked']:.2f} | {m['largest_object_kept']:.2f} | "
                     f"{m['object_region_rmse']['mean']:.3f} ± {m['object_region_rmse']['ci95']:.3f} |")
    lines += ["", "| paired per-image difference | mean ± 95% CI |", "|---|---|"]
    lines += [f"| {_difference_label(k)} | {v['mean']:+.3f} ± {v['ci95']:.3f} |"
              for k, v in results["paired_differences"].items()]
    lines += ["", "| claim | holds |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in results["verdicts"].items()]
    return "\n".join(lines) + "\n"


# paired_differences' key prefixes: (what is compared, its unit)
_DIFFERENCE_METRICS = {"psnr_": ("PSNR", "dB"), "center_error_": ("centre error", "image units"),
                       "colour_error_": ("colour error", "RGB 0-255"), "object_region_rmse_": ("object-region RMSE", "0-1")}


def _difference_label(key: str) -> str:
    """'psnr_vilex_4_minus_vilex_1' -> 'PSNR (dB): vilex 4 minus vilex 1'."""
    prefix = next(p for p in _DIFFERENCE_METRICS if key.startswith(p))
    name, unit = _DIFFERENCE_METRICS[prefix]
    return f"{name} ({unit}): {key[len(prefix):].replace('_', ' ')}"


def claims_summary(results: dict[str, Any]) -> str:
    """One paragraph: what each claim says, its target, what was measured and whether it holds."""
    v, d, counts = results["verdicts"], results["paired_differences"], results["token_counts"]
    one = f"vilex_{counts[0]}"
    word = lambda ok: "**holds**" if ok else "**does not hold**"  # noqa: E731
    ci = lambda x, unit="": f"{x['mean']:+.2f}{unit} (95% CI ±{x['ci95']:.2f})"  # noqa: E731
    gain = d[f"psnr_{one}_minus_caption_coarse"]
    a_ok = all(v[k] for k in v if k.startswith("A_"))
    steps = ", ".join(f"{a}→{b} tokens {ci(d[f'psnr_vilex_{b}_minus_vilex_{a}'], ' dB')}"
                      for a, b in zip(counts, counts[1:]))
    tfg = results["tfg"]["tfg"]
    d_ok = all(v[k] for k in v if k.startswith("D_"))
    return (
        f"**A — one token says more than a caption.** A single ViLex token should reconstruct the image better than "
        f"the scene's whole coarse caption: at least {A_MIN_PSNR_GAIN_DB:g} dB more PSNR, and lower centre-position "
        f"and colour errors for the largest object, each paired CI excluding 0. Measured: {ci(gain, ' dB')} PSNR, "
        f"centre error {ci(d[f'center_error_{one}_minus_caption_coarse'])}, colour error "
        f"{ci(d[f'colour_error_{one}_minus_caption_coarse'])} — A {word(a_ok)}. "
        f"**B — more tokens, more detail (TailDrop).** Each step up in token count should raise PSNR, each paired CI "
        f"excluding 0: {steps} — B {word(v['B_monotone_psnr'])}. "
        f"**D — Text-Free Guidance edits what the text asks and keeps the rest.** The tokens plus \"on a <new> "
        f"background\" (w = {results['tfg_scale']:g}) should show the asked background in at least "
        f"{D_MIN_EDITS_AS_ASKED:.0%} of the edits ({tfg['background_changed_as_asked']:.0%} of {tfg['n']}) and keep "
        f"the objects closer to the source than the edited caption alone (object-region RMSE "
        f"{ci(d['object_region_rmse_tfg_minus_caption_edited'])}, below 0 is closer) — D {word(d_ok)}. "
        f"All on {results['n']} held-out scenes, every arm sampled from the same noise per image."
    )

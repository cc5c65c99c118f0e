"""toy/decoder_commitment.py — at which noise level does the toy decoder decide each attribute?

The gate samples held-out captions from pure noise. Here the same captions start instead from their own scenes'
renders, noised to ``strength`` x T (img2img): what the probe still reads right in the result was already decided
above that noise level. Where an attribute's accuracy falls between two strengths is where the UNet must learn to
choose it from the caption, so that is where more training samples (``train.high_noise_min_t``) help it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from toy.decoder_gate import gate_captions, gate_scenes, load_decoder_folder, sample_images, start_timesteps
from toy.probe import judge, load_probe, summarize
from toy.recipe import images_to_unit_range, render_batch
from vilex.errors import UserError


@torch.no_grad()
def attribute_commitment(decoder_dir: str | Path, probe_dir: str | Path, strengths: Sequence[float],
                         n_scenes: int = 128, seed: int = 1, steps: int = 25, guidance_scale: float = 3.0,
                         batch_size: int = 64) -> dict[str, Any]:
    """{"autoencoded": the probe on the renders through the decoder's VAE (its ceiling), "by_strength":
    {strength: the probe on samples started at that noise level}, "first_timestep": {strength: t}}.
    Strength 1.0 is the gate's own sampling (pure noise) for the same seed."""
    if not strengths or any(not 0.0 < s <= 1.0 for s in strengths):
        raise UserError(f"strengths must be in (0, 1], got {list(strengths)}")
    if not (Path(probe_dir) / "config.json").is_file():
        raise UserError(f"attribute probe not found: {probe_dir}")
    unet, text_encoder, tokenizer, scheduler, latents = load_decoder_folder(decoder_dir)
    probe = load_probe(probe_dir)
    scenes, _ = gate_scenes(seed, n_scenes)
    captions = gate_captions(scenes)
    renders = images_to_unit_range(render_batch(scenes, int(unet.config.sample_size) * (latents.factor if latents
                                                                                         else 1)))
    through_vae = latents.decode(latents.encode(renders, torch.Generator().manual_seed(seed))) if latents else renders
    out: dict[str, Any] = {"seed": seed, "n_scenes": len(scenes), "ddim_steps": steps,
                           "guidance_scale": guidance_scale,
                           "autoencoded": summarize(judge(probe, through_vae, scenes)), "by_strength": {},
                           "first_timestep": {}}
    for strength in sorted(strengths):
        images = sample_images(unet, text_encoder, tokenizer, scheduler, captions, steps, guidance_scale, seed=seed,
                               batch_size=batch_size, latents=latents, init_images=renders, strength=strength)
        key = f"{strength:g}"
        out["by_strength"][key] = summarize(judge(probe, images, scenes))
        out["first_timestep"][key] = int(start_timesteps(scheduler, steps, strength)[1][0])
    return out


def commitment_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per strength (its first timestep), one column per attribute."""
    attributes = [k for k in result["autoencoded"] if k.endswith("_accuracy")]
    head = "| start | t | " + " | ".join(a.removesuffix("_accuracy") for a in attributes) + " |"
    rows = [head, "|" + "---|" * (len(attributes) + 2)]
    rows.append("| autoencoded render | 0 | " + " | ".join(f"{result['autoencoded'][a]:.2f}" for a in attributes)
                + " |")
    for key, summary in result["by_strength"].items():
        rows.append(f"| strength {key} | {result['first_timestep'][key]} | "
                    + " | ".join(f"{summary[a]:.2f}" for a in attributes) + " |")
    return "\n".join(rows)

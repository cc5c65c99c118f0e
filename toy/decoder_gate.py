"""toy/decoder_gate.py — the toy decoder's held-out quality gate: DDIM + classifier-free-guidance samples of held-out
captions (``Stream.HELDOUT``, never trained on), judged by the attribute probe against the scene graphs, and the
placement test (does E[x0 | caption] put the object where its position words say?).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from toy.decoder_model import encode_prompts
from toy.placement import placement_test
from toy.probe import CELL_NAMES, chance_levels, clear_largest, judge, largest_object, load_probe, predict, summarize
from toy.recipe import Stream, images_to_unit_range, render_batch, toy_rng
from toy.scenes import world
from toy.tokenizer import load_toy_tokenizer
from vilex.config import cfg_field, to_dict
from vilex.errors import UserError
from vilex.models.coordinates import unet_forward


@dataclass
class DecoderGateSpec:
    """The held-out quality gate (judged by the attribute probe)."""

    enabled: bool = cfg_field(True)
    probe: str = cfg_field("assets/toy/probe", help="attribute-probe folder (vilex toy train-probe)")
    n_scenes: int = cfg_field(128, ge=2, help="held-out scenes with a clear largest object; half coarse, half fine")
    ddim_steps: int = cfg_field(25, ge=1)
    guidance_scale: float = cfg_field(3.0, ge=0)
    batch_size: int = cfg_field(64, ge=1)
    grid_images: int = cfg_field(16, ge=1, help="samples shown in samples.png")
    thresholds: dict[str, float] = cfg_field(
        default_factory=lambda: {"background_accuracy": 0.95, "colour_accuracy": 0.85, "shape_accuracy": 0.70,
                                 "cell_accuracy": 0.70, "count_accuracy": 0.70},
        help="the gate: the probe's accuracy on samples of held-out captions must reach each of these (all captions)")


@torch.no_grad()
def sample_images(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, noise_scheduler: Any,
                  prompts: Sequence[str], steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
                  batch_size: int = 64, latents: Any = None, init_images: torch.Tensor | None = None,
                  strength: float = 1.0) -> torch.Tensor:
    """DDIM samples (B, 3, H, W) in [-1, 1], on the CPU, for ``prompts`` with classifier-free guidance; a latent
    decoder's samples (``latents``: its ``LatentSpace``) are decoded by its VAE.

    ``init_images`` (B, 3, H, W) in [-1, 1] with ``strength`` < 1 starts from those images noised to the first DDIM
    timestep at or below ``strength`` x T and runs only the steps below it (diffusers' img2img convention): what the
    sampler keeps from them shows which attributes are already decided at that noise level."""
    if strength < 1.0 and init_images is None:
        raise ValueError("strength < 1 needs init_images to start from")
    size = int(unet.config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), int(unet.config.out_channels), size, size, generator=generator)
    uncond_one = encode_prompts(tokenizer, text_encoder, [""])
    ddim, timesteps = start_timesteps(noise_scheduler, steps, strength)  # DDIM is stateless: one for every chunk
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        cond = encode_prompts(tokenizer, text_encoder, chunk)
        context = torch.cat([uncond_one.expand(len(chunk), -1, -1), cond])
        x = noise[i:i + len(chunk)]
        if strength < 1.0:
            start = init_images[i:i + len(chunk)]
            start = latents.encode(start, generator) if latents is not None else start
            x = ddim.add_noise(start.cpu(), x, timesteps[:1].expand(len(chunk)))
        x = x.to(unet.device)
        for t in timesteps:
            pred_uncond, pred_cond = unet_forward(unet, torch.cat([x, x]), t, context).chunk(2)
            x = ddim.step(pred_uncond + guidance_scale * (pred_cond - pred_uncond), t, x).prev_sample
        out.append((latents.decode(x) if latents is not None else x.clamp(-1.0, 1.0)).cpu())
    return torch.cat(out)


def start_timesteps(noise_scheduler: Any, steps: int, strength: float = 1.0) -> tuple[Any, torch.Tensor]:
    """(a DDIM scheduler set to ``steps``, the timesteps a sample at ``strength`` runs): all of them at 1, else those
    at or below ``strength`` x T."""
    from diffusers import DDIMScheduler

    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    ddim = DDIMScheduler.from_config(noise_scheduler.config)
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps
    if strength < 1.0:
        timesteps = timesteps[timesteps <= strength * ddim.config.num_train_timesteps]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} is below the last of {steps} DDIM steps")
    return ddim, timesteps


def signed_images_to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) tensors in [-1, 1] -> PIL images (``vilex.pipeline.to_pil`` takes [0, 1])."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def gate_scenes(seed: int, n: int) -> tuple[list[world.Scene], int]:
    """The first ``n`` held-out scenes with a clear largest object, and how many scenes were drawn for them."""
    rng = toy_rng(seed, Stream.HELDOUT)
    scenes, drawn = [], 0
    while len(scenes) < n:
        scene = world.sample_scene(rng)
        drawn += 1
        if clear_largest(scene):
            scenes.append(scene)
    return scenes, drawn


def gate_captions(scenes: Sequence[world.Scene]) -> list[str]:
    """The gate's captions: coarse for even indices, fine for odd ones."""
    return [world.caption_coarse(s) if i % 2 == 0 else world.caption_fine(s) for i, s in enumerate(scenes)]


def cells_a_fine_caption_allows(obj: world.ToyObject) -> set[str]:
    """The 3×3 cells (probe label names) a fine caption leaves open for ``obj``: its "column c row r" names a 5×5
    cell, which lies inside one 3×3 cell or straddles two (or four) of them."""
    col, row = world.grid5_cell(obj.cx, obj.cy)

    def thirds(k: int) -> set[int]:
        lo, hi = (k - 1) / world.GRID5, k / world.GRID5
        return {min(int(x * 3), 2) for x in (lo + 1e-9, hi - 1e-9)}

    return {CELL_NAMES[r * 3 + c] for r in thirds(row) for c in thirds(col)}


def fine_caption_placement(probe: Any, images: torch.Tensor, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """For samples of fine captions: how often the probe's 3×3 cell of the largest object is one the caption allows,
    next to the strict cell accuracy (the scene's own 3×3 cell, which a straddling 5×5 cell does not fix)."""
    cells = predict(probe, images)["cell"]
    allowed = [cells_a_fine_caption_allows(largest_object(s)) for s in scenes]
    return {"cell_within_the_captions_5x5_cell": round(float(np.mean([c in a for c, a in zip(cells, allowed)])), 4),
            "share_whose_5x5_cell_fixes_the_3x3_cell": round(float(np.mean([len(a) == 1 for a in allowed])), 4),
            "n": len(scenes)}


def decoder_quality_gate(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, noise_scheduler: Any,
                         probe_dir: str | Path, spec: DecoderGateSpec, seed: int, latents: Any = None
                         ) -> tuple[dict[str, Any], Any]:
    """Sample held-out captions (even index: coarse, odd: fine), judge them with the probe; (metrics, sheet).
    ``latents``: a latent decoder's ``LatentSpace`` (its samples are decoded; the pixel-space placement test, which
    reads E[x0 | caption] as an image, is left out: the probe's cell accuracy measures placement)."""
    from toy.scenes.contact_sheet import make_contact_sheet

    probe = load_probe(probe_dir)
    scenes, drawn = gate_scenes(seed, spec.n_scenes)
    captions = gate_captions(scenes)
    started = time.time()
    images = sample_images(unet, text_encoder, tokenizer, noise_scheduler, captions, spec.ddim_steps,
                           spec.guidance_scale, seed=seed, batch_size=spec.batch_size, latents=latents)
    sample_s = time.time() - started
    generated = judge(probe, images, scenes)
    placement = (placement_test(unet, text_encoder, tokenizer, noise_scheduler, seed=seed) if latents is None
                 else "not run: latent decoder (cell_accuracy measures placement)")
    real = judge(probe, images_to_unit_range(render_batch(scenes, images.shape[-1])), scenes)
    coarse = np.arange(len(scenes)) % 2 == 0
    overall = summarize(generated)
    failed = {k: {"got": overall[k], "needed": v} for k, v in spec.thresholds.items() if overall[k] < v}
    metrics = {
        "passed": not failed, "thresholds": dict(spec.thresholds), "below_threshold": failed,
        "generated": {"all": overall, "coarse_captions": summarize(generated, coarse),
                      "fine_captions": summarize(generated, ~coarse),
                      # a diagnostic beside the gate, which judges every caption by the scene's own 3×3 cell
                      "fine_captions_placement": fine_caption_placement(
                          probe, images[torch.from_numpy(~coarse)], [s for s, c in zip(scenes, coarse) if not c])},
        "probe_on_real_renders": summarize(real),
        "placement": placement,  # does E[x0 | caption] put the object where its position words say? (placement.py)
        "chance": chance_levels(probe.labels),
        "heldout_scenes_drawn": drawn,
        "heldout_scenes_used": len(scenes),
        "selection": "held-out stream scenes whose largest object is clear (probe.clear_largest); others skipped",
        "ddim_steps": spec.ddim_steps, "guidance_scale": spec.guidance_scale,
        "sampling_seconds": round(sample_s, 1),
    }
    k = min(spec.grid_images, len(scenes))
    sheet = make_contact_sheet(signed_images_to_pil(images[:k]), captions[:k], columns=8, image_px=64, tile_width=128,
                               caption_lines=7, font_size=9)
    return metrics, sheet


def gate_decoder_folder(decoder_dir: str | Path, spec: DecoderGateSpec, seed: int) -> dict[str, Any]:
    """Run the quality gate on a saved decoder folder; rewrites its samples.png and ``metrics.gate`` in recipe.json."""
    from toy.recipe import RECIPE_NAME, read_recipe

    folder = Path(decoder_dir)
    if not (Path(spec.probe) / "config.json").is_file():  # checked before the models load
        raise UserError(f"gate.probe: attribute probe not found: {spec.probe}")
    unet, text_encoder, tokenizer, scheduler, latents = load_decoder_folder(folder)
    metrics, sheet = decoder_quality_gate(unet, text_encoder, tokenizer, scheduler, spec.probe, spec, seed, latents)
    sheet.save(folder / ".samples.png.tmp", format="PNG", optimize=True)
    os.replace(folder / ".samples.png.tmp", folder / "samples.png")
    if (folder / RECIPE_NAME).is_file():
        recipe = read_recipe(folder)
        recipe["metrics"]["gate"] = metrics
        recipe["gate_config"] = to_dict(spec)  # the gate was (re)run on its own with these settings
        (folder / ".recipe.json.tmp").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        os.replace(folder / ".recipe.json.tmp", folder / RECIPE_NAME)
    return metrics


def load_decoder_folder(decoder_dir: str | Path) -> tuple[Any, Any, Any, Any, Any]:
    """(unet, text_encoder, tokenizer, scheduler, latents) of a saved toy decoder folder, in eval mode; ``latents``
    is its ``LatentSpace`` when it has a vae/, else None (a pixel-space decoder)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from toy.decoder_model import LatentSpace

    folder = Path(decoder_dir)
    if not (folder / "unet").is_dir():
        raise UserError(f"not a toy decoder folder (no unet/): {folder}")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    latents = LatentSpace(folder / "vae") if (folder / "vae").is_dir() else None
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    tokenizer = load_toy_tokenizer(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    return unet, text_encoder, tokenizer, scheduler, latents

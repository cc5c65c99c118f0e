"""toy/pretrain_vae.py — train the miniature Stable Diffusion's autoencoder (a diffusers ``AutoencoderKL``) on toy scenes.

The toy world's text-to-image decoder is a latent diffusion model laid out exactly like Stable Diffusion 1.x, so
that ViLex trains against it through the same ``stable_diffusion`` decoder type, latent cache and scaling factor as
against SD 1.5. Its first part is this VAE: 64² RGB -> 16² × 4 latents (two downsamplings, where SD 1.5 has three:
the toy images are 8× smaller than SD's, the latent grid keeps enough cells for an object's shape).

Decisions:
* Loss = MSE + ``l1_weight`` × L1 on pixels in [-1, 1], plus ``kl_weight`` × the KL of the posterior to N(0, I)
  (means over elements). Toy scenes are flat colours with anti-aliased edges, so no perceptual or adversarial
  term is needed for a sharp reconstruction; the small KL keeps the latent scale tame, as SD's VAE does.
* The decoder is trained on posterior samples (``latent_dist.sample()``), as ViLex's target sampling and SD's VAE
  training do, so decoding a slightly noisy latent is what it has learned.
* ``scaling_factor`` (diffusers: latents are multiplied by it before the UNet) is measured after training as
  1 / std of held-out posterior means and written into the saved config, as SD 1.5's 0.18215 was.
* Held-out reconstruction PSNR (posterior mean, 8-bit quantised output) is the gate: ``gate.min_psnr``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from toy.recipe import heldout_scenes, images_to_unit_range, render_batch, write_recipe
from toy.stage0 import Stage0Trainer, Stage0TrainSpec, decay_groups
from vilex.checkpoint import atomic_dir
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError
from vilex.train.run_loop import RunState

log = logging.getLogger(__name__)


@dataclass
class VAESpec:
    """``AutoencoderKL`` kwargs: one down block per entry of ``block_out_channels`` (all but the last downsample)."""

    block_out_channels: list[int] = cfg_field(default_factory=lambda: [32, 64, 64], ge=1)
    layers_per_block: int = cfg_field(1, ge=1)
    latent_channels: int = cfg_field(4, ge=1)
    norm_num_groups: int = cfg_field(16, ge=1)
    mid_block_add_attention: bool = cfg_field(False, help="False: fully convolutional, so training on crops is "
                                                          "exactly the model used on whole images")

    def validate(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"vae: block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")


@dataclass
class VAETrainSpec(Stage0TrainSpec):
    max_steps: int = cfg_field(3000, ge=1)
    global_batch_size: int = cfg_field(32, ge=1, help="scenes per optimizer step")
    lr: float = cfg_field(1e-3, gt=0)
    l1_weight: float = cfg_field(0.5, ge=0, help="L1 term's weight beside the MSE (sharper flat regions)")
    kl_weight: float = cfg_field(1e-4, ge=0, help="KL(posterior || N(0, I)) weight, means over elements")
    crop_size: int | None = cfg_field(32, ge=8, help="train on random crops of this size (a quarter of the pixels "
                                                      "of a 64² scene: 4x cheaper steps); null = whole images")
    num_workers: int = cfg_field(1, ge=0, help="DataLoader workers rendering scenes (0 = in this process)")
    device: str = cfg_field("cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto'")


@dataclass
class VAEGateSpec:
    n_scenes: int = cfg_field(256, ge=8, help="held-out scenes for the PSNR and the scaling factor")
    min_psnr: float = cfg_field(30.0, help="held-out reconstruction PSNR (dB) the VAE must reach")


@dataclass
class VAEPretrainConfig:
    """One VAE-pretraining experiment (configs/toy/vae.yaml)."""

    seed: int = cfg_field(0)
    image_size: int = cfg_field(64, ge=8)
    work_dir: str = cfg_field("runs/toy/vae", help="checkpoints and the training log (not shipped)")
    vae: VAESpec = field(default_factory=VAESpec)
    train: VAETrainSpec = field(default_factory=VAETrainSpec)
    gate: VAEGateSpec = field(default_factory=VAEGateSpec)


def build_vae(spec: VAESpec, image_size: int):
    from diffusers import AutoencoderKL

    spec.validate()
    n = len(spec.block_out_channels)
    if image_size % 2 ** (n - 1):
        raise ConfigError(f"image_size {image_size} is not divisible by the VAE's downsampling {2 ** (n - 1)}")
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(spec.block_out_channels),
                         layers_per_block=spec.layers_per_block, latent_channels=spec.latent_channels,
                         norm_num_groups=spec.norm_num_groups, sample_size=image_size,
                         mid_block_add_attention=spec.mid_block_add_attention)


def random_crops(images: torch.Tensor, size: int | None, gen: torch.Generator) -> torch.Tensor:
    """One random ``size``² crop per image, at multiples of the VAE's downsampling-friendly 8 px (a crop then
    cuts the latent grid where a whole image's would be cut)."""
    if size is None or size >= images.shape[-1]:
        return images
    n, side = images.shape[0], images.shape[-1]
    corners = torch.randint(0, (side - size) // 8 + 1, (n, 2), generator=gen) * 8
    return torch.stack([img[:, y:y + size, x:x + size] for img, (y, x) in zip(images, corners.tolist())])


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], after 8-bit quantisation (what a saved PNG would hold)."""
    def to_u8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round()
    mse = (to_u8(reconstruction) - to_u8(target)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


class VAETrainer(Stage0Trainer):
    name = "pretrain-vae"

    def __init__(self, cfg: VAEPretrainConfig) -> None:
        super().__init__(cfg, device=cfg.train.device)
        self.vae = build_vae(cfg.vae, cfg.image_size)
        self.prepare(self.vae, decay_groups(self.vae, cfg.train.lr, cfg.train.weight_decay))

    def batches(self, state: RunState) -> Iterator[Any]:
        return self.scene_batches(state, self.cfg.image_size, self.cfg.train.num_workers)

    def micro_step(self, batch: Any) -> torch.Tensor:
        step, images_u8, _ = batch
        spec = self.cfg.train
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * batch.parts + batch.part)
        x = random_crops(images_to_unit_range(images_u8), spec.crop_size, gen).to(self.device)
        posterior = self.vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
        z = posterior.mean + posterior.std * eps
        recon = self.vae.decode(z).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        return F.mse_loss(recon, x) + spec.l1_weight * F.l1_loss(recon, x) + spec.kl_weight * kl


@torch.no_grad()
def evaluate_vae(vae, image_size: int, seed: int, n_scenes: int, batch_size: int = 64) -> dict[str, Any]:
    """Held-out PSNR from the posterior mean, and the latent statistics the scaling factor comes from."""
    vae.eval()
    scenes = heldout_scenes(seed, n_scenes)
    device = next(vae.parameters()).device
    psnrs, means = [], []
    for i in range(0, n_scenes, batch_size):
        x = images_to_unit_range(render_batch(scenes[i:i + batch_size], image_size)).to(device)
        mean = vae.encode(x).latent_dist.mean
        psnrs.append(psnr(vae.decode(mean).sample, x).cpu())
        means.append(mean.cpu())
    p, z = torch.cat(psnrs), torch.cat(means)
    return {"heldout_psnr_db": round(float(p.mean()), 2), "heldout_psnr_min_db": round(float(p.min()), 2),
            "heldout_psnr_p10_db": round(float(np.percentile(p.numpy(), 10)), 2),
            "latent_mean": round(float(z.mean()), 4), "latent_std": round(float(z.std()), 4),
            "latent_channel_means": [round(float(v), 4) for v in z.mean((0, 2, 3))],
            "latent_shape": list(z.shape[1:]), "n_scenes": n_scenes}


def pretrain_vae(cfg: VAEPretrainConfig, out: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume), measure, set ``scaling_factor``, write ``out`` (an ``AutoencoderKL`` folder)."""
    trainer = VAETrainer(cfg)
    vae = trainer.vae
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("vae: %.2fM params; %d steps of batch %d on %s", n_params / 1e6, cfg.train.max_steps,
             cfg.train.global_batch_size, trainer.device)
    summary = trainer.train(resume)
    measured = evaluate_vae(vae, cfg.image_size, cfg.seed, cfg.gate.n_scenes)
    scaling = 1.0 / measured["latent_std"] if measured["latent_std"] > 0 else 1.0
    vae.register_to_config(scaling_factor=round(scaling, 5))
    passed = measured["heldout_psnr_db"] >= cfg.gate.min_psnr
    metrics = {**trainer.run_metrics(summary), "run_history": summary["run_history"], "parameters": n_params,
               **measured, "scaling_factor": round(scaling, 5),
               "gate": {"min_psnr_db": cfg.gate.min_psnr, "passed": passed}}
    if not passed:
        log.warning("vae gate NOT met: held-out PSNR %.2f dB < %.1f dB", measured["heldout_psnr_db"], cfg.gate.min_psnr)
    with atomic_dir(out) as tmp:
        vae.save_pretrained(str(tmp))
        write_recipe(tmp, "vae", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
    return metrics


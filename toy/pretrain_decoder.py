"""toy/pretrain_decoder.py — train the toy text-to-image decoder from scratch (stage 0 of the toy world).

No pretrained T2I model can be downloaded here, so the toy world ships its own: a diffusers
``UNet2DConditionModel`` in pixel space (32×32 RGB) and a transformers ``CLIPTextModel`` trained JOINTLY
with the standard diffusion loss, then saved in the layout the ViLex "pixel_unet" frozen decoder loads
(toy/decoder_model.py), plus ``recipe.json``, ``samples.png`` (the quality gate, toy/decoder_gate.py) and
``train_log.jsonl``. The text encoder can instead start from a contrastively pretrained one and stay frozen
(``text_encoder.pretrained`` / ``trainable: false``), as Stable Diffusion's does: trained jointly from scratch, a
toy text encoder learns the background word and ignores the object words (pretrain_text_encoder.py).

Decisions:
* Captions of MIXED granularity: each sample gets its coarse or its fine caption (``fine_caption_prob``).
  A decoder that only ever saw coarse captions would have a conditioning space too poor for ViLex tokens
  to express detail (exact shade, size, position); fine captions make the text space carry it.
* 10% caption dropout (the empty prompt), so classifier-free guidance works at sampling time.
* v-prediction with the cosine (``squaredcos_cap_v2``) schedule: at t≈T the cosine schedule's SNR is ~0,
  where ε-prediction cannot recover x0 (its x0 estimate divides by ~0); v stays well-posed there.
* Data is sampled on the fly from the world (``recipe.SceneBatches``): batch k depends only on (seed, k),
  noise and timesteps come from a generator seeded by (seed, k), so ``--resume`` reproduces the
  uninterrupted run. The shared run loop (toy/stage0.py) writes checkpoints (live weights, EMA, optimizer,
  LR schedule) to ``work_dir``, not to the asset folder, which receives only the EMA weights.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from toy.decoder_gate import DecoderGateSpec, decoder_quality_gate
from toy.decoder_model import (
    NoiseSpec,
    TextEncoderSpec,
    LatentSpace,
    UNetSpec,
    build_noise_scheduler,
    build_unet,
    encode_prompts,
    load_init_unet,
    load_or_build_text_encoder,
    write_model_index,
)
from toy.recipe import Stream, images_to_unit_range, toy_rng, write_recipe
from toy.scenes import world
from toy.stage0 import Stage0Trainer, Stage0TrainSpec
from toy.tokenizer import load_toy_tokenizer
from vilex.checkpoint import atomic_dir
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError, UserError
from vilex.models.coordinates import unet_forward
from vilex.models.decoders import diffusion_target
from vilex.models.timesteps import draw_timesteps
from vilex.train.ema import EMA
from vilex.train.run_loop import RunState

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config
@dataclass
class DecoderTrainSpec(Stage0TrainSpec):
    """Optimisation, data mix, checkpointing."""

    max_steps: int = cfg_field(4000, ge=1, help="optimizer steps")
    global_batch_size: int = cfg_field(32, ge=1, help="scenes per optimizer step")
    warmup_steps: int = cfg_field(200, ge=0)
    ema_decay: float = cfg_field(0.999, gt=0, lt=1)
    caption_dropout: float = cfg_field(0.1, ge=0, le=1, help="share of empty prompts (for CFG)")
    fine_caption_prob: float = cfg_field(0.5, ge=0, le=1, help="share of fine captions (the rest coarse)")
    high_noise_fraction: float = cfg_field(0.0, ge=0, le=1, help="share of each batch whose timestep is drawn from "
                                                                "[high_noise_min_t, T) instead of [0, T)")
    high_noise_min_t: int = cfg_field(950, ge=0, help="see high_noise_fraction: where the layout is decided")
    max_objects: int = cfg_field(3, ge=1, le=3, help="objects per training scene at most (1: a single-object "
                                                    "first stage); the gate always uses the full world")
    bf16: bool = cfg_field(True, help="bf16 autocast for forward/backward (weights and optimizer stay fp32)")
    device: str = cfg_field("cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available); data and noise "
                                        "are drawn on the CPU either way, so a run is the same data on any device")
    num_workers: int = cfg_field(1, ge=0, help="DataLoader workers rendering scenes (0 = in this process)")


@dataclass
class DecoderPretrainConfig:
    """One decoder-pretraining experiment (configs/toy/decoder.yaml)."""

    seed: int = cfg_field(0)
    image_size: int = cfg_field(32, ge=8)
    tokenizer: str = cfg_field("assets/toy/tokenizer", help="toy tokenizer folder (vilex toy train-tokenizer)")
    work_dir: str = cfg_field("runs/toy/decoder", help="checkpoints and the training log (not shipped)")
    init_unet: str | None = cfg_field(None, help="a decoder folder whose unet/ starts this run (a warm start, e.g. "
                                                 "the next stage of the staged recipe in configs/toy/decoder.yaml); "
                                                 "None: random init")
    vae: str | None = cfg_field(None, help="an AutoencoderKL folder (vilex toy pretrain-vae): the UNet then works on "
                                           "its latents and the folder is written in StableDiffusionPipeline's "
                                           "layout (decoder type stable_diffusion); None: pixel space (pixel_unet)")
    unet: UNetSpec = field(default_factory=UNetSpec)
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    train: DecoderTrainSpec = field(default_factory=DecoderTrainSpec)
    gate: DecoderGateSpec = field(default_factory=DecoderGateSpec)


# ----------------------------------------------------------------------------- training
def sample_timesteps(n: int, num_train_timesteps: int, spec: DecoderTrainSpec, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps (vilex/models/timesteps.py): uniform, with ``spec.high_noise_fraction`` of the batch
    drawn from the noisiest range, where the UNet must take positions from the caption."""
    try:
        return draw_timesteps(n, num_train_timesteps, gen, spec.high_noise_fraction, spec.high_noise_min_t)
    except ConfigError as e:
        raise ConfigError(f"train.{e}") from None


class _Parts(nn.Module):
    """The jointly trained pair, as one module (one optimizer, one EMA, one state dict)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def choose_captions(scenes: Sequence[world.Scene], seed: int, step: int, spec: DecoderTrainSpec) -> list[str]:
    rng = toy_rng(seed, Stream.CHOICES, step)
    fine = rng.random(len(scenes)) < spec.fine_caption_prob
    drop = rng.random(len(scenes)) < spec.caption_dropout
    return ["" if d else (world.caption_fine(s) if f else world.caption_coarse(s))
            for s, f, d in zip(scenes, fine, drop)]


class DecoderTrainer(Stage0Trainer):
    """The standard diffusion loss on fresh scenes with mixed coarse/fine captions; an EMA of the weights is shipped."""

    name = "pretrain-decoder"

    def __init__(self, cfg: DecoderPretrainConfig) -> None:
        spec = cfg.train
        super().__init__(cfg, bf16=spec.bf16, device=spec.device)
        self.tokenizer = load_toy_tokenizer(cfg.tokenizer)
        self.text_encoder = load_or_build_text_encoder(cfg.text_encoder, self.tokenizer)
        self.text_encoder.requires_grad_(cfg.text_encoder.trainable)
        self.latents = LatentSpace(cfg.vae).to(self.device) if cfg.vae is not None else None
        if self.latents is not None:
            if cfg.unet.coordinate_channels:
                raise ConfigError("unet.coordinate_channels must be 0 with a vae: the stable_diffusion decoder type "
                                  "(and diffusers' StableDiffusionPipeline) feed the UNet the latents alone")
            if cfg.image_size % self.latents.factor:
                raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the VAE's downsampling "
                                  f"{self.latents.factor}")
            self.unet = build_unet(cfg.unet, cfg.image_size // self.latents.factor, cfg.text_encoder.width,
                                   channels=self.latents.channels)
        else:
            self.unet = build_unet(cfg.unet, cfg.image_size, cfg.text_encoder.width)
        self.warm_start = load_init_unet(self.unet, cfg.init_unet) if cfg.init_unet is not None else None
        self.parts = _Parts(self.unet, self.text_encoder)
        self.noise_scheduler = build_noise_scheduler(cfg.noise)
        groups = [{"params": list(self.unet.parameters()), "lr": spec.lr, "name": "unet"}]
        if cfg.text_encoder.trainable:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": spec.lr * cfg.text_encoder.lr_scale,
                           "name": "text_encoder"})
        self.prepare(self.parts, groups, weight_decay=spec.weight_decay)
        self.ema = EMA(self.parts, decay=spec.ema_decay)

    def set_train_mode(self) -> None:
        self.parts.train()
        self.text_encoder.train(self.cfg.text_encoder.trainable)  # a frozen text encoder stays in eval mode

    def batches(self, state: RunState) -> Iterator[Any]:
        spec = self.cfg.train
        return self.scene_batches(state, self.cfg.image_size, spec.num_workers,
                                  {"max_objects": spec.max_objects})

    def micro_step(self, batch: Any) -> torch.Tensor:
        step_index, images_u8, scenes = batch
        draw = step_index * batch.parts + batch.part  # the step itself when there is no accumulation
        spec, device = self.cfg.train, self.device
        x0 = images_to_unit_range(images_u8)
        prompts = choose_captions(scenes, self.seed, draw, spec)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        if self.latents is not None:
            x0 = self.latents.encode(x0, gen).cpu()
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(x0.shape[0], self.cfg.noise.num_train_timesteps, spec, gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        with self.strategy.autocast():
            cond = encode_prompts(self.tokenizer, self.text_encoder, prompts)
            pred = unet_forward(self.unet, x_t, t, cond)
        return F.mse_loss(pred.float(), diffusion_target(self.noise_scheduler, x0, noise, t))

    def on_optimizer_step(self, state: RunState) -> None:
        self.ema.update(self.parts)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{name}": value for name, value in self.ema.shadow.items()} | {
            "ema_num_updates": torch.tensor(self.ema.num_updates)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        shadow = {k[len("ema."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        self.ema.load_state_dict({"decay": self.ema.decay, "num_updates": int(tensors["ema_num_updates"]),
                                  "shadow": shadow})

    def use_ema_weights(self) -> None:
        """The shipped weights are the EMA weights: copy them in for the gate and the save."""
        with torch.no_grad():
            named = dict(self.parts.named_parameters())
            for name in self.ema.names:
                named[name].copy_(self.ema.shadow[name])


def pretrain_decoder(cfg: DecoderPretrainConfig, out: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume), run the quality gate, write the decoder folder ``out``; returns its recipe metrics."""
    if cfg.gate.enabled and not (Path(cfg.gate.probe) / "config.json").is_file():
        raise UserError(f"gate.probe: attribute probe not found: {cfg.gate.probe} (train it with `vilex toy "
                        f"train-probe`, or --set gate.enabled=false)")
    trainer = DecoderTrainer(cfg)
    unet, text_encoder, tokenizer = trainer.unet, trainer.text_encoder, trainer.tokenizer
    n_params = {"unet": sum(p.numel() for p in unet.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    log.info("decoder: unet %.2fM params, text encoder %.2fM params; %d steps of batch %d, on %s",
             n_params["unet"] / 1e6, n_params["text_encoder"] / 1e6, cfg.train.max_steps, cfg.train.global_batch_size,
             trainer.device)
    summary = trainer.train(resume)
    trainer.use_ema_weights()
    metrics: dict[str, Any] = {**trainer.run_metrics(summary), "run_history": summary["run_history"],
                               "parameters": n_params, "warm_start": trainer.warm_start}
    sheet = None
    if cfg.gate.enabled:
        metrics["gate"], sheet = decoder_quality_gate(unet, text_encoder, tokenizer, trainer.noise_scheduler,
                                                      cfg.gate.probe, cfg.gate, cfg.seed, trainer.latents)
    else:
        metrics["gate"] = "disabled (gate.enabled=false)"
    with atomic_dir(out) as tmp:
        unet.save_pretrained(str(tmp / "unet"))
        text_encoder.save_pretrained(str(tmp / "text_encoder"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        trainer.noise_scheduler.save_pretrained(str(tmp / "scheduler"))
        if trainer.latents is not None:
            trainer.latents.vae.save_pretrained(str(tmp / "vae"))
            shutil.copyfile(Path(cfg.vae) / "recipe.json", tmp / "vae" / "recipe.json")
        write_model_index(tmp, latent=trainer.latents is not None)
        shutil.copyfile(Path(cfg.work_dir) / "train_log.jsonl", tmp / "train_log.jsonl")
        if sheet is not None:
            sheet.save(tmp / "samples.png", format="PNG", optimize=True)
        write_recipe(tmp, "decoder", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
    return metrics

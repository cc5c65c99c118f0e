"""toy/pretrain_decoder.py — train the toy text-to-image decoder from scratch (stage 0 of the toy world).

No pretrained T2I model can be downloaded here, so the toy world ships its own: a diffusers
``UNet2DConditionModel`` in pixel space (32×32 RGB) and a transformers ``CLIPTextModel`` trained JOINTLY
with the standard diffusion loss, then saved in the layout the ViLex "pixel_unet" frozen decoder loads:
``unet/ text_encoder/ tokenizer/ scheduler/ model_index.json`` (no ``vae/``), plus ``recipe.json``,
``samples.png`` and ``train_log.jsonl``. The text encoder can instead start from a contrastively pretrained one
and stay frozen (``text_encoder.pretrained`` / ``trainable: false``), as Stable Diffusion's does: trained jointly
from scratch, the toy text encoder learned the background word and ignored the object words
(pretrain_text_encoder.py).

Decisions:
* Captions of MIXED granularity: each sample gets its coarse or its fine caption (``fine_caption_prob``).
  A decoder that only ever saw coarse captions would have a conditioning space too poor for ViLex tokens
  to express detail (exact shade, size, position); fine captions make the text space carry it.
* 10% caption dropout (the empty prompt), so classifier-free guidance works at sampling time.
* v-prediction with the cosine (``squaredcos_cap_v2``) schedule: at t≈T the cosine schedule's SNR is ~0,
  where ε-prediction cannot recover x0 (its x0 estimate divides by ~0); v stays well-posed there.
* Data is sampled on the fly from the world (``recipe.SceneBatches``): batch k depends only on (seed, k),
  noise and timesteps come from a generator seeded by (seed, k), so ``--resume`` reproduces the
  uninterrupted run. Checkpoints (live weights, EMA, optimizer, LR schedule) go to ``work_dir``, not to
  the asset folder, which receives only the EMA weights.
* The quality gate samples held-out captions (``Stream.HELDOUT``, never trained on) with DDIM + CFG and
  lets the attribute probe (probe.py) judge the images against the scene graphs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vilex.checkpoint import CheckpointManager, atomic_dir, load_tensors, save_tensors
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError, UserError
from vilex.models.coordinates import COORDINATE_CHANNELS, coordinate_channels, unet_forward
from vilex.models.timesteps import draw_timesteps
from vilex.train.distributed import resolve_device
from toy.scenes import world
from toy.placement import placement_test
from toy.probe import chance_levels, clear_largest, judge, load_probe, summarize, warmup_cosine
from toy.recipe import (
    SceneBatches,
    Stream,
    images_to_unit_range,
    render_batch,
    scene_loader,
    toy_rng,
    write_recipe,
)
from toy.tokenizer import load_toy_tokenizer

log = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction"]


# ----------------------------------------------------------------------------- config
@dataclass
class UNetSpec:
    """Architecture of the pixel-space UNet (``UNet2DConditionModel`` kwargs; cross-attention width = text width)."""

    block_out_channels: list[int] = cfg_field(default_factory=lambda: [32, 64, 64], ge=1)
    layers_per_block: int = cfg_field(1, ge=1)
    down_block_types: list[str] = cfg_field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = cfg_field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    attention_head_dim: int = cfg_field(8, ge=1)
    norm_num_groups: int = cfg_field(8, ge=1)
    coordinate_channels: int = cfg_field(0, ge=0, le=2, help="2: (x, y) coordinate maps are extra UNet inputs "
                                                             "(CoordConv; vilex/models/coordinates.py), 0: none")
    # diffusers options for a conditioning pathway besides cross-attention (see scripts/toy/README.md, "Where
    # placement fails"): "text" adds an attention-pooled summary of the conditioning to the timestep embedding, as
    # SDXL adds its pooled text embedding; "scale_shift" lets that embedding scale AND shift every ResNet's GroupNorm
    # output (AdaGN), a multiplicative interaction between the caption and the spatial features.
    addition_embed_type: Literal["text"] | None = cfg_field(None)
    resnet_time_scale_shift: Literal["default", "scale_shift"] = cfg_field("default")

    def validate(self) -> None:
        if self.coordinate_channels not in (0, COORDINATE_CHANNELS):
            raise ConfigError(f"unet.coordinate_channels: 0 or {COORDINATE_CHANNELS}, got {self.coordinate_channels}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"unet: down_block_types and up_block_types need {n} entries (one per "
                              f"block_out_channels), got {len(self.down_block_types)} and {len(self.up_block_types)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"unet: block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")


@dataclass
class TextEncoderSpec:
    """The CLIP text encoder: built from these sizes (vocabulary and context from the tokenizer), or loaded."""

    width: int = cfg_field(64, ge=8)
    layers: int = cfg_field(2, ge=1)
    heads: int = cfg_field(2, ge=1)
    mlp_ratio: int = cfg_field(4, ge=1)
    pretrained: str | None = cfg_field(None, help="a CLIPTextModel folder (vilex toy pretrain-text-encoder) to "
                                                  "start from; its sizes must equal the ones above")
    trainable: bool = cfg_field(True, help="false: the text encoder stays frozen, as SD's CLIP text encoder")
    lr_scale: float = cfg_field(1.0, gt=0, help="when trainable: its learning rate is train.lr × this (fine-tune "
                                                "a pretrained encoder gently while the UNet learns at full rate)")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text_encoder: width {self.width} not divisible by heads {self.heads}")


@dataclass
class NoiseSpec:
    """The DDPM training noise schedule (saved as scheduler/scheduler_config.json)."""

    num_train_timesteps: int = cfg_field(1000, ge=2)
    beta_schedule: str = cfg_field("squaredcos_cap_v2", help="diffusers beta_schedule name")
    prediction_type: PredictionType = cfg_field("v_prediction")
    # Sampling settings, saved with the schedule so every sampler built from it (ViLexPipeline, the gate) uses them.
    # Measured on decoder v2 (96 held-out captions, CFG 3): "leading" spacing starts DDIM at t=960, where a 32² pixel
    # image still shows its mean brightness, so pure noise reads as mid-grey and black/white backgrounds fail
    # (background accuracy 0.41 -> 0.71 with "trailing"); clipping x0 under CFG then flips white to dark (0.71 -> 1.00
    # with clip_sample false, as Stable Diffusion's scheduler has it).
    timestep_spacing: Literal["leading", "trailing", "linspace"] = cfg_field("trailing")
    clip_sample: bool = cfg_field(False, help="clip predicted x0 to [-1, 1] while sampling")


@dataclass
class DecoderTrainSpec:
    """Optimisation, data mix, checkpointing."""

    steps: int = cfg_field(4000, ge=1)
    batch_size: int = cfg_field(32, ge=1)
    lr: float = cfg_field(1e-3, gt=0)
    warmup_steps: int = cfg_field(200, ge=0)
    min_lr_ratio: float = cfg_field(0.1, ge=0, le=1, help="cosine decays to lr × this")
    weight_decay: float = cfg_field(0.01, ge=0)
    grad_clip: float = cfg_field(1.0, gt=0)
    ema_decay: float = cfg_field(0.999, gt=0, lt=1)
    caption_dropout: float = cfg_field(0.1, ge=0, le=1, help="share of empty prompts (for CFG)")
    fine_caption_prob: float = cfg_field(0.5, ge=0, le=1, help="share of fine captions (the rest coarse)")
    high_noise_fraction: float = cfg_field(0.0, ge=0, le=1, help="share of each batch whose timestep is drawn from "
                                                                "[high_noise_min_t, T) instead of [0, T)")
    high_noise_min_t: int = cfg_field(950, ge=0, help="see high_noise_fraction: where the layout is decided")
    max_objects: int = cfg_field(3, ge=1, le=3, help="objects per training scene at most (1: a single-object "
                                                    "first stage); the gate always uses the full world")
    bf16: bool = cfg_field(True, help="bf16 autocast for forward/backward (weights and optimizer stay fp32)")
    threads: int = cfg_field(2, ge=1, help="torch intra-op threads")
    device: str = cfg_field("cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available); data and noise "
                                        "are drawn on the CPU either way, so a run is the same data on any device")
    num_workers: int = cfg_field(1, ge=0, help="DataLoader workers rendering scenes (0 = in this process)")
    log_every: int = cfg_field(25, ge=1)
    checkpoint_every: int = cfg_field(250, ge=1)
    keep_last: int = cfg_field(2, ge=1)
    max_minutes: float | None = cfg_field(None, gt=0, help="stop training (checkpoint, gate, save) after this long")


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


@dataclass
class DecoderPretrainConfig:
    """One decoder-pretraining experiment (configs/toy/decoder.yaml)."""

    seed: int = cfg_field(0)
    image_size: int = cfg_field(32, ge=8)
    tokenizer: str = cfg_field("assets/toy/tokenizer", help="toy tokenizer folder (vilex toy train-tokenizer)")
    work_dir: str = cfg_field("runs/toy/decoder", help="checkpoints and the training log (not shipped)")
    init_unet: str | None = cfg_field(None, help="a decoder folder whose unet/ starts this run (a warm start, e.g. "
                                                 "to fine-tune with the text encoder unfrozen); None: random init")
    unet: UNetSpec = field(default_factory=UNetSpec)
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    train: DecoderTrainSpec = field(default_factory=DecoderTrainSpec)
    gate: DecoderGateSpec = field(default_factory=DecoderGateSpec)


# ----------------------------------------------------------------------------- model parts
def build_text_encoder(spec: TextEncoderSpec, tokenizer: Any) -> nn.Module:
    """A randomly initialised ``CLIPTextModel`` sized for ``tokenizer`` (vocabulary, context, special ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.width, intermediate_size=spec.mlp_ratio * spec.width,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, projection_dim=spec.width,
        max_position_embeddings=int(tokenizer.model_max_length), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def load_or_build_text_encoder(spec: TextEncoderSpec, tokenizer: Any) -> nn.Module:
    """``spec.pretrained`` loaded (checked against the sizes in ``spec`` and the tokenizer), else a new one."""
    from transformers import CLIPTextModel

    if spec.pretrained is None:
        return build_text_encoder(spec, tokenizer)
    if not (Path(spec.pretrained) / "config.json").is_file():
        raise UserError(f"text_encoder.pretrained: no CLIPTextModel folder at {spec.pretrained} (train one with "
                        f"`vilex toy pretrain-text-encoder`)")
    model = CLIPTextModel.from_pretrained(spec.pretrained)
    c = model.config
    found = {"width": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "mlp_ratio": c.intermediate_size // c.hidden_size, "vocab": c.vocab_size}
    wanted = {"width": spec.width, "layers": spec.layers, "heads": spec.heads, "mlp_ratio": spec.mlp_ratio,
              "vocab": len(tokenizer)}
    if found != wanted:
        raise ConfigError(f"text_encoder.pretrained {spec.pretrained} has {found}; the config says {wanted}")
    return model


def load_init_unet(unet: nn.Module, decoder_dir: str | Path) -> dict[str, Any]:
    """Copy ``decoder_dir/unet`` weights into ``unet``; the architectures must match exactly, except that a
    UNet without coordinate channels may start one with them: the new ``conv_in`` input channels start at
    zero, so the warm-started UNet computes exactly what the saved one did (as SD-inpainting was
    initialised from SD). Returns what was done, for the recipe."""
    from diffusers import UNet2DConditionModel

    folder = Path(decoder_dir) / "unet"
    if not (folder / "config.json").is_file():
        raise UserError(f"init_unet: no decoder unet at {folder}")
    saved_unet = UNet2DConditionModel.from_pretrained(str(folder))
    saved = saved_unet.state_dict()
    ours = unet.state_dict()
    saved_coords, our_coords = coordinate_channels(saved_unet), coordinate_channels(unet)
    added = our_coords - saved_coords
    expandable = {"conv_in.weight"} if added > 0 else set()
    mismatched = sorted(k for k in ours if k not in saved
                        or (saved[k].shape != ours[k].shape and k not in expandable))
    if mismatched or len(saved) != len(ours) or added < 0:
        raise ConfigError(f"init_unet {decoder_dir}: its UNet differs from the unet section of this config "
                          f"({len(mismatched)} mismatched tensors, e.g. {mismatched[:3]}; coordinate channels "
                          f"{saved_coords} saved vs {our_coords} configured)")
    if added:
        weight = saved["conv_in.weight"]
        saved["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], added, *weight.shape[2:])], 1)
    unet.load_state_dict(saved)
    return {"from": str(decoder_dir), "zero_initialised_coordinate_channels": added}


def build_unet(spec: UNetSpec, image_size: int, cross_attention_dim: int) -> nn.Module:
    """A randomly initialised pixel-space ``UNet2DConditionModel``: 3 channels out, 3 (+ coordinates) in."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size, in_channels=3 + spec.coordinate_channels, out_channels=3,
        layers_per_block=spec.layers_per_block,
        block_out_channels=tuple(spec.block_out_channels), down_block_types=tuple(spec.down_block_types),
        up_block_types=tuple(spec.up_block_types), cross_attention_dim=cross_attention_dim,
        attention_head_dim=spec.attention_head_dim, norm_num_groups=spec.norm_num_groups,
        addition_embed_type=spec.addition_embed_type, resnet_time_scale_shift=spec.resnet_time_scale_shift,
        addition_embed_type_num_heads=max(1, cross_attention_dim // 16))  # the pooler's heads (diffusers default 64)


def build_noise_scheduler(spec: NoiseSpec) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type=spec.prediction_type, timestep_spacing=spec.timestep_spacing,
                         clip_sample=spec.clip_sample)


def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """UNet conditioning (B, L, W) as SD1 pipelines build it: pad to the full context, no padding mask."""
    ids = prompt_ids(tokenizer, prompts)
    return text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(B, context) token ids, padded with EOS to the full context (what ``encode_prompts`` feeds the encoder)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] > tokenizer.model_max_length:
        raise UserError(f"a prompt has {ids.shape[1]} tokens; the text context holds {tokenizer.model_max_length}")
    return ids


def sample_timesteps(n: int, num_train_timesteps: int, spec: DecoderTrainSpec, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps (vilex/models/timesteps.py): uniform, with ``spec.high_noise_fraction`` of the batch
    drawn from the noisiest range, where the UNet must take positions from the caption."""
    try:
        return draw_timesteps(n, num_train_timesteps, gen, spec.high_noise_fraction, spec.high_noise_min_t)
    except ConfigError as e:
        raise ConfigError(f"train.{e}") from None


def diffusion_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict under the scheduler's prediction_type."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


@torch.no_grad()
def sample_images(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, noise_scheduler: Any,
                  prompts: Sequence[str], steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
                  batch_size: int = 64) -> torch.Tensor:
    """DDIM samples (B, 3, H, W) in [-1, 1], on the CPU, for ``prompts`` with classifier-free guidance."""
    from diffusers import DDIMScheduler

    size = int(unet.config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 3, size, size, generator=generator)
    uncond_one = encode_prompts(tokenizer, text_encoder, [""])
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        cond = encode_prompts(tokenizer, text_encoder, chunk)
        context = torch.cat([uncond_one.expand(len(chunk), -1, -1), cond])
        ddim = DDIMScheduler.from_config(noise_scheduler.config)
        ddim.set_timesteps(steps)
        x = noise[i:i + len(chunk)].to(unet.device)
        for t in ddim.timesteps:
            pred_uncond, pred_cond = unet_forward(unet, torch.cat([x, x]), t, context).chunk(2)
            x = ddim.step(pred_uncond + guidance_scale * (pred_cond - pred_uncond), t, x).prev_sample
        out.append(x.clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def to_pil(images: torch.Tensor) -> list:
    """[-1, 1] tensors -> PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


# ----------------------------------------------------------------------------- quality gate
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


def decoder_quality_gate(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, noise_scheduler: Any,
                         probe_dir: str | Path, spec: DecoderGateSpec, seed: int) -> tuple[dict[str, Any], Any]:
    """Sample held-out captions (even index: coarse, odd: fine), judge them with the probe; (metrics, sheet)."""
    from toy.scenes.contact_sheet import make_contact_sheet

    probe = load_probe(probe_dir)
    scenes, drawn = gate_scenes(seed, spec.n_scenes)
    captions = [world.caption_coarse(s) if i % 2 == 0 else world.caption_fine(s) for i, s in enumerate(scenes)]
    started = time.time()
    images = sample_images(unet, text_encoder, tokenizer, noise_scheduler, captions, spec.ddim_steps,
                           spec.guidance_scale, seed=seed, batch_size=spec.batch_size)
    sample_s = time.time() - started
    generated = judge(probe, images, scenes)
    placement = placement_test(unet, text_encoder, tokenizer, noise_scheduler, seed=seed)
    real = judge(probe, images_to_unit_range(render_batch(scenes, images.shape[-1])), scenes)
    coarse = np.arange(len(scenes)) % 2 == 0
    metrics = {
        "generated": {"all": summarize(generated), "coarse_captions": summarize(generated, coarse),
                      "fine_captions": summarize(generated, ~coarse)},
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
    sheet = make_contact_sheet(to_pil(images[:k]), captions[:k], columns=8, image_px=64, tile_width=128,
                               caption_lines=7, font_size=9)
    return metrics, sheet


def gate_decoder_folder(decoder_dir: str | Path, spec: DecoderGateSpec, seed: int) -> dict[str, Any]:
    """Run the quality gate on a saved decoder folder; rewrites its samples.png and ``metrics.gate`` in recipe.json."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from toy.recipe import RECIPE_NAME, read_recipe

    folder = Path(decoder_dir)
    if not (folder / "unet").is_dir():
        raise UserError(f"not a toy decoder folder (no unet/): {folder}")
    if not (Path(spec.probe) / "config.json").is_file():
        raise UserError(f"gate.probe: attribute probe not found: {spec.probe}")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    tokenizer = load_toy_tokenizer(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    metrics, sheet = decoder_quality_gate(unet, text_encoder, tokenizer, scheduler, spec.probe, spec, seed)
    sheet.save(folder / ".samples.png.tmp", format="PNG", optimize=True)
    os.replace(folder / ".samples.png.tmp", folder / "samples.png")
    if (folder / RECIPE_NAME).is_file():
        recipe = read_recipe(folder)
        recipe["metrics"]["gate"] = metrics
        recipe["gate_config"] = to_dict(spec)  # the gate was (re)run on its own with these settings
        (folder / ".recipe.json.tmp").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        os.replace(folder / ".recipe.json.tmp", folder / RECIPE_NAME)
    return metrics


# ----------------------------------------------------------------------------- training
class _Parts(nn.Module):
    """The jointly trained pair, as one module (one optimizer, one EMA, one state dict)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def _choose_captions(scenes: Sequence[world.Scene], seed: int, step: int, spec: DecoderTrainSpec) -> list[str]:
    rng = toy_rng(seed, Stream.CHOICES, step)
    fine = rng.random(len(scenes)) < spec.fine_caption_prob
    drop = rng.random(len(scenes)) < spec.caption_dropout
    return ["" if d else (world.caption_fine(s) if f else world.caption_coarse(s))
            for s, f, d in zip(scenes, fine, drop)]


def _save_training_state(folder: Path, parts: _Parts, ema: Any, opt: Any, lr_sched: Any, step: int) -> None:
    save_tensors(folder, parts.state_dict(), {"step": step, "ema_num_updates": ema.num_updates})
    save_tensors(folder, ema.shadow, weights_name="ema.safetensors")
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict()}, folder / "optimizer.pt")


def _load_training_state(folder: Path, parts: _Parts, ema: Any, opt: Any, lr_sched: Any,
                         device: torch.device) -> int:
    tensors, meta = load_tensors(folder)
    parts.load_state_dict(tensors)
    shadow, _ = load_tensors(folder, weights_name="ema.safetensors")
    ema.load_state_dict({"decay": ema.decay, "num_updates": meta["ema_num_updates"], "shadow": shadow})
    ema.shadow = {name: value.to(device) for name, value in ema.shadow.items()}
    state = torch.load(folder / "optimizer.pt", weights_only=True, map_location=device)
    opt.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    return int(meta["step"])


def _write_model_index(folder: Path) -> None:
    import diffusers

    index = {
        "_class_name": "ToyPixelText2ImagePipeline",  # no diffusers pipeline matches; load the parts one by one
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def pretrain_decoder(cfg: DecoderPretrainConfig, out: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume), run the quality gate, write the decoder folder ``out``; returns its recipe metrics."""
    from vilex.train.ema import EMA

    if cfg.gate.enabled and not (Path(cfg.gate.probe) / "config.json").is_file():
        raise UserError(f"gate.probe: attribute probe not found: {cfg.gate.probe} (train it with `vilex toy "
                        f"train-probe`, or --set gate.enabled=false)")
    device = resolve_device(cfg.train.device, "train.device")
    torch.set_num_threads(cfg.train.threads)
    started = time.time()
    spec = cfg.train
    tokenizer = load_toy_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    text_encoder = load_or_build_text_encoder(cfg.text_encoder, tokenizer)
    text_encoder.requires_grad_(cfg.text_encoder.trainable)
    unet = build_unet(cfg.unet, cfg.image_size, cfg.text_encoder.width)
    warm_start = load_init_unet(unet, cfg.init_unet) if cfg.init_unet is not None else None
    parts = _Parts(unet, text_encoder).to(device)
    noise_scheduler = build_noise_scheduler(cfg.noise)
    trainable = [p for p in parts.parameters() if p.requires_grad]
    groups = [{"params": list(unet.parameters()), "lr": spec.lr}]
    if cfg.text_encoder.trainable:
        groups.append({"params": list(text_encoder.parameters()), "lr": spec.lr * cfg.text_encoder.lr_scale})
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, spec.steps, spec.warmup_steps, spec.min_lr_ratio))
    ema = EMA(parts, decay=spec.ema_decay)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(work / "checkpoints", keep_last=spec.keep_last)
    ckpts.clean_stale()
    start_step = 0
    resume_from = ckpts.resolve(resume)
    if resume_from is not None:
        start_step = _load_training_state(resume_from, parts, ema, opt, lr_sched, device)
        log.info("resumed from %s at step %d", resume_from, start_step)
    n_params = {"unet": sum(p.numel() for p in unet.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    log.info("decoder: unet %.2fM params, text encoder %.2fM params; steps %d..%d, batch %d, on %s",
             n_params["unet"] / 1e6, n_params["text_encoder"] / 1e6, start_step, spec.steps, spec.batch_size, device)

    log_path = work / "train_log.jsonl"
    _truncate_log(log_path, start_step)
    batches = SceneBatches(cfg.seed, start_step, spec.steps, spec.batch_size, cfg.image_size,
                           scene_options={"max_objects": spec.max_objects})
    step, window, window_start, stopped_early = start_step, [], time.time(), False
    parts.train()
    text_encoder.train(cfg.text_encoder.trainable)
    with open(log_path, "a") as log_fh:
        for step_index, images_u8, scenes in scene_loader(batches, spec.num_workers):
            x0 = images_to_unit_range(images_u8)
            prompts = _choose_captions(scenes, cfg.seed, step_index, spec)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step_index)
            noise = torch.randn(x0.shape, generator=gen)
            t = sample_timesteps(x0.shape[0], cfg.noise.num_train_timesteps, spec, gen)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            x_t = noise_scheduler.add_noise(x0, noise, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                cond = encode_prompts(tokenizer, text_encoder, prompts)
                pred = unet_forward(unet, x_t, t, cond)
            loss = F.mse_loss(pred.float(), diffusion_target(noise_scheduler, x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip)
            opt.step()
            lr_sched.step()
            ema.update(parts)
            step = step_index + 1
            window.append(float(loss.detach()))
            if step % spec.log_every == 0 or step == spec.steps:
                sec = (time.time() - window_start) / len(window)
                record = {"step": step, "loss": round(float(np.mean(window)), 5), "lr": lr_sched.get_last_lr()[0],
                          "grad_norm": round(float(grad_norm), 4), "sec_per_step": round(sec, 3),
                          "elapsed_min": round((time.time() - started) / 60, 2)}
                log_fh.write(json.dumps(record) + "\n")
                log_fh.flush()
                log.info("step %d/%d loss %.4f lr %.2e %.2fs/step", step, spec.steps, record["loss"], record["lr"], sec)
                window, window_start = [], time.time()
            if step % spec.checkpoint_every == 0 or step == spec.steps:
                ckpts.save(step, lambda d: _save_training_state(d, parts, ema, opt, lr_sched, step))
            if spec.max_minutes is not None and time.time() - started > spec.max_minutes * 60 and step < spec.steps:
                log.warning("train.max_minutes=%s reached at step %d of %d: stopping early", spec.max_minutes,
                            step, spec.steps)
                ckpts.save(step, lambda d: _save_training_state(d, parts, ema, opt, lr_sched, step))
                stopped_early = True
                break
    train_minutes = (time.time() - started) / 60
    history = _record_segment(work / "run_history.json", {
        "from_step": start_step, "to_step": step, "steps_planned": spec.steps, "minutes": round(train_minutes, 2),
        "stopped_early": stopped_early, "train": to_dict(cfg.train)})

    # The shipped weights are the EMA weights: copy them in for the gate and the save.
    with torch.no_grad():
        named = dict(parts.named_parameters())
        for name in ema.names:
            named[name].copy_(ema.shadow[name])
    parts.eval()
    metrics: dict[str, Any] = {"steps_done": step, "steps_planned": spec.steps, "stopped_early": stopped_early,
                               "resumed_from_step": start_step if resume_from is not None else None,
                               "parameters": n_params, "train_minutes_this_run": round(train_minutes, 2),
                               "loss_curve": summarize_loss_log(log_path),
                               "train_minutes_all_runs": round(sum(h["minutes"] for h in history), 2),
                               "run_history": history, "warm_start": warm_start}
    sheet = None
    if cfg.gate.enabled:
        metrics["gate"], sheet = decoder_quality_gate(unet, text_encoder, tokenizer, noise_scheduler,
                                                      cfg.gate.probe, cfg.gate, cfg.seed)
    else:
        metrics["gate"] = "disabled (gate.enabled=false)"
    with atomic_dir(out) as tmp:
        unet.save_pretrained(str(tmp / "unet"))
        text_encoder.save_pretrained(str(tmp / "text_encoder"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        noise_scheduler.save_pretrained(str(tmp / "scheduler"))
        _write_model_index(tmp)
        shutil.copyfile(log_path, tmp / "train_log.jsonl")
        if sheet is not None:
            sheet.save(tmp / "samples.png", format="PNG", optimize=True)
        write_recipe(tmp, "decoder", to_dict(cfg), cfg.seed, time.time() - started, metrics)
    return metrics


def _record_segment(path: Path, segment: dict[str, Any]) -> list[dict[str, Any]]:
    """Append this invocation to the work dir's run history (segments a resumed run was made of); return it all.

    Segments that a later resume replayed (from_step >= this segment's start) are dropped: their steps were redone.
    """
    history = json.loads(path.read_text()) if path.is_file() else []
    history = [h for h in history if h["from_step"] < segment["from_step"]] + [segment]
    path.write_text(json.dumps(history, indent=2, default=str) + "\n")
    return history


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows after ``last_step`` (written by a killed run after its last checkpoint) before resuming."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= last_step))


def summarize_loss_log(path: str | Path, points: int = 8) -> list[dict[str, float]]:
    """A few (step, loss) points spread over a ``train_log.jsonl`` (the loss curve in brief)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    idx = sorted({round(i * (len(rows) - 1) / max(points - 1, 1)) for i in range(points)})
    return [{"step": rows[i]["step"], "loss": rows[i]["loss"]} for i in idx]

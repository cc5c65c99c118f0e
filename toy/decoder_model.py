"""toy/decoder_model.py — the toy text-to-image decoder's parts: a diffusers ``UNet2DConditionModel`` in pixel space,
a transformers ``CLIPTextModel`` with the toy tokenizer, and the DDPM noise schedule; their specs, builders, and the
prompt encoding the decoder is trained with (SD1-style: padded to the full context with EOS, no padding mask).

The saved folder (``unet/ text_encoder/ tokenizer/ scheduler/ model_index.json``, no ``vae/``) is what the
``pixel_unet`` frozen decoder type loads (vilex/models/decoders.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from vilex.config import cfg_field
from vilex.errors import ConfigError, UserError
from vilex.models.coordinates import COORDINATE_CHANNELS, coordinate_channels

PredictionType = Literal["epsilon", "v_prediction"]


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
    # diffusers options for a conditioning pathway besides cross-attention (see docs/EXPERIMENTS.md, "Where
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
    # "trailing": "leading" spacing starts DDIM at t=960, where a 32² pixel image still shows its mean brightness, so
    # pure noise reads as mid-grey and black/white backgrounds fail; no x0 clipping (as Stable Diffusion's scheduler):
    # clipping x0 under CFG flips white backgrounds to dark (docs/EXPERIMENTS.md has the numbers).
    timestep_spacing: Literal["leading", "trailing", "linspace"] = cfg_field("trailing")
    clip_sample: bool = cfg_field(False, help="clip predicted x0 to [-1, 1] while sampling")


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


def build_unet(spec: UNetSpec, sample_size: int, cross_attention_dim: int, channels: int = 3) -> nn.Module:
    """A randomly initialised ``UNet2DConditionModel`` on ``channels``-channel inputs of ``sample_size``² (pixels:
    3; a VAE's latents: its latent channels), plus the coordinate channels in."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels + spec.coordinate_channels, out_channels=channels,
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
                         clip_sample=spec.clip_sample, steps_offset=1)  # SD's; "trailing" spacing ignores it


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


def write_model_index(folder: Path, latent: bool = False) -> None:
    """``model_index.json``: a pixel decoder's parts, or (``latent``: a ``vae/`` is saved too) the layout of
    diffusers' ``StableDiffusionPipeline``, which then loads the folder as it is, as SD 1.5's own."""
    import diffusers

    if latent:
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return
    index = {
        "_class_name": "ToyPixelText2ImagePipeline",  # no diffusers pipeline matches; load the parts one by one
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


class LatentSpace:
    """A frozen ``AutoencoderKL`` as the decoder's model space: images in [-1, 1] <-> latents × ``scaling_factor``
    (SD 1.x conventions: a posterior sample, scaled; no shift)."""

    def __init__(self, vae_dir: str | Path) -> None:
        from diffusers import AutoencoderKL

        if not (Path(vae_dir) / "config.json").is_file():
            raise UserError(f"vae: no AutoencoderKL folder at {vae_dir} (train one with `vilex toy pretrain-vae`)")
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        self.scaling = float(self.vae.config.scaling_factor)
        self.channels = int(self.vae.config.latent_channels)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: Any) -> "LatentSpace":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.device)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
        return (dist.mean + dist.std * eps) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.device) / self.scaling).sample.clamp(-1.0, 1.0)

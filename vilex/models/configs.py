"""configs.py — the typed config of a Stage-1 ViLex model: vision tower, pooler, TailDrop, frozen decoder.

These dataclasses are embedded in the training config (``ViLexConfig`` under a ``model:`` key) and written
beside every checkpoint as ``vilex_config.json``. Choices of classes go through registry names (``type``),
never through the spelling of a path or a model id.

Decisions worth knowing:

* The pooler's OUTPUT width is not configurable: it is always the frozen text encoder's token-embedding
  width, read from the decoder at build time (a ViLex token must fit where a word embedding goes).
* ``PoolerConfig.num_tokens`` is checked against the decoder's context at build time (n <= context - 2,
  room for BOS and EOS), because only the decoder knows its context length.
* ``VisionTowerConfig.init`` builds a randomly initialised tower from config kwargs (tests, benchmarks,
  toy world); ``name_or_path`` loads pretrained weights. Exactly one of them must be given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vilex.config import cfg_field
from vilex.errors import ConfigError

OutputNorm = Literal["match_embeddings", "layernorm", "none"]
ContextPositions = Literal["none", "sincos2d"]
TailDropDistribution = Literal["uniform", "short"]
DecoderDType = Literal["float32", "bfloat16"]


@dataclass
class VisionTowerConfig:
    """The ViT that sees the image (initialised from SigLIP in the paper; fine-tuned)."""

    type: str = cfg_field("siglip", help="registry name in VISION_TOWERS: 'siglip' | 'timm'")
    name_or_path: str | None = cfg_field(
        None, help="hub id or local folder (siglip) / timm architecture name (timm); None -> build from `init`")
    init: dict[str, Any] | None = cfg_field(
        None, help="config kwargs for a randomly initialised tower (SiglipVisionConfig / timm.create_model kwargs)")
    checkpoint: str | None = cfg_field(None, help="timm only: local weights file (.safetensors/.pth) to load")
    feature_layer: int = cfg_field(-1, help="hidden layer feeding the pooler: -1 last (after the final norm, "
                                            "= last_hidden_state; unlike the VLM's tower.feature_layer, where -1 has "
                                            "no norm), -2 penultimate, k>=0 the output of block k-1 (0 = patch "
                                            "embeddings)")
    gradient_checkpointing: bool = cfg_field(False, help="non-reentrant activation checkpointing in the ViT")
    image_size: int | None = cfg_field(None, gt=0, help="input resolution; None -> the tower's own")

    def validate(self) -> None:
        if self.type == "siglip" and (self.name_or_path is None) == (self.init is None):
            raise ConfigError("vit: give exactly one of 'name_or_path' (pretrained) or 'init' (random init kwargs)")
        if self.type == "timm" and self.name_or_path is None:
            raise ConfigError("vit: a timm tower needs 'name_or_path' (the timm architecture name)")


@dataclass
class PoolerConfig:
    """Attention pooler: n learned position-specific queries attend to the ViT patch tokens."""

    num_tokens: int = cfg_field(75, ge=1, le=75, help="n ViLex tokens (<= decoder context - 2)")
    depth: int = cfg_field(5, ge=1, help="blocks of [self-attn over queries, cross-attn to patches, MLP]")
    heads: int = cfg_field(16, ge=1, help="attention heads (width must be divisible by heads)")
    mlp_ratio: float = cfg_field(4.0, gt=0)
    width: int = cfg_field(1024, ge=1, help="internal width; the output width is the decoder's embedding width")
    output_norm: OutputNorm = cfg_field("match_embeddings", help="how tokens are kept at word-embedding scale")
    context_positions: ContextPositions = cfg_field(
        "none", help="'sincos2d': add fixed 2-D sin-cos position codes to the patch tokens the queries attend to "
                     "(attention is blind to order, and a ViT's last-layer features may have lost where each patch "
                     "is: docs/EXPERIMENTS.md); 'none': the patch features alone")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"pooler.width ({self.width}) must be divisible by pooler.heads ({self.heads})")


@dataclass
class TailDropConfig:
    """TailDrop: per sample keep only the first m tokens (so any m works at inference)."""

    prob: float = cfg_field(0.5, ge=0.0, le=1.0, help="probability per sample that TailDrop applies")
    distribution: TailDropDistribution = cfg_field(
        "uniform", help="'uniform' m ~ U{min..n}; 'short' log-uniform in [min, n] (biased to few tokens)")
    min_tokens: int = cfg_field(1, ge=1, help="smallest kept length")


@dataclass
class DecoderConfig:
    """The frozen text-to-image decoder (a diffusers pipeline folder layout)."""

    type: str = cfg_field("stable_diffusion", help="registry name in FROZEN_DECODERS: stable_diffusion (SD 1.x/2.x) | "
                                                  "stable_diffusion_xl | pixel_unet")
    name_or_path: str = cfg_field("stabilityai/stable-diffusion-2-1-base",
                                  help="hub id or local folder with unet/ text_encoder/ tokenizer/ scheduler/ [vae/]")
    resolution: int | None = cfg_field(
        None, gt=0, help="pixels per side the decoder is trained at and generates (null = its own: the UNet's "
                         "sample_size × the VAE's factor, 512 for SD 1.5); a multiple of the VAE's factor × the UNet's "
                         "downsampling (64 for SD), e.g. 256 for a cheap SD 1.5 run")
    dtype: DecoderDType = cfg_field("float32", help="dtype the frozen decoder is held in")
    gradient_checkpointing: bool = cfg_field(False, help="non-reentrant checkpointing in text encoder and UNet")
    snr_gamma: float | None = cfg_field(None, gt=0, help="min-SNR loss weighting gamma (None = plain MSE)")
    high_noise_fraction: float = cfg_field(0.0, ge=0, le=1, help="share of each batch whose timestep is drawn from "
                                                                "[high_noise_min_t, T): where the layout is decided "
                                                                "(vilex/models/timesteps.py)")
    high_noise_min_t: int = cfg_field(950, ge=0)
    clip_skip: int = cfg_field(0, ge=0, help="0 = last text-encoder layer (the pipelines' default); k = k-th from last")
    channels_last: bool = cfg_field(False, help="hold the UNet in channels-last memory format (faster convolutions "
                                                "with oneDNN on CPU and tensor cores on GPU; same numbers)")
    sd3_token_encoders: list[str] = cfg_field(
        default_factory=lambda: ["clip_l", "clip_g", "t5"],
        help="stable_diffusion_3 only: the text encoders the ViLex tokens enter, of 'clip_l', 'clip_g', 't5' (one "
             "pooler head each); the others read the prompt alone. All three trained and reconstructed best on tiny "
             "configs; [clip_l, clip_g] costs no T5 pass per image (vilex/models/sd3.py)")
    t5_max_length: int = cfg_field(256, ge=2, help="stable_diffusion_3 only: T5's text positions (diffusers' default "
                                                   "256; SD3 was trained with 77, SD3.5 with 77 and 256)")
    flow_weighting: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = cfg_field(
        "logit_normal", help="flow-matching decoders (stable_diffusion_3): the noise-level density and loss weighting, "
                             "diffusers' SD3 weighting_scheme: 'logit_normal' (SD3's), 'mode', or uniform levels "
                             "weighted by 'cosmap' / 'sigma_sqrt' / 'none'")
    flow_logit_mean: float = cfg_field(0.0, help="'logit_normal': mean of the normal squashed into u in (0, 1)")
    flow_logit_std: float = cfg_field(1.0, gt=0, help="'logit_normal': its std")
    flow_mode_scale: float = cfg_field(1.29, help="'mode': the density's scale (SD3 paper's s)")


@dataclass
class ViLexConfig:
    """Everything needed to rebuild a Stage-1 ViLex model (stored as vilex_config.json in checkpoints)."""

    vit: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(
        name_or_path="google/siglip-so400m-patch14-224"))
    pooler: PoolerConfig = field(default_factory=PoolerConfig)
    taildrop: TailDropConfig = field(default_factory=TailDropConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> None:
        if self.taildrop.min_tokens > self.pooler.num_tokens:
            raise ConfigError(f"taildrop.min_tokens ({self.taildrop.min_tokens}) must be <= "
                              f"pooler.num_tokens ({self.pooler.num_tokens})")

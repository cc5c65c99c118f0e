"""train/config.py — the experiment config of `vilex pretrain` (one YAML per experiment in configs/vilex/).

    model:        ViLexConfig (vision tower, pooler, TailDrop, frozen decoder) — vilex/models/configs.py
    data:         train / val image sources — vilex/data
    train:        steps, batch, strategy (torch | deepspeed), precision, optimizer, EMA, checkpoints, NaN guard
    latent_cache: VAE posterior cache (VAE decoders only)
    val:          the fixed validation grid every N steps
    log:          tensorboard / W&B
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from vilex.config import cfg_field
from vilex.data.config import DataConfig as DataSourceConfig
from vilex.errors import ConfigError
from vilex.models.configs import ViLexConfig


@dataclass
class OptimConfig:
    """AdamW (the open stand-in for the paper's Adafactor) with two parameter groups."""

    lr_vit: float = cfg_field(1e-5, gt=0, help="ViT (SigLIP init) learning rate; the paper's 1e-5")
    lr_pooler: float = cfg_field(3e-4, gt=0, help="attention pooler (random init) learning rate; the paper's 3e-4")
    weight_decay: float = cfg_field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = cfg_field(1e-8, gt=0)
    warmup_steps: int = cfg_field(0, ge=0)
    min_lr_ratio: float = cfg_field(0.01, ge=0, le=1, help="cosine decays to lr * min_lr_ratio")
    grad_clip: Optional[float] = cfg_field(1.0, gt=0, help="max global grad norm (null = no clipping)")


@dataclass
class TrainConfig:
    output_dir: Path = Path("runs/pretrain")
    seed: int = 0
    max_steps: int = cfg_field(1000, ge=1, help="optimizer steps")
    trainable: list[Literal["vit", "pooler"]] = cfg_field(
        default_factory=lambda: ["vit", "pooler"], help="the encoder parts that learn (the paper: both); the others "
                                                        "stay frozen, e.g. [pooler] for a frozen-ViT probe")
    micro_batch_size: int = cfg_field(8, ge=1, help="images per process per forward")
    grad_accum: int = cfg_field(1, ge=1)
    strategy: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: Optional[Path] = cfg_field(None, help="configs/deepspeed/*.json (strategy: deepspeed)")
    precision: Literal["fp32", "bf16"] = "fp32"
    attention_backend: Literal["auto", "math"] = cfg_field(
        "auto", help="auto: torch picks the SDPA kernel; math: force the unfused math kernels (faster on CPU at "
                     "small head dims, where the fused kernel's backward dominates: docs/PERFORMANCE.md)")
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: Optional[float] = cfg_field(None, gt=0, lt=1, help="EMA of the encoder (null = off)")
    checkpoint_every: int = cfg_field(500, ge=1)
    keep_last: int = cfg_field(3, ge=1)
    log_every: int = cfg_field(10, ge=1)
    max_consecutive_nonfinite: int = cfg_field(5, ge=1, help="stop after this many non-finite losses in a row")
    peak_tflops: Optional[float] = cfg_field(None, gt=0, help="hardware bf16 peak for MFU (null = measure once)")
    max_minutes: Optional[float] = cfg_field(None, gt=0, help="checkpoint and stop after this long (--resume auto "
                                                              "continues); null = no limit")
    stop_signals: list[str] = cfg_field(default_factory=lambda: ["SIGTERM", "SIGUSR1"],
                                        help="checkpoint and stop cleanly (exit 0) on these signals (what SLURM and "
                                             "spot instances send before a kill); --resume auto continues")

    def validate(self) -> None:
        if self.strategy == "deepspeed" and self.deepspeed_config is None:
            raise ConfigError("train.deepspeed_config is required with train.strategy: deepspeed")
        if not self.trainable or len(set(self.trainable)) != len(self.trainable):
            raise ConfigError(f"train.trainable: one or both of 'vit', 'pooler', each once; got {self.trainable}")


@dataclass
class PretrainDataConfig:
    """The training image source and the (optional) validation one."""

    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    val: Optional[DataSourceConfig] = cfg_field(None, help="validation images (null = first images of train)")


@dataclass
class LatentCacheConfig:
    enabled: bool = cfg_field(True, help="cache the VAE posterior per image (VAE decoders only)")
    dir: Path = Path("~/.cache/vilex/latents")
    dtype: Literal["float16", "float32"] = "float32"


@dataclass
class ValConfig:
    every: int = cfg_field(500, ge=1, help="reconstruct the validation grid every N steps")
    num_images: int = cfg_field(8, ge=1)
    token_counts: list[int] = field(default_factory=lambda: [1, 4, 16, -1])  # -1 = the model's maximum
    guidance_scale: float = cfg_field(3.0, ge=0)
    num_inference_steps: int = cfg_field(25, ge=1)
    seed: int = 0


@dataclass
class LogConfig:
    """Where the run loop's metrics go besides the console and ``train_log.jsonl`` (stage 1 and stage 2)."""

    tensorboard: bool = True
    wandb_project: Optional[str] = cfg_field(None, help="a W&B project to log to (needs wandb installed)")


@dataclass
class PretrainConfig:
    model: ViLexConfig = field(default_factory=ViLexConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent_cache: LatentCacheConfig = field(default_factory=LatentCacheConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)

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
from typing import ClassVar, Literal, Optional

from vilex.config import cfg_field
from vilex.data.config import SourceConfig, ViewFit
from vilex.errors import ConfigError
from vilex.models.configs import ViLexConfig
from vilex.train.batching import BatchSchedule


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
class TrainConfig(BatchSchedule):
    """Steps and batch (the shared vocabulary: vilex/train/batching.py; a batch counts images), then the run."""

    output_dir: Path = Path("runs/pretrain")
    seed: int = cfg_field(0, help="model init, the data order and the loss's noise")
    trainable: list[Literal["vit", "pooler"]] = cfg_field(
        default_factory=lambda: ["vit", "pooler"], help="the encoder parts that learn (the paper: both); the others "
                                                        "stay frozen, e.g. [pooler] for a frozen-ViT probe")
    strategy: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: Optional[Path] = cfg_field(None, help="configs/deepspeed/*.json (strategy: deepspeed)")
    precision: Literal["fp32", "bf16"] = "fp32"
    attention_backend: Literal["auto", "math"] = cfg_field(
        "auto", help="auto: torch picks the SDPA kernel; math: force the unfused math kernels (faster on CPU at "
                     "small head dims, where the fused kernel's backward dominates: docs/PERFORMANCE.md)")
    optim: OptimConfig = field(default_factory=OptimConfig)
    init_from: Optional[Path] = cfg_field(
        None, help="a ViLex checkpoint, `vilex pretrain` checkpoint-<step> or run folder whose encoder weights (ViT "
                   "and pooler) start this run: a new schedule from trained weights. Not a resume: the step, "
                   "optimizer, learning rates and data order start fresh (--resume continues a run as it was)")
    ema_decay: Optional[float] = cfg_field(None, gt=0, lt=1, help="EMA of the encoder (null = off)")
    pipeline_weights: Literal["ema", "raw"] = cfg_field(
        "ema", help="the encoder weights each checkpoint's pipeline/ (the ViLex checkpoint every command loads) "
                    "holds when ema_decay is set: the EMA or the raw trained weights; both stay in the checkpoint "
                    "(ema.pt, encoder.pt) either way. Without EMA: raw")
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
class TrainingViewFit(ViewFit):
    """How the encoder or decoder view fits an image; the model sets the size and normalisation."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "size": "the model sets each view's size: the encoder's is model.vit.image_size (null = the ViT's own), "
                "the decoder's model.decoder.resolution (null = the decoder's own)",
        "mean": "the model sets each view's normalisation (the ViT's own; [-1, 1] for the decoder)",
        "std": "the model sets each view's normalisation (the ViT's own; [-1, 1] for the decoder)",
    }


def _training_views() -> dict[str, TrainingViewFit]:
    return {"encoder": TrainingViewFit(), "decoder": TrainingViewFit()}


@dataclass
class TrainingSourceConfig(SourceConfig):
    """An image source of stage 1: where the images are, how each view fits them and whether to shuffle. Batch,
    steps and seed are the train section's (one place for each)."""

    views: dict[str, TrainingViewFit] = cfg_field(default_factory=_training_views,
                                                  help="encoder / decoder: how each view fits an image")
    shuffle: bool = cfg_field(True, help="per-epoch shuffle derived from train.seed + epoch")

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "batch_size": "set train.global_batch_size and train.micro_batch_size",
        "epochs": "set train.max_steps (stage 1 repeats the data until then)",
        "seed": "set train.seed",
        "drop_last": "stage 1 always drops a rank's last partial batch of an epoch (every step has a full batch)",
    }

    def validate(self) -> None:
        super().validate()
        unknown = sorted(set(self.views) - {"encoder", "decoder"})
        if unknown:
            raise ConfigError(f"views: unknown view {', '.join(map(repr, unknown))}; stage 1 has 'encoder' "
                              f"and 'decoder'")


@dataclass
class PretrainDataConfig:
    """The training image source and the (optional) validation one."""

    train: TrainingSourceConfig = field(default_factory=TrainingSourceConfig)
    val: Optional[TrainingSourceConfig] = cfg_field(None, help="validation images (null = first images of train)")


@dataclass
class LatentCacheConfig:
    enabled: bool = cfg_field(True, help="cache the VAE posterior per image (VAE decoders only)")
    dir: Path = Path("~/.cache/vilex/latents")
    dtype: Literal["float16", "float32"] = "float32"
    chunk_rows: int = cfg_field(4096, ge=1, help="map sources (folder, hf): samples per cache file; each process "
                                                 "encodes whole files (sharded sources: one file per shard)")
    wait_timeout_min: Optional[float] = cfg_field(
        None, gt=0, help="how long a process that has encoded its share of the cache waits for the others' before "
                         "stopping with an error (null = $VILEX_COLLECTIVE_TIMEOUT_MIN, default 120)")


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

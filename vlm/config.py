"""vlm/config.py — the typed experiment config of `vilex train-vlm` (one YAML per experiment in configs/vlm/).

    model:     the VLM: vision tower (registry type), projector (registry type), LLM (HF causal LM by id or path)
    align:     stage 1 of the LLaVA recipe (projector only; plain captioning data)
    instruct:  stage 2 (projector + LLM; chat-template conversations)
    full:      optional third stage (projector + LLM + tower), off unless given
    output_dir each stage writes <output_dir>/<stage>/ (checkpoints/, summary.json, config.yaml)

Decisions worth knowing:

* One ``StageConfig`` per stage holds BOTH its data and its optimisation recipe (prismatic-vlms style), so the
  LLaVA-1.5 recipe is readable in one YAML: align lr 1e-3, batch 256, ZeRO-2; instruct lr 2e-5, batch 128, ZeRO-3.
* Batch sizes are in SAMPLES (conversations), as LLaVA states them: ``global_batch_size`` = micro x accumulation x
  processes; the accumulation is derived at run time from the number of processes (an error if it does not divide).
  Packing changes how a micro-batch's samples are laid out in rows, never which samples form a step.
* The stages and what each trains come from ONE explicit map, ``STAGE_TRAINS`` (here; ``STAGE_ORDER`` is its keys,
  in order); a stage's ``trainable`` overrides it.
* ``init_from: previous`` (the default of instruct/full) loads the projector (and tower, when it was trained) of the
  previous stage's latest checkpoint in the same ``output_dir``; a path loads from that checkpoint instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from vilex.config import cfg_field
from vilex.errors import ConfigError
from vilex.train.batching import BatchSchedule
from vilex.train.config import LogConfig

Component = Literal["projector", "llm", "tower"]
# The recipe's stages, in the order they run, and the components each trains unless its ``trainable`` says otherwise.
# The one definition of the stage names: the CLI's --stage choices, the stage order and the trainable defaults.
STAGE_TRAINS: dict[str, tuple[Component, ...]] = {
    "align": ("projector",),
    "instruct": ("projector", "llm"),
    "full": ("projector", "llm", "tower"),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_TRAINS)


@dataclass
class TowerConfig:
    """The vision tower (see vlm/towers.py for the registered types)."""

    type: str = cfg_field("siglip", help="registry name in vlm.towers.VLM_TOWERS: siglip | vilex | vilex_tokens")
    name_or_path: str = cfg_field("google/siglip-so400m-patch14-224",
                                  help="siglip: hub id or folder of a SiglipVisionModel; vilex*: a stage-1 checkpoint")
    feature_layer: int = cfg_field(-2, help="hidden_states index, HF Llava's vision_feature_layer convention (the "
                                            "final norm is never applied): 0 = patch embeddings, k = output of block "
                                            "k, -1 = last block, -2 = penultimate (unlike stage 1's vit.feature_layer, "
                                            "where -1 adds the final norm)")
    num_vilex_tokens: Optional[int] = cfg_field(None, ge=1, help="vilex_tokens: the first m ViLex tokens (None = all)")
    image_fit: Literal["resize", "crop", "letterbox"] = cfg_field(
        "resize", help="how an image becomes a square: resize (= the exported SigLIP processor), crop, letterbox")
    gradient_checkpointing: bool = cfg_field(False, help="non-reentrant activation checkpointing in the tower")


@dataclass
class ProjectorConfig:
    type: str = cfg_field("mlp2x_gelu", help="registry name in vlm.projector.PROJECTORS: mlp2x_gelu | linear")


@dataclass
class LLMConfig:
    name_or_path: str = cfg_field("Qwen/Qwen2.5-7B-Instruct", help="any HF causal LM: hub id or local folder")
    tokenizer: Optional[str] = cfg_field(None, help="tokenizer id/folder (None = name_or_path)")
    dtype: Literal["float32", "bfloat16"] = cfg_field("float32", help="weights dtype at load (DeepSpeed bf16 casts)")
    attn_implementation: Literal["sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = cfg_field(
        "sdpa_varlen", help="sdpa_varlen: sdpa per packed sample (vlm/varlen_attention.py), any device; "
                            "flash_attention_2 when installed (CUDA)")
    gradient_checkpointing: bool = cfg_field(False, help="non-reentrant activation checkpointing in the LLM")
    image_token: str = cfg_field("<image>", help="the placeholder token added to the tokenizer")


@dataclass
class VLMModelConfig:
    tower: TowerConfig = field(default_factory=TowerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)


@dataclass
class ConversationDataConfig:
    """LLaVA JSON conversations (see vlm/data.py) and how samples become tokens."""

    json: Optional[Path] = cfg_field(None, help="LLaVA-format JSON list (or .jsonl) of samples")
    image_root: Optional[Path] = cfg_field(None, help="folder the samples' `image` paths are relative to")
    template: Optional[Literal["align", "instruct"]] = cfg_field(
        None, help="align = plain captioning, instruct = the LLM's chat template (None = by stage)")
    max_length: int = cfg_field(2048, ge=8, help="tokens per sample (and per packed row)")
    on_too_long: Literal["truncate", "error"] = "truncate"
    on_bad_image: Literal["skip", "error"] = cfg_field(
        "skip", help="missing/undecodable image: skip = drop the sample, counted by reason (the run stops above "
                     "max_bad_fraction); error = stop at the first one")
    max_bad_fraction: float = cfg_field(
        0.001, ge=0, le=1, help="on_bad_image: skip: stop when more than this fraction of the samples seen had a bad "
                                "image (0.001 = 0.1 %); judged once 10 / max_bad_fraction samples were seen")
    packing: bool = cfg_field(True, help="several samples per row, no attention across samples")
    pack_length: Optional[int] = cfg_field(
        None, ge=8, help="tokens per packed row (None = max_length); longer rows waste less padding and cost nothing "
                         "extra with flash-attention 2 (varlen), while sdpa attention grows with the row")
    group_by_length: bool = cfg_field(True, help="length-grouped micro-batches (less padding when not packing)")
    num_workers: int = cfg_field(0, ge=0)


@dataclass
class StageConfig(BatchSchedule):
    """One stage: steps and batch (the shared vocabulary: vilex/train/batching.py; a batch counts samples), its
    data, what it trains and its optimisation."""

    max_steps: Optional[int] = cfg_field(None, ge=1, help="stop after this many steps (None = the epochs' steps)")
    global_batch_size: int = cfg_field(256, ge=1, help="samples per optimizer step over all processes")
    data: ConversationDataConfig = field(default_factory=ConversationDataConfig)
    trainable: Optional[list[Component]] = cfg_field(None, help="override the stage's default trainable components")
    init_from: Optional[str] = cfg_field(None, help="'previous' | a checkpoint/run folder | None: start weights")
    lr: float = cfg_field(1e-3, gt=0, help="projector (and LLM) learning rate")
    tower_lr: Optional[float] = cfg_field(None, gt=0, help="tower learning rate when it trains (None = lr)")
    weight_decay: float = cfg_field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = cfg_field(1e-8, gt=0)
    warmup_ratio: float = cfg_field(0.03, ge=0, lt=1)
    min_lr_ratio: float = cfg_field(0.0, ge=0, le=1)
    grad_clip: Optional[float] = cfg_field(1.0, gt=0)
    epochs: int = cfg_field(1, ge=1, help="passes over the data (the step count when max_steps is null)")
    strategy: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: Optional[Path] = cfg_field(None, help="configs/deepspeed/*.json (strategy: deepspeed)")
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    checkpoint_every: int = cfg_field(500, ge=1)
    keep_last: int = cfg_field(2, ge=1)
    log_every: int = cfg_field(10, ge=1)
    max_consecutive_nonfinite: int = cfg_field(5, ge=1)
    max_minutes: Optional[float] = cfg_field(None, gt=0, help="checkpoint and stop after this long (--resume auto "
                                                              "continues); null = no limit")
    stop_signals: list[str] = cfg_field(default_factory=lambda: ["SIGTERM", "SIGUSR1"],
                                        help="checkpoint and stop cleanly (exit 0) on these signals (what SLURM and "
                                             "spot instances send before a kill); --resume auto continues")

    def validate(self) -> None:
        if self.data.pack_length is not None and self.data.pack_length < self.data.max_length:
            raise ConfigError(f"data.pack_length ({self.data.pack_length}) must be >= data.max_length "
                              f"({self.data.max_length})")
        if self.strategy == "deepspeed" and self.deepspeed_config is None:
            raise ConfigError("deepspeed_config is required with strategy: deepspeed")
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"micro_batch_size ({self.micro_batch_size})")


def _align_defaults() -> StageConfig:
    return StageConfig(data=ConversationDataConfig(template="align"), lr=1e-3, global_batch_size=256,
                       micro_batch_size=32)


def _instruct_defaults() -> StageConfig:
    return StageConfig(data=ConversationDataConfig(template="instruct"), init_from="previous", lr=2e-5,
                       global_batch_size=128, micro_batch_size=16)


@dataclass
class VLMConfig:
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    align: StageConfig = field(default_factory=_align_defaults)
    instruct: StageConfig = field(default_factory=_instruct_defaults)
    full: Optional[StageConfig] = cfg_field(None, help="optional stage that also trains the tower")
    output_dir: Path = Path("runs/vlm")
    log: LogConfig = field(default_factory=lambda: LogConfig(tensorboard=False))

    def stage(self, name: str) -> StageConfig:
        """The config of stage ``name``; a stage the YAML does not define is a one-line error."""
        if name not in STAGE_ORDER:
            raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(STAGE_ORDER)}")
        cfg = getattr(self, name)
        if cfg is None:
            raise ConfigError(f"stage '{name}' is not defined in this config (add a '{name}:' section)")
        return cfg

    def stage_dir(self, name: str) -> Path:
        return Path(self.output_dir) / name


def template_for(stage: str, cfg: StageConfig) -> str:
    """The template a stage uses: its own setting, else 'align' for align and 'instruct' otherwise."""
    return cfg.data.template or ("align" if stage == "align" else "instruct")


# ---------------------------------------------------------------- references inside a saved checkpoint
REFERENCE_FIELDS: tuple[tuple[str, str], ...] = (("tower", "name_or_path"), ("llm", "name_or_path"),
                                                 ("llm", "tokenizer"))


def resolve_relative_references(model: dict, checkpoint_dir: str | Path) -> dict:
    """A saved model config with references written RELATIVE to the checkpoint ("../../siglip/vision", how shipped
    checkpoints point at the assets beside them) made absolute; absolute paths and hub ids are left as they are.

    Training writes absolute paths; a checkpoint that is moved or shipped rewrites them relative to itself
    (vilex toy ship-vlm), so it loads from any working directory."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in model.items()}
    for section, key in REFERENCE_FIELDS:
        ref = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(ref, str) and ref.startswith(("./", "../")):
            out[section][key] = str((Path(checkpoint_dir) / ref).resolve())
    return out

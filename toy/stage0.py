"""toy/stage0.py — what the toy world's stage-0 trainers share: their run settings and their task base class.

Every stage-0 trainer (the attribute probe, the decoder's text encoder, the decoder, the SigLIP, the chat LLM) is a
``Stage0Trainer``: a ``TrainTask`` of the shared run loop (vilex/train/run_loop.py), run by the plain torch strategy
in one process. The loop gives each of them the same resume (``--resume auto``: checkpoints under ``work_dir``),
non-finite guard, logging (``work_dir/train_log.jsonl``), checkpoint cadence, ``max_minutes`` and run history; a
trainer supplies its model, its optimizer groups, its batches and the loss of one batch, then evaluates and writes its
asset folder with a ``recipe.json``.

Data are drawn on the fly and batch k depends only on (seed, k) (toy/recipe.py), so resuming at step k replays
exactly the batches an uninterrupted run would have seen. Steps and batches use the one vocabulary of every trainer
(vilex/train/batching.py): ``max_steps``, ``global_batch_size`` and ``micro_batch_size``; with a micro-batch below
the global one, each step's batch is drawn whole and split into ``micro_batch_size`` parts (accumulation), so the
samples of a step do not depend on the micro-batch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from toy.recipe import SceneBatches, scene_loader
from vilex.checkpoint import load_tensors, save_tensors
from vilex.config import cfg_field
from vilex.errors import ConfigError
from vilex.train.batching import BatchSchedule, plan_batches
from vilex.train.distributed import resolve_device
from vilex.train.run_loop import LoopSettings, RunLoop, RunState, TrainTask, loss_curve
from vilex.train.strategy import TorchStrategy, warmup_cosine

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


@dataclass
class SceneBatch:
    """One micro-batch of rendered scenes: part ``part`` of ``parts`` of step ``step``'s batch. It unpacks as
    ``step, images, scenes`` (uint8 [B,3,H,W] and the scene graphs)."""

    step: int
    images: Any
    scenes: list[Any]
    part: int = 0
    parts: int = 1

    def __iter__(self) -> Iterator[Any]:
        return iter((self.step, self.images, self.scenes))


@dataclass
class Stage0TrainSpec(BatchSchedule):
    """The optimisation and run settings every stage-0 trainer has (each trainer's spec adds its own and may change
    these defaults). A batch counts scenes."""

    lr: float = cfg_field(1e-3, gt=0)
    warmup_steps: int = cfg_field(100, ge=0)
    min_lr_ratio: float = cfg_field(0.1, ge=0, le=1, help="cosine decays to lr × this")
    weight_decay: float = cfg_field(0.01, ge=0)
    grad_clip: float | None = cfg_field(1.0, gt=0, help="max global grad norm (null = no clipping)")
    threads: int = cfg_field(2, ge=1, help="torch intra-op threads")
    log_every: int = cfg_field(25, ge=1)
    checkpoint_every: int = cfg_field(250, ge=1)
    keep_last: int = cfg_field(2, ge=1)
    max_minutes: float | None = cfg_field(None, gt=0, help="checkpoint and stop training after this long (the asset "
                                                           "is still evaluated and written; --resume auto continues)")
    stop_signals: list[str] = cfg_field(default_factory=lambda: ["SIGTERM", "SIGUSR1"],
                                        help="checkpoint and stop training cleanly on these signals (the asset is "
                                             "still evaluated and written; --resume auto continues)")


def decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on vectors (norms, biases, scalars)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay, "name": "decay"},
            {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0, "name": "no_decay"}]


class Stage0Trainer(TrainTask):
    """One stage-0 run: ``prepare(module, groups)`` once the model exists, then ``train(resume)``."""

    name = "stage0"
    # False for a trainer whose loss couples the samples of a batch (a contrastive loss's negatives): the whole
    # batch must be one forward, so a smaller micro_batch_size is refused
    accumulates = True

    def __init__(self, cfg: Any, bf16: bool = False, device: str = "cpu") -> None:
        """``cfg``: the trainer's config, with ``seed``, ``work_dir`` and a ``train`` section (a Stage0TrainSpec).
        Seeds torch, so the model a subclass builds next starts from the same weights every run."""
        self.cfg, self.spec, self.seed = cfg, cfg.train, cfg.seed
        spec, work_dir = cfg.train, cfg.work_dir
        self.started = time.time()
        torch.set_num_threads(spec.threads)
        self.batch = plan_batches(spec.global_batch_size, spec.micro_batch_size, 1)
        if self.batch.grad_accum > 1 and not self.accumulates:
            raise ConfigError(f"train.micro_batch_size: {type(self).__name__}'s loss compares the samples of a batch "
                              f"with each other, so the whole global batch ({spec.global_batch_size}) must be one "
                              f"forward; leave micro_batch_size null")
        self.strategy = TorchStrategy("bf16" if bf16 else "fp32", self.batch.grad_accum, spec.grad_clip,
                                      self.batch.micro_batch_size, device=resolve_device(device, "train.device"))
        self.loop = RunLoop(self, self.strategy, LoopSettings(
            output_dir=Path(work_dir), total_steps=spec.max_steps, log_every=spec.log_every,
            checkpoint_every=spec.checkpoint_every, keep_last=spec.keep_last, max_minutes=spec.max_minutes,
            name=self.name, stop_signals=tuple(spec.stop_signals)))
        torch.manual_seed(self.seed)

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def state(self) -> RunState:
        return self.loop.state

    def scene_batches(self, state: RunState, image_size: int, num_workers: int,
                      scene_options: dict[str, Any] | None = None) -> Iterator[SceneBatch]:
        """Rendered training scenes for steps ``state.step`` .. ``spec.max_steps - 1`` (toy/recipe.py), each step's
        ``global_batch_size`` scenes in ``grad_accum`` micro-batches."""
        batches = SceneBatches(self.seed, state.step, self.spec.max_steps, self.batch.global_batch_size, image_size,
                               scene_options)
        micro, parts = self.batch.micro_batch_size, self.batch.grad_accum
        for step, images, scenes in scene_loader(batches, num_workers):
            for part in range(parts):
                cut = slice(part * micro, (part + 1) * micro)
                yield SceneBatch(step, images[cut], scenes[cut], part, parts)

    def prepare(self, module: nn.Module, groups: list[dict[str, Any]], **optim_kwargs: Any) -> None:
        """The module that learns (moved to the device), its optimizer groups, warmup + cosine schedule."""
        self.module = module
        self.strategy.prepare(module, groups, warmup_cosine(self.spec.warmup_steps, self.spec.max_steps,
                                                            self.spec.min_lr_ratio), optim_kwargs)

    def train(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Resume if asked, run the loop to ``spec.max_steps`` (or ``max_minutes``); the module is left in eval
        mode."""
        folder = self.loop.resolve(resume)
        if folder is not None:
            self.loop.resume(folder)
        self.set_train_mode()
        summary = self.loop.run()
        self.module.eval()
        return summary

    def set_train_mode(self) -> None:
        """Train mode for the loop (a part that stays frozen may keep eval mode)."""
        self.module.train()

    def run_metrics(self, summary: dict[str, Any]) -> dict[str, Any]:
        """What every stage-0 recipe reports about the run itself."""
        return {"steps_done": summary["steps"], "steps_planned": self.spec.max_steps,
                "stopped_early": summary["stopped_early"],
                "resumed_from_step": summary["this_run"]["from_step"] if self.loop.resumed_from else None,
                "train_minutes_this_run": round(summary["this_run"]["loop_seconds"] / 60, 2),
                "train_minutes_all_runs": round(sum(h["minutes"] for h in summary["run_history"]), 2),
                "loss_curve": loss_curve(summary["losses"], self.spec.log_every)}

    # ---- checkpoints: the module's weights (and the trainer's extra state) beside the loop's
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Further tensors a checkpoint needs (an EMA, a noise generator's state)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def save_main(self, tmp: Path) -> None:
        # cloned: tied weights (an LLM's embeddings and head) share storage, which safetensors refuses
        save_tensors(tmp, {k: v.detach().clone() for k, v in self.module.state_dict().items()})
        extra = self.extra_state()
        if extra:
            save_tensors(tmp, extra, weights_name="extra.safetensors")

    def load(self, folder: Path, rank: int) -> None:
        tensors, _ = load_tensors(folder)
        self.module.load_state_dict(tensors)
        if (folder / "extra.safetensors").is_file():
            self.load_extra_state(load_tensors(folder, weights_name="extra.safetensors")[0])

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        return {}

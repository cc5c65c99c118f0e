"""vlm/train.py — `vilex train-vlm --stage align|instruct|full`: one stage of LLaVA-style VLM training.

Reads top to bottom: setup (process group, seed, model from references / previous stage / resume checkpoint, stage ->
trainable components, data, micro-batch plan, strategy) -> loop (micro-step, non-finite guard, optimizer step, log,
checkpoint) -> summary. The same code runs one process (``torch`` strategy; ``torchrun`` makes it DDP) or many under
DeepSpeed ZeRO-2/3 (``deepspeed`` strategy, vilex/train/strategy.py), fp32 or bf16.

Weights a stage starts from: ``init_from: previous`` = the latest checkpoint of the previous stage in the same
``output_dir`` (align -> instruct -> full); they are loaded BEFORE ``deepspeed.initialize`` (and through
``GatheredParameters`` when parameters are already partitioned), so ZeRO-3 is safe. Under ZeRO-3 the model is built
inside ``strategy.construction_context()``: transformers' ``from_pretrained`` partitions the LLM and tower as they load
(``deepspeed.zero.Init``), so no rank materialises the whole LLM.

A checkpoint (``<output_dir>/<stage>/checkpoints/checkpoint-<step>/``) holds the FULL training state — trainer counters,
optimizer and scheduler (``optimizer.pt``, or DeepSpeed's ``deepspeed/`` folder with its ZeRO partitions), every RNG
and data counter per rank (``rank<r>.pt``) — AND the extracted components loadable on their own: ``projector/``
always, ``tower/`` / ``llm/`` when trained (or loaded from a previous stage), ``tokenizer/``, ``vlm_config.json``. It is
written by all ranks into one temp folder that rank 0 renames into place (atomic). Exact resume: the model is rebuilt
from the checkpoint's components, optimizer/RNG/counters are restored, and the data plan continues at the same
micro-batch (the plan is a pure function of seed and position, vlm/sampler.py): a SIGKILLed run resumed with
``--resume auto`` reproduces the uninterrupted run's losses bit for bit on CPU (tests/test_vlm_train.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vilex.checkpoint import CheckpointManager
from vilex.config import save_config, to_dict
from vilex.errors import ConfigError, UserError
from vilex.train import distributed as D
from vilex.train.common import NonFiniteLossError  # noqa: F401 (re-exported for callers)
from vilex.train.common import (NonFiniteGuard, check_same_run_shape, rng_state, save_distributed, seed_everything,
                                set_rng_state, sum_over_ranks)
from vilex.train.strategy import STRATEGIES, Strategy, warmup_cosine
from vlm.config import STAGE_ORDER, StageConfig, VLMConfig, template_for

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Counters that belong in every checkpoint (rank 0's view; data counters are per rank, see DataCounters)."""

    step: int = 0
    micro_steps: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step (mean over ranks and micro-batches)


@dataclass
class DataCounters:
    """What this rank's data did: samples used and skipped by reason, truncation, tokens real and padded."""

    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_samples: int = 0
    truncated_tokens: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    empty_batches: int = 0

    def add(self, batch: Any) -> None:
        self.samples += batch.num_samples
        self.skipped = dict(Counter(self.skipped) + Counter(batch.skipped))
        self.truncated_samples += batch.truncated_samples
        self.truncated_tokens += batch.truncated_tokens
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.empty_batches += int(batch.num_samples == 0)


def resolve_init_from(cfg: VLMConfig, stage: str, init_from: str | None) -> Path | None:
    """'previous' -> the previous stage's latest checkpoint (an error naming what to do when there is none)."""
    from vlm.model import resolve_checkpoint

    if not init_from:
        return None
    if init_from != "previous":
        return resolve_checkpoint(init_from)
    index = STAGE_ORDER.index(stage)
    if index == 0:
        raise ConfigError(f"{stage}.init_from: 'previous' but {stage} is the first stage")
    prev = STAGE_ORDER[index - 1]
    latest = CheckpointManager(cfg.stage_dir(prev) / "checkpoints", keep_last=None).latest()
    if latest is None:
        raise UserError(f"{stage}.init_from is 'previous' but stage '{prev}' has no checkpoint under "
                        f"{cfg.stage_dir(prev) / 'checkpoints'}; run --stage {prev} first, or set "
                        f"{stage}.init_from to a checkpoint folder or null")
    return latest


class VLMTrainer:
    """Owns the objects of one stage's run; ``run()`` is the loop."""

    def __init__(self, cfg: VLMConfig, stage: str, resume: str | None = None) -> None:
        self.cfg = cfg
        self.stage = stage
        self.sc: StageConfig = cfg.stage(stage)
        sc = self.sc
        if sc.data.json is None:
            raise ConfigError(f"{stage}.data.json is not set: give the LLaVA-format conversation file")
        _, world, _ = D.env_world()
        per_step = sc.micro_batch_size * world
        if sc.global_batch_size % per_step:
            raise ConfigError(f"{stage}.global_batch_size {sc.global_batch_size} is not a multiple of "
                              f"micro_batch_size x processes = {sc.micro_batch_size} x {world}")
        self.grad_accum = sc.global_batch_size // per_step
        extra = {"deepspeed_config": sc.deepspeed_config} if sc.strategy == "deepspeed" else {}
        self.strategy: Strategy = STRATEGIES.get(sc.strategy)(sc.precision, self.grad_accum, sc.grad_clip,
                                                              sc.micro_batch_size, **extra)
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        self.out = cfg.stage_dir(stage)
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep_last=sc.keep_last)
        self.resume_from = self.ckpts.resolve(resume)
        self.state = RunState()
        self.counters = DataCounters()
        self.writer = None

    # ---- setup
    def setup(self) -> None:
        from vlm.data import ConversationDataset, ImageSpec, read_llava_json
        from vlm.model import STAGE_TRAINS, VLM
        from vlm.sampler import MicroBatchPlan
        from vlm.templates import build_template

        sc = self.sc
        D.init_process_group_if_needed()
        seed_everything(sc.seed)  # identical projector init on every rank
        weights_from = self.resume_from or resolve_init_from(self.cfg, self.stage, sc.init_from)
        with self.strategy.construction_context():  # ZeRO-3: the LLM and tower are partitioned as they load
            self.model = VLM.build(self.cfg.model, weights_from=weights_from)
        self.partitioned_at_build = {name: sum(hasattr(p, "ds_id") for p in module.parameters())
                                     for name, module in self.model.components().items()}
        self.model.set_trainable(sc.trainable or STAGE_TRAINS[self.stage])
        self.keep_components = tuple(dict.fromkeys([*self.model.trained, *self.model.loaded_components]))

        tower, tok = self.model.tower, self.model.tokenizer
        template = build_template(template_for(self.stage, sc), tok, self.cfg.model.llm.image_token)
        self.dataset = ConversationDataset(
            read_llava_json(sc.data.json), tok, template,
            image_spec=ImageSpec(tower.image_size, tower.image_mean, tower.image_std, self.cfg.model.tower.image_fit),
            image_token=self.cfg.model.llm.image_token, image_token_id=self.model.image_token_id,
            num_image_tokens=self.model.num_image_tokens, max_length=sc.data.max_length,
            image_root=sc.data.image_root, on_too_long=sc.data.on_too_long, on_bad_image=sc.data.on_bad_image)
        self.plan = MicroBatchPlan([self.dataset.estimated_length(i) for i in range(len(self.dataset))],
                                   sc.global_batch_size, sc.micro_batch_size, self.world, sc.seed,
                                   sc.data.group_by_length)
        self.total_steps = sc.max_steps or self.plan.steps_per_epoch * sc.epochs
        if self.strategy.is_main:
            log.info("%s: %d samples, %d steps/epoch (%d samples of a partial last batch unused per epoch), "
                     "%d steps, global batch %d = %d micro x %d accum x %d processes", self.stage, len(self.dataset),
                     self.plan.steps_per_epoch, self.plan.dropped_per_epoch, self.total_steps, sc.global_batch_size,
                     sc.micro_batch_size, self.grad_accum, self.world)

        groups = self.model.parameter_groups(sc.lr, sc.tower_lr)
        warmup = round(sc.warmup_ratio * self.total_steps)
        optim_kwargs = {"betas": sc.betas, "eps": sc.eps, "weight_decay": sc.weight_decay}
        self.strategy.prepare(self.model, groups, warmup_cosine(warmup, self.total_steps, sc.min_lr_ratio),
                              optim_kwargs)
        if self.resume_from is not None:
            self.load(self.resume_from)
        self.loader = self._make_loader()
        if self.strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            self._open_loggers()

    def _make_loader(self):
        from vlm.packing import Collator
        from vlm.sampler import ResumableBatchSampler

        sc = self.sc
        row_length = sc.data.pack_length or sc.data.max_length
        collate = Collator(self.model.tokenizer.pad_token_id, sc.data.packing, row_length)
        sampler = ResumableBatchSampler(self.plan, self.rank, start=self.state.micro_steps)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=sc.data.num_workers,
                                           persistent_workers=sc.data.num_workers > 0)

    def _open_loggers(self) -> None:
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    # ---- one micro-batch
    def micro_step(self, batch) -> torch.Tensor:
        with self.strategy.autocast():
            out = self.strategy.forward(**batch.model_inputs(self.strategy.device))
        return out["loss"]

    # ---- checkpoints
    def _gathered(self):
        """Gather ZeRO-3 partitions of the components rank 0 writes (a no-op otherwise)."""
        if getattr(self.strategy, "zero_stage", 0) != 3:
            return contextlib.nullcontext()
        import deepspeed

        mods = {"projector": self.model.projectors, "tower": self.model.tower, "llm": self.model.llm}
        params = [p for name in self.keep_components for p in mods[name].parameters()]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save(self) -> Path:
        """All ranks write into one temp folder; rank 0 publishes it atomically (vilex.train.common)."""

        def every_rank(tmp: Path) -> None:
            torch.save({"rng": rng_state(), "counters": self.counters.__dict__}, tmp / f"rank{self.rank}.pt")
            if self.strategy.name == "deepspeed":
                self.strategy.save(tmp)

        def main_only(tmp: Path) -> None:
            if self.strategy.name == "torch":
                self.strategy.save(tmp)
            self.model.save_components(tmp, self.keep_components, stage=self.stage)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {**self.state.__dict__, "world_size": self.world, "strategy": self.strategy.name,
                 "stage": self.stage}, indent=1))

        return save_distributed(self.ckpts, self.state.step, self.strategy.is_main, every_rank, main_only,
                                self._gathered)

    def load(self, folder: Path) -> None:
        """Restore optimizer/scheduler, counters, RNG (the weights were built from the folder's components)."""
        st = json.loads((folder / "trainer_state.json").read_text())
        check_same_run_shape(folder, st, {"world_size": self.world, "strategy": self.strategy.name,
                                          "stage": self.stage})
        self.state = RunState(**{k: v for k, v in st.items() if k in RunState.__dataclass_fields__})
        self.strategy.load(folder)
        own = torch.load(folder / f"rank{self.rank}.pt", map_location="cpu", weights_only=False)
        self.counters = DataCounters(**own["counters"])
        set_rng_state(own["rng"])
        log.info("resumed from %s at step %d", folder, self.state.step)

    # ---- the loop
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        sc = self.sc
        self.guard = NonFiniteGuard(self.state, sc.max_consecutive_nonfinite, self.ckpts.latest)
        it = iter(self.loader)
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.strategy.is_main,
                   desc=f"train-vlm {self.stage}", dynamic_ncols=True)
        t_last, tokens_last = time.perf_counter(), self.counters.real_tokens
        window: list[float] = []
        while self.state.step < self.total_steps:
            batch = next(it)
            self.counters.add(batch)
            loss = self.micro_step(batch)
            finite = bool(self._sum([float(torch.isfinite(loss.detach()).all())])[0] == self.world)
            if finite:
                self.strategy.backward(loss)
            self.state.micro_steps += 1
            if not finite:
                self.guard.bad()
                continue
            self.guard.ok()
            result = self.strategy.step()
            window.append(float(loss.detach()))
            if not result.stepped:
                continue
            self.state.step += 1
            step_loss = float(self._sum([sum(window) / len(window)])[0]) / self.world
            window = []
            self.state.losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if self.state.step % sc.log_every == 0 or self.state.step == self.total_steps:
                dt = time.perf_counter() - t_last
                self._log(step_loss, result.grad_norm, (self.counters.real_tokens - tokens_last) * self.world / dt)
                t_last, tokens_last = time.perf_counter(), self.counters.real_tokens
            if self.state.step % sc.checkpoint_every == 0 or self.state.step == self.total_steps:
                self.save()
        bar.close()
        return self.summary()

    def _sum(self, values: list[float]) -> list[float]:
        return sum_over_ranks(values, self.strategy.device)

    def _log(self, loss: float, grad_norm: float | None, tokens_per_s: float) -> None:
        if not self.strategy.is_main:
            return
        metrics = {"train/loss": loss, "train/tokens_per_s": tokens_per_s,
                   "train/padding_fraction": 1 - self.counters.real_tokens / max(1, self.counters.padded_tokens)}
        for g, lr in zip(self.strategy.optimizer.param_groups, self.strategy.lrs()):
            metrics[f"train/lr_{g.get('name', 'group')}"] = lr
        if grad_norm is not None and math.isfinite(grad_norm):
            metrics["train/grad_norm"] = grad_norm
        log.info("step %d  " + "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()), self.state.step)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, self.state.step)
            self.writer.flush()

    def summary(self) -> dict[str, Any]:
        """Run totals over all ranks (also written to <output_dir>/<stage>/summary.json)."""
        c = self.counters
        keys = ("samples", "truncated_samples", "truncated_tokens", "real_tokens", "padded_tokens", "empty_batches")
        totals = self._sum([float(getattr(c, k)) for k in keys])
        reasons = _all_skip_reasons(c.skipped)
        skipped = self._sum([float(c.skipped.get(r, 0)) for r in reasons])
        data = {k: int(v) for k, v in zip(keys, totals)}
        s = {"stage": self.stage, "steps": self.state.step, "final_loss": self.state.losses[-1] if self.state.losses
             else None, "losses": self.state.losses, "nonfinite_skipped": self.state.nonfinite_total,
             "data": {**data, "skipped": {r: int(n) for r, n in zip(reasons, skipped)},
                      "padding_fraction": 1 - data["real_tokens"] / max(1, data["padded_tokens"])},
             "checkpoint": str(self.ckpts.latest()) if self.ckpts.latest() else None,
             "params_partitioned_at_build": self.partitioned_at_build}
        if self.strategy.is_main:
            (self.out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
            if self.writer is not None:
                self.writer.close()
        return s


def _all_skip_reasons(skipped: dict[str, int]) -> list[str]:
    """The union of every rank's skip reasons, sorted (so all ranks reduce the same vector)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return sorted(skipped)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, sorted(skipped))
    return sorted(set().union(*out))


def train_vlm(cfg: VLMConfig, stage: str, resume: str | None = None) -> dict[str, Any]:
    """Run one stage; returns the summary (also written to <output_dir>/<stage>/summary.json)."""
    trainer = VLMTrainer(cfg, stage, resume)
    trainer.setup()
    if trainer.strategy.is_main:
        log.info("config: %s", json.dumps(to_dict(cfg.stage(stage)), default=str))
    return trainer.run()

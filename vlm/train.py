"""vlm/train.py — `vilex train-vlm --stage align|instruct|full`: one stage of LLaVA-style VLM training.

``VLMTrainer`` is the stage-2 ``TrainTask`` of the shared run loop (vilex/train/run_loop.py: resume, the step with
its non-finite guard, logging, checkpoint cadence, ``max_minutes``, summary). Here: setup (process group, seed, model
from references / previous stage / resume checkpoint, stage -> trainable components, data, micro-batch plan,
strategy), the loss of one micro-batch, the data counters and what a checkpoint holds. The same code runs one process
(``torch`` strategy; ``torchrun`` makes it DDP) or many under DeepSpeed ZeRO-2/3 (``deepspeed`` strategy,
vilex/train/strategy.py), fp32 or bf16. A resume checks that the frozen inputs the run references (the tower and
LLM folders) still hold the weights it started from (content fingerprints in ``trainer_state.json``).

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from vilex.checkpoint import CheckpointManager, folder_fingerprint
from vilex.config import save_config, to_dict
from vilex.errors import ConfigError, UserError
from vilex.train import distributed as D
from vilex.train.common import NonFiniteLossError  # noqa: F401 (re-exported for callers)
from vilex.train.common import rng_state, seed_everything, set_rng_state, sum_over_ranks
from vilex.train.batching import plan_batches
from vilex.train.run_loop import LoopSettings, RunLoop, RunState, TrainTask
from vilex.train.strategy import STRATEGIES, Strategy, warmup_cosine
from vlm.config import STAGE_ORDER, StageConfig, VLMConfig, template_for

log = logging.getLogger(__name__)


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

    def seen_and_skipped(self) -> list[float]:
        """[samples used, skipped for each of ``SKIP_REASONS`` in its fixed order]: a vector every rank can sum
        (the same length and order everywhere, whatever reasons this rank met)."""
        from vilex.data.decode import SKIP_REASONS

        return [float(self.samples)] + [float(self.skipped.get(r, 0)) for r in SKIP_REASONS]


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


class VLMTrainer(TrainTask):
    """Owns the objects of one stage's run; ``run()`` runs them through the shared loop."""

    def __init__(self, cfg: VLMConfig, stage: str, resume: str | None = None) -> None:
        self.cfg = cfg
        self.stage = stage
        self.sc: StageConfig = cfg.stage(stage)
        sc = self.sc
        if sc.data.json is None:
            raise ConfigError(f"{stage}.data.json is not set: give the LLaVA-format conversation file")
        self.batch = plan_batches(sc.global_batch_size, sc.micro_batch_size, D.env_world()[1], where=stage)
        self.grad_accum = self.batch.grad_accum
        extra = {"deepspeed_config": sc.deepspeed_config} if sc.strategy == "deepspeed" else {}
        self.strategy: Strategy = STRATEGIES.get(sc.strategy)(sc.precision, self.grad_accum, sc.grad_clip,
                                                              self.batch.micro_batch_size, **extra)
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        self.out = cfg.stage_dir(stage)
        self.loop = RunLoop(self, self.strategy, LoopSettings(
            output_dir=self.out, total_steps=0, log_every=sc.log_every, checkpoint_every=sc.checkpoint_every,
            keep_last=sc.keep_last, max_consecutive_nonfinite=sc.max_consecutive_nonfinite,
            max_minutes=sc.max_minutes, name=f"train-vlm {stage}", tensorboard=cfg.log.tensorboard,
            stop_signals=tuple(sc.stop_signals),
            wandb_project=cfg.log.wandb_project, wandb_config=to_dict(cfg)))
        self.resume_arg = resume
        self._pin_tower_reference()
        # the frozen inputs a stage reads by reference: other weights under the same path = another experiment
        self.input_weights = {"tower_weights": folder_fingerprint(cfg.model.tower.name_or_path),
                              "llm_weights": folder_fingerprint(cfg.model.llm.name_or_path)}
        self.counters = DataCounters()

    def _pin_tower_reference(self) -> None:
        """Record the tower checkpoint this stage reads (a stage-1 run folder becomes its latest checkpoint now)."""
        from vlm.towers import VLM_TOWERS

        tower = self.cfg.model.tower
        pinned = VLM_TOWERS.get(tower.type).pinned_reference(tower.name_or_path)
        if pinned != tower.name_or_path:
            log.info("tower %s: using %s", tower.name_or_path, pinned)
            tower.name_or_path = pinned

    @property
    def ckpts(self) -> CheckpointManager:
        return self.loop.ckpts

    @property
    def state(self) -> RunState:
        return self.loop.state

    # ---- setup
    def setup(self) -> None:
        from vlm.data import ConversationDataset, ImageSpec, read_llava_json
        from vlm.model import STAGE_TRAINS, VLM
        from vlm.sampler import MicroBatchPlan
        from vlm.templates import build_template

        sc = self.sc
        D.init_process_group_if_needed()
        self.resume_from = self.loop.resolve(self.resume_arg)  # takes the run folder's lock first
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
                                   sc.global_batch_size, self.batch.micro_batch_size, self.world, sc.seed,
                                   sc.data.group_by_length)
        self.total_steps = sc.max_steps or self.plan.steps_per_epoch * sc.epochs
        self.loop.settings.total_steps = self.total_steps
        if self.strategy.is_main:
            log.info("%s: %d samples, %d steps/epoch (%d samples of a partial last batch unused per epoch), "
                     "%d steps, global batch %d = %d micro x %d accum x %d processes", self.stage, len(self.dataset),
                     self.plan.steps_per_epoch, self.plan.dropped_per_epoch, self.total_steps, sc.global_batch_size,
                     self.batch.micro_batch_size, self.grad_accum, self.world)

        groups = self.model.parameter_groups(sc.lr, sc.tower_lr)
        warmup = round(sc.warmup_ratio * self.total_steps)
        optim_kwargs = {"betas": sc.betas, "eps": sc.eps, "weight_decay": sc.weight_decay}
        self.strategy.prepare(self.model, groups, warmup_cosine(warmup, self.total_steps, sc.min_lr_ratio),
                              optim_kwargs)
        if self.resume_from is not None:
            self.loop.resume(self.resume_from)
        if self.strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")

    def batches(self, state: RunState) -> Iterator[Any]:
        from vlm.packing import Collator
        from vlm.sampler import ResumableBatchSampler

        sc = self.sc
        row_length = sc.data.pack_length or sc.data.max_length
        collate = Collator(self.model.tokenizer.pad_token_id, sc.data.packing, row_length)
        sampler = ResumableBatchSampler(self.plan, self.rank, start=state.micro_steps)
        self._tokens_logged = self.counters.real_tokens  # tokens/s counts this run's tokens only
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                                num_workers=sc.data.num_workers,
                                                persistent_workers=sc.data.num_workers > 0))

    # ---- one micro-batch
    def micro_step(self, batch) -> torch.Tensor:
        with self.strategy.autocast():
            out = self.strategy.forward(**batch.model_inputs(self.strategy.device))
        return out["loss"]

    def on_micro_batch(self, batch: Any, finite: bool) -> None:
        self.counters.add(batch)

    def on_optimizer_step(self, state: RunState) -> None:
        self.check_bad_images(state)

    _bad_images_logged = 0  # the skip total last written to the log

    def check_bad_images(self, state: RunState) -> None:
        """Log the bad-image skips, and stop the run (UserError) once more than ``data.max_bad_fraction`` of the
        samples seen had a bad image.

        It runs after every optimizer step on the counters SUMMED OVER RANKS (one all-reduce of a few floats, like the
        loop's own per-step reductions), so every rank sees the same totals and stops at the same step. It judges only
        once ``10 / max_bad_fraction`` samples were seen: by then ~10 bad samples are expected at the threshold rate,
        so a few broken files early in the data (the noise of a small count) cannot stop a run whose overall rate is
        fine, while a data set that is broken throughout stops within a small part of an epoch (10,000 samples at the
        default 0.1 %)."""
        from vilex.data.decode import SKIP_REASONS

        data = self.sc.data
        if data.on_bad_image != "skip":
            return
        totals = self._sum(self.counters.seen_and_skipped())
        bad_by_reason = {r: int(n) for r, n in zip(SKIP_REASONS, totals[1:]) if n}
        bad = sum(bad_by_reason.values())
        seen = int(totals[0]) + bad
        if not bad:
            return
        limit = data.max_bad_fraction
        counts = (f"{bad} of {seen} samples seen ({100 * bad / seen:.3g} %) had a bad image and were skipped "
                  f"({', '.join(f'{r} {n}' for r, n in bad_by_reason.items())})")
        over = bad > limit * seen
        if over and (limit == 0 or seen * limit >= 10):
            raise UserError(f"{self.stage}: {counts}, more than {self.stage}.data.max_bad_fraction = {limit:g} "
                            f"({100 * limit:g} %) at step {state.step}; fix or remove them (the log names the first "
                            f"ones), or raise {self.stage}.data.max_bad_fraction")
        last = state.step == self.total_steps
        if self.strategy.is_main and bad > self._bad_images_logged and (state.step % self.sc.log_every == 0 or last):
            self._bad_images_logged = bad
            log.warning("%s step %d: %s%s", self.stage, state.step, counts,
                        f"; above max_bad_fraction {limit:g}, but too few samples seen to judge"
                        f" ({seen} < {10 / limit:.0f})" if over else "")

    # ---- checkpoints
    def identity(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.input_weights}

    def gathered(self):
        """Gather ZeRO-3 partitions of the components rank 0 writes (a no-op otherwise)."""
        if getattr(self.strategy, "zero_stage", 0) != 3:
            return contextlib.nullcontext()
        import deepspeed

        mods = {"projector": self.model.projectors, "tower": self.model.tower, "llm": self.model.llm}
        params = [p for name in self.keep_components for p in mods[name].parameters()]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save_every_rank(self, tmp: Path, rank: int) -> None:
        torch.save({"rng": rng_state(), "counters": self.counters.__dict__}, tmp / f"rank{rank}.pt")

    def save_main(self, tmp: Path) -> None:
        self.model.save_components(tmp, self.keep_components, stage=self.stage)

    def load(self, folder: Path, rank: int) -> None:
        """Counters and RNG (the weights were built from the folder's components, the optimizer by the loop)."""
        own = torch.load(folder / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        self.counters = DataCounters(**own["counters"])
        set_rng_state(own["rng"])

    # ---- the loop
    def run(self) -> dict[str, Any]:
        return self.loop.run()

    def _sum(self, values: list[float]) -> list[float]:
        return sum_over_ranks(values, self.strategy.device)

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        c = self.counters
        tokens = c.real_tokens - self._tokens_logged
        self._tokens_logged = c.real_tokens
        return {"train/tokens_per_s": tokens * self.world / max(window_seconds, 1e-9),
                "train/padding_fraction": 1 - c.real_tokens / max(1, c.padded_tokens)}

    def summary(self, state: RunState) -> dict[str, Any]:
        """Data totals over all ranks (every rank calls this: it reduces)."""
        c = self.counters
        keys = ("samples", "truncated_samples", "truncated_tokens", "real_tokens", "padded_tokens", "empty_batches")
        totals = self._sum([float(getattr(c, k)) for k in keys])
        reasons = _all_skip_reasons(c.skipped)
        skipped = self._sum([float(c.skipped.get(r, 0)) for r in reasons])
        data = {k: int(v) for k, v in zip(keys, totals)}
        return {"stage": self.stage,
                "data": {**data, "skipped": {r: int(n) for r, n in zip(reasons, skipped)},
                         "padding_fraction": 1 - data["real_tokens"] / max(1, data["padded_tokens"])},
                "params_partitioned_at_build": self.partitioned_at_build}


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

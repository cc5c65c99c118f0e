"""loop.py — `vilex pretrain`: train the ViLex encoder against a frozen text-to-image decoder.

Reads top to bottom: setup -> data -> model -> optimizer/strategy -> resume -> loop (step, log, validate,
checkpoint) -> summary. The same code runs 1 process (``vilex pretrain``), many processes
(``torchrun``/``deepspeed`` via ``scripts/launch_pretrain.sh``), fp32 or bf16, torch or DeepSpeed ZeRO.

Exact resume: a checkpoint holds model, optimizer, scheduler, EMA, step, every RNG (python, numpy, torch,
the loss generator) per rank and each rank's data-loader position; checkpoints are written only at
optimizer-step boundaries, atomically. On CPU a killed-and-resumed run reproduces the uninterrupted run's
losses bit for bit (tests/test_pretrain_resume.py).

Non-finite loss: the micro-batch is skipped (no backward, no step) on every rank and counted; after
``train.max_consecutive_nonfinite`` in a row the run stops with a clear message, and the last good checkpoint
stays the latest one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vilex.checkpoint import CheckpointManager, folder_fingerprint
from vilex.config import save_config, to_dict
from vilex.errors import UserError
from vilex.train import distributed as D
from vilex.train.config import PretrainConfig
from vilex.train.common import NonFiniteLossError  # noqa: F401 (re-exported for callers)
from vilex.train.common import (NonFiniteGuard, attention_kernels, check_same_run_shape, rng_state, save_distributed,
                                seed_everything, set_rng_state, sum_over_ranks)
from vilex.train.ema import EMA
from vilex.train.strategy import STRATEGIES, Strategy, warmup_cosine
from vilex.train.throughput import measure_matmul_peak, peak_memory_bytes

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Counters that belong in every checkpoint."""

    step: int = 0
    micro_steps: int = 0
    images_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step (rank-mean), for tests/plots


# ----------------------------------------------------------------------------- the trainer
class Pretrainer:
    """Owns the objects of one run; ``run()`` is the loop."""

    def __init__(self, cfg: PretrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        self.resume_arg = resume
        tc = cfg.train
        self.strategy: Strategy = STRATEGIES.get(tc.strategy)(
            tc.precision, tc.grad_accum, tc.optim.grad_clip, tc.micro_batch_size,
            **({"deepspeed_config": tc.deepspeed_config} if tc.strategy == "deepspeed" else {}))
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        self.out = Path(tc.output_dir)
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep_last=tc.keep_last)
        # what the encoder is trained against: a resume against other decoder weights under the same path (a
        # retrained asset) would silently continue a different experiment
        self.decoder_weights = folder_fingerprint(cfg.model.decoder.name_or_path)
        self.state = RunState()
        self.writer = None
        self.wandb = None
        self.flops_per_step: int | None = None
        self.peak_flops: float | None = tc.peak_tflops * 1e12 if tc.peak_tflops else None

    # ---- setup
    def setup(self) -> None:
        from vilex.models.vilex_model import ViLexModel
        from vilex.train.data import model_views, training_loader
        from vilex.train.latent_cache import LatentCache

        cfg, tc = self.cfg, self.cfg.train
        D.init_process_group_if_needed()
        seed_everything(tc.seed)  # identical model init on every rank
        self.model = ViLexModel.from_config(cfg.model)
        self.decoder = self.model.decoder
        self.encoder = self.model.encoder
        self.generator = torch.Generator().manual_seed(tc.seed * 1000 + self.rank)

        views = model_views(self.model, cfg.data.train)
        self.loader = training_loader(self.model, cfg.data.train, tc.micro_batch_size, tc.seed, self.rank, self.world,
                                      views=views)
        self.cache = None
        if self.decoder.vae is not None and cfg.latent_cache.enabled:
            self.cache = LatentCache.open_or_build(cfg.latent_cache, self.decoder, cfg.data.train,
                                                   views["decoder"], rank=self.rank, world_size=self.world)

        groups = self.model.trainable_parameter_groups()
        lrs = {"vit": tc.optim.lr_vit, "pooler": tc.optim.lr_pooler}
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items()
                        if ps and lrs[name] > 0]
        if tc.optim.lr_vit == 0:
            for p in groups["vit"]:
                p.requires_grad_(False)
        optim_kwargs = {"betas": tc.optim.betas, "eps": tc.optim.eps, "weight_decay": tc.optim.weight_decay}
        self.strategy.prepare(self.encoder, param_groups,
                              warmup_cosine(tc.optim.warmup_steps, tc.max_steps, tc.optim.min_lr_ratio), optim_kwargs)
        self.decoder.to(self.strategy.device)
        self.ema = EMA(self.encoder, tc.ema_decay) if tc.ema_decay else None
        if self.ema and getattr(self.strategy, "zero_stage", 0) == 3:
            raise UserError("train.ema_decay is not supported with ZeRO-3 (parameters are partitioned); use ZeRO-2")

        resume_from = self.ckpts.resolve(self.resume_arg)
        if resume_from is not None:
            self.load(resume_from)
        if self.strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
            self._open_loggers()
        self.count_flops()

    def _open_loggers(self) -> None:
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if self.cfg.log.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("log.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=self.cfg.log.wandb_project, config=to_dict(self.cfg),
                                    dir=str(self.out), resume="allow")

    # ---- one micro-batch
    def _x0(self, batch: dict) -> torch.Tensor:
        """The decoder-space target: a sample from the cached VAE posterior, or encoded now."""
        if self.cache is not None:
            return self.cache.sample(batch.keys, self.decoder, self.generator)
        with torch.no_grad():
            return self.decoder.to_model_space(batch.images["decoder"].to(self.strategy.device), self.generator)

    def micro_step(self, batch: dict) -> torch.Tensor:
        x0 = self._x0(batch)
        with self.strategy.autocast(), attention_kernels(self.cfg.train.attention_backend):
            tokens = self.strategy.forward(batch.images["encoder"].to(self.strategy.device))
            out = self.model.loss_from_tokens(tokens.float(), x0, generator=self.generator)
        return out["loss"]

    # ---- checkpoints
    def save(self) -> Path:
        """All ranks write into one temp folder; rank 0 publishes it atomically (vilex.train.common)."""

        def every_rank(tmp: Path) -> None:
            torch.save({"rng": rng_state(self.generator), "loader": self.loader.state_dict()}, tmp / f"rank{self.rank}.pt")
            if self.strategy.name == "deepspeed":
                self.strategy.save(tmp)

        def main_only(tmp: Path) -> None:
            if self.strategy.name == "torch":
                self.strategy.save(tmp)
                torch.save({k: v.detach().clone() for k, v in self.encoder.state_dict().items()}, tmp / "encoder.pt")
            if self.ema:
                torch.save(self.ema.state_dict(), tmp / "ema.pt")
            self.model.save_pretrained(tmp / "pipeline")  # loadable on its own (ViLexPipeline.from_pretrained)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {**self.state.__dict__, "world_size": self.world, "strategy": self.strategy.name,
                 "frozen_decoder_weights": self.decoder_weights}, indent=1))

        return save_distributed(self.ckpts, self.state.step, self.strategy.is_main, every_rank, main_only,
                                self._full_weights)

    def load(self, folder: Path) -> None:
        st = json.loads((folder / "trainer_state.json").read_text())
        expected = {"world_size": self.world, "strategy": self.strategy.name}
        if st.get("frozen_decoder_weights") and self.decoder_weights:  # older checkpoints and hub ids: unchecked
            expected["frozen_decoder_weights"] = self.decoder_weights
        check_same_run_shape(folder, st, expected)
        self.state = RunState(**{k: v for k, v in st.items() if k in RunState.__dataclass_fields__})
        if self.strategy.name == "torch":
            self.encoder.load_state_dict(torch.load(folder / "encoder.pt", map_location="cpu", weights_only=True))
        self.strategy.load(folder)
        if self.ema:
            self.ema.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu", weights_only=False))
        own = torch.load(folder / f"rank{self.rank}.pt", map_location="cpu", weights_only=False)
        set_rng_state(own["rng"], self.generator)
        self.loader.load_state_dict(own["loader"])
        log.info("resumed from %s at step %d", folder, self.state.step)

    def _full_weights(self):
        """Gather ZeRO-3 partitions so rank 0 can export full weights (a no-op otherwise)."""
        if getattr(self.strategy, "zero_stage", 0) == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.encoder.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    # ---- validation
    def validate(self) -> Path | None:
        from vilex.train.validation import reconstruct_grid

        with self._full_weights():
            if not self.strategy.is_main:
                return None
            ctx = self.ema.swap_in(self.encoder) if self.ema else contextlib.nullcontext()
            with ctx:
                path, grid = reconstruct_grid(self.model, self.cfg, self.out / "val", self.state.step)
        if self.writer is not None:
            self.writer.add_image("val/reconstructions", grid, self.state.step)
        return path

    # ---- the loop
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        self._run_started, self._run_from_step = time.perf_counter(), self.state.step
        self.guard = NonFiniteGuard(self.state, tc.max_consecutive_nonfinite, self.ckpts.latest)
        it = iter(self.loader)
        bar = tqdm(total=tc.max_steps, initial=self.state.step, disable=not self.strategy.is_main,
                   desc="pretrain", dynamic_ncols=True)
        t_last, imgs_last = time.perf_counter(), self.state.images_seen
        window_losses: list[float] = []
        while self.state.step < tc.max_steps:
            try:
                batch = next(it)
            except StopIteration:  # next epoch (the loader reshuffles deterministically)
                it = iter(self.loader)
                batch = next(it)
            loss = self.micro_step(batch)
            finite = sum_over_ranks([float(torch.isfinite(loss.detach()).all())], self.strategy.device)[0] == self.world
            if finite:
                self.strategy.backward(loss)
            self.state.micro_steps += 1
            if not finite:
                self.guard.bad()
                continue
            self.guard.ok()
            result = self.strategy.step()
            window_losses.append(float(loss.detach()))
            self.state.images_seen += tc.micro_batch_size * self.world
            if not result.stepped:
                continue
            self.state.step += 1
            step_loss = sum_over_ranks([sum(window_losses) / len(window_losses)], self.strategy.device)[0] / self.world
            window_losses = []
            self.state.losses.append(step_loss)
            if self.ema:
                self.ema.update(self.encoder)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if self.state.step % tc.log_every == 0 or self.state.step == tc.max_steps:
                dt = time.perf_counter() - t_last
                self._log_metrics(step_loss, result.grad_norm, (self.state.images_seen - imgs_last) / max(dt, 1e-9), dt)
                t_last, imgs_last = time.perf_counter(), self.state.images_seen
            if self.state.step % self.cfg.val.every == 0:
                self.validate()
            if self.state.step % tc.checkpoint_every == 0 or self.state.step == tc.max_steps:
                self.save()
        bar.close()
        return self.summary()

    def count_flops(self) -> None:
        """Model FLOPs of one optimizer step, counted once on zero inputs of the training shapes (for MFU).

        Forward FLOPs of the encoder (F_enc) and of the frozen text encoder + UNet (F_dec) are counted by
        torch's FlopCounterMode in a forward-only pass with a forked RNG, so training numerics and RNG streams
        are untouched (counting inside a real step would change kernels and break bitwise resume). A step
        costs ~3·F_enc (forward, input grads, weight grads) + 2·F_dec (forward, input grads only: frozen),
        times gradient accumulation; recomputation by activation checkpointing is not counted (MFU, not HFU).
        """
        from torch.utils.flop_counter import FlopCounterMode

        tc = self.cfg.train
        tower = self.encoder.vit
        pixels = torch.zeros(tc.micro_batch_size, 3, tower.image_size, tower.image_size, device=self.strategy.device)
        x0 = torch.zeros(tc.micro_batch_size, *self.decoder.model_space_shape, device=self.strategy.device)
        try:
            # (not under no_grad: FlopCounterMode's module tracker needs autograd; nothing is backpropagated)
            with torch.random.fork_rng(devices=[]):
                enc, dec = FlopCounterMode(display=False), FlopCounterMode(display=False)
                with enc, self.strategy.autocast():
                    tokens = self.strategy.forward(pixels)
                with dec, self.strategy.autocast():
                    self.model.loss_from_tokens(tokens.float(), x0, generator=torch.Generator().manual_seed(0))
            self.flops_per_step = (3 * enc.get_total_flops() + 2 * dec.get_total_flops()) * tc.grad_accum
        except Exception as e:  # diagnostics only: never stop training for it
            log.warning("FLOP counting failed (%s); MFU will not be logged", e)
            self.flops_per_step = 0
        if self.flops_per_step and self.peak_flops is None:
            self.peak_flops = measure_matmul_peak(self.strategy.device)
        if self.strategy.is_main and self.flops_per_step:
            log.info("%.3g model FLOPs per optimizer step; matmul peak %.3g FLOP/s", self.flops_per_step,
                     self.peak_flops)

    def _log_metrics(self, loss: float, grad_norm: float | None, images_per_s: float, dt: float) -> None:
        if not self.strategy.is_main:
            return
        steps = self.cfg.train.log_every
        metrics = {"train/loss": loss, "train/images_per_s": images_per_s,
                   "train/peak_memory_gb": peak_memory_bytes(self.strategy.device) / 2**30,
                   "train/nonfinite_total": self.state.nonfinite_total}
        for g, lr in zip(self.strategy.optimizer.param_groups, self.strategy.lrs()):
            metrics[f"train/lr_{g.get('name', 'group')}"] = lr
        if grad_norm is not None and math.isfinite(grad_norm):
            metrics["train/grad_norm"] = grad_norm
        if self.flops_per_step and self.peak_flops:
            metrics["train/mfu"] = self.flops_per_step / (dt / steps) / self.peak_flops  # per process
        log.info("step %d  " + "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()), self.state.step)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, self.state.step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=self.state.step)

    def summary(self) -> dict[str, Any]:
        s = {"steps": self.state.step, "images_seen": self.state.images_seen,
             "final_loss": self.state.losses[-1] if self.state.losses else None,
             "nonfinite_skipped": self.state.nonfinite_total,
             "losses": self.state.losses,
             "data_skipped": self.loader.summary() if hasattr(self.loader, "summary") else {},
             "checkpoint": str(self.ckpts.latest()) if self.ckpts.latest() else None}
        if hasattr(self, "_run_started"):  # this invocation (a resumed run counts from its resume step)
            s["this_run"] = {"from_step": self._run_from_step,
                             "loop_seconds": round(time.perf_counter() - self._run_started, 1)}
        if self.strategy.is_main:
            (self.out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
            if self.writer is not None:
                self.writer.close()
        return s


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run stage-1 pretraining; returns the run summary (also written to <output_dir>/summary.json)."""
    trainer = Pretrainer(cfg, resume)
    trainer.setup()
    return trainer.run()

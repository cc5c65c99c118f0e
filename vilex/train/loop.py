"""loop.py — `vilex pretrain`: train the ViLex encoder against a frozen text-to-image decoder.

``Pretrainer`` is the stage-1 ``TrainTask`` of the shared run loop (vilex/train/run_loop.py: resume, the step with
its non-finite guard, logging, checkpoint cadence, ``max_minutes``, summary). Here: setup (data -> model ->
trainable modules -> optimizer/strategy -> resume), the loss of one micro-batch, what a checkpoint holds beyond the
loop's state, validation grids and MFU. The same code runs 1 process (``vilex pretrain``), many processes
(``torchrun``/``deepspeed`` via ``scripts/launch_pretrain.sh``), fp32 or bf16, torch or DeepSpeed ZeRO.

A checkpoint holds the encoder (or DeepSpeed's state), optimizer, scheduler, EMA, step, every RNG (python, numpy,
torch, the loss generator) per rank and each rank's data-loader position, plus ``pipeline/``: the ViLex checkpoint,
loadable on its own, holding the EMA weights when there is an EMA (``train.pipeline_weights: raw`` for the trained
ones; ``pipeline/training.json`` says which);
a resume against other frozen-decoder weights under the same path is refused (its content fingerprint is part of
the run's identity).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vilex.checkpoint import folder_fingerprint, write_manifest
from vilex.config import save_config, to_dict
from vilex.errors import UserError
from vilex.train import distributed as D
from vilex.train.common import NonFiniteLossError  # noqa: F401 (re-exported for callers)
from vilex.train.common import attention_kernels, rng_state, seed_everything, set_rng_state
from vilex.train.config import PretrainConfig
from vilex.train.ema import EMA
from vilex.train.batching import plan_batches
from vilex.train.run_loop import LoopSettings, RunLoop, RunState, TrainTask
from vilex.train.strategy import STRATEGIES, Strategy, warmup_cosine
from vilex.train.throughput import measure_matmul_peak, peak_memory_bytes

log = logging.getLogger(__name__)

# beside the ViLex checkpoint in each checkpoint's pipeline/: the step and which encoder weights it holds
PIPELINE_PROVENANCE = "training.json"


@dataclass
class PretrainState(RunState):
    """The loop's counters plus the images seen (all ranks)."""

    images_seen: int = 0


class Pretrainer(TrainTask):
    """Owns the objects of one stage-1 run; ``run()`` runs them through the shared loop."""

    state_class = PretrainState

    def __init__(self, cfg: PretrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        self.resume_arg = resume
        tc = cfg.train
        self.batch = plan_batches(tc.global_batch_size, tc.micro_batch_size, D.env_world()[1])
        extra = {"deepspeed_config": tc.deepspeed_config} if tc.strategy == "deepspeed" else {}
        self.strategy: Strategy = STRATEGIES.get(tc.strategy)(tc.precision, self.batch.grad_accum,
                                                              tc.optim.grad_clip, self.batch.micro_batch_size, **extra)
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        self.out = Path(tc.output_dir)
        self.loop = RunLoop(self, self.strategy, LoopSettings(
            output_dir=self.out, total_steps=tc.max_steps, log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every, keep_last=tc.keep_last,
            max_consecutive_nonfinite=tc.max_consecutive_nonfinite, max_minutes=tc.max_minutes, name="pretrain",
            stop_signals=tuple(tc.stop_signals),
            tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project, wandb_config=to_dict(cfg)))
        # what the encoder is trained against: a resume against other decoder weights under the same path (a
        # retrained asset) would silently continue a different experiment
        self.decoder_weights = folder_fingerprint(cfg.model.decoder.name_or_path)
        self.flops_per_step: int | None = None
        self.peak_flops: float | None = tc.peak_tflops * 1e12 if tc.peak_tflops else None

    @property
    def ckpts(self):
        return self.loop.ckpts

    @property
    def state(self) -> PretrainState:
        return self.loop.state

    # ---- setup
    def setup(self) -> None:
        from vilex.models.vilex_model import ViLexModel
        from vilex.train.data import model_views, training_loader
        from vilex.train.latent_cache import LatentCache

        cfg, tc = self.cfg, self.cfg.train
        D.init_process_group_if_needed()
        self.loop.acquire()  # one run per output folder: refuse before an hour of latent caching
        seed_everything(tc.seed)  # identical model init on every rank
        self.model = ViLexModel.from_config(cfg.model)
        self.decoder = self.model.decoder
        self.encoder = self.model.encoder
        self.generator = torch.Generator().manual_seed(tc.seed * 1000 + self.rank)
        if tc.init_from is not None:
            load_encoder_weights(self.encoder, tc.init_from, cfg.model.vit)

        views = model_views(self.model, cfg.data.train)
        cached = self.decoder.vae is not None and cfg.latent_cache.enabled
        # with the latent cache, x0 comes from the cached posterior: the decoder view is never decoded
        loader_views = {"encoder": views["encoder"]} if cached else views
        self.loader = training_loader(self.model, cfg.data.train, self.batch.micro_batch_size, tc.seed, self.rank, self.world,
                                      views=loader_views)
        self.decoder.to(self.strategy.device)  # before the latent cache: a cache miss encodes on this device
        self.cache = None
        if cached:
            self.cache = LatentCache.open_or_build(cfg.latent_cache, self.decoder, cfg.data.train, views["decoder"],
                                                   rank=self.rank, world_size=self.world, source=self.loader.source)

        groups = self.model.trainable_parameter_groups()
        lrs = {"vit": tc.optim.lr_vit, "pooler": tc.optim.lr_pooler}
        for name, params in groups.items():  # train.trainable decides, nothing else
            if name not in tc.trainable:
                for p in params:
                    p.requires_grad_(False)
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items()
                        if ps and name in tc.trainable]
        optim_kwargs = {"betas": tc.optim.betas, "eps": tc.optim.eps, "weight_decay": tc.optim.weight_decay}
        self.strategy.prepare(self.encoder, param_groups,
                              warmup_cosine(tc.optim.warmup_steps, tc.max_steps, tc.optim.min_lr_ratio), optim_kwargs)
        self.ema = EMA(self.encoder, tc.ema_decay) if tc.ema_decay else None
        if self.ema and getattr(self.strategy, "zero_stage", 0) == 3:
            raise UserError("train.ema_decay is not supported with ZeRO-3 (parameters are partitioned); use ZeRO-2")

        resume_from = self.loop.resolve(self.resume_arg)
        if resume_from is not None:
            self.loop.resume(resume_from)
        if self.strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        self.count_flops()

    # ---- one micro-batch
    def batches(self, state: RunState) -> Iterator[Any]:
        while True:  # epochs: the loader reshuffles deterministically and continues from its saved position
            yield from self.loader

    def _x0(self, batch: Any) -> torch.Tensor:
        """The decoder-space target: a sample from the cached VAE posterior, or encoded now."""
        if self.cache is not None:
            return self.cache.sample(batch.keys, batch.locations, self.decoder, self.generator)
        with torch.no_grad():
            return self.decoder.to_model_space(batch.images["decoder"].to(self.strategy.device), self.generator)

    def micro_step(self, batch: Any) -> torch.Tensor:
        x0 = self._x0(batch)
        with self.strategy.autocast(), attention_kernels(self.cfg.train.attention_backend):
            tokens = self.strategy.forward(batch.images["encoder"].to(self.strategy.device))
            out = self.model.loss_from_tokens(tokens.float(), x0, generator=self.generator)
        return out["loss"]

    def backward_context(self):
        return attention_kernels(self.cfg.train.attention_backend)  # checkpointed blocks recompute under it

    def on_micro_batch(self, batch: Any, finite: bool) -> None:
        if finite:
            self.state.images_seen += self.batch.micro_batch_size * self.world

    def on_optimizer_step(self, state: RunState) -> None:
        if self.ema:
            self.ema.update(self.encoder)

    def after_step(self, state: RunState) -> None:
        if state.step % self.cfg.val.every == 0:
            self.validate()

    # ---- checkpoints
    def identity(self) -> dict[str, Any]:
        return {"frozen_decoder_weights": self.decoder_weights}

    def save_every_rank(self, tmp: Path, rank: int) -> None:
        torch.save({"rng": rng_state(self.generator), "loader": self.loader.state_dict()}, tmp / f"rank{rank}.pt")

    def save_main(self, tmp: Path) -> None:
        if not self.strategy.shards_state:  # else DeepSpeed's own checkpoint holds the weights
            torch.save({k: v.detach().clone() for k, v in self.encoder.state_dict().items()}, tmp / "encoder.pt")
        if self.ema:
            torch.save(self.ema.state_dict(), tmp / "ema.pt")
        weights = "ema" if self.ema and self.cfg.train.pipeline_weights == "ema" else "raw"
        with self.ema.swap_in(self.encoder) if weights == "ema" else contextlib.nullcontext():
            self.model.save_pretrained(tmp / "pipeline")  # loadable on its own (ViLexPipeline.from_pretrained)
        (tmp / "pipeline" / PIPELINE_PROVENANCE).write_text(json.dumps(
            {"step": self.state.step, "encoder_weights": weights, "ema_decay": self.cfg.train.ema_decay}, indent=2))
        write_manifest(tmp / "pipeline")  # verifiable on its own too, when copied out of the checkpoint

    def gathered(self):
        """Gather ZeRO-3 partitions so rank 0 can export full weights (a no-op otherwise)."""
        if getattr(self.strategy, "zero_stage", 0) == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.encoder.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def load(self, folder: Path, rank: int) -> None:
        if not self.strategy.shards_state:
            self.encoder.load_state_dict(torch.load(folder / "encoder.pt", map_location="cpu", weights_only=True))
        if self.ema:
            self.ema.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu", weights_only=True))
        own = torch.load(folder / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        set_rng_state(own["rng"], self.generator)
        self.loader.load_state_dict(own["loader"])

    # ---- validation
    def validate(self) -> Path | None:
        from vilex.train.validation import reconstruct_grid

        with self.gathered():
            if not self.strategy.is_main:
                return None
            ctx = self.ema.swap_in(self.encoder) if self.ema else contextlib.nullcontext()
            with ctx:
                path, grid = reconstruct_grid(self.model, self.cfg, self.out / "val", self.state.step)
        if self.loop.writer is not None:
            self.loop.writer.add_image("val/reconstructions", grid, self.state.step)
        return path

    # ---- the loop
    def run(self) -> dict[str, Any]:
        return self.loop.run()

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
        pixels = torch.zeros(self.batch.micro_batch_size, 3, tower.image_size, tower.image_size, device=self.strategy.device)
        x0 = torch.zeros(self.batch.micro_batch_size, *self.decoder.model_space_shape, device=self.strategy.device)
        try:
            # (not under no_grad: FlopCounterMode's module tracker needs autograd; nothing is backpropagated)
            with torch.random.fork_rng(devices=[]):
                enc, dec = FlopCounterMode(display=False), FlopCounterMode(display=False)
                with enc, self.strategy.autocast():
                    tokens = self.strategy.forward(pixels)
                with dec, self.strategy.autocast():
                    self.model.loss_from_tokens(tokens.float(), x0, generator=torch.Generator().manual_seed(0))
            self.flops_per_step = (3 * enc.get_total_flops() + 2 * dec.get_total_flops()) * self.batch.grad_accum
        except Exception as e:  # diagnostics only: never stop training for it
            log.warning("FLOP counting failed (%s); MFU will not be logged", e)
            self.flops_per_step = 0
        if self.flops_per_step and self.peak_flops is None:
            self.peak_flops = measure_matmul_peak(self.strategy.device)
        if self.strategy.is_main and self.flops_per_step:
            log.info("%.3g model FLOPs per optimizer step; matmul peak %.3g FLOP/s", self.flops_per_step,
                     self.peak_flops)

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        images = window_steps * self.batch.global_batch_size
        metrics = {"train/images_per_s": images / max(window_seconds, 1e-9),
                   "train/peak_memory_gb": peak_memory_bytes(self.strategy.device) / 2**30,
                   "train/nonfinite_total": self.state.nonfinite_total}
        if self.flops_per_step and self.peak_flops:  # per process
            metrics["train/mfu"] = self.flops_per_step / (window_seconds / max(1, window_steps)) / self.peak_flops
        return metrics

    def summary(self, state: RunState) -> dict[str, Any]:
        return {"images_seen": self.state.images_seen,
                "data_skipped": self.loader.summary() if hasattr(self.loader, "summary") else {}}


def load_encoder_weights(encoder: torch.nn.Module, path: str | Path, vit_config) -> None:
    """Copy the weights of the ViLex encoder saved at ``path`` (anything ``resolve_vilex_checkpoint`` takes) into
    ``encoder``; a different architecture is a UserError naming the first parameters that differ."""
    from vilex.models.encoder import ViLexEncoder
    from vilex.pipeline import resolve_vilex_checkpoint

    folder = resolve_vilex_checkpoint(path)
    # the embedding statistics belong to this run's decoder (computed from its table at build), not the source's
    own_buffers = ("pooler.embed_mean", "pooler.embed_std")
    source = {k: v for k, v in ViLexEncoder.from_saved(folder, vit_config).state_dict().items() if k not in own_buffers}
    target = {k: v for k, v in encoder.state_dict().items() if k not in own_buffers}
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = sorted(k for k in set(target) & set(source) if target[k].shape != source[k].shape)
    if missing or unexpected or shapes:
        raise UserError(f"train.init_from={path}: its encoder does not match this config's (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}); init_from needs "
                        "the same model.vit and model.pooler")
    encoder.load_state_dict(source, strict=False)
    log.info("encoder weights from %s", folder)


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run stage-1 pretraining; returns the run summary (also written to <output_dir>/summary.json)."""
    trainer = Pretrainer(cfg, resume)
    trainer.setup()
    return trainer.run()

"""strategy.py — how a training step is executed: plain PyTorch (1 process or DDP) or DeepSpeed ZeRO.

The loop (``loop.py``) does not know which one runs. Both wrap ONLY the trainable module (the ViLex
encoder); the frozen decoder stays outside, replicated on every rank and held in its own dtype, so ZeRO
never partitions or casts it and gradients still flow through it into the encoder.

* ``torch``: AdamW over parameter groups, warmup+cosine ``LambdaLR``, gradient accumulation, clipping,
  bf16 autocast over fp32 weights (the weights ARE the fp32 master copy). With ``torchrun`` it becomes DDP
  (gloo on CPU, nccl on GPU).
* ``deepspeed``: ``deepspeed.initialize`` with a JSON from ``configs/deepspeed/`` whose ``"auto"`` values
  are filled from the experiment config; DeepSpeed does accumulation, clipping, bf16 with fp32 master
  weights, ZeRO-2/3 and its own checkpoint files.

Why not accelerate: on CPU it silently drops the DeepSpeed plugin (``cpu=True`` gives MULTI_CPU DDP; without
it two ``torchrun`` workers each became a 1-process DeepSpeed world — measured), and our tests must run real
2-process DeepSpeed on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vilex.errors import ConfigError
from vilex.registry import Registry
from vilex.train import distributed as D

STRATEGIES: Registry[type["Strategy"]] = Registry("training strategy")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@dataclass
class StepResult:
    stepped: bool  # an optimizer step happened (end of an accumulation window)
    grad_norm: float | None


class Strategy:
    """Interface. ``prepare`` once, then per micro-batch: ``forward`` (under ``autocast``), ``backward``, ``step``."""

    name = "base"
    # True: every rank writes its own part of the checkpoint (ZeRO partitions) and it holds the module weights too;
    # False: rank 0 writes the optimizer state alone and the trainer saves the weights it wants.
    shards_state = False

    def __init__(self, precision: str, grad_accum: int, grad_clip: float | None, micro_batch: int,
                 device: torch.device | None = None) -> None:
        self.precision = precision
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.micro_batch = micro_batch
        self.rank, self.world_size, self.local_rank = D.env_world()
        self.device = device if device is not None else D.default_device()
        self.module: nn.Module | Any = None
        self.optimizer: torch.optim.Optimizer | Any = None
        self.scheduler: Any = None
        self._micro = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast over fp32 weights when ``precision`` is bf16."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def construction_context(self) -> contextlib.AbstractContextManager:
        """Enter while building the model. Plain strategies: nothing. DeepSpeed ZeRO-3: Hugging Face models built
        inside (``from_pretrained``) are partitioned as they are created (``zero.Init``), so no rank ever holds a full
        copy of the LLM."""
        return contextlib.nullcontext()

    # --- to implement
    def prepare(self, module: nn.Module, param_groups: list[dict], lr_lambda: Callable[[int], float],
                optim_kwargs: dict) -> None: ...
    def forward(self, *args, **kwargs): return self.module(*args, **kwargs)
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepResult: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...
    def unwrapped(self) -> nn.Module: ...
    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


@STRATEGIES.register("torch")
class TorchStrategy(Strategy):
    name = "torch"

    def prepare(self, module, param_groups, lr_lambda, optim_kwargs) -> None:
        D.init_process_group_if_needed()
        module.to(self.device)
        self._raw = module
        if self.world_size > 1:
            kw = {"device_ids": [self.local_rank]} if self.device.type == "cuda" else {}
            module = nn.parallel.DistributedDataParallel(module, **kw)
        self.module = module
        self.optimizer = torch.optim.AdamW(param_groups, **optim_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def unwrapped(self) -> nn.Module:
        return self._raw

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> StepResult:
        self._micro += 1
        if self._micro % self.grad_accum:
            return StepResult(False, None)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(True, float(norm))

    def discard_grads(self) -> None:
        """Drop the gradients of the current accumulation window (after a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    def save(self, folder: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "micro": self._micro}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]


def fill_deepspeed_config(path: Path, micro_batch: int, grad_accum: int, world_size: int,
                          grad_clip: float | None, precision: str, optim_kwargs: dict) -> dict:
    """Read a DeepSpeed JSON and replace its ``"auto"`` values from the experiment config."""
    if not Path(path).is_file():
        raise ConfigError(f"deepspeed config not found: {path}")
    cfg = json.loads(Path(path).read_text())
    fills = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip or 0.0,
    }
    for k, v in fills.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif k != "gradient_clipping" and cfg[k] != v:
            raise ConfigError(f"{path}: {k}={cfg[k]} contradicts the experiment config ({v}); set it to \"auto\"")
    cfg.setdefault("bf16", {})
    if cfg["bf16"].get("enabled", "auto") == "auto":
        cfg["bf16"]["enabled"] = precision == "bf16"
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for k, v in optim_kwargs.items():
        if params.get(k, "auto") == "auto":
            params[k] = list(v) if isinstance(v, tuple) else v
    params.setdefault("torch_adam", True)  # avoids a 45 s JIT build of FusedAdam on CPU
    params.pop("lr", None)  # per-group lrs come from the param groups
    return cfg


def zero_stage(ds_cfg: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization section)."""
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


@STRATEGIES.register("deepspeed")
class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    shards_state = True

    def __init__(self, *args, deepspeed_config: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config_path = Path(deepspeed_config)
        self._hf_ds_config = None  # kept alive for the run: transformers reads ZeRO-3 from it (a weak reference)

    def _filled_config(self, optim_kwargs: dict) -> dict:
        return fill_deepspeed_config(self.config_path, self.micro_batch, self.grad_accum, self.world_size,
                                     self.grad_clip, self.precision, optim_kwargs)

    @staticmethod
    def _start_deepspeed() -> None:
        """DeepSpeed's process group (gloo on CPU, without building its shared-memory op); idempotent."""
        import deepspeed

        if not torch.cuda.is_available():
            D.skip_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    @contextlib.contextmanager
    def construction_context(self):
        ds_cfg = self._filled_config({})
        if zero_stage(ds_cfg) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._start_deepspeed()
            self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)  # from_pretrained now builds under deepspeed.zero.Init
        yield

    def prepare(self, module, param_groups, lr_lambda, optim_kwargs) -> None:
        import deepspeed

        ds_cfg = self._filled_config(optim_kwargs)
        self.zero_stage = zero_stage(ds_cfg)
        self._start_deepspeed()
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=param_groups, config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        )
        self.device = self.module.device
        self.param_dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32

    def unwrapped(self) -> nn.Module:
        return self.module.module

    def autocast(self):
        """No autocast: DeepSpeed holds bf16 weights itself (inputs are cast in ``forward``)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=False)

    def forward(self, *args, **kwargs):
        args = [a.to(self.param_dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def step(self) -> StepResult:
        boundary = self.module.is_gradient_accumulation_boundary()
        self.module.step()
        if not boundary:
            return StepResult(False, None)
        norm = self.module.get_global_grad_norm()
        return StepResult(True, None if norm is None else float(norm))

    def discard_grads(self) -> None:
        self.module.zero_grad()

    def save(self, folder: Path) -> None:
        self.module.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.module.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"no DeepSpeed state in {folder}")

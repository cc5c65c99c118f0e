"""train/common.py — pieces every training loop here shares (stage 1 `vilex pretrain`, stage 2 `vilex train-vlm`).

* RNG state capture/restore (python, numpy, torch, CUDA, and an optional loop-owned ``torch.Generator``);
* the non-finite-loss guard (skip and count; stop after N in a row, naming the last good checkpoint);
* the multi-rank atomic checkpoint save: all ranks write into ONE hidden temp folder, rank 0 publishes it
  with a rename (vilex.checkpoint), barriers between — a kill at any point leaves the previous checkpoint;
* the sum-over-ranks of a few floats on the strategy's device (nccl reduces only GPU tensors).
"""
from __future__ import annotations

import contextlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from vilex.checkpoint import CheckpointManager, publish_dir, temp_dir_for
from vilex.errors import RunMismatchError, UserError
from vilex.train import distributed as D

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Too many non-finite losses in a row: the run stops, the last good checkpoint is kept."""


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "generator": generator.get_state() if generator is not None else None,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (float64, on ``device``: nccl reduces only GPU tensors)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return D.all_reduce_sum(t).cpu().tolist()


class NonFiniteGuard:
    """Counts non-finite losses; raises NonFiniteLossError after ``limit`` in a row."""

    def __init__(self, state: Any, limit: int, latest_checkpoint: Callable[[], Path | None]) -> None:
        self.state, self.limit, self.latest = state, limit, latest_checkpoint

    def ok(self) -> None:
        self.state.nonfinite_in_a_row = 0

    def bad(self) -> None:
        s = self.state
        s.nonfinite_total += 1
        s.nonfinite_in_a_row += 1
        log.warning("non-finite loss at step %d (micro-step %d): skipped (%d in a row, %d total)",
                    s.step, s.micro_steps, s.nonfinite_in_a_row, s.nonfinite_total)
        if s.nonfinite_in_a_row >= self.limit:
            last = self.latest()
            raise NonFiniteLossError(
                f"{s.nonfinite_in_a_row} non-finite losses in a row at step {s.step}; stopping. "
                f"Last good checkpoint: {last if last else 'none written yet'}. "
                "Lower the learning rate or check the data.")


def save_distributed(ckpts: CheckpointManager, step: int, is_main: bool, write_every_rank: Callable[[Path], None],
                     write_main: Callable[[Path], None],
                     gathered: Callable[[], ContextManager] = contextlib.nullcontext,
                     device: torch.device | str = "cpu") -> Path:
    """One checkpoint written by all ranks into a shared temp folder and published atomically by rank 0.

    ``write_every_rank(tmp)`` runs on every rank (its RNG/loader state, DeepSpeed shards); ``write_main(tmp)`` on
    rank 0 only, inside ``gathered()`` (e.g. ZeRO-3 GatheredParameters, entered by all ranks). A write that fails on
    any rank (``OSError``: a full disk) is agreed on by all ranks, the temp folder is removed and every rank raises
    it, so no rank waits forever and ``--resume auto`` never sees a partial checkpoint.
    """
    final = ckpts.path_for(step)
    tmp = temp_dir_for(final, tag=f"step{step}")
    if is_main:
        ckpts.clean_stale()
        tmp.mkdir(parents=True)
    D.barrier()

    def agreed(phase: Callable[[], None]) -> None:
        failure: OSError | None = None
        try:
            phase()
        except OSError as e:
            failure = e
        if sum_over_ranks([float(failure is not None)], torch.device(device))[0] > 0:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failure or OSError(f"another rank failed to write {final.name}")

    def write() -> None:
        write_every_rank(tmp)
        with gathered():
            if is_main:
                write_main(tmp)

    agreed(write)
    agreed(lambda: publish_dir(tmp, final) if is_main else None)
    if is_main:
        ckpts.prune()
        log.info("saved %s", final)
    D.barrier()
    return final


def check_same_run_shape(folder: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Exact resume needs the same world size, strategy (and stage...): say which differ."""
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise RunMismatchError(f"{folder} cannot be resumed by this run ({what}) — exact resume needs the same; "
                               "start a new output_dir (or move this run away)")


def attention_kernels(backend: str):
    """Context for a forward pass: ``auto`` leaves SDPA's kernel choice to torch, ``math`` forces the unfused math
    kernels (the backward follows the forward's choice)."""
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    if backend == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    raise ValueError(f"unknown attention backend {backend!r} (auto, math)")

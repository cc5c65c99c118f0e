"""train/batching.py — the one vocabulary of steps and batches, shared by every trainer (stage 0, 1 and 2).

    max_steps          optimizer steps
    global_batch_size  samples per optimizer step, over all processes (what a paper states)
    micro_batch_size   samples per process per forward (null = global_batch_size / processes)

Gradient accumulation is never set by hand: it is ``global / (micro × processes)``, and a global batch that this
does not divide is a one-line error. So a recipe keeps its global batch when it moves to another number of GPUs,
and only the memory-bound micro-batch is a property of the machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from vilex.config import cfg_field
from vilex.errors import ConfigError

# "{section}" is the config section the key was found in (vilex.config.from_dict fills it in)
ACCUMULATION_IS_DERIVED = ("set {section}.global_batch_size (samples per optimizer step over all processes) and "
                           "{section}.micro_batch_size; the accumulation is derived: global / (micro × processes)")


@dataclass
class BatchSchedule:
    """The steps-and-batch fields every trainer's config section starts with (see the module docstring)."""

    max_steps: int = cfg_field(1000, ge=1, help="optimizer steps")
    global_batch_size: int = cfg_field(8, ge=1, help="samples per optimizer step over all processes")
    micro_batch_size: Optional[int] = cfg_field(
        None, ge=1, help="samples per process per forward (null = global_batch_size / processes); the gradient "
                         "accumulation is derived: global / (micro × processes)")

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "steps": "set {section}.max_steps (optimizer steps)",
        "batch_size": "set {section}.global_batch_size (samples per optimizer step) and, to accumulate, "
                      "{section}.micro_batch_size",
        "grad_accum": ACCUMULATION_IS_DERIVED,
        "gradient_accumulation_steps": ACCUMULATION_IS_DERIVED,
    }


@dataclass(frozen=True)
class BatchPlan:
    """A schedule resolved for a number of processes."""

    global_batch_size: int
    micro_batch_size: int
    processes: int

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.processes)


def plan_batches(global_batch_size: int, micro_batch_size: int | None, processes: int, where: str = "train"
                 ) -> BatchPlan:
    """Resolve micro-batch and accumulation for ``processes``; a global batch they do not divide is an error
    naming the keys (``where`` is the config section, e.g. ``train`` or ``instruct``)."""
    if micro_batch_size is None:
        if global_batch_size % processes:
            raise ConfigError(f"{where}.global_batch_size {global_batch_size} is not divisible by the {processes} "
                              f"processes: set {where}.micro_batch_size or another global batch")
        return BatchPlan(global_batch_size, global_batch_size // processes, processes)
    per_step = micro_batch_size * processes
    if global_batch_size % per_step:
        raise ConfigError(f"{where}.global_batch_size {global_batch_size} is not a multiple of micro_batch_size x "
                          f"processes = {micro_batch_size} x {processes}")
    return BatchPlan(global_batch_size, micro_batch_size, processes)

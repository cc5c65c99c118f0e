"""vlm/sampler.py — which samples form micro-batch k of rank r: a pure function of (seed, k, r), so resume is exact.

Each epoch draws a permutation from ``numpy.random.default_rng([seed, epoch])``. Consecutive ``global_batch_size``
chunks of it are the optimizer steps; a chunk is split into ``accum x world`` micro-batches of ``micro_batch_size``,
micro-batch (a, r) going to accumulation slot a of rank r. With ``group_by_length`` the chunk is first sorted by
estimated length (longest first), so each micro-batch holds samples of similar length and padding shrinks
(LLaVA's ``group_by_modality_length`` does the same within mega-batches; text-only samples have no image tokens and
so naturally group together). The samples of a step are the same with and without grouping — only how they are
split into micro-batches changes.

The samples of a last partial chunk (``len % global_batch_size``) are not used in that epoch (drop-last); their
number is logged once at start-up. The trainer's resume state is just the number of micro-batches consumed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from vilex.errors import ConfigError


class MicroBatchPlan:
    """Deterministic assignment of sample indices to (rank, micro-batch number)."""

    def __init__(self, lengths: Sequence[int], global_batch_size: int, micro_batch_size: int, world_size: int,
                 seed: int, group_by_length: bool) -> None:
        per_step = micro_batch_size * world_size
        if global_batch_size % per_step:
            raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size x "
                              f"processes = {micro_batch_size} x {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.grad_accum = global_batch_size // per_step
        self.seed = seed
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(self.lengths) // global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.lengths)} samples are fewer than one global batch ({global_batch_size})")
        self.dropped_per_epoch = len(self.lengths) % global_batch_size
        self.micro_batches_per_epoch = self.steps_per_epoch * self.grad_accum
        self._cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)))
        return self._cache[1]

    def indices(self, rank: int, k: int) -> list[int]:
        """Sample indices of micro-batch ``k`` (counted from the start of training) of ``rank``."""
        epoch, j = divmod(k, self.micro_batches_per_epoch)
        step, slot = divmod(j, self.grad_accum)
        chunk = self._permutation(epoch)[step * self.global_batch_size:(step + 1) * self.global_batch_size]
        if self.group_by_length:
            chunk = chunk[np.lexsort((chunk, -self.lengths[chunk]))]  # longest first, ties by index
        m = slot * self.world_size + rank
        return [int(i) for i in chunk[m * self.micro_batch_size:(m + 1) * self.micro_batch_size]]


class ResumableBatchSampler:
    """A ``batch_sampler`` for DataLoader: micro-batches of one rank from number ``start`` on, forever."""

    def __init__(self, plan: MicroBatchPlan, rank: int, start: int = 0) -> None:
        self.plan = plan
        self.rank = rank
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            yield self.plan.indices(self.rank, k)
            k += 1

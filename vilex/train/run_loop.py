"""train/run_loop.py — the one training run loop: stage 1 (`vilex pretrain`), stage 2 (`vilex train-vlm`) and the
toy stage-0 trainers all run through ``RunLoop``.

A trainer is a ``TrainTask``: it builds its model, data and strategy (vilex/train/strategy.py) and supplies the
model-specific parts — the micro-batches, the loss of one micro-batch, what it saves beside the loop's state and what
it adds to the log and the summary. The loop owns what every run needs, written once:

* resume: ``--resume auto|PATH`` through the CheckpointManager; a checkpoint records the run's identity (world size,
  strategy, and whatever the task adds: stage, fingerprints of frozen inputs) and a resume with another identity is a
  ``RunMismatchError``. Fingerprint keys (``*_weights``) are compared only when both sides have one (hub ids have
  none);
* the step: micro-step -> non-finite check on every rank -> backward -> optimizer step (the strategy accumulates);
  a non-finite loss is skipped and counted, N in a row stop the run naming the last good checkpoint;
* cadence: log every ``log_every`` steps (console, ``train_log.jsonl``, tensorboard, W&B), checkpoint every
  ``checkpoint_every`` steps and at the end, ``max_minutes`` (checkpoint, then stop: the caller still evaluates and
  saves, and ``--resume auto`` continues);
* the atomic multi-rank checkpoint (vilex.train.common.save_distributed) and ``trainer_state.json``;
* the summary (``summary.json``) and the run history (``run_history.json``: the segments a resumed run was made of);
* one writer per output folder (vilex/train/run_lock.py), taken before anything is read or written there;
* preemption: the ``stop_signals`` (SIGTERM and SIGUSR1 by default: what SLURM and spot instances send before a
  kill) make the run finish its optimizer step, write a checkpoint and return normally (exit 0); ``--resume auto``
  continues bit-identically. Every rank stops at the same step (the flag travels with the step's loss reduction);
* a checkpoint write that fails (a full disk) removes its partial folder, keeps the previous checkpoint and stops
  with one line.

Exact resume: the loop restores its counters and the strategy's optimizer/scheduler; the task restores its weights,
RNG and data position. On CPU a killed-and-resumed run reproduces the uninterrupted run's losses bit for bit
(tests/test_pretrain_resume.py, tests/test_vlm_train.py, tests/test_toy_pretrain.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch

from vilex.checkpoint import CheckpointManager
from vilex.errors import UserError
from vilex.train.common import NonFiniteGuard, check_same_run_shape, save_distributed, sum_over_ranks
from vilex.train.run_lock import RunLock
from vilex.train.strategy import Strategy

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
FINGERPRINT_SUFFIX = "_weights"  # identity keys compared only when both the checkpoint and this run have a value


@dataclass
class RunState:
    """Counters that belong in every checkpoint (rank 0's view)."""

    step: int = 0
    micro_steps: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step (mean over ranks and micro-batches)


@dataclass
class LoopSettings:
    """The run-level knobs, taken from each trainer's own config section."""

    output_dir: Path
    total_steps: int
    log_every: int
    checkpoint_every: int
    keep_last: int | None
    max_consecutive_nonfinite: int = 5
    max_minutes: float | None = None
    name: str = "train"  # progress-bar label
    checkpoints_dir: Path | None = None  # default: output_dir / "checkpoints"
    tensorboard: bool = False
    wandb_project: str | None = None
    wandb_config: dict[str, Any] | None = None
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")  # checkpoint and stop cleanly on these


def signal_numbers(names: Any) -> list[signal.Signals]:
    """``["SIGTERM", "SIGUSR1"]`` -> signal numbers; an unknown name is a UserError."""
    out = []
    for name in names:
        try:
            out.append(signal.Signals[str(name).upper()])
        except KeyError:
            raise UserError(f"stop_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1, SIGUSR2)") from None
    return out


class TrainTask:
    """What a trainer supplies to the loop. Only ``batches`` and ``micro_step`` are required."""

    state_class: type[RunState] = RunState

    def batches(self, state: RunState) -> Iterator[Any]:
        """Micro-batches from ``state``'s position on (called once, after any resume)."""
        raise NotImplementedError

    def micro_step(self, batch: Any) -> torch.Tensor:
        """The loss of one micro-batch (forward only; the loop does backward and step)."""
        raise NotImplementedError

    def backward_context(self) -> ContextManager:
        """Entered around the backward pass: what ``micro_step`` chose for its forward that recomputation must see
        too (activation checkpointing re-runs forward pieces during backward, e.g. under the same SDPA kernel)."""
        return contextlib.nullcontext()

    def on_micro_batch(self, batch: Any, finite: bool) -> None:
        """Count what the micro-batch held (samples, tokens, skips)."""

    def on_optimizer_step(self, state: RunState) -> None:
        """Right after an optimizer step (e.g. an EMA update)."""

    def after_step(self, state: RunState) -> None:
        """After the step's log line and before its checkpoint (e.g. a validation grid)."""

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        """Extra metrics for the log line (names with a ``train/`` prefix), on the main process."""
        return {}

    def identity(self) -> dict[str, Any]:
        """Values a resumed run must share with the checkpoint, besides world size and strategy."""
        return {}

    def save_every_rank(self, tmp: Path, rank: int) -> None:
        """This rank's own state (RNG, data position) into the checkpoint's temp folder."""

    def save_main(self, tmp: Path) -> None:
        """Rank 0's part: weights (loadable on their own), EMA."""

    def gathered(self) -> ContextManager:
        """Entered by all ranks around ``save_main`` (ZeRO-3: gather the partitioned weights)."""
        return contextlib.nullcontext()

    def load(self, folder: Path, rank: int) -> None:
        """Restore what ``save_every_rank`` / ``save_main`` wrote (called after the strategy's own state)."""

    def summary(self, state: RunState) -> dict[str, Any]:
        """Extra summary fields; called on every rank (it may reduce over ranks)."""
        return {}


class RunLoop:
    """Runs a ``TrainTask`` with a prepared ``Strategy`` from the current state to ``settings.total_steps``."""

    def __init__(self, task: TrainTask, strategy: Strategy, settings: LoopSettings) -> None:
        self.task, self.strategy, self.settings = task, strategy, settings
        self.out = Path(settings.output_dir)
        self.ckpts = CheckpointManager(settings.checkpoints_dir or self.out / "checkpoints",
                                       keep_last=settings.keep_last)
        self.state = task.state_class()
        self.resumed_from: Path | None = None
        self.stopped_early = False
        self.stop_reason: str | None = None
        self.writer = None
        self.wandb = None
        self.lock = RunLock(self.out)
        self._acquired = False
        self._signalled: str | None = None
        signal_numbers(settings.stop_signals)  # a bad name fails before any work

    def acquire(self) -> None:
        """Take the output folder's lock on rank 0 (idempotent); every rank fails if it is held by another run."""
        if self._acquired:  # tracked on every rank: only rank 0 holds the lock, all take part in the check
            return
        error: Exception | None = None
        if self.strategy.is_main:
            try:
                self.lock.acquire()
            except UserError as e:
                error = e
        if sum_over_ranks([float(error is not None)], self.strategy.device)[0] > 0:
            raise error or UserError(f"{self.out} is in use by another run (see rank 0's message)")
        self._acquired = True

    def release(self) -> None:
        self.lock.release()
        self._acquired = False

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def world(self) -> int:
        return self.strategy.world_size

    # ---- resume
    def resolve(self, resume: str | Path | None) -> Path | None:
        """``None`` (fresh start), ``auto`` (the newest checkpoint that verifies, if any) or a checkpoint folder
        (it must verify). Takes the run folder's lock first."""
        self.acquire()
        return self.ckpts.resolve(resume)

    def _identity(self) -> dict[str, Any]:
        return {"world_size": self.world, "strategy": self.strategy.name, **self.task.identity()}

    def resume(self, folder: Path) -> None:
        """Restore the loop's counters, the strategy's optimizer/scheduler and the task's own state from ``folder``."""
        saved = json.loads((folder / TRAINER_STATE).read_text())
        expected = {k: v for k, v in self._identity().items()
                    if not (k.endswith(FINGERPRINT_SUFFIX) and (v is None or saved.get(k) is None))}
        check_same_run_shape(folder, saved, expected)
        fields = self.task.state_class.__dataclass_fields__
        self.state = self.task.state_class(**{k: v for k, v in saved.items() if k in fields})
        self.strategy.load(folder)
        self.task.load(folder, self.rank)
        self.resumed_from = folder
        if self.strategy.is_main:
            _truncate_log(self.out / "train_log.jsonl", self.state.step)
        log.info("resumed from %s at step %d", folder, self.state.step)

    # ---- checkpoints
    def save(self) -> Path:
        """All ranks write into one temp folder; rank 0 publishes it atomically (vilex.train.common)."""

        def every_rank(tmp: Path) -> None:
            self.task.save_every_rank(tmp, self.rank)
            if self.strategy.shards_state:
                self.strategy.save(tmp)

        def main_only(tmp: Path) -> None:
            if not self.strategy.shards_state:
                self.strategy.save(tmp)
            self.task.save_main(tmp)
            (tmp / TRAINER_STATE).write_text(json.dumps({**self.state.__dict__, **self._identity()}, indent=1,
                                                        default=str))

        try:
            return save_distributed(self.ckpts, self.state.step, self.strategy.is_main, every_rank, main_only,
                                    self.task.gathered, self.strategy.device)
        except OSError as e:
            latest = self.ckpts.latest()
            raise UserError(f"writing checkpoint-{self.state.step} under {self.ckpts.root} failed "
                            f"({e.strerror or e}); its partial folder was removed, the last complete checkpoint is "
                            f"{latest or 'none yet'}: free space, then --resume auto") from None

    # ---- loggers
    def _open_loggers(self) -> None:
        s = self.settings
        if not self.strategy.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if s.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if s.wandb_project:
            from vilex.errors import UserError

            try:
                import wandb
            except ImportError:
                raise UserError("log.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=s.wandb_project, config=s.wandb_config, dir=str(self.out),
                                    resume="allow")

    def _log(self, loss: float, grad_norm: float | None, window_seconds: float, window_steps: int) -> None:
        if not self.strategy.is_main:
            return
        metrics = {"train/loss": loss, **self.task.log_metrics(window_seconds, window_steps)}
        for g, lr in zip(self.strategy.optimizer.param_groups, self.strategy.lrs()):
            metrics[f"train/lr_{g.get('name', 'group')}"] = lr
        if grad_norm is not None and math.isfinite(grad_norm):
            metrics["train/grad_norm"] = grad_norm
        metrics["train/sec_per_step"] = window_seconds / max(1, window_steps)
        step = self.state.step
        log.info("%s step %d/%d  " + "  ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()),
                 self.settings.name, step, self.settings.total_steps)
        row = {"step": step, **{k.split("/", 1)[1]: v for k, v in metrics.items()},
               "elapsed_min": round((time.perf_counter() - self._started) / 60, 3)}
        with open(self.out / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _late(self) -> float:
        """1.0 when ``max_minutes`` has passed on this rank's clock (rank 0's decides: the flag is summed)."""
        limit = self.settings.max_minutes
        return float(limit is not None and self.strategy.is_main and time.perf_counter() - self._started > limit * 60)

    @contextlib.contextmanager
    def _stop_signal_handlers(self):
        """While the loop runs, the stop signals set a flag instead of killing the process (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):  # noqa: ARG001
            self._signalled = signal.Signals(signum).name

        previous = {s: signal.signal(s, handler) for s in signal_numbers(self.settings.stop_signals)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ---- the loop
    def run(self) -> dict[str, Any]:
        self.acquire()
        try:
            with self._stop_signal_handlers():
                return self._run()
        finally:
            self.release()

    def _run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        s, st = self.settings, self.state
        self._started, self._from_step = time.perf_counter(), st.step
        self._open_loggers()
        guard = NonFiniteGuard(st, s.max_consecutive_nonfinite, self.ckpts.latest)
        batches = iter(self.task.batches(st))
        bar = tqdm(total=s.total_steps, initial=st.step, disable=not self.strategy.is_main, desc=s.name,
                   dynamic_ncols=True)
        window_start, window_steps, micro_losses = time.perf_counter(), 0, []
        try:
            while st.step < s.total_steps:
                batch = next(batches)
                loss = self.task.micro_step(batch)
                finite_here = float(torch.isfinite(loss.detach()).all())
                finite = sum_over_ranks([finite_here], self.strategy.device)[0] == self.world
                if finite:
                    with self.task.backward_context():
                        self.strategy.backward(loss)
                st.micro_steps += 1
                self.task.on_micro_batch(batch, finite)
                if not finite:
                    guard.bad()
                    continue
                guard.ok()
                result = self.strategy.step()
                micro_losses.append(float(loss.detach()))
                if not result.stepped:
                    continue
                st.step += 1
                window_steps += 1
                # one reduction per step carries the loss and the stop flags, so every rank decides alike
                loss_sum, signalled, late = sum_over_ranks(
                    [sum(micro_losses) / len(micro_losses), float(self._signalled is not None), self._late()],
                    self.strategy.device)
                step_loss = loss_sum / self.world
                micro_losses = []
                st.losses.append(step_loss)
                self.task.on_optimizer_step(st)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if st.step % s.log_every == 0 or st.step == s.total_steps:
                    self._log(step_loss, result.grad_norm, time.perf_counter() - window_start, window_steps)
                    window_start, window_steps = time.perf_counter(), 0
                self.task.after_step(st)
                stop = None
                if st.step < s.total_steps:
                    stop = (f"signal {self._signalled or 'on another rank'}" if signalled
                            else f"max_minutes={s.max_minutes}" if late else None)
                if st.step % s.checkpoint_every == 0 or st.step == s.total_steps or stop:
                    self.save()
                if stop:
                    log.warning("%s at step %d of %d: stopped after a checkpoint (--resume auto continues)", stop,
                                st.step, s.total_steps)
                    self.stopped_early, self.stop_reason = True, stop
                    break
        finally:  # a closed bar ends its line, so an error message starts on a line of its own
            bar.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The run's totals (also written to ``<output_dir>/summary.json`` and ``run_history.json``)."""
        st = self.state
        latest = self.ckpts.latest()
        s: dict[str, Any] = {"steps": st.step, "final_loss": st.losses[-1] if st.losses else None,
                             "losses": st.losses, "nonfinite_skipped": st.nonfinite_total,
                             "stopped_early": self.stopped_early, "stop_reason": self.stop_reason,
                             **self.task.summary(st),
                             "checkpoint": str(latest) if latest else None}
        if hasattr(self, "_started"):  # this invocation (a resumed run counts from its resume step)
            s["this_run"] = {"from_step": self._from_step,
                             "loop_seconds": round(time.perf_counter() - self._started, 1)}
        if self.strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "summary.json").write_text(json.dumps(s, indent=2, default=str))
            if "this_run" in s:
                s["run_history"] = _record_segment(self.out / "run_history.json", {
                    "from_step": self._from_step, "to_step": st.step, "steps_planned": self.settings.total_steps,
                    "minutes": round(s["this_run"]["loop_seconds"] / 60, 2), "stopped_early": self.stopped_early})
            if self.writer is not None:
                self.writer.close()
        return s


def _record_segment(path: Path, segment: dict[str, Any]) -> list[dict[str, Any]]:
    """Append this invocation to the run history (the segments a resumed run was made of); return it all.

    Segments that a later resume replayed (from_step >= this segment's start) are dropped: their steps were redone.
    """
    history = json.loads(path.read_text()) if path.is_file() else []
    history = [h for h in history if h["from_step"] < segment["from_step"]] + [segment]
    path.write_text(json.dumps(history, indent=2, default=str) + "\n")
    return history


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows after ``last_step`` (written by a killed run after its last checkpoint) before resuming."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= last_step))


def loss_curve(losses: list[float], log_every: int, points: int = 8) -> list[dict[str, float]]:
    """A few (step, mean loss over the preceding log window) points spread over a run: the loss curve in brief."""
    ends = [s for s in range(log_every, len(losses) + 1, log_every)]
    if losses and (not ends or ends[-1] != len(losses)):
        ends.append(len(losses))
    rows = []
    for end in ends:
        window = losses[(end - 1) // log_every * log_every:end]
        rows.append({"step": end, "loss": round(sum(window) / len(window), 4)})
    if not rows:
        return []
    idx = sorted({round(i * (len(rows) - 1) / max(points - 1, 1)) for i in range(points)})
    return [rows[i] for i in idx]

"""parallel.py — ``DecodePool``: decode an ``ImageLoader``'s samples in worker processes, handed back in order.

The pool changes WHERE samples are decoded, never WHICH or in what order, so ``ImageLoader(num_workers=N)``
yields what ``num_workers=0`` yields, bit for bit:

* The main process walks the loader's order exactly as the in-process path does and reads each sample's
  raw bytes itself (source I/O, shard opening and ``bad_shard`` events stay in one place, in order). It
  hands the bytes to the least-busy worker, which runs the very same ``decode_image`` + ``render_view``
  and answers "decoded" (keeping the views) or with the ``BadSample``.
* Outcomes are handed back strictly in the loader's order (a result that arrives early waits), so the
  loader counts skips, fills a bad sample's place with the next one that decodes and cuts batches exactly
  as before. At most ``window`` samples are read ahead of the consumer.
* Nothing the loader saves depends on the workers: its state is still "where the next sample comes from"
  plus the counts of what was consumed. Samples read ahead but not consumed when a state is saved are
  simply decoded again after a resume; a source error met while reading ahead is kept and raised only
  when the consumer reaches that sample.
* Decoding uses no random numbers. A future random view must derive its randomness from the sample
  (seed, epoch, index), never from the worker, or the worker count would change the data.

Where a sample lands. Batches live in shared memory (a ``memfd`` per batch buffer, mapped by the main
process and by the workers; not ``/dev/shm``, whose size containers often cap at 64 MB), and the
handed-out tensors are those mappings. A worker keeps each sample it rendered until the main process,
consuming in order, knows the sample's row (only then: a bad sample before it shifts it) and tells the
worker, whose task-reading thread copies it into that row at once — the one copy the in-process path
makes too (its ``torch.stack``). The main process itself never touches pixels: its work per sample is a
file read and a few small messages, so it does not cap the throughput of many workers. A buffer whose
batch the consumer has let go of (no tensor uses its memory any more: a reference count tells) is filled
again, so its pages are not faulted in anew for every batch, in the workers or here.

Start method: ``forkserver`` where the platform has it, else ``spawn``; never ``fork``. The training
process has torch's intra-op thread pool (and CUDA) running, and a forked child inherits locks held by
threads that do not exist in it — a torch op in the child can then hang. ``spawn`` is safe but imports
torch again in every worker of every loader (seconds each on a busy machine); ``forkserver`` starts one
clean, single-threaded server per process once (this module preloaded) and forks workers from it in
milliseconds.

Lifetime: workers are daemons tied to the pool by their pipes. ``close()`` (also run by a
``weakref.finalize`` when the pool is garbage-collected, and at interpreter exit) closes the task pipes,
so each worker ends after its current sample; stragglers are terminated, then killed, and every one is
joined (no zombies). If the main process dies — even by SIGKILL — the pipe reaches EOF and the workers
exit on their own. Workers ignore SIGINT: Ctrl-C reaches the whole foreground process group, and it is
the main process that decides to stop (its KeyboardInterrupt closes the pool). A worker that dies
unexpectedly (the OOM killer, a crash in a codec) raises ``DecodeWorkerError`` in the main process,
naming the worker, how it ended and the samples it held.
"""
from __future__ import annotations

import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vilex.data.config import ViewConfig
from vilex.data.decode import BadSample, decode_image
from vilex.data.sources import RawSample
from vilex.data.views import render_view
from vilex.errors import DataError

try:  # Unix only; elsewhere the loader still works, with num_workers=0
    import fcntl
    from multiprocessing.reduction import recvfds, sendfds
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

READ_AHEAD_BUDGET_BYTES = 1 << 30  # the default window never reads ahead more decoded pixels than this
STOP_GRACE_S = 2.0  # how long close() lets a worker finish its current sample before terminating it
# Handed-out batch buffers kept for reuse: 2 to 4, and no more than SPARE_BUDGET_BYTES when batches are big. A
# training loop holds the previous batch while the next is filled, so with 2 the one before is free again.
SPARE_BUFFERS = (2, 4)
SPARE_BUDGET_BYTES = 1 << 30

# One item of the loader's order: (position after it, key, reader of its raw bytes).
Item = tuple[Any, str, Callable[[], RawSample]]


class DecodeWorkerError(DataError):
    """A decode worker process died (killed, out of memory, crashed in a codec)."""


def default_start_method() -> str:
    """``forkserver`` where available (Linux, macOS), else ``spawn``; never ``fork`` (see the module docstring)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def sample_bytes(views: Mapping[str, ViewConfig]) -> int:
    """Bytes of one decoded sample: a float32 (3, size, size) tensor per view."""
    return sum(3 * view.size * view.size * 4 for view in views.values())


def default_window(num_workers: int, batch_size: int, views: Mapping[str, ViewConfig]) -> int:
    """Samples read ahead of the consumer: a batch plus two per worker, so the workers keep decoding the next
    batch while the training step runs; capped at ``READ_AHEAD_BUDGET_BYTES`` of pixels, but never below two
    per worker (one decoding, one queued)."""
    cap = max(1, READ_AHEAD_BUDGET_BYTES // max(1, sample_bytes(views)))
    return max(2 * num_workers, min(batch_size + 2 * num_workers, cap))


def _batch_tensors(buffer: Any, batch_size: int, views: Mapping[str, ViewConfig]) -> dict[str, torch.Tensor]:
    """A ``(batch_size, 3, size, size)`` float32 tensor per view, one after the other in ``buffer``.

    The tensors keep the buffer (a mapping) alive: it is unmapped when the last of them is freed."""
    tensors, offset = {}, 0
    for name, view in views.items():
        count = batch_size * 3 * view.size * view.size
        tensors[name] = torch.frombuffer(buffer, dtype=torch.float32, count=count, offset=offset).view(
            batch_size, 3, view.size, view.size)
        offset += count * 4
    return tensors


def _shared_file(nbytes: int) -> int:
    """A file descriptor of ``nbytes`` of shared memory with no name (nothing to clean up after a crash)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("vilex-batch", os.MFD_CLOEXEC)
    else:  # macOS: an unlinked temporary file, paged through the page cache
        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, nbytes)
    return fd


class _Buffer:
    """One batch's rows, every view, in a shared file the workers map once and write into."""

    def __init__(self, ident: int, batch_size: int, views: Mapping[str, ViewConfig]) -> None:
        self.id, self.batch_size, self.views = ident, batch_size, views
        self.fd = _shared_file(batch_size * sample_bytes(views))
        self._view = memoryview(mmap.mmap(self.fd, batch_size * sample_bytes(views)))
        self.tensors: dict[str, torch.Tensor] | None = _batch_tensors(self._view, batch_size, views)

    def hand_out(self) -> dict[str, torch.Tensor]:
        """The tensors, now the caller's: this buffer keeps no reference to them."""
        tensors, self.tensors = self.tensors, None
        assert tensors is not None
        return tensors

    def reclaim(self) -> bool:
        """Take the buffer back if no tensor handed out uses it any more (then fresh tensors over it).

        ``torch.frombuffer`` keeps a reference to ``self._view`` in the storage of every tensor it made, until
        the last tensor, view or storage sharing that memory is freed; so references beyond this attribute
        (and ``getrefcount``'s own argument) mean the consumer still holds some of the batch."""
        if sys.getrefcount(self._view) > 2:
            return False
        self.tensors = _batch_tensors(self._view, self.batch_size, self.views)
        return True

    def forget(self) -> None:
        """Drop this side's handle; tensors still in use keep the memory mapped until they go."""
        self.tensors = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


@dataclass
class _Record:
    """One item read ahead, in loader order, until the consumer takes it."""

    position_after: Any
    key: str
    raw: RawSample | None = None
    bad: BadSample | None = None  # the read itself failed (unreadable, bad_shard, ...)
    error: BaseException | None = None  # a source error, raised when the consumer gets here
    seq: int = -1  # the decode task, once sent


class _Worker:
    def __init__(self, index: int, process: Any, tasks: Any, task_socket: socket.socket, results: Any) -> None:
        self.index, self.process, self.tasks, self.task_socket, self.results = index, process, tasks, task_socket, results
        self.pending: set[int] = set()  # decode tasks sent and not yet answered (its load)
        self.mapped: set[int] = set()  # the buffers this worker has mapped


class DecodePool:
    """``num_workers`` decode processes; ``decode_in_order`` runs one pass over an order through them."""

    def __init__(self, num_workers: int, views: Mapping[str, ViewConfig], *, max_pixels: int, min_side: int,
                 window: int, name: str = "loader", start_method: str | None = None) -> None:
        if num_workers < 1 or window < 1:
            raise ValueError(f"need num_workers >= 1 and window >= 1, got {num_workers} and {window}")
        if fcntl is None or not hasattr(socket, "AF_UNIX"):
            raise DataError("data.num_workers > 0 needs a Unix system (decoded batches are passed as shared files)")
        self.num_workers, self.window, self.name = num_workers, window, name
        self.start_method = start_method or default_start_method()
        self.views = dict(views)
        self.tasks_sent = 0  # decode tasks handed to workers over the pool's life (tests count re-decoding)
        self._seq = 0
        self._inflight: dict[int, tuple[_Worker, str]] = {}  # decode task -> its worker, the sample's key
        self._done: dict[int, tuple[Any, ...] | None] = {}  # decode task -> None (decoded) or the failure
        self._held: dict[int, _Worker] = {}  # decoded, the views kept by this worker until placed
        self._placing: dict[int, _Worker] = {}  # told where to put them, not yet confirmed
        self._generation = 0
        self._closed = False
        self._buffer_ids = 0
        self._spare: list[_Buffer] = []  # handed out (maybe still in use), oldest first: reused once let go of
        self._workers = self._start_workers(max_pixels, min_side)
        self._finalizer = weakref.finalize(self, _stop_workers, [(w.process, w.tasks, w.task_socket, w.results)
                                                                 for w in self._workers])
        log.info("%s: decoding in %d worker processes (%s), up to %d samples ahead", name, num_workers,
                 self.start_method, window)

    def _start_workers(self, max_pixels: int, min_side: int) -> list[_Worker]:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # The server imports this module (torch included) once; every worker forked from it starts warm.
            # Only effective before the process's forkserver first starts; harmless afterwards.
            ctx.set_forkserver_preload(["__main__", __name__])
        workers: list[_Worker] = []
        try:
            for index in range(self.num_workers):
                task_reader, task_writer = ctx.Pipe(duplex=True)  # a Unix socket pair: it can carry fds
                result_reader, result_writer = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_worker_main, name=f"vilex-decode-{index}", daemon=True,
                                      args=(task_reader, result_writer, self.views, max_pixels, min_side))
                process.start()
                # Only the worker may hold its ends: EOF on a pipe must mean "the other side is gone".
                task_reader.close()
                result_writer.close()
                _widen_pipe(result_reader)
                task_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(task_writer.fileno()))
                workers.append(_Worker(index, process, task_writer, task_socket, result_reader))
        except BaseException:
            _stop_workers([(w.process, w.tasks, w.task_socket, w.results) for w in workers])
            raise
        return workers

    # ------------------------------------------------------------------ public
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop and reap every worker (idempotent)."""
        self._closed = True
        for table in (self._inflight, self._done, self._held, self._placing):
            table.clear()
        self._finalizer()

    def decode_in_order(self, items: Iterator[Item], batch_size: int) -> DecodeRun:
        """One pass over ``items`` (the loader's order): iterate it for the outcomes, take batches from it.

        Starting another pass ends this one: one pass at a time."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the decode pool is closed")
        self._discard_stale()
        self._release()  # an unclosed earlier pass may have left kept samples in the workers
        self._generation += 1
        return DecodeRun(self, items, batch_size, self._generation)

    # ------------------------------------------------------------------ messages
    def _send(self, worker: _Worker, message: tuple[Any, ...], fd: int | None = None) -> None:
        try:
            worker.tasks.send(message)
            if fd is not None:
                sendfds(worker.task_socket, [fd])
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            self._collect(timeout=0.5)  # report how it ended
            raise self._death(worker) from None

    def _submit(self, data: bytes, key: str) -> int:
        """Send one sample's bytes to the least busy worker."""
        worker = min(self._workers, key=lambda w: len(w.pending))
        seq = self._seq
        self._seq += 1
        self._send(worker, ("task", seq, data))
        worker.pending.add(seq)
        self._inflight[seq] = (worker, key)
        self.tasks_sent += 1
        return seq

    def _place(self, seq: int, buffer: _Buffer, row: int) -> None:
        """Tell the worker holding decoded sample ``seq`` to copy it into ``row`` of ``buffer``."""
        worker = self._held.pop(seq)
        if buffer.id not in worker.mapped:
            self._send(worker, ("map", buffer.id), fd=buffer.fd)
            worker.mapped.add(buffer.id)
        self._send(worker, ("place", seq, buffer.id, row))
        self._placing[seq] = worker

    def _buffer(self, batch_size: int) -> _Buffer:
        """A batch buffer: a spare one the consumer has let go of, else a new one."""
        for spare in self._spare:
            if spare.batch_size == batch_size and spare.reclaim():
                self._spare.remove(spare)
                return spare
        self._buffer_ids += 1
        return _Buffer(self._buffer_ids, batch_size, self.views)

    def _retire(self, buffer: _Buffer) -> None:
        """Keep a handed-out (or unused) buffer to reuse; beyond a few, forget the oldest."""
        buffer.tensors = None
        self._spare.append(buffer)
        fewest, most = SPARE_BUFFERS
        keep = max(fewest, min(most, SPARE_BUDGET_BYTES // max(1, buffer.batch_size * sample_bytes(self.views))))
        while len(self._spare) > keep:
            oldest = self._spare.pop(0)
            for worker in self._workers:
                if oldest.id in worker.mapped:
                    worker.mapped.discard(oldest.id)
                    try:
                        worker.tasks.send(("unmap", oldest.id))
                    except OSError:
                        pass  # a dead worker is reported when next used
            oldest.forget()

    def _wait_placed(self, seqs: list[int]) -> None:
        while any(seq in self._placing for seq in seqs):
            self._collect(timeout=None)

    def _release(self) -> None:
        """Tell every worker to drop the samples it keeps (after the messages it already has)."""
        for worker in self._workers:
            try:
                worker.tasks.send(("release",))
            except OSError:
                pass  # a dead worker is reported when next used

    def _result(self, seq: int) -> tuple[Any, ...] | None:
        while seq not in self._done:
            if seq not in self._inflight:
                raise RuntimeError(f"{self.name}: decode task {seq} was lost")  # a bug, not a data problem
            self._collect(timeout=None)
        return self._done.pop(seq)

    def _collect(self, timeout: float | None) -> None:
        """Wait for answers (or a worker's death) and file them."""
        by_handle: dict[Any, _Worker] = {}
        for worker in self._workers:
            by_handle[worker.results] = worker
            by_handle[worker.process.sentinel] = worker
        ready = multiprocessing.connection.wait(list(by_handle), timeout)
        dead: list[_Worker] = []
        for handle in ready:
            worker = by_handle[handle]
            if handle is not worker.results:
                dead.append(worker)
                continue
            try:
                while worker.results.poll():
                    kind, seq, failure = worker.results.recv()
                    if kind == "placed":
                        if self._placing.pop(seq, None) is not None and failure is not None:
                            raise RuntimeError(f"{self.name}: a worker failed to store a decoded sample: {failure}")
                        continue
                    worker.pending.discard(seq)
                    if self._inflight.pop(seq, None) is not None:
                        self._done[seq] = failure
                        if failure is None:
                            self._held[seq] = worker
            except (EOFError, OSError):
                dead.append(worker)
        if dead:
            raise self._death(dead[0])

    def _death(self, worker: _Worker) -> DecodeWorkerError:
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        held = [key for _, (owner, key) in sorted(self._inflight.items()) if owner is worker]
        holding = f" while decoding {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}" if held else ""
        return DecodeWorkerError(f"{self.name}: decode worker {worker.index} of {self.num_workers} "
                                 f"(pid {worker.process.pid}) {how}{holding}; set data.num_workers to 0 to decode "
                                 f"in the training process")

    def _discard_stale(self) -> None:
        """Wait out the messages of an abandoned pass, so loads and tables start from zero."""
        while self._inflight or self._placing:
            self._collect(timeout=None)
        self._done.clear()
        self._held.clear()


class DecodeRun:
    """One pass of a ``DecodePool`` over the loader's order.

    Iterating yields ``(position_after, key, outcome)`` per item, in order: ``outcome`` is the ``BadSample``, or
    the ``RawSample`` (key, meta) of a decoded sample, the ``good``-th of the pass. ``take_batch()`` hands out the
    batch holding the latest decoded sample (``batch_size`` rows, fewer for the pass's last one)."""

    def __init__(self, pool: DecodePool, items: Iterator[Item], batch_size: int, generation: int) -> None:
        self.pool, self.items, self.batch_size, self.generation = pool, items, batch_size, generation
        self.good = 0
        self._buffers: dict[int, _Buffer] = {}  # batch of this pass -> its buffer, until handed out
        self._rows: dict[int, list[int]] = {}  # batch -> the decode tasks placed into it
        self._records: deque[_Record] = deque()
        self._outcomes = self._run()

    def __iter__(self) -> DecodeRun:
        return self

    def __next__(self) -> tuple[Any, str, BadSample | RawSample]:
        return next(self._outcomes)

    def close(self) -> None:
        """End the pass: drop the batches not handed out and tell the workers to forget this pass."""
        self._outcomes.close()
        if self.generation == self.pool._generation and not self.pool.closed:
            for buffer in self._buffers.values():  # filled in part, never handed out: spare at once
                self.pool._retire(buffer)
            self.pool._release()
        self._buffers.clear()

    def take_batch(self) -> dict[str, torch.Tensor]:
        """The batch of the latest decoded sample, as tensors the caller owns (rows up to that sample), once every
        row is in place. Call it before ``close()``, also for the pass's last, partial batch."""
        if self.good == 0:
            raise RuntimeError("no decoded sample to take a batch of")
        batch = (self.good - 1) // self.batch_size
        rows = self.good - batch * self.batch_size
        try:
            self.pool._wait_placed(self._rows.pop(batch, []))
        except BaseException:
            self._fail()
            raise
        buffer = self._buffers.pop(batch, None)
        if buffer is None:
            return {}  # no views: nothing was decoded into memory
        tensors = buffer.hand_out()
        self.pool._retire(buffer)
        return {name: t if rows == self.batch_size else t[:rows] for name, t in tensors.items()}

    # ------------------------------------------------------------------ internals
    def _fill(self) -> bool:
        """Read ahead and send until the window is full; False once the order is exhausted."""
        while len(self._records) < self.pool.window:
            record = self._read_ahead()
            if record is None:
                return False
            if record.raw is not None:
                record.seq = self.pool._submit(record.raw.data, record.key)
            self._records.append(record)
            if record.error is not None:
                return False  # nothing after a source error is read: it ends the pass there
        return True

    def _read_ahead(self) -> _Record | None:
        try:
            position_after, key, read = next(self.items)
        except StopIteration:
            return None
        except Exception as error:  # noqa: BLE001 - raised when the consumer reaches this point, as in-process
            return _Record(None, "", error=error)
        try:
            return _Record(position_after, key, raw=read())
        except BadSample as bad:
            return _Record(position_after, key, bad=bad)
        except Exception as error:  # noqa: BLE001 - same: deferred to its place in the order
            return _Record(position_after, key, error=error)

    def _place(self, seq: int) -> None:
        """Now that every sample before it is settled, ``seq``'s row is known: have its worker put it there."""
        batch, row = divmod(self.good, self.batch_size)
        if not self.pool.views:
            self.pool._held.pop(seq, None)
            return
        if batch not in self._buffers:
            self._buffers[batch] = self.pool._buffer(self.batch_size)
        self.pool._place(seq, self._buffers[batch], row)
        self._rows.setdefault(batch, []).append(seq)

    def _run(self) -> Iterator[tuple[Any, str, BadSample | RawSample]]:
        pool = self.pool
        more = True
        try:
            while True:
                if self.generation != pool._generation:
                    raise RuntimeError(f"{pool.name}: iterated again while an earlier iterator was still in use; "
                                       f"use one iterator of a loader at a time")
                if more:
                    more = self._fill()
                if not self._records:
                    return
                head = self._records.popleft()
                if head.error is not None:
                    raise head.error
                if head.bad is not None:
                    yield head.position_after, head.key, head.bad
                    continue
                failure = pool._result(head.seq)
                if failure is None:
                    self._place(head.seq)
                    self.good += 1
                    yield head.position_after, head.key, head.raw  # type: ignore[misc]
                elif failure[0] == "bad":
                    yield head.position_after, head.key, BadSample(failure[1], failure[2])
                else:
                    raise RuntimeError(f"{pool.name}: decoding {head.key} in a worker raised {failure[1]}\n"
                                       f"--- worker traceback ---\n{failure[2]}")
        except GeneratorExit:
            raise  # abandoned mid-epoch: the next pass waits out the messages still in flight
        except BaseException:
            self._fail()
            raise

    def _fail(self) -> None:
        """KeyboardInterrupt, a dead worker, a source error: the workers must not outlive the failure (unless
        this pass was superseded: the pool then belongs to the newer one)."""
        if self.generation == self.pool._generation:
            self.pool.close()


def _widen_pipe(connection: Any) -> None:
    """Room for every answer a worker can owe (at most a window of decodes plus a batch of placements), so
    a worker's task-reading thread never blocks answering while the main process is busy sending to it."""
    if fcntl is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default 64 KiB still holds ~1000 answers


def _stop_workers(workers: list[tuple[Any, Any, socket.socket, Any]]) -> None:
    """Close the task pipes (each worker ends after its current sample), then terminate, kill and reap."""
    for _, tasks, task_socket, _ in workers:
        for end in (tasks, task_socket):
            try:
                end.close()
            except OSError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for process, _, _, _ in workers:
        if process.pid is not None:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        for process, _, _, _ in workers:
            if process.pid is not None and process.is_alive():
                getattr(process, stop)()
                process.join(timeout=1.0)
    for _, _, _, results in workers:
        try:
            results.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------- the worker process
def _worker_main(tasks: Any, results: Any, views: dict[str, ViewConfig], max_pixels: int, min_side: int) -> None:
    """Two threads. This one decodes ``("task", seq, bytes)``, keeps the views and answers ``("done", seq,
    None | failure)``. The task-reading thread handles the rest at once, even mid-decode: ``("map", id)`` + an fd
    maps a batch buffer, ``("unmap", id)`` drops it, ``("place", seq, id, row)`` copies a kept sample into that
    row and answers ``("placed", seq, None | error)``, ``("release",)`` drops every kept sample; EOF ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop (module docstring)
    torch.set_num_threads(1)  # one core per worker: more threads only oversubscribe the machine
    task_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(tasks.fileno()))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    kept: dict[int, dict[str, torch.Tensor]] = {}  # decoded samples waiting for their row
    send_lock = threading.Lock()  # both threads answer on the one results pipe

    def answer(message: tuple[Any, ...]) -> None:
        with send_lock:
            results.send(message)

    def pump() -> None:
        # Reading tasks continuously also means the main process never blocks sending a large image to a
        # worker that is busy decoding.
        buffers: dict[int, dict[str, torch.Tensor]] = {}
        per_sample = sample_bytes(views)
        try:
            while True:
                message = tasks.recv()
                kind = message[0]
                if kind == "task":
                    inbox.put(message)
                elif kind == "map":
                    fd = recvfds(task_socket, 1)[0]
                    try:
                        size = os.fstat(fd).st_size
                        buffers[message[1]] = _batch_tensors(mmap.mmap(fd, size), size // per_sample, views)
                    finally:
                        os.close(fd)
                elif kind == "unmap":
                    buffers.pop(message[1], None)  # unmapped once its tensors go
                elif kind == "place":
                    _, seq, ident, row = message
                    error = None
                    try:
                        sample = kept.pop(seq)
                        for name, tensor in sample.items():
                            buffers[ident][name][row].copy_(tensor)
                    except Exception as e:  # noqa: BLE001 - reported in the main process
                        error = f"{type(e).__name__}: {e}"
                    answer(("placed", seq, error))
                elif kind == "release":
                    kept.clear()
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=pump, name="tasks", daemon=True).start()
    while True:
        message = inbox.get()
        if message is None:
            return
        _, seq, data = message
        failure: tuple[Any, ...] | None = None
        try:
            image = decode_image(data, max_pixels=max_pixels, min_side=min_side)
            kept[seq] = {name: render_view(image, view) for name, view in views.items()}
        except BadSample as bad:
            failure = ("bad", bad.reason, bad.detail)
        except Exception as error:  # noqa: BLE001 - a bug or a codec crash: reported in the main process
            failure = ("error", f"{type(error).__name__}: {error}", traceback.format_exc())
        try:
            answer(("done", seq, failure))
        except OSError:
            return  # the main process is gone

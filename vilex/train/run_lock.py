"""train/run_lock.py — one writer per run folder.

Two runs on one output folder (a double-submitted job, a forgotten tmux pane) would interleave their checkpoints
and logs. A run therefore holds ``<output_dir>/.run.lock`` (created with O_EXCL: exactly one creator wins) naming its
host, PID and start time; a second run refuses in one line naming the holder. A lock whose holder is gone (same host,
PID no longer running) is taken over with a warning. On another host liveness cannot be checked, so the message
says which file to delete once that run is known to be gone. Multi-process runs hold one lock, taken by rank 0.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from vilex.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"


class RunLockedError(UserError):
    """The run folder is held by another live run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunLock:
    """``acquire()`` / ``release()`` the lock of one run folder (re-entrant within one process)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _me(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # a holder killed between create and write: nobody can be running under it
            return {"host": socket.gethostname(), "pid": -1, "since": "?"}

    def acquire(self) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a few rounds: another process may take over the same stale lock at the same moment
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released just now
                same_host = holder.get("host") == socket.gethostname()
                if same_host and holder.get("pid") == os.getpid():
                    break  # this process already holds it (e.g. a trainer rebuilt after an error)
                if same_host and not _alive(int(holder.get("pid", -1))):
                    log.warning("run folder %s: taking over the lock of pid %s (started %s), which is no longer "
                                "running", self.path.parent, holder.get("pid"), holder.get("since"))
                    stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                    try:
                        os.rename(self.path, stale)  # atomic: one taker wins, the others retry
                        os.unlink(stale)
                    except FileNotFoundError:
                        pass
                    continue
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"since {holder.get('since')}); use another output folder, or wait for that run. If it is gone "
                    f"(e.g. its host crashed), delete {self.path}") from None
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(self._me()))
                break
        else:
            raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

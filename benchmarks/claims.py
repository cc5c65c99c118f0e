"""benchmarks/claims.py — claim files: several sweeps share one output_dir and never run the same pair twice.

Before a sweep runs a (model, task) pair it creates ``<key>.claim`` beside the pair's result folder with
``O_CREAT | O_EXCL``: exactly one process can create it, on a local disk and on NFS alike. The file holds the
holder's host, pid, process start time, a per-sweep token and when it was taken. The holder removes it once the
pair's result (or error) is written, so a pair is either finished, claimed, or free.

A claim is **stale** when its holder is gone: same host, and no process with that pid and start time exists (a
sweep killed with SIGKILL, a crashed node that came back). A stale claim is taken over with a warning. A claim
held from another host cannot be checked from here: it stays held until that sweep removes it (or a person does;
the log names the file). Taking over goes through a short ``.takeover`` lock so that two sweeps that both find the
same stale claim do not both take it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

HOST = socket.gethostname()
# a claim or takeover lock whose content cannot be read (its writer died between create and write) is treated as
# held for this long, then as stale
UNREADABLE_GRACE_S = 60.0


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), so a reused pid is told
    apart from the process that took the claim; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


@dataclass(frozen=True)
class Holder:
    """Who holds a claim."""

    host: str
    pid: int
    proc_start: str | None
    token: str
    since: str

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid} since {self.since}"


def new_holder() -> Holder:
    """This process as a claim holder; the token tells this sweep's claims apart from an earlier process that had
    the same pid."""
    return Holder(HOST, os.getpid(), _proc_start(os.getpid()), uuid.uuid4().hex[:12],
                  datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def read_claim(path: Path) -> Holder | None | str:
    """The holder of claim ``path``; None when there is no claim; "unreadable" for a file without valid content."""
    try:
        data = json.loads(path.read_text())
        return Holder(**{k: data[k] for k in ("host", "pid", "proc_start", "token", "since")})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def holder_alive(holder: Holder, me: Holder) -> bool | None:
    """True / False for a holder on this host; None when it is on another host (cannot be checked from here)."""
    if holder.token == me.token:
        return True
    if holder.host != HOST:
        return None
    if holder.pid == me.pid:
        return False  # an earlier process with our pid (ours would carry our token)
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's process
    start = _proc_start(holder.pid)
    return not (holder.proc_start and start and start != holder.proc_start)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def is_stale(path: Path, holder: Holder | str, me: Holder) -> bool:
    if holder == "unreadable":
        return _age_s(path) > UNREADABLE_GRACE_S
    assert isinstance(holder, Holder)
    return holder_alive(holder, me) is False


def _create(path: Path, me: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(me)))
        f.flush()
        os.fsync(f.fileno())
    return True


def try_claim(path: Path, me: Holder) -> tuple[bool, Holder | str | None]:
    """Claim ``path`` for ``me``. Returns (True, None) when ``me`` now holds it, (True, OLD) when it took over the
    stale claim of OLD, (False, HOLDER) when a live (or unverifiable) holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path, me):
        return True, None
    holder = read_claim(path)
    if holder is None:  # released between our create and read
        return (True, None) if _create(path, me) else (False, read_claim(path))
    if isinstance(holder, Holder) and holder.token == me.token:
        return True, None
    if not is_stale(path, holder, me):
        return False, holder
    lock = path.with_name(path.name + ".takeover")
    if not _create(lock, me):
        if _age_s(lock) <= UNREADABLE_GRACE_S:
            return False, holder  # another sweep is taking it over right now
        lock.unlink(missing_ok=True)  # its taker died mid-takeover
        if not _create(lock, me):
            return False, holder
    try:
        if read_claim(path) != holder:  # changed hands while we looked
            return False, read_claim(path)
        path.unlink(missing_ok=True)
        if not _create(path, me):
            return False, read_claim(path)
        return True, holder
    finally:
        lock.unlink(missing_ok=True)


def release(path: Path, me: Holder) -> None:
    """Remove ``path`` if ``me`` holds it (never another holder's claim)."""
    holder = read_claim(path)
    if isinstance(holder, Holder) and holder.token == me.token:
        path.unlink(missing_ok=True)

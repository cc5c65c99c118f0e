"""checkpoint.py — atomic checkpoint folders: safetensors + JSON config, keep-last-K, load by path.

A checkpoint is a folder. It is written under a hidden temp name (``.tmp-<name>-<pid>``) in the
same parent, flushed to disk, then renamed into place — a rename within one filesystem is atomic,
so a loader never sees a half-written checkpoint: a process killed mid-save leaves only a hidden
temp folder (ignored by loaders, cleaned by the next save) and the previous checkpoints intact.

``atomic_dir`` is the primitive (any writer — ``save_pretrained``, DeepSpeed, accelerate — can
write inside it); ``CheckpointManager`` adds numbered ``checkpoint-<step>`` folders, keep-last-K
and ``latest()`` for ``--resume auto``.

Every published folder carries ``manifest.json``: each file's size and xxh3-128 hash, written just before the
rename. ``verify_folder`` re-reads them, so a truncated copy, a full disk during an rsync or bit rot on shared
storage is caught by name before anything is loaded: ``--resume auto`` takes the newest checkpoint that verifies
(saying which newer ones it skipped and why), and loaders refuse a corrupt folder in one line. Hashing runs at
about 4-5 GB/s per core (scripts/bench/checkpoint_manifest.py), well under the cost of writing or reading the files.
Folders written before manifests existed load unverified, with a note.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from vilex.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
_HASH_BLOCK = 8 << 20
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(path: Path) -> None:
    """Flush every file (and the folder entries) under ``path`` to disk before the rename."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes (hex), read in 8 MiB blocks."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Record every file under ``folder`` (relative path -> size, xxh3-128) in ``folder/manifest.json``."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3_128": file_hash(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"format": 1, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


class CorruptFolderError(UserError):
    """A folder whose files do not match its manifest (missing, truncated, or changed bytes)."""


def folder_problem(folder: str | Path, hashes: bool = True, skip: Callable[[str], bool] | None = None) -> str | None:
    """What is wrong with ``folder`` against its manifest (None = it verifies, or it has no manifest).

    ``hashes=False`` checks presence and sizes only (a stat per file): cheap enough for large derived data whose
    contents are hashed lazily where they are read. ``skip(relative_name)`` leaves out files a reader does not use
    (e.g. the optimizer state when a checkpoint is only evaluated)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} is unreadable"
    for name, want in files.items():
        if skip is not None and skip(name):
            continue
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} is {'truncated' if size < want['size'] else 'longer than written'} ({size} of " \
                   f"{want['size']} bytes)"
        if hashes and file_hash(p) != want["xxh3_128"]:
            return f"{name} has changed bytes (content hash differs from the manifest)"
    return None


def verify_folder(folder: str | Path, what: str = "checkpoint", hashes: bool = True,
                  skip: Callable[[str], bool] | None = None) -> None:
    """Raise ``CorruptFolderError`` (one line naming the bad file) if ``folder`` does not match its manifest."""
    folder = Path(folder)
    problem = folder_problem(folder, hashes=hashes, skip=skip)
    if problem is not None:
        raise CorruptFolderError(f"{what} {folder} is corrupt: {problem}")
    if not (folder / MANIFEST_NAME).is_file():
        log.info("%s %s has no %s (written before manifests existed): loaded unverified", what, folder,
                 MANIFEST_NAME)


def temp_dir_for(final: str | Path, tag: str | int | None = None) -> Path:
    """The hidden temp folder a save of ``final`` writes into (``tag`` defaults to this pid).

    Multi-process saves pass a tag all ranks agree on (e.g. the step) so they share one folder.
    """
    final = Path(final)
    return final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid() if tag is None else tag}"


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Write ``tmp``'s manifest, flush it to disk and rename it to ``final`` (replacing an existing ``final``)
    atomically."""
    tmp, final = Path(tmp), Path(final)
    write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():
        trash = final.parent / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on normal exit it becomes ``final`` atomically.

    If ``final`` already exists it is replaced (old one moved aside first, then deleted). On an
    exception the temp folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
FINGERPRINT_CHUNK = 1 << 16


def folder_fingerprint(path: str | Path) -> str | None:
    """A cheap content fingerprint of a local model folder's weight files, or None when ``path`` is not a local
    folder (a hub id). Hashes each weight file's relative path, size and three 64 KiB samples (start, middle, end):
    retrained or replaced weights change it, a copy of the same files does not, and a multi-GB model costs a few
    reads."""
    import hashlib

    root = Path(path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in root.rglob("*") if q.is_file() and q.suffix in WEIGHT_SUFFIXES):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}:{size}".encode())
        with f.open("rb") as fh:
            for offset in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
                fh.seek(offset)
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()[:16]


def save_tensors(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None,
                 weights_name: str = WEIGHTS_NAME) -> None:
    """Write ``tensors`` as safetensors and ``config`` as JSON into an (existing) folder."""
    folder = Path(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / weights_name))
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def load_tensors(folder: str | Path, weights_name: str = WEIGHTS_NAME) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (tensors, config) from a checkpoint folder; a missing folder or file is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder not found: {folder}")
    wfile = folder / weights_name
    if not wfile.is_file():
        raise UserError(f"{folder} is not a checkpoint: {weights_name} missing")
    cfile = folder / CONFIG_NAME
    config = json.loads(cfile.read_text()) if cfile.is_file() else {}
    return load_safetensors(wfile), config


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a damaged file reported by name in one line."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type (truncated header or data), or an OSError
        raise CorruptFolderError(f"{path} cannot be read ({e}): the file is damaged (truncated or overwritten)") \
            from None


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    """Atomically write a safetensors + config.json checkpoint folder."""
    with atomic_dir(folder) as tmp:
        save_tensors(tmp, tensors, config)
    return Path(folder)


class CheckpointManager:
    """Numbered checkpoints ``<root>/checkpoint-<step>``: atomic save, keep last K, find latest."""

    def __init__(self, root: str | Path, keep_last: int | None = 3) -> None:
        if keep_last is not None and keep_last < 1:
            raise UserError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp/trash folders are never listed)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def clean_stale(self) -> None:
        """Remove temp/trash folders left by a process killed mid-save."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                log.warning("removing incomplete checkpoint folder %s (left by an interrupted save)", p)
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Call ``write(tmp_folder)`` and publish it atomically as ``checkpoint-<step>``; prune old ones."""
        self.clean_stale()
        final = self.path_for(step)
        with atomic_dir(final) as tmp:
            write(tmp)
        self.prune()
        return final

    def prune(self) -> None:
        if self.keep_last is None:
            return
        for old in self.list()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_verified(self, problem_of: Callable[[Path], str | None] = folder_problem) -> Path | None:
        """The newest checkpoint without a problem (by default: that verifies against its manifest); newer ones with
        a problem are named in a warning. ``problem_of`` lets a reader check only what it loads."""
        for path in reversed(self.list()):
            problem = problem_of(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s, newer than the one used: %s", path, problem)
        return None

    def resolve(self, resume: str | None) -> Path | None:
        """``--resume`` semantics: None/'' -> None; 'auto' -> the newest checkpoint that verifies, or None; a path ->
        that path (it must exist and verify)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest_verified()
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: checkpoint folder not found: {path}")
        verify_folder(path, "--resume: checkpoint")
        return path

"""tar_source.py — the ``webdataset`` source: samples in ``.tar`` shards, local or remote, one shard open at a time.

Format (the webdataset convention): consecutive tar members that share a key form one sample; the
key is the member path up to the first dot of its file name, the rest is the extension
(``a/0001.jpg`` + ``a/0001.txt`` + ``a/0001.json`` -> key ``a/0001``). The image is the first of
``IMAGE_EXTENSIONS`` present; ``.txt`` becomes ``meta["txt"]``; a ``.json`` object is merged into
the metadata (a non-object goes to ``meta["json"]``). Other extensions are ignored.

Paths: files, globs, brace patterns, or a folder, which stands for its ``*.tar`` files, sorted — so an
img2dataset output folder (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json`` ...) is read as it
is, its samples' ``.txt`` caption in ``meta["txt"]`` and their ``.json`` fields (url, key, width, ...)
in the metadata. Each of these may also be an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``https://``),
read with range requests (vilex/data/remote.py; settings: ``remote.*``).

Why Python's ``tarfile`` and not the ``webdataset`` package: resuming must be exact and cheap. We
open a shard, list its member headers (``tarfile`` seeks past member data, so listing reads no
image bytes from a local file; remotely it reads what the listing's read-ahead window covers, see
remote.py), and then read sample j by seeking to it: its members are read as one byte range. A
resume at (shard, sample) therefore reads and decodes nothing before the position, and every
failure is classified by our own skip reasons; webdataset's pipeline (and its ``pipe:`` URLs) would
have to stream through the shard and its error handlers either raise or warn-and-continue.
``pipe:`` shards are refused for that reason: a pipe cannot seek, so a resume would re-read the
shard up to its position; the URL the pipe would fetch is read directly instead.

A shard that cannot be opened, or whose listing breaks off (a truncated tar), counts one
``bad_shard`` skip; the samples listed before the break are still read. A REMOTE failure that
outlives ``remote.retries`` either stops the run (``remote.on_error: raise``) or, by default, is
skipped: while listing, as one ``bad_shard`` with none of the shard's samples; while reading, the
sample and every later one of that shard count as ``remote_error`` without further requests, and the
run goes on with the next shard.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from vilex.data import remote
from vilex.data.config import RemoteConfig
from vilex.data.decode import BadSample
from vilex.data.sources import IMAGE_SOURCES, RawSample, ShardedImageSource, ShardReader, expand_paths
from vilex.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
# Members of one sample closer than this are read in one request (the 512-byte headers between them and small
# sidecars ride along); a larger ignored member in between (say a .npy) is skipped with a second request.
COALESCE_GAP_BYTES = 64 * 1024


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/0001.seg.png"`` -> ``("dir/0001", "seg.png")``: the key ends at the file name's first dot."""
    folder, _, file_name = name.rpartition("/")
    stem, dot, extension = file_name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, extension.lower() if dot else ""


class TarShardReader(ShardReader):
    """An open tar shard: its samples grouped by key, each read by position as one byte range."""

    def __init__(self, path: Path | str, remote_cfg: RemoteConfig | None = None) -> None:
        self.path = path
        self.is_remote = remote.is_url(str(path))
        self.name = str(path) if self.is_remote else Path(path).name
        self.keys: list[str] = []
        self.members: list[dict[str, tarfile.TarInfo]] = []  # per sample: extension -> member
        self.error: str | None = None
        self._remote_cfg = remote_cfg or RemoteConfig()
        self._tar: tarfile.TarFile | None = None
        self._listing: remote.RetryingFile | None = None  # remote: the read-ahead handle tarfile lists through
        self._data: Any = None  # where member bytes are read from (opened on the first read)
        self._failed: str | None = None  # a remote read failed for good: the rest of the shard is skipped
        try:
            if self.is_remote:
                self._listing = remote.open_remote(str(path), self._remote_cfg, cache_type="readahead")
                self._tar = tarfile.open(fileobj=self._listing, mode="r:*")  # type: ignore[call-overload]
            else:
                self._tar = tarfile.open(path, "r:*")
            self._list_members()
        except remote.RemoteReadError as e:
            self.close()
            self._give_up(e)
            self.keys, self.members, self.error = [], [], str(e)
        except (tarfile.TarError, OSError, EOFError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def _list_members(self) -> None:
        assert self._tar is not None
        while True:
            member = self._tar.next()  # seeks past member data: no image bytes are read here
            if member is None:
                self._check_end_of_archive()
                return
            key, extension = split_member_name(member.name)
            if member.isdir() and not extension:
                continue  # a folder entry ("train/") is structure, not a sample
            if not self.keys or self.keys[-1] != key:
                self.keys.append(key)
                self.members.append({})
            self.members[-1].setdefault(extension, member)

    def _check_end_of_archive(self) -> None:
        """``tarfile`` stops quietly at a cut or garbled header; a complete tar ends with a zero block."""
        assert self._tar is not None
        self._tar.fileobj.seek(self._tar.offset)
        block = self._tar.fileobj.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive block at byte {self._tar.offset}: truncated or corrupt tar")

    def read(self, position: int) -> RawSample:
        members = self.members[position]
        image_extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if image_extension is None:
            raise BadSample("missing_image", f"extensions present: {', '.join(sorted(members))}")
        if self._failed is not None:  # no request for a shard whose remote has failed past the retries
            raise BadSample(remote.REMOTE_SKIP_REASON, f"an earlier read of this shard failed: {self._failed}")
        wanted = [members[e] for e in ("txt", "json", image_extension) if e in members]
        try:
            contents = self._read_members(wanted)
        except remote.RemoteReadError as e:
            self._give_up(e)
            self._failed = str(e)
            raise BadSample(remote.REMOTE_SKIP_REASON, str(e)) from None
        meta: dict[str, Any] = {}
        if "txt" in members:
            try:
                meta["txt"] = _content(contents, members["txt"]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadSample("corrupt", f"{members['txt'].name}: invalid UTF-8 ({e.reason})") from None
        if "json" in members:
            try:
                parsed = json.loads(_content(contents, members["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSample("corrupt", f"{members['json'].name}: invalid JSON ({e})") from None
            meta.update(parsed if isinstance(parsed, dict) else {"json": parsed})
        data = _content(contents, members[image_extension])
        return RawSample(key=self.keys[position], data=data, meta=meta)

    def _give_up(self, error: remote.RemoteReadError) -> None:
        """A remote failure past the retries: stop the run if the config says so (else the caller skips)."""
        if self._remote_cfg.on_error == "raise":
            raise DataError(f"{error} (remote.on_error is 'raise'; 'skip' would count the shard's remaining "
                            f"samples as skipped and go on)") from None

    def _read_members(self, wanted: list[tarfile.TarInfo]) -> dict[tarfile.TarInfo, bytes | BadSample]:
        """Each member's bytes, or the ``BadSample`` reading it gave. Regular members are read in byte ranges
        (adjacent ones together: one request per sample remotely); links and the like go through ``tarfile``."""
        contents: dict[tarfile.TarInfo, bytes | BadSample] = {}
        direct = sorted((m for m in wanted if m.isreg() and not m.issparse()), key=lambda m: m.offset_data)
        for member in wanted:
            if member not in direct:
                contents[member] = self._extract(member)
        runs: list[list[tarfile.TarInfo]] = []
        for member in direct:
            if runs and member.offset_data - _end(runs[-1][-1]) <= COALESCE_GAP_BYTES:
                runs[-1].append(member)
            else:
                runs.append([member])
        for run in runs:
            start, end = run[0].offset_data, max(_end(m) for m in run)
            try:
                blob = self._read_range(start, end)
            except (tarfile.TarError, OSError, EOFError) as e:
                for member in run:
                    contents[member] = BadSample("truncated", f"{member.name}: {type(e).__name__}: {e}")
                continue
            for member in run:
                data = blob[member.offset_data - start : _end(member) - start]
                contents[member] = data if len(data) == member.size else BadSample(
                    "truncated", f"{member.name}: {len(data)} of {member.size} bytes in {self.name}")
        return contents

    def _read_range(self, start: int, end: int) -> bytes:
        assert self._tar is not None
        if self._data is None:
            compressed = self._tar.fileobj is not self._listing
            if self.is_remote and not compressed:  # exact ranges, no read-ahead: samples come in shuffled order
                self._data = remote.open_remote(str(self.path), self._remote_cfg, cache_type="none")
            else:  # a local file, or a compressed stream whose offsets only its decompressor knows
                self._data = self._tar.fileobj
        self._data.seek(start)
        return self._data.read(end - start)

    def _extract(self, member: tarfile.TarInfo) -> bytes | BadSample:
        """A member that is not a plain run of bytes (a link, a directory named like an image), via ``tarfile``."""
        assert self._tar is not None
        try:
            handle = self._tar.extractfile(member)
            if handle is None:  # a directory or special file named like an image
                return BadSample("unreadable", f"{member.name} is not a regular file in {self.name}")
            data = handle.read()
        except KeyError as e:  # a link to a member that is not in the archive
            return BadSample("unreadable", f"{member.name}: broken link in tar ({e})")
        except (tarfile.TarError, OSError, EOFError) as e:
            return BadSample("truncated", f"{member.name}: {type(e).__name__}: {e}")
        if len(data) < member.size:
            return BadSample("truncated", f"{member.name}: {len(data)} of {member.size} bytes in {self.name}")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        for handle in (self._data, self._listing):
            if isinstance(handle, remote.RetryingFile):
                handle.close()
        self._data = self._listing = None


IMG2DATASET_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def img2dataset_stats(shards: list[str]) -> dict[str, int] | None:
    """The download counts img2dataset wrote beside local shards (``00000_stats.json`` next to ``00000.tar``),
    summed; None when there are none. The tars hold only the successes, so this is where failures are told."""
    totals = dict.fromkeys(IMG2DATASET_COUNTS, 0)
    found = unreadable = 0
    for shard in shards:
        if remote.is_url(shard):
            continue  # a request per shard for a side note: not worth it
        sidecar = Path(shard).with_name(f"{Path(shard).stem}_stats.json")
        if not sidecar.is_file():
            continue
        try:
            stats = json.loads(sidecar.read_text())
            counts = {name: int(stats.get(name, 0)) for name in IMG2DATASET_COUNTS}
        except (OSError, ValueError, TypeError, AttributeError):
            unreadable += 1
            continue
        found += 1
        for name, value in counts.items():
            totals[name] += value
    if not found and not unreadable:
        return None
    return {"stats_files": found, **totals, **({"unreadable_stats_files": unreadable} if unreadable else {})}


def _end(member: tarfile.TarInfo) -> int:
    return member.offset_data + member.size


def _content(contents: dict[tarfile.TarInfo, bytes | BadSample], member: tarfile.TarInfo) -> bytes:
    value = contents[member]
    if isinstance(value, BadSample):
        raise value
    return value


@IMAGE_SOURCES.register("webdataset")
class TarShardSource(ShardedImageSource):
    """Webdataset-style ``.tar`` shards: paths, globs, brace patterns, folders (their ``*.tar``), or fsspec URLs."""

    def __init__(self, patterns: list[str], remote_cfg: RemoteConfig | None = None) -> None:
        patterns = [str(p) for p in patterns]
        piped = next((p for p in patterns if p.startswith("pipe:")), None)
        if piped is not None:
            raise DataError(f"webdataset source: {piped!r}: 'pipe:' shards are not supported, because a resume seeks "
                            f"to its sample and a pipe cannot seek; give the URL itself (s3://, gs://, hf://, "
                            f"https://), which is read with range requests")
        self.remote = remote_cfg or RemoteConfig()
        self.shards = [str(p) for p in expand_paths(patterns, "webdataset source", urls=True, folder_glob="*.tar")]
        if not self.shards:
            raise DataError(f"no shards in webdataset source {' '.join(patterns)}")
        self.name = f"webdataset {' '.join(patterns)} ({len(self.shards)} shards)"

    @classmethod
    def from_config(cls, cfg: Any) -> TarShardSource:
        return cls(cfg.paths, getattr(cfg, "remote", None))

    def open_shard(self, index: int) -> TarShardReader:
        shard = self.shards[index]
        return TarShardReader(shard if remote.is_url(shard) else Path(shard), self.remote)

    def shard_fingerprint(self, index: int) -> str:
        """For a URL: its size plus ETag / last-modified, from one metadata request (``"missing"`` when the
        object is not there, as for a local file); local files: the base class's size and modification time."""
        shard = self.shards[index]
        if not remote.is_url(shard):
            return super().shard_fingerprint(index)
        try:
            return remote.fingerprint(shard, self.remote)
        except remote.RemoteReadError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return "missing"
            raise DataError(f"webdataset source: {e}") from None

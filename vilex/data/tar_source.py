"""tar_source.py — the ``webdataset`` source: samples in ``.tar`` shards, one shard open at a time.

Format (the webdataset convention): consecutive tar members that share a key form one sample; the
key is the member path up to the first dot of its file name, the rest is the extension
(``a/0001.jpg`` + ``a/0001.txt`` + ``a/0001.json`` -> key ``a/0001``). The image is the first of
``IMAGE_EXTENSIONS`` present; ``.txt`` becomes ``meta["txt"]``; a ``.json`` object is merged into
the metadata (a non-object goes to ``meta["json"]``). Other extensions are ignored.

Why Python's ``tarfile`` and not the ``webdataset`` package: resuming must be exact and cheap. We
open a shard, list its member headers (``tarfile`` seeks past member data, so listing reads no
image bytes), and then read sample j by seeking to it. A resume at (shard, sample) therefore
reads and decodes nothing before the position, and every failure is classified by our own skip
reasons; webdataset's pipeline would have to stream through the shard and its error handlers
either raise or warn-and-continue. Cost: shards must be seekable files (local or mounted disk);
``pipe:``/``http`` URLs are not supported.

A shard that cannot be opened, or whose listing breaks off (a truncated tar), counts one
``bad_shard`` skip; the samples listed before the break are still read.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from vilex.data.decode import BadSample
from vilex.data.sources import IMAGE_SOURCES, RawSample, ShardedImageSource, ShardReader, expand_paths
from vilex.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/0001.seg.png"`` -> ``("dir/0001", "seg.png")``: the key ends at the file name's first dot."""
    folder, _, file_name = name.rpartition("/")
    stem, dot, extension = file_name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, extension.lower() if dot else ""


class TarShardReader(ShardReader):
    """An open tar shard: its samples grouped by key, read by position with a seek."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: list[str] = []
        self.members: list[dict[str, tarfile.TarInfo]] = []  # per sample: extension -> member
        self.error: str | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            self._tar = tarfile.open(path, "r:*")
            self._list_members()
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
        meta: dict[str, Any] = {}
        if "txt" in members:
            try:
                meta["txt"] = self._read_member(members["txt"]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadSample("corrupt", f"{members['txt'].name}: invalid UTF-8 ({e.reason})") from None
        if "json" in members:
            try:
                parsed = json.loads(self._read_member(members["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSample("corrupt", f"{members['json'].name}: invalid JSON ({e})") from None
            meta.update(parsed if isinstance(parsed, dict) else {"json": parsed})
        data = self._read_member(members[image_extension])
        return RawSample(key=self.keys[position], data=data, meta=meta)

    def _read_member(self, member: tarfile.TarInfo) -> bytes:
        assert self._tar is not None
        try:
            handle = self._tar.extractfile(member)
            if handle is None:  # a directory or special file named like an image
                raise BadSample("unreadable", f"{member.name} is not a regular file in {self.path.name}")
            data = handle.read()
        except KeyError as e:  # a link to a member that is not in the archive
            raise BadSample("unreadable", f"{member.name}: broken link in tar ({e})") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadSample("truncated", f"{member.name}: {type(e).__name__}: {e}") from None
        if len(data) < member.size:
            raise BadSample("truncated", f"{member.name}: {len(data)} of {member.size} bytes in {self.path.name}")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


@IMAGE_SOURCES.register("webdataset")
class TarShardSource(ShardedImageSource):
    """Webdataset-style ``.tar`` shards: a list of paths, globs or brace patterns."""

    def __init__(self, patterns: list[str]) -> None:
        self.shards = [str(p) for p in expand_paths(patterns, "webdataset source")]
        if not self.shards:
            raise DataError(f"no shards in webdataset source {' '.join(patterns)}")
        self.name = f"webdataset {' '.join(patterns)} ({len(self.shards)} shards)"

    @classmethod
    def from_config(cls, cfg: Any) -> TarShardSource:
        return cls(cfg.paths)

    def open_shard(self, index: int) -> TarShardReader:
        return TarShardReader(Path(self.shards[index]))

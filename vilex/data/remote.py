"""remote.py — shards given as URLs (``s3://``, ``gs://``, ``hf://``, ``https://``): fsspec files, retries, URLs.

A URL is read with fsspec's range requests, so a remote shard is as seekable as a local one and a resume
still seeks straight to its sample. Two handles per shard, because the two access patterns want opposite
caches:

* the LISTING handle (``cache_type="readahead"``, ``block_size`` = ``remote.block_size``): ``tarfile``
  walks the headers front to back with tiny reads (512 bytes, plus one byte before each header); the
  read-ahead cache answers every header that lies within ``block_size`` of the previous fetch from memory
  and only asks the server again past that, so a listing costs about ``size / block_size`` requests when
  members are small and one ``block_size`` request per member when they are large. The cache holds one
  range: at most ``block_size`` + the current read (512 bytes) per open shard, replaced, never grown.
  ``blockcache`` would keep up to 32 blocks (32x the memory) for re-reads that a front-to-back walk never
  makes, and fetches a member spanning n blocks in n sequential requests; ``bytes`` grows its buffer while
  reads move forward and trims it only in whole blocks.
* the DATA handle (``cache_type="none"``): a sample's members are read as one exact range (see
  ``tar_source.py``), so a shuffled read costs one request of just the sample's bytes. Any read-ahead there
  would be discarded by the next, random, sample.

Credentials and endpoints come from the user's fsspec configuration (``~/.config/fsspec/``, ``FSSPEC_*``
environment variables) or the implementation's own (AWS profiles, gcloud); nothing is configured here.
``s3fs``, ``gcsfs`` and ``adlfs`` are optional installs; a missing one is named in one line.

Retries. A transient failure (connection refused, reset or dropped mid-body, a timeout, a 5xx / 408 / 429
answer) is retried ``remote.retries`` times, waiting ``remote.backoff_s`` and doubling up to
``MAX_BACKOFF_S``; a permanent one (404, 403, other 4xx) is not. What stays broken after that is a
``RemoteReadError``, which the tar source turns into skips or a stop (``remote.on_error``). Implementations
that retry internally (s3fs, gcsfs) do so inside each of these attempts.
"""
from __future__ import annotations

import glob
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vilex.data.config import URL_PATTERN, RemoteConfig
from vilex.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF_S = 30.0
# The skip reason of samples lost to a remote failure (its own, so a flaky bucket is told from bad files)
REMOTE_SKIP_REASON = "remote_error"
# Which pip package provides each protocol that fsspec does not implement itself.
PROTOCOL_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "http": "aiohttp",
    "https": "aiohttp", "abfs": "adlfs", "az": "adlfs", "adl": "adlfs",
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class RemoteReadError(DataError):
    """A remote read that failed for good (permanent, or still failing after the retries).

    Deliberately not an ``OSError``: ``tarfile``'s gzip probe turns an ``OSError`` into "not a gzip file" and
    tries the next format, which would hide a network failure behind a format error."""


# ----------------------------------------------------------------------------- URLs
def is_url(path: str) -> bool:
    """``True`` for ``scheme://...`` (fsspec's form); local paths, including ``C:\\...``, are not URLs."""
    return URL_PATTERN.match(str(path)) is not None


def protocol_of(url: str) -> str:
    match = URL_PATTERN.match(url)
    return match.group(1).lower() if match else "file"


def filesystem(url: str, what: str) -> tuple[Any, str]:
    """(fsspec filesystem, its path for ``url``); an unknown protocol or a missing package is one DataError line."""
    import fsspec.core

    protocol = protocol_of(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = PROTOCOL_PACKAGES.get(protocol)
        install = f"pip install {package}" if package else f"install the package that provides it ({e})"
        raise DataError(f"{what}: reading {protocol}:// URLs needs an fsspec implementation that is not installed: "
                        f"{install}") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise DataError(f"{what}: bad URL {url}: {e}") from None
        common = ", ".join(f"{p}://" for p in ("s3", "gs", "hf", "https", "http", "file"))
        raise DataError(f"{what}: unknown URL protocol '{protocol}://' in {url}; fsspec reads e.g. {common}") from None


def _has_magic(url: str) -> bool:
    """Glob characters in a URL; for http(s) only before the query string, whose '?' and '&' are not globs."""
    if protocol_of(url) in ("http", "https"):
        url = url.split("?", 1)[0]
    return glob.has_magic(url)


def expand_url(url: str, what: str, folder_glob: str | None = None) -> list[str]:
    """A brace-expanded URL -> the URLs it names: a glob through the filesystem's own ``glob`` (sorted); with
    ``folder_glob``, a URL ending in ``/`` is that folder's matching files; anything else as is, without a
    request (thousands of shards would cost thousands of round trips before the first batch; a missing shard
    fails when it is opened)."""
    if folder_glob and url.endswith("/"):
        url += folder_glob
    fs, path = filesystem(url, what)
    if not _has_magic(url):
        return [url]
    try:
        matches = sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    except NotImplementedError:
        matches = None
    except Exception as e:  # noqa: BLE001 - any failure of a remote listing is the user's to see, in one line
        raise DataError(f"{what}: listing {url} failed: {type(e).__name__}: {e}") from None
    if matches is None:
        raise DataError(f"{what}: {protocol_of(url)}:// cannot list files, so {url} cannot be globbed; "
                        f"name the shards with a brace pattern such as shard-{{000000..000099}}.tar")
    if not matches:
        raise DataError(f"{what}: no files match {url}")
    return matches


# ----------------------------------------------------------------------------- retries
def _client_error() -> tuple[type[BaseException], ...]:
    try:
        from aiohttp import ClientError
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec's http support
        return ()
    return (ClientError,)


def _status(error: BaseException) -> int | None:
    status = getattr(error, "status", None) or getattr(error, "code", None)  # aiohttp / urllib answers
    return status if isinstance(status, int) else None


def is_remote_failure(error: BaseException) -> bool:
    """An I/O failure of the storage or the network (as opposed to a bug, which keeps its traceback)."""
    return isinstance(error, (OSError, TimeoutError, *_client_error())) or _status(error) is not None


def is_transient(error: BaseException) -> bool:
    """Whether trying again may help: network and server-side failures yes, missing / forbidden / bad request no."""
    if isinstance(error, _PERMANENT):
        return False
    status = _status(error)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return False
    return is_remote_failure(error)


def with_retries(action: Callable[[], T], what: str, cfg: RemoteConfig) -> T:
    """``action()``, retried on transient failures as ``cfg`` says; a ``RemoteReadError`` when it stays broken."""
    wait = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return action()
        except Exception as error:
            if isinstance(error, RemoteReadError) or not is_remote_failure(error):
                raise
            detail = f"{type(error).__name__}: {error}".rstrip(": ")
            if not is_transient(error):
                raise RemoteReadError(f"{what}: {detail}") from error
            if attempt == cfg.retries:
                tries = f"after {cfg.retries + 1} attempts" if cfg.retries else "(remote.retries is 0)"
                raise RemoteReadError(f"{what} failed {tries}: {detail}") from error
            log.warning("%s failed (%s); retry %d of %d in %.1f s", what, detail, attempt + 1, cfg.retries, wait)
            time.sleep(wait)
            wait = min(MAX_BACKOFF_S, wait * 2)
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingFile:
    """A seekable fsspec file whose reads are retried: a failed range read leaves fsspec's position and cache as
    they were, so seeking back to where the read began and reading again is exact."""

    def __init__(self, file: Any, url: str, cfg: RemoteConfig) -> None:
        self._file, self.name, self._cfg = file, url, cfg
        self.size: int = file.size

    def read(self, size: int = -1) -> bytes:
        start = self._file.tell()

        def attempt() -> bytes:
            self._file.seek(start)
            return self._file.read(size)

        return with_retries(attempt, f"reading {self.name} at byte {start}", self._cfg)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()


def open_remote(url: str, cfg: RemoteConfig, *, cache_type: str) -> RetryingFile:
    """``url`` opened for range reads (see the module docstring for the two cache types), with retries."""
    fs, path = filesystem(url, "webdataset source")

    def attempt() -> Any:
        return fs.open(path, "rb", block_size=cfg.block_size, cache_type=cache_type)

    file = with_retries(attempt, f"opening {url}", cfg)
    if not getattr(file, "seekable", lambda: False)() or getattr(file, "size", None) is None:
        file.close()
        raise RemoteReadError(f"opening {url}: the server does not give the size or does not accept range "
                              f"requests, so samples cannot be read by position")
    return RetryingFile(file, url, cfg)


# ----------------------------------------------------------------------------- identity
_CONTENT_KEYS = ("ETag", "etag", "md5Hash", "generation", "blob_id", "sha256")
_TIME_KEYS = ("LastModified", "Last-Modified", "last_modified", "updated", "mtime")


def fingerprint(url: str, cfg: RemoteConfig) -> str:
    """``"size=123 etag=... modified=..."`` from one metadata request (``fs.info``): what tells a replaced object
    from the one a saved position was counted in. The content id and the time are those present, if any."""
    fs, path = filesystem(url, "webdataset source")
    info = with_retries(lambda: fs.info(path), f"reading the metadata of {url}", cfg)
    parts = [f"size={info.get('size')}"]
    lfs = info.get("lfs")
    content = next((info[k] for k in _CONTENT_KEYS if info.get(k)), None) or (lfs or {}).get("sha256")
    if content:
        etag = str(content).strip('"')  # HTTP quotes ETags; the quotes are not part of the id
        parts.append(f"etag={etag}")
    modified = next((info[k] for k in _TIME_KEYS if info.get(k)), None)
    if modified:
        parts.append(f"modified={modified}")
    return " ".join(parts)

"""Remote webdataset shards over a local HTTP server (fsspec range reads): the batches, resume and skip counts of
the same local files; a server that drops connections mid-shard, with retries that recover and retries that run
out; one-line errors for unknown protocols, missing implementations, pipes and bad remote settings."""
from __future__ import annotations

import html
import io
import itertools
import re
import tarfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import bad_images as zoo_files
import pytest
import torch

from vilex.cli.main import main
from vilex.config import ConfigError, from_dict
from vilex.data import DataConfig, ImageLoader, TarShardSource, ViewConfig, remote
from vilex.data import loader as loader_module
from vilex.data.config import RemoteConfig
from vilex.data.loader import build_loader
from vilex.data.tar_source import TarShardReader
from vilex.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

VIEWS = {"encoder": ViewConfig(size=8), "decoder": ViewConfig(size=4, fit="letterbox", mean=(0, 0, 0), std=(1, 1, 1))}
FAST = RemoteConfig(backoff_s=0)  # retries without waiting: the policy is the same, the test is quick
COUNTS = [5, 3, 6, 4]  # samples per shard: 18, batches of 3 straddle shard edges


# ----------------------------------------------------------------------------- the server
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Drop:
    """GET requests of one file whose range starts at or after ``from_byte`` are cut after half their body;
    ``times`` of them (None: all)."""

    from_byte: int = 0
    times: int | None = None
    done: int = 0


@dataclass
class Request:
    method: str
    path: str
    start: int | None  # of the requested range
    sent: int  # body bytes actually sent
    dropped: bool = False


@dataclass
class ShardServer:
    """``files`` maps a URL path (``/shards/a.tar``) to its bytes; a path ending in ``/`` lists its files as HTML."""

    files: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, Drop] = field(default_factory=dict)
    no_ranges: set[str] = field(default_factory=set)  # answered without Content-Length / ranges (a stream)
    log: list[Request] = field(default_factory=list)
    in_flight: int = 0  # requests received whose handler has not returned yet
    versions: dict[str, int] = field(default_factory=dict)  # bumps the ETag when a file is replaced
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Request]:
        """The requests answered so far, once every handler has returned: a client holds the answer before the
        server's thread writes its log line, so reading the log at once would race with it."""
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.log

    def put(self, path: str, data: bytes) -> None:
        self.files[path] = data
        self.versions[path] = self.versions.get(path, 0) + 1

    def sent(self, path: str, method: str = "GET") -> int:
        return sum(r.sent for r in self.requests if r.path == path and r.method == method)

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path and r.method == "GET"]


def _handler(state: ShardServer) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like an object store

        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._counted(body=False)

        def do_GET(self) -> None:
            self._counted(body=True)

        def _counted(self, body: bool) -> None:
            with lock:
                state.in_flight += 1
            try:
                self._answer(body)
            finally:
                with lock:
                    state.in_flight -= 1

        def _record(self, start: int | None, sent: int, dropped: bool = False) -> None:
            with lock:
                state.log.append(Request(self.command, self.path, start, sent, dropped))

        def _answer(self, body: bool) -> None:
            path = self.path
            if path.endswith("/"):
                names = sorted(p[len(path):] for p in state.files if p.startswith(path) and "/" not in p[len(path):])
                page = "".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in names).encode()
                if not names:
                    return self._not_found()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if body:
                    self.wfile.write(page)
                self._record(None, len(page) if body else 0)
                return
            data = state.files.get(path)
            if data is None:
                return self._not_found()
            if path in state.no_ranges:
                self.send_response(200)
                self.send_header("Accept-Ranges", "none")
                self.send_header("Connection", "close")
                self.end_headers()
                if body:
                    self.wfile.write(data)
                self.close_connection = True
                self._record(None, len(data) if body else 0)
                return
            start, end, status = 0, len(data), 200
            match = _RANGE.match(self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._record(start, 0)
                    return
                status = 206
            chunk = data[start:end]
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("ETag", f'"{path.strip("/").replace("/", "-")}-v{state.versions.get(path, 1)}"')
            self.send_header("Last-Modified", formatdate(1_700_000_000 + state.versions.get(path, 1), usegmt=True))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                self._record(None, 0)
                return
            drop = state.drops.get(path)
            with lock:
                cut = drop is not None and start >= drop.from_byte and (drop.times is None or drop.done < drop.times)
                if cut:
                    drop.done += 1
            if cut:  # half the promised body, then the connection goes away
                half = chunk[: len(chunk) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                self.close_connection = True
                self._record(start, len(half), dropped=True)
                return
            self.wfile.write(chunk)
            self._record(start, len(chunk))

        def _not_found(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(None, 0)

    return Handler


class serving:
    """``with serving(state) as server:`` serves ``state`` on a free port of 127.0.0.1 until the block ends."""

    def __init__(self, state: ShardServer) -> None:
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        self.httpd.daemon_threads = True
        state.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="shard-server", daemon=True)

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def served(tmp_path):
    """The shards of ``COUNTS`` on disk and on a running server under /wds/: (server, local paths)."""
    paths, _ = zoo_files.write_good_shards(tmp_path / "shards", COUNTS)
    state = ShardServer()
    for path in paths:
        state.put(f"/wds/{path.name}", path.read_bytes())
    with serving(state) as server:
        yield server, paths


def _urls(server: ShardServer) -> list[str]:
    return [server.url(f"/wds/good-{{000..{len(COUNTS) - 1:03d}}}.tar")]


def _loader(patterns, remote_cfg: RemoteConfig | None = None, **kwargs) -> ImageLoader:
    settings = {"views": VIEWS, "batch_size": 3, "seed": 5, "epochs": 2, **kwargs}
    return ImageLoader(TarShardSource([str(p) for p in patterns], remote_cfg or FAST), **settings)


def _run(loader: ImageLoader) -> tuple[list, dict]:
    with loader:
        batches = list(loader)
    summary = loader.summary()
    summary.pop("source")  # names the paths, which differ between the local and the remote run
    return batches, summary


def _assert_same_batches(left, right):
    assert [b.keys for b in left] == [b.keys for b in right]
    assert [b.meta for b in left] == [b.meta for b in right]
    for a, b in zip(left, right, strict=True):
        for view in VIEWS:
            assert torch.equal(a.images[view], b.images[view])


def _sample_offset(path, position: int) -> int:
    """Where sample ``position`` (stored order) of a local shard starts: its first member's data."""
    with TarShardReader(path) as reader:
        return min(m.offset_data for m in reader.members[position].values())


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys]


# ----------------------------------------------------------------------------- same data as local files
def test_http_shards_give_the_batches_of_the_local_files(served):
    server, paths = served
    remote_batches, remote_summary = _run(_loader(_urls(server)))
    local_batches, local_summary = _run(_loader(paths))
    assert len(remote_batches) == 12
    _assert_same_batches(remote_batches, local_batches)
    assert remote_summary == local_summary
    assert not any(r.dropped for r in server.requests)


@pytest.mark.parametrize("k", [1, 4])
def test_resume_mid_shard_over_http_is_exact_and_reads_nothing_before(served, monkeypatch, k):
    server, _ = served
    original = _loader(_urls(server))
    stream = iter(original)
    list(itertools.islice(stream, k))
    state = original.state_dict()
    assert state["position"][1] > 0  # inside a shard, so the resume seeks
    rest = list(stream)

    decoded = []
    real_decode = loader_module.decode_image
    monkeypatch.setattr(loader_module, "decode_image", lambda data, **kw: decoded.append(1) or real_decode(data, **kw))
    server.requests.clear()
    restored = _loader(_urls(server))
    restored.load_state_dict(state)
    resumed = list(restored)
    _assert_same_batches(resumed, rest)
    assert len(decoded) == 3 * (12 - k)
    assert restored.summary() == original.summary()
    sample_gets = [r for r in server.requests if r.method == "GET" and r.start]  # range reads past the first header
    assert len(sample_gets) == 3 * (12 - k)  # one request per remaining sample, none for those before


def test_parallel_decoding_over_http_matches_local(served):
    server, paths = served
    remote_batches, remote_summary = _run(_loader(_urls(server), num_workers=2, epochs=1))
    local_batches, local_summary = _run(_loader(paths, epochs=1))
    _assert_same_batches(remote_batches, local_batches)
    assert remote_summary == local_summary


def test_listing_fetches_headers_not_member_data(tmp_path):
    """Large members: a small read-ahead lists the shard with a few percent of its bytes; a sample is then one
    exact range request. (A block larger than the members reads them along: the block size is the trade-off.)"""
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(8):
            for name, size in ((f"{i:03d}.jpg", 200_000), (f"{i:03d}.txt", 40)):
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, io.BytesIO(bytes([i]) * size))
    data = path.read_bytes()
    state = ShardServer()
    state.put("/big.tar", data)
    with serving(state) as server:
        with TarShardReader(server.url("/big.tar"), RemoteConfig(block_size=4096)) as reader:
            assert reader.error is None and reader.keys == [f"{i:03d}" for i in range(8)]
            listed = server.sent("/big.tar")
            assert listed < 0.05 * len(data)  # ~8 requests of 4 KiB + 512 for a 1.6 MB shard
            before = len(server.gets("/big.tar"))
            sample = reader.read(5)
            assert sample.data == bytes([5]) * 200_000 and sample.meta == {"txt": "\x05" * 40}
            read = server.gets("/big.tar")[before:]
            assert len(read) == 1 and 200_040 <= read[0].sent <= 200_040 + 1024  # image + header + caption
        server.requests.clear()
        with TarShardReader(server.url("/big.tar"), RemoteConfig(block_size=1 << 21)) as reader:
            assert len(reader.keys) == 8
            assert len(server.gets("/big.tar")) == 1 and server.sent("/big.tar") == len(data)


# ----------------------------------------------------------------------------- a flaky server
def test_dropped_connections_are_retried_and_the_result_is_exact(served):
    server, paths = served
    server.drops["/wds/good-001.tar"] = Drop(from_byte=0, times=1)  # the listing's first request
    server.drops["/wds/good-002.tar"] = Drop(from_byte=_sample_offset(paths[2], 3), times=2)  # mid-shard reads
    remote_batches, remote_summary = _run(_loader(_urls(server), RemoteConfig(retries=2, backoff_s=0)))
    local_batches, local_summary = _run(_loader(paths))
    assert [d.done for d in server.drops.values()] == [1, 2]
    _assert_same_batches(remote_batches, local_batches)
    assert remote_summary == local_summary


def test_retries_exhausted_mid_shard_skip_its_remaining_samples_and_go_on(served):
    server, paths = served
    server.drops["/wds/good-002.tar"] = Drop(from_byte=_sample_offset(paths[2], 2))  # gone from sample 2 on
    cfg = from_dict(DataConfig, {"type": "webdataset", "path": _urls(server), "views": {"encoder": {"size": 8}},
                                 "batch_size": 2, "shuffle": False, "remote": {"retries": 1, "backoff_s": 0}})
    batches, summary = _run(build_loader(cfg))
    _, keys = zoo_files.write_good_shards(paths[0].parent.parent / "again", COUNTS)
    lost = keys[5 + 3 + 2 : 5 + 3 + 6]  # shard 2, samples 2..5
    assert _keys(batches) == [k for k in keys if k not in lost]  # shard 3 still read
    assert summary["skipped"] == {remote.REMOTE_SKIP_REASON: 4}
    assert summary["samples"] == 18 - 4
    assert len(server.gets("/wds/good-002.tar")) == 1 + 2 + 2  # listing, 2 good samples, 1 + 1 tries of the third
    assert server.drops["/wds/good-002.tar"].done == 2  # the later samples cost no request


def test_a_listing_that_keeps_failing_is_one_bad_shard(served):
    server, _ = served
    server.drops["/wds/good-001.tar"] = Drop(from_byte=0)
    batches, summary = _run(_loader(_urls(server), RemoteConfig(retries=1, backoff_s=0), shuffle=False, epochs=1))
    assert summary["skipped"] == {"bad_shard": 1}
    assert summary["samples"] == 18 - 3
    assert not any(key.startswith("g1/") for key in _keys(batches))
    assert server.drops["/wds/good-001.tar"].done == 2


def test_on_error_raise_stops_the_run_in_one_line(served):
    server, paths = served
    server.drops["/wds/good-002.tar"] = Drop(from_byte=_sample_offset(paths[2], 1))
    loader = _loader(_urls(server), RemoteConfig(retries=0, on_error="raise"), shuffle=False, epochs=1, num_workers=2)
    with pytest.raises(DataError) as caught, loader:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message
    assert server.url("/wds/good-002.tar") in message and "remote.on_error is 'raise'" in message
    assert "remote.retries is 0" in message


def test_missing_remote_shard_is_one_bad_shard_without_retries(served):
    server, _ = served
    source = TarShardSource([server.url("/wds/good-000.tar"), server.url("/wds/nope.tar")], RemoteConfig(retries=3))
    _, summary = _run(ImageLoader(source, views=VIEWS, batch_size=2, shuffle=False))
    assert summary["skipped"] == {"bad_shard": 1} and summary["samples"] == 5
    # fsspec asks for the size with HEAD, then GET; a 404 ends it there, without retries
    assert [r.method for r in server.requests if r.path == "/wds/nope.tar"] == ["HEAD", "GET"]


def test_a_server_without_range_requests_is_refused_clearly(served):
    server, _ = served
    server.no_ranges.add("/wds/good-000.tar")
    with TarShardReader(server.url("/wds/good-000.tar"), FAST) as reader:
        assert reader.keys == []
        assert "does not accept range requests" in reader.error


def test_retry_waits_double_up_to_the_cap_and_only_transient_failures_are_retried(monkeypatch):
    waits, calls = [], []
    monkeypatch.setattr(remote.time, "sleep", waits.append)

    def flaky():
        calls.append(1)
        raise ConnectionResetError("peer reset")

    with pytest.raises(remote.RemoteReadError, match="after 7 attempts: ConnectionResetError: peer reset"):
        remote.with_retries(flaky, "reading x", RemoteConfig(retries=6, backoff_s=4))
    assert waits == [4, 8, 16, 30, 30, 30] and len(calls) == 7

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/x.tar")

    calls.clear()
    with pytest.raises(remote.RemoteReadError, match="reading x: FileNotFoundError"):
        remote.with_retries(missing, "reading x", RemoteConfig(retries=6))
    assert len(calls) == 1

    def bug():
        calls.append(1)
        raise TypeError("not the network")

    calls.clear()
    with pytest.raises(TypeError, match="not the network"):  # a bug keeps its traceback: no retry, no skip
        remote.with_retries(bug, "reading x", RemoteConfig(retries=6))
    assert len(calls) == 1
    assert remote.with_retries(lambda: 7, "x", RemoteConfig()) == 7


# ----------------------------------------------------------------------------- URLs, globs, identity
def test_url_globs_and_folder_urls(served):
    server, _ = served
    server.put("/wds/00000.parquet", b"PAR1")
    server.put("/wds/00000_stats.json", b"{}")
    expected = [server.url(f"/wds/good-{i:03d}.tar") for i in range(4)]
    assert TarShardSource([server.url("/wds/*.tar")]).shards == expected
    assert TarShardSource([server.url("/wds/")]).shards == expected  # a folder URL: its *.tar
    assert TarShardSource(_urls(server)).shards == expected
    with pytest.raises(DataError, match=r"no files match .*/wds/\*\.tgz"):
        TarShardSource([server.url("/wds/*.tgz")])


def test_query_strings_are_not_globs():
    assert remote.expand_url("https://host/a.tar?X-Amz-Signature=ab&x=1", "w") == [
        "https://host/a.tar?X-Amz-Signature=ab&x=1"]


def test_fingerprint_of_a_url_follows_its_content(served, tmp_path):
    server, paths = served
    source = TarShardSource(_urls(server))
    first = source.shard_fingerprint(1)
    assert first.startswith(f"size={paths[1].stat().st_size} etag=wds-good-001.tar-v1 modified=")
    assert source.shard_fingerprint(1) == first
    server.put("/wds/good-001.tar", paths[1].read_bytes())  # replaced: same size, new ETag and date
    assert source.shard_fingerprint(1) != first
    assert TarShardSource([server.url("/wds/gone.tar")]).shard_fingerprint(0) == "missing"
    local = TarShardSource([str(p) for p in paths])
    assert local.shard_fingerprint(1) == f"{paths[1].stat().st_size}:{paths[1].stat().st_mtime_ns}"


# ----------------------------------------------------------------------------- one-line errors
def test_unknown_protocol_is_one_line():
    with pytest.raises(DataError) as caught:
        TarShardSource(["foo://bucket/shard-{000..003}.tar"])
    assert str(caught.value) == ("webdataset source: unknown URL protocol 'foo://' in foo://bucket/shard-000.tar; "
                                 "fsspec reads e.g. s3://, gs://, hf://, https://, http://, file://")


@pytest.mark.parametrize("url, package", [("s3://bucket/s-{0..1}.tar", "s3fs"), ("gs://bucket/s.tar", "gcsfs")])
def test_missing_protocol_implementation_names_the_package(url, package, capsys):
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    with pytest.raises(DataError) as caught:
        TarShardSource([url])
    assert "\n" not in str(caught.value) and str(caught.value).endswith(f"pip install {package}")
    assert main(["data", "inspect", "--source-type", "webdataset", "--path", url]) == 2
    assert capsys.readouterr().err.strip().endswith(f"pip install {package}")


def test_pipe_shards_are_refused_with_the_reason():
    with pytest.raises(DataError, match=r"'pipe:' shards are not supported, because a resume seeks to its sample.*"
                                        r"give the URL itself"):
        TarShardSource(["pipe:curl -s https://host/shard-000.tar"])


def test_remote_settings_are_validated_in_one_line():
    base = {"type": "webdataset", "path": "https://host/s.tar"}
    for remote_cfg, message in [
        ({"retries": -1}, "remote.retries: must be >= 0, got -1"),
        ({"on_error": "retry"}, "remote.on_error: must be one of 'skip', 'raise'; got 'retry'"),
        ({"block_size": 100}, "remote.block_size: must be >= 4096, got 100"),
        ({"retrys": 2}, "unknown key 'remote.retrys' (did you mean 'remote.retries'?)"),
    ]:
        with pytest.raises(ConfigError) as caught:
            from_dict(DataConfig, {**base, "remote": remote_cfg})
        assert message in str(caught.value)
    with pytest.raises(ConfigError, match="the hf source reads local files only"):
        from_dict(DataConfig, {"type": "hf", "path": "s3://bucket/x.parquet"})
    assert from_dict(DataConfig, {**base, "remote": {"retries": 0}}).remote == RemoteConfig(retries=0)

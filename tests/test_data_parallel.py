"""ImageLoader(num_workers=N): the batches, skips and states of the in-process loader, bit for bit; exact resume
across worker counts; workers that never outlive their loader; a clear error when one dies."""
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bad_images as zoo_files
import pytest
import torch
from bad_images import ZOO_MAX_PIXELS, ZOO_MIN_SIDE

from vilex.data import (
    Batch,
    DataConfig,
    FolderSource,
    ImageLoader,
    MapImageSource,
    RawSample,
    TarShardSource,
    ViewConfig,
)
from vilex.data.loader import build_loader
from vilex.data.parallel import DecodeWorkerError

REPO = Path(__file__).resolve().parents[1]
VIEWS = {"encoder": ViewConfig(size=8), "decoder": ViewConfig(size=4, fit="letterbox", mean=(0, 0, 0), std=(1, 1, 1))}
ZOO_LIMITS = {"max_pixels": ZOO_MAX_PIXELS, "min_side": ZOO_MIN_SIDE}


# ----------------------------------------------------------------------------- helpers
def _run(loader: ImageLoader) -> tuple[list, list[str], dict]:
    """Batches, the JSON state after each, and the summary; the loader is closed afterwards."""
    batches, states = [], []
    with loader:
        for batch in loader:
            batches.append(batch)
            states.append(json.dumps(loader.state_dict(), sort_keys=True))
    return batches, states, loader.summary()


def _assert_same_batches(left, right):
    assert [b.keys for b in left] == [b.keys for b in right]
    assert [b.meta for b in left] == [b.meta for b in right]
    for a, b in zip(left, right):
        assert a.images.keys() == b.images.keys()
        for view in a.images:
            assert a.images[view].shape == b.images[view].shape
            assert torch.equal(a.images[view], b.images[view])


def _gone(pid: int, reaped: bool = True) -> bool:
    """The process has exited and been reaped (no zombie left); ``reaped=False`` also accepts a zombie, for
    orphans of a killed process, whose reaping is up to PID 1 (in a container, maybe nobody)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return not reaped and state in ("Z", "X")


def _wait_gone(pids, timeout: float = 10.0, reaped: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(pid, reaped) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def _folder_loader(root, **kwargs) -> ImageLoader:
    return ImageLoader(FolderSource(root), **{"views": VIEWS, "batch_size": 3, "seed": 3, "epochs": 2, **ZOO_LIMITS,
                                              **kwargs})


def _shard_loader(paths, **kwargs) -> ImageLoader:
    return ImageLoader(TarShardSource([str(p) for p in paths]),
                       **{"views": VIEWS, "batch_size": 3, "seed": 5, "epochs": 2, **ZOO_LIMITS, **kwargs})


@pytest.fixture
def zoo_folder(tmp_path):
    """20 good images and 9 bad ones (every skip reason a folder can give)."""
    zoo_files.write_folder(tmp_path / "zoo")
    names = zoo_files.write_good_folder(tmp_path / "zoo" / "extra", 9)
    with open(tmp_path / "zoo" / "metadata.jsonl", "a") as fh:
        fh.writelines(json.dumps({"file_name": f"extra/{n}"}) + "\n" for n in names)
    return tmp_path / "zoo"


@pytest.fixture
def zoo_shards(tmp_path):
    """Zoo shards (bad samples, a folder member, a caption-only sample), a garbage shard, a cut shard (3 samples
    listed, then a broken header) and good shards: 11 + 3 + 8 good samples, 9 + 2 bad ones, 2 bad shards."""
    paths, _ = zoo_files.write_tar_shards(tmp_path / "zoo", n_shards=2)
    good, _ = zoo_files.write_good_shards(tmp_path / "good", [5, 3])
    garbage, cut = tmp_path / "garbage.tar", tmp_path / "cut.tar"
    garbage.write_bytes(b"not a tar" * 100)
    cut.write_bytes(good[0].read_bytes()[: 3 * 2048 + 100])
    return [*paths, garbage, cut, *good]


# ----------------------------------------------------------------------------- identical to in-process
# (workers, prefetch): the default window, a window of one sample, and one larger than an epoch.
SETTINGS = [(1, None), (3, None), (2, 1), (3, 64)]


def test_folder_with_bad_files_gives_identical_batches_states_and_skips(zoo_folder):
    reference = _run(_folder_loader(zoo_folder))
    assert reference[2]["skipped"] == {"decompression_bomb": 4, "empty": 2, "not_an_image": 2, "too_small": 2,
                                       "truncated": 4, "unreadable": 4}
    assert [len(b) for b in reference[0]] == [3] * 6 + [2] + [3] * 6 + [2]
    for workers, prefetch in SETTINGS:
        batches, states, summary = _run(_folder_loader(zoo_folder, num_workers=workers, prefetch=prefetch))
        _assert_same_batches(batches, reference[0])
        assert states == reference[1], (workers, prefetch)
        assert summary == reference[2]


def test_webdataset_shards_with_bad_samples_and_shards_give_identical_batches(zoo_shards):
    for drop_last in (False, True):
        reference = _run(_shard_loader(zoo_shards, drop_last=drop_last))
        assert reference[2]["skipped"] == {"bad_shard": 4, "decompression_bomb": 4, "empty": 2, "missing_image": 2,
                                           "not_an_image": 2, "too_small": 2, "truncated": 4, "unreadable": 2}
        assert reference[2]["samples"] == (2 * 22 if not drop_last else 2 * 21)
        for workers, prefetch in SETTINGS:
            batches, states, summary = _run(_shard_loader(zoo_shards, drop_last=drop_last, num_workers=workers,
                                                          prefetch=prefetch))
            _assert_same_batches(batches, reference[0])
            assert states == reference[1], (drop_last, workers, prefetch)
            assert summary == reference[2]


def test_views_none_and_config_path(tmp_path):
    """A loader with no views (decode only) and one built from a data config with ``num_workers``."""
    names = zoo_files.write_good_folder(tmp_path / "good", 7)
    (tmp_path / "good" / "broken.png").write_bytes(b"\x89PNG broken")
    plain = _run(ImageLoader(FolderSource(tmp_path / "good"), views={}, batch_size=2, shuffle=False))
    pooled = _run(ImageLoader(FolderSource(tmp_path / "good"), views={}, batch_size=2, shuffle=False, num_workers=2))
    assert [b.keys for b in pooled[0]] == [b.keys for b in plain[0]] == [names[0:2], names[2:4], names[4:6], [names[6]]]
    assert pooled[0][0].images == {} and pooled[1:] == plain[1:]

    cfg = DataConfig(type="folder", path=str(tmp_path / "good"), views=VIEWS, batch_size=3, num_workers=2)
    loader = build_loader(cfg)
    assert loader.num_workers == 2
    _assert_same_batches(_run(loader)[0], _run(build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 0})))[0])


def test_batch_memory_is_reused_only_once_the_consumer_lets_go(zoo_folder):
    """Workers write into shared batch buffers that are filled again once no tensor uses them: batches the
    consumer still holds (or holds a view of) are never overwritten."""
    reference = _run(_folder_loader(zoo_folder, epochs=3))[0]
    copies, held = [], []
    with _folder_loader(zoo_folder, epochs=3, num_workers=2) as loader:
        for i, batch in enumerate(loader):
            copies.append(Batch({v: t.clone() for v, t in batch.images.items()}, batch.keys, batch.meta))
            if i % 4 == 0:
                held.append((i, batch.images["encoder"], batch.images["decoder"]))  # the whole batch
            elif i % 4 == 1:
                held.append((i, batch.images["encoder"][1:2], None))  # only a view of one row
        buffers_made = loader._pool._buffer_ids
    _assert_same_batches(copies, reference)
    for i, encoder, decoder in held:
        expected = reference[i].images["encoder"]
        assert torch.equal(encoder, expected if decoder is not None else expected[1:2])
        assert decoder is None or torch.equal(decoder, reference[i].images["decoder"])
    # 21 batches, 11 held: the others' buffers were filled again (besides the held ones, one for the batch the
    # loop variable may still hold while the next is filled, one being filled, one of slack)
    assert len(held) < buffers_made <= len(held) + 3 < len(reference)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [1, 6, 9])
def test_resume_from_a_worker_state_with_any_worker_count(zoo_folder, k):
    """A state saved mid-epoch (7 batches an epoch: k = 6 is before the partial one, 9 inside epoch 1) by a 3-worker loader resumes bit-identically with 0 or 2
    workers, and a 0-worker state with 3; read-ahead that was never consumed is simply decoded again."""
    original = _folder_loader(zoo_folder, num_workers=3)
    stream = iter(original)
    list(itertools.islice(stream, k))
    state = json.loads(json.dumps(original.state_dict()))
    rest = list(stream)
    original.close()
    for workers in (0, 2):
        resumed = _folder_loader(zoo_folder, num_workers=workers)
        resumed.load_state_dict(state)
        batches, _, summary = _run(resumed)
        _assert_same_batches(batches, rest)
        assert summary == original.summary()

    in_process = _folder_loader(zoo_folder)
    list(itertools.islice(in_process, k))
    assert in_process.state_dict() == state
    resumed = _folder_loader(zoo_folder, num_workers=3)
    resumed.load_state_dict(in_process.state_dict())
    _assert_same_batches(_run(resumed)[0], rest)


@pytest.mark.parametrize("k", [2, 5])
def test_sharded_resume_with_workers_decodes_only_what_remains(tmp_path, k):
    """18 samples in shards of 5, 3, 6, 4; batch 3, 2 epochs = 12 batches. After a resume at batch k the workers
    decode exactly the 3 * (12 - k) remaining samples."""
    paths, _ = zoo_files.write_good_shards(tmp_path / "shards", [5, 3, 6, 4])
    original = _shard_loader(paths, num_workers=2)
    stream = iter(original)
    list(itertools.islice(stream, k))
    state = original.state_dict()
    rest = list(stream)
    original.close()
    resumed = _shard_loader(paths, num_workers=2)
    resumed.load_state_dict(state)
    batches = list(resumed)
    _assert_same_batches(batches, rest)
    assert resumed._pool.tasks_sent == 3 * (12 - k)
    resumed.close()


def test_an_abandoned_iterator_leaves_the_position_at_its_last_batch(zoo_folder):
    """Breaking out of a loop mid-epoch (read-ahead in flight) and iterating again continues exactly after the
    last batch handed out; a superseded iterator refuses to go on rather than interleave."""
    reference = _run(_folder_loader(zoo_folder))[0]
    with _folder_loader(zoo_folder, num_workers=2) as loader:
        first = list(itertools.islice(iter(loader), 3))
        gc.collect()
        older = iter(loader)
        second = next(older)
        newer = iter(loader)
        third = next(newer)  # starts from the state after `second`
        with pytest.raises(RuntimeError, match="use one iterator of a loader at a time"):
            next(older)
        rest = list(newer)
    _assert_same_batches([*first, second, third, *rest], reference)


def test_a_source_error_surfaces_at_its_place_in_the_order(tmp_path):
    """A source that fails with an ordinary exception: the workers' read-ahead meets it early, but it is raised
    only after the batches before it were handed out, exactly as in-process."""

    class Flaky(MapImageSource):
        name = "flaky"

        def __init__(self, root):
            self.inner = FolderSource(root)

        @classmethod
        def from_config(cls, cfg):
            raise NotImplementedError

        def __len__(self):
            return len(self.inner)

        def key(self, index):
            return self.inner.key(index)

        def read(self, index) -> RawSample:
            if index == 9:
                raise OSError("disk on fire")
            return self.inner.read(index)

    zoo_files.write_good_folder(tmp_path / "good", 12)
    outcomes = []
    for workers in (0, 2):
        loader = ImageLoader(Flaky(tmp_path / "good"), views=VIEWS, batch_size=2, shuffle=False, num_workers=workers)
        got = []
        with pytest.raises(OSError, match="disk on fire"):
            got.extend(loader)
        outcomes.append((got, loader.state_dict()))
        if workers:
            assert loader._pool is None or loader._pool.closed  # an error ends the workers
            loader.close()
    _assert_same_batches(outcomes[0][0], outcomes[1][0])
    assert len(outcomes[0][0]) == 4 and outcomes[0][1] == outcomes[1][1]


def test_an_exception_in_a_worker_is_raised_with_its_traceback(tmp_path):
    zoo_files.write_good_folder(tmp_path / "good", 4)
    loader = ImageLoader(FolderSource(tmp_path / "good"), views={"x": ViewConfig(size=4, fit="bogus")}, batch_size=2,
                         num_workers=1)
    with pytest.raises(RuntimeError, match=r"decoding img_00\d\.png in a worker raised ValueError: unknown fit "
                                           r"'bogus'(.|\n)*--- worker traceback ---(.|\n)*views\.py"):
        next(iter(loader))
    assert loader._pool.closed
    loader.close()


# ----------------------------------------------------------------------------- worker lifetime
@pytest.fixture
def good_folder(tmp_path):
    zoo_files.write_good_folder(tmp_path / "good", 40)
    return tmp_path / "good"


def _started(root, **kwargs) -> tuple[ImageLoader, object, list[int]]:
    loader = ImageLoader(FolderSource(root), views=VIEWS, batch_size=2, num_workers=2, **kwargs)
    stream = iter(loader)
    next(stream)
    pids = loader._pool.worker_pids
    assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    return loader, stream, pids


def test_close_and_context_manager_reap_the_workers(good_folder):
    loader, _, pids = _started(good_folder)
    loader.close()
    assert _wait_gone(pids)
    loader.close()  # idempotent

    class Stop(Exception):
        pass

    with pytest.raises(Stop), ImageLoader(FolderSource(good_folder), views=VIEWS, batch_size=2, num_workers=2) as loader:
        for _ in loader:
            pids = loader._pool.worker_pids
            raise Stop
    assert _wait_gone(pids)


def test_garbage_collection_reaps_the_workers(good_folder):
    loader, stream, pids = _started(good_folder)
    del loader, stream
    gc.collect()
    assert _wait_gone(pids)


def test_keyboard_interrupt_inside_the_loader_stops_the_workers(good_folder):
    class Interrupting(FolderSource):
        def read(self, index):
            if index == 30:
                raise KeyboardInterrupt
            return super().read(index)

    loader = ImageLoader(Interrupting(good_folder), views=VIEWS, batch_size=2, shuffle=False, num_workers=2)
    pids = []
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pids = pids or loader._pool.worker_pids
    assert pids and _wait_gone(pids)


def test_a_dead_worker_raises_a_clear_error(good_folder):
    loader, stream, pids = _started(good_folder)
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(DecodeWorkerError, match=r"decode worker 0 of 2 \(pid \d+\) was killed by SIGKILL "
                                                r"\(out of memory\?\).*set data\.num_workers to 0"):
        for _ in stream:
            pass
    assert _wait_gone(pids)  # the other worker is stopped too
    assert _run(loader)[2]["samples"] > 0  # iterating again starts fresh workers and continues


def test_workers_exit_when_the_main_process_is_killed(good_folder):
    """SIGKILL leaves no chance to clean up: the workers must notice the closed pipe and exit on their own."""
    script = textwrap.dedent(f"""
        from vilex.data import FolderSource, ImageLoader, ViewConfig
        loader = ImageLoader(FolderSource({str(good_folder)!r}), views={{"v": ViewConfig(size=8)}}, batch_size=2,
                             num_workers=2, epochs=None)
        stream = iter(loader)
        next(stream)
        print(*loader._pool.worker_pids, flush=True)
        import time
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
        proc.kill()
        proc.wait(10)
        assert _wait_gone(pids, reaped=False), "decode workers outlived their killed main process"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_pretrain_sigkill_and_resume_with_workers_matches_in_process_losses(tmp_path_factory, tmp_path):
    """`vilex pretrain` with 2 decode workers, SIGKILLed after a checkpoint and resumed: every loss equals, bit for
    bit, those of an uninterrupted run that decodes in-process."""
    from pretrain_helpers import (
        build_tiny_world,
        cli_args,
        run_and_kill,
        run_cli,
        summary,
    )

    world = build_tiny_world(tmp_path_factory.mktemp("world"))
    common = ["train.max_steps=12", "train.checkpoint_every=3", "val.every=1000"]
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    ref = run_cli(cli_args(world, ref_out, *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = summary(ref_out)["losses"]
    assert len(reference) == 12

    workers = [*common, "data.train.num_workers=2"]
    rc = run_and_kill(cli_args(world, out, *workers), out, after_checkpoint=3)
    assert rc != 0, "the run finished before it could be killed (the test did not test a kill)"
    assert not (out / "summary.json").exists()
    resumed = run_cli(cli_args(world, out, *workers) + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(out)["losses"] == reference

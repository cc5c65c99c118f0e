"""Atomic checkpoints: safetensors + config round trip, keep-last-K, and a save killed mid-write."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from vilex.checkpoint import CheckpointManager, atomic_dir, load_tensors, save_checkpoint, save_tensors
from vilex.errors import UserError


def test_round_trip(tmp_path):
    t = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_checkpoint(tmp_path / "ck", t, {"width": 4, "name": "x"})
    loaded, cfg = load_tensors(tmp_path / "ck")
    assert cfg == {"width": 4, "name": "x"}
    assert torch.equal(loaded["w"], t["w"]) and torch.equal(loaded["b"], t["b"])
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load_tensors(tmp_path / "nope")


def test_keep_last_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 5):
        mgr.save(step, lambda d, s=step: save_tensors(d, {"s": torch.tensor([s])}, {"step": s}))
    # keep the two highest steps (numeric order, not lexicographic)
    assert [p.name for p in mgr.list()] == ["checkpoint-20", "checkpoint-30"]
    assert mgr.latest().name == "checkpoint-30"
    assert mgr.resolve("auto") == mgr.latest()
    assert mgr.resolve(None) is None
    with pytest.raises(UserError, match="--resume: checkpoint folder not found"):
        mgr.resolve(str(tmp_path / "missing"))


def test_failed_writer_leaves_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, lambda d: save_tensors(d, {"a": torch.ones(1)}))

    def broken(d):
        (d / "partial.bin").write_bytes(b"x" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(2, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_overwrite_same_name_is_atomic(tmp_path):
    save_checkpoint(tmp_path / "ck", {"v": torch.zeros(2)})
    save_checkpoint(tmp_path / "ck", {"v": torch.ones(2)})
    assert torch.equal(load_tensors(tmp_path / "ck")[0]["v"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from vilex.checkpoint import CheckpointManager, save_tensors
    root = Path(sys.argv[1])
    mgr = CheckpointManager(root, keep_last=5)
    mgr.save(1, lambda d: save_tensors(d, {"w": torch.full((4,), 1.0)}, {"step": 1}))
    def slow(d):
        with open(d / "model.safetensors", "wb") as fh:
            fh.write(b"\\0" * 1000)   # a half-written weights file ...
            fh.flush()
            (root / "WRITING").touch()  # ... tell the test, then hang until killed
            time.sleep(60)
    mgr.save(2, slow)
    """
)


def test_save_killed_mid_write_keeps_previous_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "WRITING").exists():
            assert proc.poll() is None, "writer exited early"
            assert time.time() < deadline, "writer never reached the middle of the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    mgr = CheckpointManager(tmp_path, keep_last=5)
    # the half-written save is not visible to loaders; the previous checkpoint is intact
    assert [p.name for p in mgr.list()] == ["checkpoint-1"]
    tensors, cfg = load_tensors(mgr.latest())
    assert cfg == {"step": 1} and torch.equal(tensors["w"], torch.full((4,), 1.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [".tmp-checkpoint-2-%d" % proc.pid]
    # the next save cleans the stale temp folder
    mgr.save(2, lambda d: save_tensors(d, {"w": torch.zeros(1)}))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "WRITING") == ["checkpoint-1", "checkpoint-2"]


def test_atomic_dir_exception_cleans_temp(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "x") as d:
            (d / "f").write_text("hi")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_folder_fingerprint_is_of_weight_content(tmp_path):
    from vilex.checkpoint import folder_fingerprint

    assert folder_fingerprint("stabilityai/stable-diffusion-2-1") is None  # a hub id: nothing local to read
    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    big = bytes(range(256)) * 2000  # 512 KB: the three samples do not cover it all
    (a / "unet" / "w.safetensors").write_bytes(big)
    (a / "unet" / "config.json").write_text("{}")
    first = folder_fingerprint(a)
    (a / "unet" / "config.json").write_text('{"comment": 1}')  # not a weight file
    assert folder_fingerprint(a) == first
    (a / "unet" / "w.safetensors").write_bytes(big[:-1] + b"\x00")  # the last byte changed
    assert folder_fingerprint(a) != first
    (a / "unet" / "w.safetensors").write_bytes(big)
    assert folder_fingerprint(a) == first

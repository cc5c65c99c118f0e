"""Reliability: verified checkpoints and caches, one writer per run folder, preemption by signal, safe loading and a
full disk — each as a user meets it (tiny configs; real subprocesses where signals and locks are involved)."""
import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_helpers import REPO, _cmd, build_tiny_world, cli_args, env, run_cli, summary

from vilex.checkpoint import CheckpointManager, CorruptFolderError, atomic_dir, verify_folder
from vilex.cli.main import main as vilex_main

COMMON = ["val.every=1000", "train.log_every=1", "train.keep_last=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("rel_world"), n=16)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints every 2 steps) and its per-step losses."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_cli(cli_args(world, out, "train.max_steps=6", "train.checkpoint_every=2", *COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, summary(out)["losses"]


def _copy_run(src: Path, dst: Path, keep: list[int]) -> Path:
    """A copy of a finished run holding only the given checkpoints (as if it had been stopped there)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("summary.json", "run_history.json"))
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) not in keep:
            shutil.rmtree(ckpt)
    return dst


# ----------------------------------------------------------------------------- verified checkpoints
@pytest.mark.parametrize("damage", ["truncate", "same_size_bytes"])
def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_resumes_exactly(world, reference, tmp_path, damage):
    ref_out, ref_losses = reference
    run = _copy_run(ref_out, tmp_path / "run", keep=[2, 4])
    bad = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-64] + bytes(64))
    r = run_cli(cli_args(world, run, "train.max_steps=6", "train.checkpoint_every=2", *COMMON) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint" in r.stderr and "checkpoint-4" in r.stderr and "optimizer.pt" in r.stderr
    assert summary(run)["this_run"]["from_step"] == 2
    assert summary(run)["losses"] == ref_losses  # resumed from checkpoint-2, bit for bit


def test_resume_path_to_a_corrupt_checkpoint_is_one_line_naming_the_file(reference, tmp_path, capsys):
    ref_out, _ = reference
    run = _copy_run(ref_out, tmp_path / "run", keep=[4])
    bad = run / "checkpoints" / "checkpoint-4" / "encoder.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = run / "config.yaml"
    code = vilex_main(["pretrain", "--config", str(cfg), "--resume", str(bad.parent)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (log lines come before it)
    assert code == 2 and err.startswith("error: --resume: checkpoint")
    assert "checkpoint-4 is corrupt: encoder.pt is truncated" in err


def test_every_published_folder_carries_a_manifest_that_catches_changed_bytes(tmp_path):
    with atomic_dir(tmp_path / "exported") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    folder = tmp_path / "exported"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"sub/weights.bin"} and manifest["files"]["sub/weights.bin"]["size"] == 4096
    verify_folder(folder)
    data = bytearray((folder / "sub" / "weights.bin").read_bytes())
    data[2000] ^= 0xFF
    (folder / "sub" / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(CorruptFolderError, match=r"sub/weights.bin has changed bytes"):
        verify_folder(folder)
    (folder / "sub" / "weights.bin").unlink()
    with pytest.raises(CorruptFolderError, match=r"sub/weights.bin is missing"):
        verify_folder(folder)


def test_a_truncated_safetensors_file_is_named_by_the_loader(tmp_path):
    from vilex.checkpoint import load_tensors, save_tensors

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_tensors(folder, {"w": torch.randn(64, 64)})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptFolderError, match=r"model.safetensors"):
        load_tensors(folder)


# ----------------------------------------------------------------------------- the latent cache
def _cache_folder(out: Path) -> Path:
    [folder] = [p for p in (out / "latent_cache").iterdir() if p.is_dir()]
    return folder


def _verify_cache(folder: Path) -> None:
    """Every unit's sidecar has the size and content hash its completion marker records."""
    from vilex.checkpoint import file_hash

    markers = sorted(folder.glob("*.done.json"))
    assert markers and len(markers) == len(list(folder.glob("*.safetensors")))
    for marker in markers:
        want = json.loads(marker.read_text())["sidecar"]
        sidecar = marker.with_name(marker.name.replace(".done.json", ".safetensors"))
        assert (sidecar.stat().st_size, file_hash(sidecar)) == (want["size"], want["xxh3_128"])


@pytest.mark.parametrize("damage", ["marker_truncated", "sidecar_truncated"])
def test_a_broken_latent_cache_is_rebuilt_with_a_warning(world, tmp_path, damage):
    out = tmp_path / "run"
    first = run_cli(cli_args(world, out, "train.max_steps=1", *COMMON))
    assert first.returncode == 0, first.stderr[-2000:]
    folder = _cache_folder(out)
    target = next(folder.glob("*.done.json" if damage == "marker_truncated" else "*.safetensors"))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    again = run_cli(cli_args(world, tmp_path / "run2", "train.max_steps=1", f"latent_cache.dir={out / 'latent_cache'}",
                             *COMMON))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is broken" in again.stderr and "rebuilding" in again.stderr
    _verify_cache(_cache_folder(out))  # rebuilt whole


def test_changed_bytes_in_a_cache_sidecar_stop_the_run_in_one_line_and_the_next_start_rebuilds(world, tmp_path):
    out = tmp_path / "run"
    assert run_cli(cli_args(world, out, "train.max_steps=1", *COMMON)).returncode == 0
    folder = _cache_folder(out)
    sidecar = next(folder.glob("*.safetensors"))
    data = bytearray(sidecar.read_bytes())
    data[-200:] = bytes(200)  # same size: only the content hash can tell
    sidecar.write_bytes(bytes(data))
    args = cli_args(world, tmp_path / "run2", "train.max_steps=2", f"latent_cache.dir={out / 'latent_cache'}",
                    *COMMON)
    stopped = run_cli(args)
    assert stopped.returncode == 2
    [line] = [x for x in stopped.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: latent cache") and "has changed bytes" in line and "rebuilt" in line
    assert "Traceback" not in stopped.stderr
    note = sidecar.with_name(sidecar.name.replace(".safetensors", ".corrupt"))
    assert note.is_file()  # the unit is marked (its marker withdrawn) for the next start
    rebuilt = run_cli(args + ["--resume", "auto"])
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "rebuilding" in rebuilt.stderr and not note.exists()
    _verify_cache(folder)


# ----------------------------------------------------------------------------- one writer per folder
def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_cmd(args, 1), env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_a_second_run_on_the_same_folder_refuses_naming_the_holder(world, tmp_path):
    out = tmp_path / "run"
    first = _start(cli_args(world, out, "train.max_steps=400", "train.checkpoint_every=1000", *COMMON))
    try:
        _wait_for(out / "train_log.jsonl", first)
        second = run_cli(cli_args(world, out, "train.max_steps=400", *COMMON))
        assert second.returncode == 2
        [last] = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}" in last
        assert first.poll() is None  # the first run is untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    # its holder is gone now: the next run takes the lock over with a warning
    third = run_cli(cli_args(world, out, "train.max_steps=2", *COMMON))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the lock" in third.stderr and not (out / ".run.lock").exists()


# ----------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_a_stop_signal_checkpoints_exits_zero_and_resume_is_exact(world, reference, tmp_path, nproc, sig):
    _, ref_losses = reference
    out = tmp_path / "run"
    args = cli_args(world, out, "train.max_steps=6", "train.checkpoint_every=2", *COMMON)
    if nproc == 2:  # the reference is one process; two processes get their own
        ref2 = tmp_path / "ref2"
        r = run_cli(cli_args(world, ref2, "train.max_steps=6", "train.checkpoint_every=2", *COMMON), nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        ref_losses = summary(ref2)["losses"]
    proc = subprocess.Popen(_cmd(args, nproc), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(out / "train_log.jsonl", proc)
        if nproc == 1:
            os.kill(proc.pid, sig)
        else:  # what SLURM does: the signal goes to every task of the job
            for pid in _children(proc.pid):
                os.kill(pid, sig)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, proc.stderr.read()[-3000:]
    s = summary(out)
    assert s["stopped_early"] and sig.name in s["stop_reason"] and s["steps"] < 6
    assert (out / "checkpoints" / f"checkpoint-{s['steps']}").is_dir()
    resumed = run_cli(args + ["--resume", "auto"], nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(out)["losses"] == ref_losses


def _children(pid: int) -> list[int]:
    """The worker processes a launcher started (one level down)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


# ----------------------------------------------------------------------------- a full disk
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops_in_one_line(world, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        if str(f).endswith("encoder.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: the disk fills up half-way through
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    args = cli_args(world, out, "train.max_steps=4", "train.checkpoint_every=2", *COMMON)
    assert vilex_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "writing checkpoint-4" in err and "No space left on device" in err and "checkpoint-2" in err
    ckpts = CheckpointManager(out / "checkpoints")
    assert [p.name for p in ckpts.list()] == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no partial folder
    verify_folder(ckpts.latest())
    monkeypatch.setattr(torch, "save", real_save)
    assert vilex_main(args + ["--resume", "auto"]) == 0
    assert summary(out)["steps"] == 4


# ----------------------------------------------------------------------------- safe loading
def test_no_code_loads_with_weights_only_false():
    found = []
    for package in ("vilex", "vlm", "benchmarks", "toy", "scripts"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.keyword) and node.arg == "weights_only" and not (
                        isinstance(node.value, ast.Constant) and node.value.value is True):
                    found.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                        getattr(node.func.value, "id", "") == "torch" and \
                        not any(k.arg == "weights_only" for k in node.keywords):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} (torch.load without weights_only=True)")
    assert found == []


def test_resume_state_loads_with_weights_only(reference):
    ref_out, _ = reference
    ckpt = ref_out / "checkpoints" / "checkpoint-6"
    for name in ("rank0.pt", "optimizer.pt", "encoder.pt"):
        torch.load(ckpt / name, map_location="cpu", weights_only=True)  # raises on any pickled code object


def test_a_vlm_checkpoint_with_a_truncated_file_is_refused_naming_it(tmp_path):
    from vlm.model import resolve_checkpoint

    with atomic_dir(tmp_path / "vlm" / "checkpoints" / "checkpoint-2") as tmp:
        (tmp / "vlm_config.json").write_text("{}")
        (tmp / "projector").mkdir()
        (tmp / "projector" / "model.safetensors").write_bytes(os.urandom(2048))
    ckpt = tmp_path / "vlm" / "checkpoints" / "checkpoint-2"
    assert resolve_checkpoint(tmp_path / "vlm") == ckpt
    weights = ckpt / "projector" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptFolderError, match=r"checkpoint-2 is corrupt: projector/model.safetensors is truncated"):
        resolve_checkpoint(ckpt)
    from vilex.errors import UserError

    with pytest.raises(UserError, match="not a VLM checkpoint"):  # the run folder skips it: no other checkpoint
        resolve_checkpoint(tmp_path / "vlm")

"""`vilex eval --dry-run`: everything resolved, the plan printed (pairs, worker of each, done / held), nothing run."""
import json
import subprocess
import sys

import pytest
from test_bench_parallel import fake_world

import benchmarks.sweep as sweep
from benchmarks.claims import HOST, Holder
from benchmarks.sweep import SweepConfig, plan_sweep
from vilex.cli.main import main
from vilex.config import from_dict


def _files(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _table(lines: list[str]) -> list[dict[str, str]]:
    """The plan's table (aligned columns under a '#  model …' header) as dicts."""
    i = next(n for n, line in enumerate(lines) if line.startswith("#  model"))
    names = lines[i].split()
    starts = [lines[i].index(f" {n} ") + 1 if n != "#" else 0 for n in names[:-1]] + [lines[i].index(" status") + 1]
    bounds = list(zip(starts, starts[1:] + [None]))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds)} for line in lines[i + 1:]
            if line and not line.startswith("{")]


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "cuda_device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    models, tasks, include = fake_world(tmp_path / "world", 2, 3)
    cfg = {"models": models, "tasks": tasks, "include_path": str(include), "output_dir": str(tmp_path / "run"),
           "devices": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    return path, cfg


def test_dry_run_prints_the_plan_and_writes_nothing(world, tmp_path, capsys):
    path, cfg = world
    pairs = plan_sweep(from_dict(SweepConfig, cfg), full_index=lambda p: {}).pairs
    (pairs[0].result_dir).mkdir(parents=True)
    (pairs[0].result_dir / "result.json").write_text("{}")
    pairs[1].error_file.parent.mkdir(parents=True)
    pairs[1].error_file.write_text(json.dumps({"error": "ValueError: boom"}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = Holder("node-b", 7, None, "b", "2026-01-01T00:00:00Z")
    stale = Holder(HOST, dead.pid, None, "gone", "2026-01-01T00:00:00Z")
    for pair, holder in ((pairs[2], held), (pairs[3], stale)):
        pair.claim_file.parent.mkdir(parents=True, exist_ok=True)
        pair.claim_file.write_text(json.dumps(holder.__dict__))
    before = _files(tmp_path / "run")

    assert main(["eval", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert _files(tmp_path / "run") == before  # no logs/, claims, sweep.json: nothing written or taken over
    assert out[0] == "plan: 2 model(s) x 3 task(s) = 6 pairs: 1 done (skipped), 4 to run, 1 held by another sweep"
    assert f"output_dir: {tmp_path / 'run'} (writable)" in out
    assert f"tasks: t1, t2, t3 from include_path {tmp_path / 'world' / 'tasks'}" in out
    assert "workers: 2 at once (1 on GPU 0, 2 on GPU 1); 4 worker process(es) to start (process_per: pair)" in out
    rows = _table(out)
    assert [(r["model"], r["task"], r["key"]) for r in rows] == [(p.model, p.task, p.key) for p in pairs]
    assert [(r["process"], r["worker"], r["status"]) for r in rows] == [
        ("", "", "done (skipped)"),
        ("1", "1 (GPU 0)", "to run (failed before, retried)"),
        ("", "", f"held by {held}: left to that sweep"),
        ("2", "2 (GPU 1)", f"to run (takes over the stale claim of {stale})"),
        ("3", "1 (GPU 0)", "to run"),
        ("4", "2 (GPU 1)", "to run")]
    assert json.loads(out[-1]) == {"pairs": 6, "done": 1, "to_run": 4, "held": 1, "workers": 2, "processes": 4}


@pytest.mark.parametrize("overrides, message", [
    (["models.m2=/nope/ckpt"], "checkpoint(s) not found: m2: /nope/ckpt"),
    (["tasks=[t1,gqq]"], "unknown lmms-eval task(s): 'gqq' (close: gqa)"),
    (["devices=[0,2]"], "devices: GPU 2 not available: this machine sees 2 GPU(s); use indices 0..1 or cpu"),
    (["devices=[0,cuda:1]"], "devices[1]: expected a GPU index (0, 1, ...) or cpu, got 'cuda:1'"),
    (["device=cuda"], "device and devices: give one"),
    (["output_dir=OUT/sub"], "output_dir OUT/sub: OUT is a file, not a folder"),
])
def test_dry_run_refuses_what_would_fail_in_one_line(world, tmp_path, capsys, monkeypatch, overrides, message):
    path, _ = world
    monkeypatch.setattr(sweep, "lmms_task_index", lambda include_path: {"gqa": tmp_path / "gqa.yaml"})
    (tmp_path / "file").write_text("")
    overrides = [o.replace("OUT", str(tmp_path / "file")) for o in overrides]
    args = ["eval", "--config", str(path), "--dry-run"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("OUT", str(tmp_path / "file")) in err
    assert not (tmp_path / "run").exists()

"""Sweeps on several devices at once and several sweeps on one output_dir, with real worker subprocesses.

The worker command is swapped for a stand-in script (FAKE_WORKER) that records the environment it got (its
CUDA_VISIBLE_DEVICES, threads, response-cache run id) and writes a result the way benchmarks.worker does, so the
scheduling, claims and device plumbing run for real in seconds; the GPU path is the same code with
CUDA_VISIBLE_DEVICES set (the visible GPU count is patched on this GPU-less machine). Real lmms-eval workers on
`devices: [cpu, cpu]` and two real `vilex eval` processes sharing an output_dir run in the slow tests.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmarks.sweep as sweep
from benchmarks.claims import HOST, Holder, read_claim
from benchmarks.sweep import SweepConfig, make_units, plan_sweep, run_sweep
from vilex.config import from_dict
from vilex.errors import ConfigError, UserError

FAKE_WORKER = r'''
import json, os, sys, time
from pathlib import Path

spec = json.loads(Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
record = Path(os.environ["FAKE_WORKER_RECORD"])
if os.environ.get("FAKE_WORKER_EXIT_WITH_PARENT"):
    from benchmarks.worker import _exit_with_parent
    _exit_with_parent(0.1)
met = True
barrier = int(os.environ.get("FAKE_WORKER_BARRIER", "0"))
if barrier:  # wait until that many workers are alive at once (proves they run side by side)
    alive = record.with_name("alive")
    alive.mkdir(exist_ok=True)
    (alive / str(os.getpid())).touch()
    deadline = time.time() + 20
    while len(list(alive.iterdir())) < barrier and time.time() < deadline:
        time.sleep(0.02)
    met = len(list(alive.iterdir())) >= barrier
common = {k: v for k, v in spec.items() if k != "pairs"}
for pair in spec.get("pairs") or [{}]:
    one = {**common, **pair}
    t0 = time.time()
    time.sleep(float(os.environ.get("FAKE_WORKER_SLEEP", "0")))
    out = Path(one["out"])
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    (tmp / "result.json").write_text(json.dumps({"metrics": {"exact_match,none": 0.5}, "spec": one, "seconds": 0.1,
                                                 "config": {"metric_list": [{"metric": "exact_match"}]}}))
    os.rename(tmp, out)
    line = {"model": one["model_args"].split("=", 1)[1], "task": one["task"], "key": one["key"],
            "device": one["device"], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "cache_run": os.environ.get("LMMS_CACHE_RUN_ID"),
            "sweep": one["sweep"], "pid": os.getpid(), "met": met, "t0": t0, "t1": time.time()}
    with open(record, "a") as f:
        f.write(json.dumps(line) + "\n")
'''

# runs run_sweep in its own process with the stand-in worker, started together with others through a go file
DRIVER = r'''
import json, logging, sys, time
from pathlib import Path
import benchmarks.sweep as sweep
from vilex.config import load_config
logging.basicConfig(level=logging.INFO)
cfg_path, worker, go, ready = sys.argv[1:5]
sweep.WORKER_COMMAND = [sys.executable, worker]
cfg = load_config(sweep.SweepConfig, cfg_path)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
print(json.dumps(sweep.run_sweep(cfg, full_index=lambda include_path: {}).counts()))
'''


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def fake_world(root: Path, n_models: int, n_tasks: int) -> tuple[dict[str, str], list[str], Path]:
    """Checkpoint folders m1..mN and task YAMLs t1..tM (enough for planning; the stand-in worker reads no data)."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    names = [f"t{j}" for j in range(1, n_tasks + 1)]
    for t in names:
        (tasks / f"{t}.yaml").write_text(f"task: {t}\n")
    models = {}
    for i in range(1, n_models + 1):
        (root / f"m{i}").mkdir()
        (root / f"m{i}" / "weights.bin").write_bytes(bytes([i]))
        models[f"m{i}"] = str(root / f"m{i}")
    return models, names, tasks


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """The stand-in worker for in-process sweeps; returns the file its runs are recorded in."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    record = tmp_path / "record" / "runs.jsonl"
    record.parent.mkdir()
    monkeypatch.setattr(sweep, "WORKER_COMMAND", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_WORKER_RECORD", str(record))
    return record


def _cfg(tmp_path, n_models, n_tasks, **kw) -> SweepConfig:
    models, tasks, include = fake_world(tmp_path / "world", n_models, n_tasks)
    return from_dict(SweepConfig, {"models": models, "tasks": tasks, "include_path": str(include),
                                   "output_dir": str(tmp_path / "run"), **kw})


def test_four_gpu_workers_at_once_each_seeing_only_its_gpu(tmp_path, fake_worker, monkeypatch):
    monkeypatch.setattr(sweep, "cuda_device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,6,5,4")  # the sweep's own view: index 0 is physical GPU 7
    monkeypatch.setenv("FAKE_WORKER_BARRIER", "4")
    monkeypatch.setenv("FAKE_WORKER_SLEEP", "0.2")
    cfg = _cfg(tmp_path, 2, 4, devices=[0, 1, 2, 3])  # YAML ints
    summary = run_sweep(cfg, full_index=lambda p: {})
    assert summary.counts() == {"done": 8, "skipped": 0, "failed": 0, "elsewhere": 0}
    runs = records(fake_worker)
    assert sorted((r["model"].rsplit("/", 1)[1], r["task"]) for r in runs) == \
        sorted((m, t) for m in ("m1", "m2") for t in ("t1", "t2", "t3", "t4"))  # each pair exactly once
    assert all(r["met"] for r in runs)  # the first four workers were alive at the same time
    assert {r["cuda"] for r in runs} == {"7", "6", "5", "4"} and {r["device"] for r in runs} == {"cuda"}
    assert len({r["cache_run"] for r in runs}) == 8  # one lmms-eval response-cache shard per worker process
    by_gpu = {o.device for o in summary.outcomes}
    assert by_gpu == {"GPU 0 (CUDA_VISIBLE_DEVICES=7)", "GPU 1 (CUDA_VISIBLE_DEVICES=6)",
                      "GPU 2 (CUDA_VISIBLE_DEVICES=5)", "GPU 3 (CUDA_VISIBLE_DEVICES=4)"}
    result = json.loads((Path(summary.outcomes[0].result_dir) / "result.json").read_text())
    assert result["spec"]["visible_devices"] in {"7", "6", "5", "4"}
    assert not list((tmp_path / "run").rglob("*.claim"))  # every claim released
    # a rerun skips all, on any devices
    again = run_sweep(_cfg_again(cfg, devices=["cpu"]), full_index=lambda p: {})
    assert again.count("skipped") == 8 and len(records(fake_worker)) == 8


def _cfg_again(cfg: SweepConfig, **kw) -> SweepConfig:
    from vilex.config import to_dict

    return from_dict(SweepConfig, {**to_dict(cfg), **kw})


def test_cpu_workers_hide_the_gpus_and_share_the_cores(tmp_path, fake_worker, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("FAKE_WORKER_BARRIER", "2")
    cfg = _cfg(tmp_path, 1, 2, devices=["cpu", "cpu"])
    assert run_sweep(cfg, full_index=lambda p: {}).count("done") == 2
    runs = records(fake_worker)
    assert all(r["met"] for r in runs)
    assert [(r["cuda"], r["device"], r["omp"]) for r in runs] == [("", "cpu", str(max(1, os.cpu_count() // 2)))] * 2


def test_one_model_per_process_is_cut_into_chunks_when_devices_outnumber_models(tmp_path, fake_worker):
    cfg = _cfg(tmp_path, 3, 4, devices=["cpu"] * 4, process_per="model")
    plan = plan_sweep(cfg, full_index=lambda p: {})
    assert [[(p.model, p.task) for p in u] for u in plan.units] == [
        [("m1", "t1"), ("m1", "t2")], [("m1", "t3"), ("m1", "t4")], [("m2", "t1"), ("m2", "t2")],
        [("m2", "t3"), ("m2", "t4")], [("m3", "t1"), ("m3", "t2")], [("m3", "t3"), ("m3", "t4")]]
    assert [len(u) for u in make_units(plan.pairs, "model", 1)] == [4, 4, 4]  # one device: one process per model
    summary = run_sweep(cfg, full_index=lambda p: {})
    runs = records(fake_worker)
    assert summary.count("done") == 12 and len(runs) == 12 and len({r["pid"] for r in runs}) == 6


def test_device_mistakes_fail_in_one_line_before_anything_runs(tmp_path, fake_worker, monkeypatch):
    monkeypatch.setattr(sweep, "cuda_device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match=r"^devices: GPU 2, 3 not available: this machine sees 2 GPU\(s\); use "
                                        r"indices 0..1 or cpu$"):
        run_sweep(_cfg(tmp_path, 1, 1, devices=[0, 3, 2]), full_index=lambda p: {})
    assert not (tmp_path / "run").exists() and records(fake_worker) == []
    with pytest.raises(ConfigError, match=r"devices\[1\]: expected a GPU index \(0, 1, \.\.\.\) or cpu, got 'cuda:1'"):
        from_dict(SweepConfig, {"models": {"a": "x"}, "tasks": ["t"], "devices": [0, "cuda:1"]})
    with pytest.raises(ConfigError, match=r"device and devices: give one"):
        from_dict(SweepConfig, {"models": {"a": "x"}, "tasks": ["t"], "devices": [0], "device": "cuda"})


def test_a_stale_claim_is_taken_over_and_a_claim_from_another_host_is_left(tmp_path, fake_worker, caplog):
    caplog.set_level("INFO", logger="benchmarks.sweep")
    cfg = _cfg(tmp_path, 1, 3)
    pairs = plan_sweep(cfg, full_index=lambda p: {}).pairs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = Holder(HOST, dead.pid, None, "gone", "2026-01-01T00:00:00Z")
    foreign = Holder("node-b", 4242, None, "theirs", "2026-01-01T00:00:00Z")
    for pair, holder in ((pairs[0], gone), (pairs[2], foreign)):
        pair.claim_file.parent.mkdir(parents=True)
        pair.claim_file.write_text(json.dumps(holder.__dict__))
    summary = run_sweep(cfg, full_index=lambda p: {})
    assert [o.status for o in summary.outcomes] == ["done", "done", "elsewhere"]
    assert summary.outcomes[2].by == "node-b pid 4242 since 2026-01-01T00:00:00Z"
    assert sorted(r["task"] for r in records(fake_worker)) == ["t1", "t2"]
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and f"took over the stale claim of {gone}" in warning[0].getMessage()
    assert str(pairs[0].claim_file) in warning[0].getMessage()
    assert read_claim(pairs[2].claim_file) == foreign and not pairs[0].claim_file.exists()
    saved = json.loads((tmp_path / "run" / "sweep.json").read_text())["pairs"]
    assert [p["status"] for p in saved] == ["done", "done", "elsewhere"]
    pairs[2].claim_file.unlink()  # node-b's sweep is gone and a person removed its claim
    assert [o.status for o in run_sweep(cfg, full_index=lambda p: {}).outcomes] == ["skipped", "skipped", "done"]


def _start_drivers(tmp_path: Path, cfg_path: Path, n: int, env: dict) -> list[subprocess.Popen]:
    driver, worker = tmp_path / "driver.py", tmp_path / "fake_worker.py"
    driver.write_text(DRIVER)
    worker.write_text(FAKE_WORKER)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(driver), str(cfg_path), str(worker), str(go),
                               str(tmp_path / f"ready{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(n)]
    deadline = time.time() + 30
    while len(list(tmp_path.glob("ready*"))) < n and time.time() < deadline:
        time.sleep(0.02)
    go.touch()
    return procs


def test_two_sweep_processes_on_one_output_dir_run_each_pair_once(tmp_path):
    models, tasks, include = fake_world(tmp_path / "world", 3, 4)
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(json.dumps({"models": models, "tasks": tasks, "include_path": str(include),
                                    "output_dir": str(tmp_path / "run"), "devices": ["cpu", "cpu"]}))
    record = tmp_path / "record" / "runs.jsonl"
    record.parent.mkdir()
    env = {**os.environ, "FAKE_WORKER_RECORD": str(record), "FAKE_WORKER_SLEEP": "0.3"}
    procs = _start_drivers(tmp_path, cfg_path, 2, env)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    counts = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    runs = records(record)
    assert len(runs) == 12 and len({(r["model"], r["task"]) for r in runs}) == 12  # every pair ran, none twice
    assert len({r["sweep"] for r in runs}) == 2  # both sweeps did work
    assert counts[0]["done"] + counts[1]["done"] == 12 and all(c["failed"] == 0 for c in counts)
    assert all(sum(c.values()) == 12 for c in counts)
    assert not list((tmp_path / "run").rglob("*.claim*"))
    from benchmarks.report import collect

    rows, _ = collect(tmp_path / "run")  # whichever sweep wrote sweep.json last, the report sees all 12 scores
    assert len(rows) == 12 and all(r["score"] == 0.5 for r in rows)


def test_a_killed_sweep_stops_its_workers_and_the_next_sweep_takes_its_pairs_over(tmp_path, caplog):
    models, tasks, include = fake_world(tmp_path / "world", 1, 2)
    cfg_path = tmp_path / "sweep.yaml"
    cfg = {"models": models, "tasks": tasks, "include_path": str(include), "output_dir": str(tmp_path / "run"),
           "devices": ["cpu", "cpu"]}
    cfg_path.write_text(json.dumps(cfg))
    record = tmp_path / "record" / "runs.jsonl"
    record.parent.mkdir()
    env = {**os.environ, "FAKE_WORKER_RECORD": str(record), "FAKE_WORKER_SLEEP": "60",
           "FAKE_WORKER_EXIT_WITH_PARENT": "1"}
    (proc,) = _start_drivers(tmp_path, cfg_path, 1, env)
    deadline = time.time() + 30
    while len(list((tmp_path / "run").rglob("*.spec.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are up
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    claims = list((tmp_path / "run").rglob("*.claim"))
    assert len(claims) == 2  # SIGKILL leaves its claims behind ...
    time.sleep(1.0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "fake_worker.py") not in ps  # ... but not its workers (they exit with their sweep)
    assert records(record) == []

    caplog.set_level("WARNING", logger="benchmarks.sweep")
    script = tmp_path / "fake_worker.py"
    os.environ["FAKE_WORKER_RECORD"] = str(record)
    try:
        sweep.WORKER_COMMAND, saved = [sys.executable, str(script)], sweep.WORKER_COMMAND
        summary = run_sweep(from_dict(SweepConfig, cfg), full_index=lambda p: {})
    finally:
        sweep.WORKER_COMMAND = saved
        del os.environ["FAKE_WORKER_RECORD"]
    assert summary.count("done") == 2 and len(records(record)) == 2
    assert sum("took over the stale claim" in r.getMessage() for r in caplog.records) == 2


def test_sigterm_releases_the_claims_and_stops_the_workers(tmp_path):
    models, tasks, include = fake_world(tmp_path / "world", 1, 2)
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(json.dumps({"models": models, "tasks": tasks, "include_path": str(include),
                                    "output_dir": str(tmp_path / "run"), "devices": ["cpu", "cpu"]}))
    record = tmp_path / "record" / "runs.jsonl"
    record.parent.mkdir()
    env = {**os.environ, "FAKE_WORKER_RECORD": str(record), "FAKE_WORKER_SLEEP": "60"}
    (proc,) = _start_drivers(tmp_path, cfg_path, 1, env)
    deadline = time.time() + 30
    while len(list((tmp_path / "run").rglob("*.claim"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not list((tmp_path / "run").rglob("*.claim"))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "fake_worker.py") not in ps
    assert records(record) == []


@pytest.mark.slow
def test_two_real_vilex_eval_processes_share_one_output_dir(tmp_path):
    """Two `vilex eval` processes started together on one output_dir, real lmms-eval workers: each pair runs once
    (the two summaries' `done` add up to the grid), every result is complete, and the report has every score."""
    from benchmarks.report import collect
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from toy.tiny_suite import build_tiny_toy_suite

    build_tiny_toy_suite(tmp_path, n=8, max_per_task=2)
    ckpts = build_tiny_vlm_checkpoints(tmp_path, seeds=(0, 1))
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(json.dumps({"models": {"a": str(ckpts[0]), "b": str(ckpts[1])},
                               "tasks": ["vilex_toy_colour", "vilex_toy_caption"],
                               "include_path": str(tmp_path / "tasks"), "output_dir": str(tmp_path / "run")}))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "vilex", "eval", "--config", str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    counts = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert counts[0]["done"] + counts[1]["done"] == 4 and all(c["failed"] == 0 for c in counts)
    rows, _ = collect(tmp_path / "run")
    assert len(rows) == 4 and all(r["score"] == r["score"] for r in rows)  # a score (not NaN) for every pair
    sweeps = set()
    for result in (tmp_path / "run" / "results").rglob("result.json"):
        data = json.loads(result.read_text())
        assert data["n_samples"]["effective"] == 2
        assert len((result.parent / "samples.jsonl").read_text().splitlines()) == 2
        sweeps.add(data["spec"]["sweep"])
    assert len(list((tmp_path / "run" / "results").rglob("result.json"))) == 4
    assert not list((tmp_path / "run").rglob("*.claim"))

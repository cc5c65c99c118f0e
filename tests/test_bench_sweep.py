"""The resumable sweep runner: skip finished pairs, record failures, refuse task typos, key changes."""
import json
import os
from pathlib import Path

import pytest

from benchmarks.sweep import SweepConfig, checkpoint_hash, run_sweep
from vilex.errors import UserError

TASKS = ["toy_a", "toy_b"]


class FakeLauncher:
    """Stands in for the worker subprocess: writes a result the way the worker does, counts launches."""

    def __init__(self, fail_task=None):
        self.launches = []
        self.fail_task = fail_task

    def __call__(self, spec_path: Path, log_path: Path) -> int:
        spec = json.loads(spec_path.read_text())
        self.launches.append((Path(spec["model_args"].split("=", 1)[1]).name, spec["task"]))
        out = Path(spec["out"])
        if spec["task"] == self.fail_task:
            out.parent.mkdir(parents=True, exist_ok=True)
            (out.parent / f"{out.name}.error.json").write_text(json.dumps({"error": "ValueError: boom"}))
            return 1
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({"metrics": {"exact_match,none": 0.5},
                                                     "config": {"metric_list": [{"metric": "exact_match"}]}}))
        return 0


def _no_full_index(include_path):
    return {"toy_caption": Path("/nowhere/toy_caption.yaml")}


@pytest.fixture
def setup(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for t in TASKS:
        (tasks / f"{t}.yaml").write_text(f"task: {t}\ndoc_to_text: !function utils.doc_to_text\n")
    models = {}
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(name.encode())
        models[name] = str(tmp_path / name)
    return SweepConfig(models=models, tasks=list(TASKS), include_path=tasks, output_dir=tmp_path / "run")


def test_progress_line_per_model_and_task(setup, caplog):
    caplog.set_level("INFO", logger="benchmarks.sweep")
    run_sweep(setup, launch=FakeLauncher(fail_task="toy_b"), full_index=_no_full_index)
    run_sweep(setup, launch=FakeLauncher(), full_index=_no_full_index)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ")]
    assert [line.split(": ")[0] for line in lines if "running" not in line] == [
        "model 1/2 m1 · task 1/2 toy_a", "model 1/2 m1 · task 2/2 toy_b", "model 2/2 m2 · task 1/2 toy_a",
        "model 2/2 m2 · task 2/2 toy_b"] * 2
    status = [line.split(": ", 1)[1] for line in lines if "running" not in line]
    assert status[0].startswith("done in ") and status[0].endswith("s")
    assert status[1] == "failed: ValueError: boom"
    assert status[4].startswith("skipped (cached, key ") and status[5].startswith("done in ")


def test_rerun_after_a_kill_recomputes_only_the_missing_pairs(setup):
    first = FakeLauncher()
    summary = run_sweep(setup, launch=first, full_index=_no_full_index)
    assert first.launches == [("m1", "toy_a"), ("m1", "toy_b"), ("m2", "toy_a"), ("m2", "toy_b")]
    assert summary.count("done") == 4
    # a kill after the first result == only the first pair's folder exists
    for o in summary.outcomes[1:]:
        for f in Path(o.result_dir).iterdir():
            f.unlink()
        Path(o.result_dir).rmdir()
    second = FakeLauncher()
    summary = run_sweep(setup, launch=second, full_index=_no_full_index)
    assert second.launches == [("m1", "toy_b"), ("m2", "toy_a"), ("m2", "toy_b")]
    assert [o.status for o in summary.outcomes] == ["skipped", "done", "done", "done"]
    third = FakeLauncher()
    assert run_sweep(setup, launch=third, full_index=_no_full_index).count("skipped") == 4
    assert third.launches == []
    saved = json.loads((setup.output_dir / "sweep.json").read_text())
    assert [p["status"] for p in saved["pairs"]] == ["skipped"] * 4


def test_a_failing_task_is_recorded_and_the_sweep_goes_on(setup):
    launcher = FakeLauncher(fail_task="toy_a")
    summary = run_sweep(setup, launch=launcher, full_index=_no_full_index)
    assert len(launcher.launches) == 4
    assert [(o.model, o.task, o.status) for o in summary.outcomes] == [
        ("m1", "toy_a", "failed"), ("m1", "toy_b", "done"), ("m2", "toy_a", "failed"), ("m2", "toy_b", "done")]
    assert summary.outcomes[0].error == "ValueError: boom"
    # failures are retried on the next run, successes are not
    again = FakeLauncher()
    run_sweep(setup, launch=again, full_index=_no_full_index)
    assert again.launches == [("m1", "toy_a"), ("m2", "toy_a")]


class FakeGroupLauncher(FakeLauncher):
    """A worker that takes several tasks of one model per process (``pairs`` in the spec)."""

    def __init__(self, fail_task=None):
        super().__init__(fail_task)
        self.processes = []

    def __call__(self, spec_path: Path, log_path: Path) -> int:
        spec = json.loads(spec_path.read_text())
        common = {k: v for k, v in spec.items() if k != "pairs"}
        self.processes.append([p["task"] for p in spec.get("pairs", [spec])])
        rcs = []
        for pair in spec.get("pairs", [{}]):
            one_spec = spec_path.with_name(f"one-{len(self.launches)}.json")
            one_spec.write_text(json.dumps({**common, **pair}))
            rcs.append(super().__call__(one_spec, log_path))
        return max(rcs)


def test_one_process_per_model_keeps_results_and_resume_per_pair(setup, caplog):
    caplog.set_level("INFO", logger="benchmarks.sweep")
    setup.process_per = "model"
    first = FakeGroupLauncher(fail_task="toy_b")
    summary = run_sweep(setup, launch=first, full_index=_no_full_index)
    assert first.processes == [["toy_a", "toy_b"], ["toy_a", "toy_b"]]
    assert [(o.model, o.task, o.status) for o in summary.outcomes] == [
        ("m1", "toy_a", "done"), ("m1", "toy_b", "failed"), ("m2", "toy_a", "done"), ("m2", "toy_b", "failed")]
    assert summary.outcomes[1].error == "ValueError: boom"
    assert "model 1/2 m1: running 2 tasks in one process (toy_a, toy_b)" in caplog.text
    # a killed group process == results of the finished tasks only; the rerun runs just the missing pairs
    second = FakeGroupLauncher()
    summary = run_sweep(setup, launch=second, full_index=_no_full_index)
    assert second.processes == [["toy_b"], ["toy_b"]]
    assert [o.status for o in summary.outcomes] == ["skipped", "done", "skipped", "done"]
    assert not list(Path(summary.outcomes[1].result_dir).parent.glob("*.error.json"))  # stale failure cleared


def test_task_typo_fails_before_anything_runs_with_close_names(setup):
    setup.tasks = ["toy_a", "toy_cpation"]
    launcher = FakeLauncher()
    with pytest.raises(UserError, match=r"unknown lmms-eval task\(s\): 'toy_cpation' \(close: toy_caption"):
        run_sweep(setup, launch=launcher, full_index=_no_full_index)
    assert launcher.launches == []
    assert not (setup.output_dir / "sweep.json").exists()


def test_result_key_follows_checkpoint_content_and_generation_kwargs(setup):
    run_sweep(setup, launch=FakeLauncher(), full_index=_no_full_index)
    before = checkpoint_hash(setup.models["m2"])
    (Path(setup.models["m2"]) / "weights.bin").write_bytes(b"retrained")
    assert checkpoint_hash(setup.models["m2"]) != before
    launcher = FakeLauncher()
    run_sweep(setup, launch=launcher, full_index=_no_full_index)
    assert launcher.launches == [("m2", "toy_a"), ("m2", "toy_b")]
    setup.gen_kwargs = "max_new_tokens=4"
    launcher = FakeLauncher()
    run_sweep(setup, launch=launcher, full_index=_no_full_index)
    assert len(launcher.launches) == 4


def test_config_errors_name_the_field(setup):
    setup.baseline = "m3"
    with pytest.raises(UserError, match=r"baseline: 'm3' is not one of the models \['m1', 'm2'\]"):
        run_sweep(setup, launch=FakeLauncher(), full_index=_no_full_index)


@pytest.mark.slow
def test_real_two_by_two_sweep_through_the_cli_resumes(tmp_path, monkeypatch, capsys):
    """2 tiny checkpoints × 2 toy tasks for real (one lmms-eval subprocess each), then a rerun after deleting one
    result launches exactly one subprocess."""
    import shutil

    from benchmarks.tiny import build_tiny_vlm_checkpoints

    from toy.tiny_suite import build_tiny_toy_suite
    from vilex.cli.main import main

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    build_tiny_toy_suite(tmp_path, n=8, max_per_task=2)
    ckpts = build_tiny_vlm_checkpoints(tmp_path, seeds=(0, 1))
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"models: {{a: {ckpts[0]}, b: {ckpts[1]}}}\ntasks: [vilex_toy_colour, vilex_toy_caption]\n"
                   f"include_path: {tmp_path / 'tasks'}\noutput_dir: {tmp_path / 'run'}\nbaseline: a\n")
    assert main(["eval", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"done": 4, "skipped": 0, "failed": 0,
                                                                             "elsewhere": 0}
    pairs = json.loads((tmp_path / "run" / "sweep.json").read_text())["pairs"]
    result = json.loads((Path(pairs[1]["result_dir"]) / "result.json").read_text())
    assert set(result["metrics"]) >= {"cider,none", "exact_match,none"} and result["n_samples"]["effective"] == 2
    shutil.rmtree(pairs[3]["result_dir"])
    assert main(["eval", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"done": 1, "skipped": 3, "failed": 0,
                                                                             "elsewhere": 0}
    assert main(["eval", "report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "results.png").read_bytes()[:4] == b"\x89PNG"

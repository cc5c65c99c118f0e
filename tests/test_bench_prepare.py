"""`vilex eval prepare`: task data saved with save_to_disk, load_from_disk task copies, offline sweeps on them.

A toy task whose ``dataset_path`` is a local json dataset stands in for a hub dataset: after preparing, the json
files are renamed away and the task must still run (HF_DATASETS_OFFLINE=1) with the same docs, answers and scores.
"""
import json
from pathlib import Path

import pytest
import yaml

from benchmarks.prepare import prepare_suite
from benchmarks.sweep import SweepConfig, run_sweep
from vilex.errors import UserError

TASKS = ["vilex_toy_colour", "vilex_toy_caption"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from toy.tiny_suite import build_tiny_toy_suite

    root = tmp_path_factory.mktemp("bench_prepare")
    build_tiny_toy_suite(root, n=8, max_per_task=3)
    (ckpt,) = build_tiny_vlm_checkpoints(root, seeds=(0,))
    return root, ckpt


def _evaluate(ckpt, include_path, include_defaults=True):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from benchmarks.lmms_plugin import VilexVLM

    tm = TaskManager(verbosity="ERROR", include_path=str(include_path), include_defaults=include_defaults)
    out = simple_evaluate(model=VilexVLM(pretrained=str(ckpt)), tasks=list(TASKS), batch_size=1, log_samples=True,
                          task_manager=tm, bootstrap_iters=0, verbosity="ERROR")
    return ({t: {k: v for k, v in out["results"][t].items() if k != "alias"} for t in TASKS},
            {t: [(s["doc_id"], s["doc"], s["target"], s["resps"], s["exact_match"]) for s in out["samples"][t]]
             for t in TASKS})


def _hide_original_data(tasks_dir: Path) -> list[Path]:
    moved = []
    for f in sorted(tasks_dir.glob("*.jsonl")):
        f.rename(f.with_suffix(".jsonl.gone"))
        moved.append(f)
    return moved


def _restore(moved):
    for f in moved:
        f.with_suffix(".jsonl.gone").rename(f)


def test_prepared_copies_run_offline_with_the_same_docs_answers_and_scores(toy, tmp_path, monkeypatch):
    root, ckpt = toy
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ref_metrics, ref_samples = _evaluate(ckpt, root / "tasks")
    cfg = SweepConfig(models={"a": str(ckpt)}, tasks=list(TASKS), include_path=root / "tasks")
    index = prepare_suite(cfg, tmp_path / "cache")
    assert {t: index["tasks"][t]["status"] for t in TASKS} == {t: "saved" for t in TASKS}
    assert index["tasks"]["vilex_toy_colour"]["splits"]["test"]["rows"] == 3
    copy = yaml.load((tmp_path / "cache/tasks/vilex_toy_colour/vilex_toy_colour.yaml").read_text(),
                     Loader=yaml.BaseLoader)
    assert copy["dataset_path"] == str((tmp_path / "cache/vilex_toy_colour").resolve())
    assert copy["dataset_kwargs"] == {"load_from_disk": "true"} and "dataset_name" not in copy
    assert (tmp_path / "cache/tasks/vilex_toy_colour/utils.py").is_file()

    moved = _hide_original_data(root / "tasks")
    try:
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-empty"))  # nothing cached from the first load
        metrics, samples = _evaluate(ckpt, tmp_path / "cache" / "tasks", include_defaults=False)
    finally:
        _restore(moved)
    assert samples == ref_samples
    assert metrics == ref_metrics

    # a second prepare keeps the saved data (resumable; re-linking only rewrites the YAMLs)
    again = prepare_suite(cfg, tmp_path / "cache")
    assert {t: again["tasks"][t]["status"] for t in TASKS} == {t: "kept" for t in TASKS}
    assert again["tasks"]["vilex_toy_colour"]["splits"] == index["tasks"]["vilex_toy_colour"]["splits"]


def test_unknown_task_fails_before_anything_is_written(toy, tmp_path):
    root, ckpt = toy
    cfg = SweepConfig(models={"a": str(ckpt)}, tasks=["vilex_toy_colour", "vilex_toy_colur"],
                      include_path=root / "tasks")
    with pytest.raises(UserError, match=r"unknown lmms-eval task\(s\): 'vilex_toy_colur' \(close: vilex_toy_colour"):
        prepare_suite(cfg, tmp_path / "cache", full_index=lambda include_path: {})
    assert not (tmp_path / "cache").exists()


def _custom_task(folder: Path, rows: int = 6, extra: str = "") -> Path:
    """A task split over an include template (another style lmms-eval uses), with a process_docs in utils.py."""
    folder.mkdir(parents=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(rows)))
    (folder / "utils.py").write_text(
        "def keep_even(dataset):\n    return dataset.filter(lambda d: int(d['answer']) % 2 == 0)\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n")
    (folder / "_template_yaml").write_text(
        f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n{extra}test_split: test\n"
        "output_type: generate_until\ndoc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n"
        "process_docs: !function utils.keep_even\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    (folder / "custom.yaml").write_text("include: _template_yaml\ntask: custom_even\n")
    return folder


def test_include_chain_flattened_and_process_docs_applied_once(tmp_path, monkeypatch):
    from datasets import load_from_disk

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    src = _custom_task(tmp_path / "src")
    cfg = SweepConfig(models={"a": "x"}, tasks=["custom_even"], include_path=src)
    index = prepare_suite(cfg, tmp_path / "cache")
    saved = load_from_disk(str(tmp_path / "cache" / "custom_even"))
    assert saved["test"]["answer"] == ["0", "2", "4"]  # process_docs ran at prepare time
    folder = tmp_path / "cache" / "tasks" / "custom_even"
    text = (folder / "custom_even.yaml").read_text()
    keys = yaml.load(text, Loader=yaml.BaseLoader)
    assert "include" not in keys and "process_docs" not in keys  # merged; not applied a second time
    assert "doc_to_text: !function" in text and "test_split: test" in text
    # manifest.json: the integrity record vilex.checkpoint.atomic_dir leaves in every folder it publishes
    assert sorted(p.name for p in folder.iterdir() if p.name != "manifest.json") == [
        "_template_yaml", "custom_even.yaml", "prepared.json", "utils.py"]
    manifest = json.loads((folder / "prepared.json").read_text())
    assert manifest["process_docs_applied"] and manifest["source"]["dataset_path"] == "json"
    assert index["tasks"]["custom_even"]["splits"]["test"]["rows"] == 3

    from lmms_eval.tasks import TaskManager

    (src / "data.jsonl").rename(src / "data.gone")
    tm = TaskManager(verbosity="ERROR", include_path=str(folder.parent), include_defaults=False)
    task = tm.load_task_or_group(["custom_even"])["custom_even"]
    assert [task.doc_to_text(d) for d in task.test_docs()] == ["q0", "q2", "q4"]


def test_media_downloading_tasks_are_refused_before_loading(tmp_path):
    src = _custom_task(tmp_path / "src", extra="")
    tpl = src / "_template_yaml"
    tpl.write_text(tpl.read_text().replace("dataset_kwargs:\n", "dataset_kwargs:\n  video: true\n"))
    cfg = SweepConfig(models={"a": "x"}, tasks=["custom_even"], include_path=src)
    calls = []
    with pytest.raises(UserError, match=r"task 'custom_even': dataset_kwargs \['video'\] make lmms-eval download"):
        prepare_suite(cfg, tmp_path / "cache", load=lambda plan, ip: calls.append(plan))
    assert calls == []


def test_a_dataset_that_cannot_be_loaded_names_the_task_and_keeps_earlier_ones(tmp_path, monkeypatch):
    src = _custom_task(tmp_path / "src")
    (src / "other.yaml").write_text("include: _template_yaml\ntask: custom_other\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from benchmarks.prepare import load_task_dataset

    def load(plan, include_path):
        if plan.name == "custom_other":
            raise ConnectionError("no route to the hub")
        return load_task_dataset(plan, include_path)

    cfg = SweepConfig(models={"a": "x"}, tasks=["custom_even", "custom_other"], include_path=src)
    with pytest.raises(UserError, match=r"task 'custom_other': lmms-eval could not load its dataset \(json\): "
                                        r"ConnectionError: no route to the hub \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1 is set: prepare needs the "):
        prepare_suite(cfg, tmp_path / "cache", load=load)
    assert list(json.loads((tmp_path / "cache" / "prepared.json").read_text())["tasks"]) == ["custom_even"]
    assert (tmp_path / "cache" / "custom_even" / "dataset_dict.json").is_file()


def test_sweep_on_a_cache_refuses_unprepared_tasks_and_runs_offline_specs(toy, tmp_path, monkeypatch):
    from test_bench_sweep import FakeLauncher

    root, ckpt = toy
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    prepare_suite(SweepConfig(models={"a": str(ckpt)}, tasks=["vilex_toy_colour"], include_path=root / "tasks"),
                  tmp_path / "cache")
    cfg = SweepConfig(models={"a": str(ckpt)}, tasks=list(TASKS), output_dir=tmp_path / "run",
                      prepared_cache=tmp_path / "cache")
    launcher = FakeLauncher()
    with pytest.raises(UserError, match=r"task\(s\) \['vilex_toy_caption'\] not prepared \(run `vilex eval prepare"):
        run_sweep(cfg, launch=launcher)
    assert launcher.launches == []
    cfg.tasks = ["vilex_toy_colour"]
    assert run_sweep(cfg, launch=launcher).count("done") == 1
    (spec_file,) = (tmp_path / "run" / "logs").glob("*.spec.json")
    spec = json.loads(spec_file.read_text())
    assert spec["offline"] is True and spec["include_defaults"] is False
    assert spec["include_path"] == str((tmp_path / "cache" / "tasks").resolve())


@pytest.mark.slow
def test_prepare_and_offline_sweep_through_the_cli(toy, tmp_path, monkeypatch, capsys):
    """`vilex eval prepare` then `vilex eval --cache` for real (worker subprocesses, original data gone)."""
    from vilex.cli.main import main

    root, ckpt = toy
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ref_metrics, ref_samples = _evaluate(ckpt, root / "tasks")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"models: {{a: {ckpt}}}\ntasks: [{', '.join(TASKS)}]\ninclude_path: {root / 'tasks'}\n"
                     f"output_dir: {tmp_path / 'run'}\nuse_cache: false\n")
    assert main(["eval", "prepare", "--suite", str(suite), "--cache", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {t: "saved" for t in TASKS}
    moved = _hide_original_data(root / "tasks")
    try:
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-empty"))
        assert main(["eval", "--config", str(suite), "--cache", str(tmp_path / "cache")]) == 0
    finally:
        _restore(moved)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"done": 2, "skipped": 0, "failed": 0,
                                                                             "elsewhere": 0}
    for pair in json.loads((tmp_path / "run" / "sweep.json").read_text())["pairs"]:
        rdir = Path(pair["result_dir"])
        result = json.loads((rdir / "result.json").read_text())
        assert {k: v for k, v in result["metrics"].items() if k != "alias"} == ref_metrics[pair["task"]]
        samples = [json.loads(x) for x in (rdir / "samples.jsonl").read_text().splitlines()]
        assert [s["resps"] for s in samples] == [r[3] for r in ref_samples[pair["task"]]]

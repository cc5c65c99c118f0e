"""`vilex eval mirror`: schema-faithful local mirrors of the paper's 15 tasks, run through the prepared-cache path.

Fast (default run): every paper15 dataset's mirror rows fit their documented features and the task's answer format
(no lmms-eval run); four tasks of four kinds (captioning, VQA, multiple choice, grounding) mirrored and swept for real
with a tiny VLM through `vilex eval --cache` (headline metric as a number, MIRROR labels everywhere, a rerun
recomputes nothing, the cache verified, moved and relinked); the tasks' own scorers give a perfect score to the
mirror's gold answers; the up-front requirement checks (Java missing, a module missing) stop `vilex eval`,
`--dry-run` and `prepare` as documented; `prepare --check` names corruption, row-count and schema problems; the
plugin's multi-image policy. The 15-task run is tests/test_eval_mirror_all15.py (slow).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from benchmarks.sweep import local_task_index
from vilex.cli.main import main
from vilex.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER15 = ROOT / "configs" / "benchmarks" / "paper15.yaml"
PAPER15_TASKS = yaml.safe_load(PAPER15.read_text())["tasks"]
# one task per kind: captioning, VQA, multiple choice, grounding
FAST_TASKS = ["coco2017_cap_val", "vqav2_val", "scienceqa_img", "refcoco_bbox_rec_val"]
CAPTION_TASKS = {"coco2017_cap_val", "nocaps_val", "textcaps_val", "flickr30k_test"}


def lmms_tasks_dir() -> Path:
    import lmms_eval

    return Path(lmms_eval.__file__).parent / "tasks"


def builtin_index(tasks: list[str]) -> dict[str, Path]:
    """name -> lmms-eval's own YAML for these tasks, read from their folders only (lmms-eval's full index of ~2000
    tasks costs seconds; the names are resolved by the same YAML reading benchmarks.sweep uses)."""
    folders = {"coco2017_cap_val": "coco_cap", "nocaps_val": "nocaps", "textcaps_val": "textcaps",
               "flickr30k_test": "flickr30k", "vqav2_val": "vqav2", "gqa": "gqa", "textvqa_val": "textvqa",
               "ok_vqa_val2014": "ok_vqa", "vizwiz_vqa_val": "vizwiz_vqa", "scienceqa_img": "scienceqa",
               "ai2d": "ai2d", "pope": "pope", "mme": "mme", "seedbench": "seedbench",
               "refcoco_bbox_rec_val": "refcoco", "refcoco_bbox_val": "refcoco"}
    index: dict[str, Path] = {}
    for folder in {folders[t] for t in tasks}:
        index.update(local_task_index(lmms_tasks_dir() / folder))
    return {t: index[t] for t in tasks}


def sweep_args(cache: Path, ckpt: Path, out: Path, tasks: list[str]) -> list[str]:
    """`vilex eval` on the REAL paper15.yaml, its models replaced by one tiny checkpoint on CPU."""
    return ["eval", "--config", str(PAPER15), "--cache", str(cache), "--set", f"models={{tiny: {ckpt}}}",
            "--set", f"tasks=[{','.join(tasks)}]", "--set", "baseline=null", "--set", f"output_dir={out}",
            "--set", "devices=[cpu]"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def headline(task: str) -> str:
    """The report's headline metric of a paper15 task (paper15.yaml's ``headline`` or lmms-eval's first)."""
    from benchmarks.prepare import flatten_task_yaml

    override = yaml.safe_load(PAPER15.read_text()).get("headline", {})
    if task in override:
        return override[task]
    config, _ = flatten_task_yaml(builtin_index([task])[task])
    return config["metric_list"][0]["metric"]


# ---------------------------------------------------------------- the gold answer, in each task's response format
def oracle(task: str, doc: dict) -> str:
    """What a perfect model answers for ``doc`` (the prepared doc, after the task's process_docs)."""
    def common(answers: list[str]) -> str:
        return Counter(answers).most_common(1)[0][0]

    if task == "coco2017_cap_val":
        return doc["answer"][0]
    if task == "nocaps_val":
        return doc["annotations_captions"][0]
    if task == "textcaps_val":
        return doc["caption_str"][0]
    if task == "flickr30k_test":
        return doc["caption"][0]
    if task == "vqav2_val":
        return doc["multiple_choice_answer"]
    if task in ("textvqa_val", "ok_vqa_val2014", "vizwiz_vqa_val"):
        return common(doc["answers"])
    if task in ("gqa", "pope", "mme", "seedbench"):
        return doc["answer"]
    if task == "scienceqa_img":
        return "ABCDE"[doc["answer"]]
    if task == "ai2d":
        return "ABCDE"[int(doc["answer"])]
    if task == "refcoco_bbox_rec_val":
        return "[" + ", ".join(f"{v:.6f}" for v in doc["bbox"]) + "]"
    raise KeyError(task)


def oracle_scores(cache: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Each task's own process_results + aggregation (lmms-eval builds the task from the prepared copy) on the
    gold answers: {task: {metric: value}}."""
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(verbosity="ERROR", include_path=str(cache / "tasks"), include_defaults=False)
    loaded = tm.load_task_or_group(tasks)
    out = {}
    for name in tasks:
        task = loaded[name]
        per_metric: dict[str, list] = {}
        for doc in task.test_docs():
            for metric, value in task.process_results(doc, [oracle(name, doc)]).items():
                per_metric.setdefault(metric, []).append(value)
        scores = {}
        for metric, fn in task.aggregation().items():
            if metric in per_metric:
                items = per_metric[metric]
                scores[metric] = fn(items, args=None) if "args" in inspect.signature(fn).parameters else fn(items)
        out[name] = scores
    return out


def check_perfect(name: str, scores: dict[str, float], docs: list[dict]) -> None:
    """The scores a perfect answer must get from each task's own scorer."""
    if name in CAPTION_TASKS:
        prefix = {"coco2017_cap_val": "coco", "nocaps_val": "nocaps", "textcaps_val": "textcaps",
                  "flickr30k_test": "flickr"}[name]
        assert scores[f"{prefix}_CIDEr"] > 1.0 and scores[f"{prefix}_Bleu_4"] > 0.5, scores
    elif name == "mme":
        categories = {d["category"] for d in docs}
        from lmms_eval.tasks.mme.utils import eval_type_dict

        perception = len(categories & set(eval_type_dict["Perception"]))
        assert scores["mme_perception_score"] == pytest.approx(200.0 * perception), scores  # acc + acc+ per subtask
        if categories & set(eval_type_dict["Cognition"]):
            assert scores["mme_cognition_score"] == pytest.approx(
                200.0 * len(categories & set(eval_type_dict["Cognition"])))
    elif name == "pope":
        assert scores["pope_accuracy"] == 1.0 and scores["pope_f1_score"] == 1.0, scores
    elif name == "seedbench":
        assert scores["seed_image"] == 1.0 and scores["seed_all"] == 1.0, scores
    elif name == "refcoco_bbox_rec_val":
        assert scores["refcoco_IoU"] == pytest.approx(1.0, abs=1e-4) and scores["refcoco_ACC@0.9"] == 1.0, scores
    else:
        assert scores["exact_match"] == pytest.approx(1.0), scores


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VLM checkpoint and the mirror of FAST_TASKS (2 rows per split), written by mirror_suite."""
    from benchmarks.mirror import mirror_suite
    from benchmarks.sweep import SweepConfig
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from vilex.config import load_config

    root = tmp_path_factory.mktemp("mirror")
    (ckpt,) = build_tiny_vlm_checkpoints(root, seeds=(0,))
    cfg = load_config(SweepConfig, PAPER15, [f"tasks=[{','.join(FAST_TASKS)}]"])
    index = mirror_suite(cfg, root / "mirror15", rows=2, full_index=lambda include_path: builtin_index(FAST_TASKS))
    return root, ckpt, index


# ---------------------------------------------------------------- schemas (all 15, no lmms-eval run)
def test_every_paper15_dataset_has_a_schema_and_rows_fit_it():
    """Each paper15 task's dataset (as its installed YAML names it) has a mirror schema whose documented splits
    include the task's, the rows encode with exactly the documented features, the columns the task code reads
    exist, and the answers are in the task's format."""
    from datasets import Dataset
    from lmms_eval.tasks.mme.utils import eval_type_dict

    from benchmarks.mirror_schemas import POPE_CATEGORIES, schema_for
    from benchmarks.prepare import plan_task

    index = builtin_index(PAPER15_TASKS)
    assert len(PAPER15_TASKS) == 15
    for name in PAPER15_TASKS:
        plan = plan_task(name, index[name], local=False)
        ds_schema, cs = schema_for(plan.config["dataset_path"], plan.config.get("dataset_name"))
        assert set(plan.splits) <= set(cs.splits), name
        features = cs.features()
        assert set(cs.required) <= set(features), name
        split = plan.splits[0]
        rows = cs.rows(6, split)
        data = Dataset.from_list(rows, features=features)
        assert data.features == features and data.num_rows == 6, name
        assert rows == cs.rows(6, split), f"{name}: rows are not deterministic"
        if name in ("vqav2_val",):
            assert all(len(r["answers"]) == 10 and {"answer", "answer_confidence", "answer_id"} == set(r["answers"][0])
                       for r in rows)
        if name in ("textvqa_val", "ok_vqa_val2014", "vizwiz_vqa_val"):
            assert all(len(r["answers"]) == 10 for r in rows), name
        if name == "vizwiz_vqa_val":
            assert any(set(r["answers"]) == {"unanswerable"} for r in rows)
        if name == "coco2017_cap_val":
            assert all(len(r["answer"]) == 5 and int(r["question_id"].split(".")[0]) > 0 for r in rows)
        if name == "nocaps_val":
            assert all(len(r["annotations_captions"]) == 10 for r in rows)
        if name == "pope":
            assert {r["answer"] for r in rows} == {"yes", "no"}
            assert {r["category"] for r in rows} == set(POPE_CATEGORIES)
        if name == "mme":
            pairs = Counter(r["question_id"] for r in rows)
            assert set(pairs.values()) == {2}  # the aggregation asserts two answers per question_id
            assert all(sorted(r["answer"] for r in rows if r["question_id"] == q) == ["No", "Yes"] for q in pairs)
            cats = {r["category"] for r in rows}
            assert cats & set(eval_type_dict["Perception"]) and cats & set(eval_type_dict["Cognition"])
        if name == "seedbench":
            assert {r["answer"] for r in rows} <= set("ABCD")
            assert sorted({(r["data_type"], len(r["image"])) for r in rows}) == [("image", 1), ("video", 8)]
        if name == "scienceqa_img":
            assert all(0 <= r["answer"] < len(r["choices"]) and r["image"] is not None for r in rows)
        if name == "ai2d":
            assert all(0 <= int(r["answer"]) < len(r["options"]) for r in rows)
        if name == "refcoco_bbox_rec_val":
            for r in rows:
                x, y, w, h = r["bbox"]
                W, H = r["image"].size
                assert 0 <= x and 0 <= y and x + w <= W + 1e-3 and y + h <= H + 1e-3 and w > 0 and h > 0
                xs, ys = r["segmentation"][0::2], r["segmentation"][1::2]
                assert min(xs) >= x - 0.02 and max(xs) <= x + w + 0.02 and min(ys) >= y - 0.02 and len(r["answer"]) >= 2
    mme_rows = schema_for("lmms-lab-encoder/MME")[1].rows(5, "test")
    assert len(mme_rows) == 6  # 5 rounds up to whole pairs


def test_unknown_datasets_and_stale_splits_are_refused_before_anything_is_written(tmp_path):
    from benchmarks.mirror import mirror_suite
    from benchmarks.sweep import SweepConfig

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text("task: my_json_task\ndataset_path: json\ntest_split: test\n"
                                   "output_type: generate_until\n")
    (folder / "v.yaml").write_text("task: my_vqa\ndataset_path: lmms-lab-encoder/VQAv2\ntest_split: minival\n"
                                   "output_type: generate_until\n")
    cfg = SweepConfig(models={"a": "x"}, tasks=["my_json_task", "my_vqa"], include_path=folder)
    with pytest.raises(UserError) as e:
        mirror_suite(cfg, tmp_path / "out", rows=2, full_index=lambda ip: {})
    assert "task 'my_json_task': no mirror schema for dataset 'json'" in str(e.value)
    assert "task 'my_vqa': split(s) ['minival'] are not documented for VQAv2" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- four kinds, end to end
def test_four_kinds_of_tasks_run_end_to_end_on_the_mirror(world, capsys, tmp_path, monkeypatch):
    """The mirror cache of a captioning, a VQA, a multiple-choice and a grounding task, swept with the tiny VLM
    through the same `--cache` path as real prepared copies; then a rerun, the report, the check, a move."""
    root, ckpt, index = world
    monkeypatch.chdir(tmp_path)  # task code writes side files to the working directory: none may land here
    cache = root / "mirror15"
    assert index["mirror"]["rows"] == 2 and "NOT the benchmark" in (cache / "MIRROR.txt").read_text()
    for t in FAST_TASKS:  # marked as a mirror: data folder name, task YAML header, both prepared.json
        assert index["tasks"][t]["mirror"] is True and Path(index["tasks"][t]["data"]).name == f"{t}.mirror"
        assert (cache / "tasks" / t / f"{t}.yaml").read_text().startswith("# MIRROR: synthetic data")
        assert json.loads((cache / "tasks" / t / "prepared.json").read_text())["mirror"]["schema_sources"]
    # the grounding task's own process_docs ran: one doc per referring expression, boxes normalised to [0, 1]
    assert index["tasks"]["refcoco_bbox_rec_val"]["splits"]["val"]["rows"] > 2

    out = root / "paper15"
    assert main(sweep_args(cache, ckpt, out, FAST_TASKS)) == 0
    assert last_json(capsys) == {"done": 4, "skipped": 0, "failed": 0, "elsewhere": 0}
    assert not out.exists()  # a mirror never writes into the real sweep's folder
    run = root / "paper15-mirror"
    summary = json.loads((run / "sweep.json").read_text())
    for pair in summary["pairs"]:
        assert pair["mirror"] is True and pair["key"].startswith("mirror-")
        rdir = Path(pair["result_dir"])
        assert rdir.name.startswith("mirror-")
        result = json.loads((rdir / "result.json").read_text())
        assert result["mirror"] is True and result["spec"]["offline"] is True
        value = result["metrics"][f"{headline(pair['task'])},none"]
        assert isinstance(value, float) and math.isfinite(value), (pair["task"], value)
        n_docs = sum(s["rows"] for s in index["tasks"][pair["task"]]["splits"].values())
        assert len((rdir / "samples.jsonl").read_text().splitlines()) == n_docs
    # the caption scorer's prediction file lands in its result folder, not in the sweep's working directory
    coco = next(Path(p["result_dir"]) for p in summary["pairs"] if p["task"] == "coco2017_cap_val")
    predictions = json.loads((coco / "task_files" / "submissions" / "coco_captions_val2014_alg_results.json")
                             .read_text())
    assert len(predictions) == index["tasks"]["coco2017_cap_val"]["splits"]["val"]["rows"]
    assert not Path("submissions").exists() and not list(Path(coco).parent.glob(".work-*"))

    assert main(sweep_args(cache, ckpt, out, FAST_TASKS)) == 0  # a rerun recomputes nothing
    assert last_json(capsys) == {"done": 0, "skipped": 4, "failed": 0, "elsewhere": 0}

    assert main(["eval", "report", str(run)]) == 0
    md = (run / "results.md").read_text().splitlines()
    assert md[0].startswith("**MIRROR** — 4 of 4 task(s) ran on `vilex eval mirror` data")
    rows = [line for line in md if line.startswith("| ") and "[MIRROR]" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [f"{t} [MIRROR]" for t in FAST_TASKS]
    assert [r.split(" | ")[1] for r in rows] == [headline(t) for t in FAST_TASKS]
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"

    # verify the cache as if made elsewhere, then move it: the sweep names the fix, --check relinks, keys stay
    assert main(["eval", "prepare", "--check", str(cache)]) == 0
    assert last_json(capsys) == {t: "ok" for t in FAST_TASKS}
    moved = root / "moved" / "mirror15"
    moved.parent.mkdir()
    shutil.move(str(cache), str(moved))
    try:
        assert main(sweep_args(moved, ckpt, out, FAST_TASKS)) == 2
        err = capsys.readouterr().err
        assert "the task copies point at data that is not there" in err and \
            f"verify and relink it with `vilex eval prepare --check {moved}`" in err
        assert main(["eval", "prepare", "--check", str(moved)]) == 0
        assert last_json(capsys) == {t: "relinked" for t in FAST_TASKS}
        assert main(["eval", "prepare", "--check", str(moved)]) == 0
        assert last_json(capsys) == {t: "ok" for t in FAST_TASKS}
        assert main(sweep_args(moved, ckpt, out, FAST_TASKS)) == 0
        assert last_json(capsys) == {"done": 0, "skipped": 4, "failed": 0, "elsewhere": 0}  # same keys
    finally:
        shutil.move(str(moved), str(cache))
        main(["eval", "prepare", "--check", str(cache)])
        capsys.readouterr()


def test_gold_answers_score_perfectly_with_the_tasks_own_scorers(world, tmp_path, monkeypatch):
    """The mirror's answers are in each task's format: its own process_results and aggregation give the gold
    answer the top score (VQA accuracy over 10 answers, the option letter, the box IoU)."""
    root, _, _ = world
    monkeypatch.chdir(tmp_path)  # scorers may write submission files to the working directory
    tasks = [t for t in FAST_TASKS if t not in CAPTION_TASKS]  # the caption scorers' JVMs: the slow test
    from lmms_eval.tasks import TaskManager

    scores = oracle_scores(root / "mirror15", tasks)
    tm = TaskManager(verbosity="ERROR", include_path=str(root / "mirror15" / "tasks"), include_defaults=False)
    for t in tasks:
        check_perfect(t, scores[t], list(tm.load_task_or_group([t])[t].test_docs()))
    # and a wrong answer is not perfect (the check can fail)
    assert oracle("vqav2_val", {"multiple_choice_answer": "x"}) == "x"


# ---------------------------------------------------------------- requirements, up front
def _no_java_path(tmp_path: Path) -> str:
    """A PATH with this Python but without java."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    return str(bin_dir)


def test_missing_java_stops_dry_run_and_sweep_before_anything_runs(world, tmp_path, monkeypatch, capsys):
    from benchmarks import requirements

    root, ckpt, _ = world
    monkeypatch.setenv("PATH", _no_java_path(tmp_path))
    requirements.java_problem.cache_clear()
    try:
        args = sweep_args(root / "mirror15", ckpt, tmp_path / "run", FAST_TASKS)
        assert main(args + ["--dry-run"]) == 1
        text = capsys.readouterr().out
        line = ("task coco2017_cap_val: missing Java runtime (pycocoevalcap Meteor, pycocoevalcap PTBTokenizer start "
                "`java`; `java` is not on PATH): install a Java runtime (e.g. `apt-get install default-jre-headless`")
        assert "requirements: NOT MET for 1 task(s)" in text and line in text
        assert "task vqav2_val" not in text  # only the task that needs it
        assert main(args) == 2
        assert ("error: sweep: task requirements missing on this machine (nothing ran):\n  task coco2017_cap_val: "
                "missing Java runtime") in capsys.readouterr().err
        assert not (tmp_path / "run-mirror" / "logs").exists()  # no worker was prepared, let alone started
    finally:
        requirements.java_problem.cache_clear()


def test_prepare_refuses_a_missing_module_and_warns_about_java(tmp_path, monkeypatch, caplog):
    from benchmarks import requirements
    from benchmarks.prepare import prepare_suite
    from benchmarks.sweep import SweepConfig

    folder = tmp_path / "tasks"
    folder.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "a", "a": "b"}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
              "output_type: generate_until\ndoc_to_target: a\n")
    (folder / "needs_mod.yaml").write_text("task: needs_mod\ndoc_to_text: !function mod_utils.text\n" + common)
    (folder / "mod_utils.py").write_text("import not_a_module_xyz.sub\n\ndef text(doc):\n    return doc['q']\n")
    (folder / "needs_java.yaml").write_text("task: needs_java\ndoc_to_text: !function java_utils.text\n" + common)
    (folder / "java_utils.py").write_text(
        "def text(doc):\n    return doc['q']\n\ndef agg(items):\n"
        "    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer\n    return PTBTokenizer().tokenize({})\n")
    monkeypatch.setenv("PATH", _no_java_path(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    requirements.java_problem.cache_clear()
    try:
        cfg = SweepConfig(models={"a": "x"}, tasks=["needs_java", "needs_mod"], include_path=folder)
        with pytest.raises(UserError, match=r"task needs_mod: missing Python module 'not_a_module_xyz.sub' \(the "
                                            r"task code imports it when lmms-eval loads the task\): pip install "
                                            r"not-a-module-xyz"):
            prepare_suite(cfg, tmp_path / "cache")
        assert not (tmp_path / "cache").exists()
        cfg.tasks = ["needs_java"]
        caplog.set_level("WARNING", logger="benchmarks.prepare")
        index = prepare_suite(cfg, tmp_path / "cache")  # preparing needs no Java: a warning, not a refusal
        assert index["tasks"]["needs_java"]["status"] == "saved"
        assert index["requirements"] == [
            "task needs_java: missing Java runtime (pycocoevalcap PTBTokenizer start `java`; `java` is not on PATH): "
            + requirements.JAVA_FIX]
        assert any("needed where the sweep runs" in r.getMessage() for r in caplog.records)
    finally:
        requirements.java_problem.cache_clear()


def test_scorer_resources_and_optional_imports(tmp_path, monkeypatch):
    """A read-only pycocoevalcap/tokenizer (PTBTokenizer writes its temp file there) and a missing METEOR
    paraphrase table are named; imports guarded by try/except ImportError are optional."""
    from benchmarks import requirements

    fake = tmp_path / "pycocoevalcap"
    (fake / "tokenizer").mkdir(parents=True)
    (fake / "tokenizer" / "stanford-corenlp-3.4.1.jar").write_bytes(b"x")
    (fake / "meteor").mkdir()
    (fake / "meteor" / "meteor-1.5.jar").write_bytes(b"x")
    monkeypatch.setattr(requirements, "pycocoevalcap_dir", lambda: fake)
    monkeypatch.setattr(requirements, "java_problem", lambda heap="2G": None)
    monkeypatch.setattr(requirements.os, "access", lambda path, mode: Path(path).name != "tokenizer")
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "t.yaml").write_text("task: t\nprocess_results: !function utils.score\n")
    (folder / "utils.py").write_text(
        "try:\n    import optional_xyz\nexcept ImportError:\n    optional_xyz = None\n"
        "from pycocoevalcap.eval import Meteor\nfrom pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer\n"
        "def score(doc, r):\n    Meteor(); PTBTokenizer()\n")
    lines = requirements.format_missing(requirements.task_missing("t", folder / "t.yaml"))
    assert len(lines) == 1 and "optional_xyz" not in lines[0]
    assert "missing pycocoevalcap/meteor/data/paraphrase-en.gz (pycocoevalcap Meteor)" in lines[0]
    assert f"missing write access to {fake / 'tokenizer'} (PTBTokenizer writes its temporary file there)" in lines[0]


# ---------------------------------------------------------------- prepare --check
def test_check_names_corruption_row_counts_and_schema_problems(world, tmp_path, capsys):
    from datasets import load_from_disk

    from benchmarks.cache_check import check_cache
    from vilex.checkpoint import write_manifest

    root, _, _ = world
    cache = tmp_path / "copy"
    shutil.copytree(root / "mirror15", cache)

    arrow = next((cache / "vqav2_val.mirror" / "validation").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    index = json.loads((cache / "prepared.json").read_text())
    index["tasks"]["scienceqa_img"]["splits"]["test"]["rows"] = 99
    (cache / "prepared.json").write_text(json.dumps(index))
    # a copy whose data lost a column the grounding task reads (re-saved with a consistent integrity record)
    data = cache / "refcoco_bbox_rec_val.mirror"
    ds = load_from_disk(str(data))
    ds.remove_columns(["bbox"]).save_to_disk(str(tmp_path / "stripped"))
    shutil.rmtree(data)
    (tmp_path / "stripped").rename(data)
    write_manifest(data)

    assert main(["eval", "prepare", "--check", str(cache)]) == 1
    assert last_json(capsys) == {"coco2017_cap_val": "relinked", "vqav2_val": "failed", "scienceqa_img": "failed",
                                 "refcoco_bbox_rec_val": "failed"}
    report = check_cache(cache)
    assert report["vqav2_val"]["problems"] == [
        f"data {cache / 'vqav2_val.mirror'}: validation/{arrow.name} has changed bytes (content hash differs from "
        "the manifest)"]
    assert report["scienceqa_img"]["problems"] == [f"split 'test' has 2 rows, {cache / 'prepared.json'} says 99"]
    assert any("column 'bbox' missing" in p for p in report["refcoco_bbox_rec_val"]["problems"])
    assert any("fingerprint" in p for p in report["refcoco_bbox_rec_val"]["problems"])


def test_a_mirror_and_real_copies_never_share_a_cache(world):
    from benchmarks.prepare import prepare_suite
    from benchmarks.sweep import SweepConfig

    root, _, _ = world
    cfg = SweepConfig(models={"a": "x"}, tasks=["vqav2_val"])
    with pytest.raises(UserError, match=r"holds a MIRROR \(vilex eval mirror\); write real copies to another folder"):
        prepare_suite(cfg, root / "mirror15", full_index=lambda ip: builtin_index(["vqav2_val"]),
                      load=lambda plan, ip: pytest.fail("nothing may load"))


# ---------------------------------------------------------------- the plugin's multi-image policy
def test_several_images_are_refused_or_reduced_to_the_middle_one(world):
    import torch
    from PIL import Image

    from benchmarks.lmms_plugin import VilexVLM

    _, ckpt, _ = world
    frames = [Image.new("RGB", (32, 32), (40 * k, 0, 0)) for k in range(5)]
    strict = VilexVLM(pretrained=str(ckpt))
    with pytest.raises(UserError, match=r"seedbench/test/doc 3 has 5 images; the model takes one image per prompt "
                                        r"\(model_args multi_image=middle"):
        strict._pixels(frames, "seedbench/test/doc 3")
    middle = VilexVLM(pretrained=str(ckpt), multi_image="middle")
    assert torch.equal(middle._pixels(frames, "seedbench/test/doc 3"), middle._pixels([frames[2]], "x/y/doc 0"))
    assert middle.reduced == {"seedbench": 1}
    with pytest.raises(UserError, match=r"multi_image='first'; use one of \['error', 'middle'\]"):
        VilexVLM(pretrained=str(ckpt), multi_image="first")


def test_documented_schema_sources_are_cited():
    from benchmarks.mirror_schemas import SCHEMAS

    for schema in SCHEMAS.values():
        assert schema.sources and any("lmms_eval/tasks/" in s for s in schema.sources), schema.name
        assert any("huggingface.co" in s for s in schema.sources), schema.name
    assert os.path.basename(__file__) == "test_eval_mirror.py"

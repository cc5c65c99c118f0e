"""The toy-world lmms-eval suite: docs per QA type, YAML shape, scoring functions."""
import json

import pytest
import yaml

from benchmarks.toy_task_fns import caption_process_results, cider_aggregate, normalize_answer, qa_process_results
from benchmarks.toy_tasks import CAPTION_TASK, QA_TYPES, TOY_TASKS, materialize_toy_tasks, qa_task_name
from vilex.errors import DataError


def _write_split(folder, rows):
    (folder / "images").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(i, qa):
    return {"id": f"scene_{i:06d}", "file_name": f"images/scene_{i:06d}.png", "caption": f"caption {i}",
            "caption_fine": f"fine caption {i}", "qa": qa}


def test_materialize_writes_one_task_per_qa_type_with_all_questions(tmp_path):
    qa0 = [{"question": "what colour is the circle?", "answer": "red", "type": "colour"},
           {"question": "how many objects are there?", "answer": "2", "type": "count"},
           {"question": "what colour is the square?", "answer": "blue", "type": "colour"}]
    qa1 = [{"question": "is there a red square?", "answer": "no", "type": "existence"}]
    _write_split(tmp_path / "test", [_row(0, qa0), _row(1, qa1)])
    manifest = materialize_toy_tasks(tmp_path / "test", tmp_path / "tasks")
    counts = {name: t["n_docs"] for name, t in manifest["tasks"].items()}
    assert counts == {"vilex_toy_colour": 2, "vilex_toy_count": 1, "vilex_toy_existence": 1, CAPTION_TASK: 2}
    assert sorted(manifest["empty"]) == ["vilex_toy_position", "vilex_toy_shape"]
    docs = [json.loads(x) for x in (tmp_path / "tasks" / "vilex_toy_colour.jsonl").read_text().splitlines()]
    assert [d["answer"] for d in docs] == ["red", "blue"]
    assert docs[0]["image"] == str((tmp_path / "test" / "images" / "scene_000000.png").resolve())
    cap = [json.loads(x) for x in (tmp_path / "tasks" / f"{CAPTION_TASK}.jsonl").read_text().splitlines()]
    assert cap[1]["references"] == ["caption 1", "fine caption 1"]


def test_task_yaml_uses_absolute_data_files_and_function_tags(tmp_path):
    _write_split(tmp_path / "test", [_row(0, [{"question": "q", "answer": "a", "type": t} for t in QA_TYPES])])
    manifest = materialize_toy_tasks(tmp_path / "test", tmp_path / "tasks")
    assert set(manifest["tasks"]) == set(TOY_TASKS)
    tags = []

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: tags.append(loader.construct_scalar(node)) or "fn")
    cfg = yaml.load((tmp_path / "tasks" / f"{CAPTION_TASK}.yaml").read_text(), Loader=Loader)
    assert cfg["task"] == CAPTION_TASK and cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "tasks" / f"{CAPTION_TASK}.jsonl"))
    assert [m["metric"] for m in cfg["metric_list"]] == ["cider", "exact_match"]
    assert "utils.cider_aggregate" in tags and "utils.caption_process_results" in tags
    assert "benchmarks.toy_task_fns" in (tmp_path / "tasks" / "utils.py").read_text()


def test_missing_metadata_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no metadata.jsonl"):
        materialize_toy_tasks(tmp_path, tmp_path / "tasks")


def test_answer_normalisation_and_exact_match():
    assert normalize_answer("  Top Left.\nmore text") == "top left"
    assert qa_process_results({"answer": "top left"}, ["Top-left"]) == {"exact_match": 1.0}
    assert qa_process_results({"answer": "top left"}, ["left"]) == {"exact_match": 0.0}
    assert qa_process_results({"answer": "top left"}, ["top left!"]) == {"exact_match": 1.0}
    assert qa_task_name("count") == "vilex_toy_count"


def test_cider_rewards_the_right_caption():
    docs = [{"doc_key": str(i), "references": [c]} for i, c in
            enumerate(["a red circle at the top", "a blue square at the bottom", "a green diamond on the left"])]
    right = [caption_process_results(d, [d["references"][0]])["cider"] for d in docs]
    wrong = [caption_process_results(d, ["nothing here"])["cider"] for d in docs]
    assert cider_aggregate(right) > 1.0
    assert cider_aggregate(wrong) == 0.0
    assert caption_process_results(docs[0], ["A red circle at the top."])["exact_match"] == 1.0

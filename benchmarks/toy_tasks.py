"""benchmarks/toy_tasks.py — materialise the toy-world lmms-eval suite into a folder for ``--include_path``.

One task per QA type (``vilex_toy_colour`` … ``vilex_toy_existence``, exact match) and ``vilex_toy_caption``
(CIDEr + exact match), all tagged ``vilex_toy``. Each task is a YAML with ``dataset_path: json`` and an ABSOLUTE
``data_files`` path to its own ``<task>.jsonl`` (lmms-eval's ``load_dataset`` would otherwise resolve it relative
to the working directory), plus ``utils.py`` re-exporting :mod:`benchmarks.toy_task_fns`.

Docs are flat rows (one per scene × question of that type) holding the image's absolute path, so the data is a
plain JSONL any tool can read. ``tasks.json`` in the folder lists the tasks, their doc counts and source split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vilex.errors import DataError

QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence")
TOY_TAG = "vilex_toy"
CAPTION_TASK = "vilex_toy_caption"
QA_POST_PROMPT = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image in one sentence."


def qa_task_name(qa_type: str) -> str:
    return f"vilex_toy_{qa_type}"


TOY_TASKS: tuple[str, ...] = tuple(qa_task_name(t) for t in QA_TYPES) + (CAPTION_TASK,)


def _read_rows(split_dir: Path) -> list[dict[str, Any]]:
    meta = split_dir / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"toy split {split_dir}: no metadata.jsonl (make one with `vilex toy generate`)")
    return [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]


def toy_docs(split_dir: str | Path, max_per_task: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Task name -> docs built from a toy split folder (scene order, questions in row order)."""
    split_dir = Path(split_dir).resolve()
    docs: dict[str, list[dict[str, Any]]] = {name: [] for name in TOY_TASKS}
    for row in _read_rows(split_dir):
        image = str(split_dir / row["file_name"])
        for k, qa in enumerate(row["qa"]):
            name = qa_task_name(qa["type"])
            if name not in docs:
                raise DataError(f"toy split {split_dir}: scene {row['id']} has unknown QA type {qa['type']!r}")
            docs[name].append({"doc_key": f"{row['id']}/{k}", "image": image, "question": qa["question"],
                               "answer": qa["answer"], "type": qa["type"]})
        docs[CAPTION_TASK].append({"doc_key": row["id"], "image": image, "question": CAPTION_PROMPT,
                                   "answer": row["caption"], "references": [row["caption"], row["caption_fine"]],
                                   "type": "caption"})
    if max_per_task is not None:
        docs = {name: rows[:max_per_task] for name, rows in docs.items()}
    return docs


def _task_yaml(name: str, data_file: Path, max_new_tokens: int) -> dict[str, Any]:
    caption = name == CAPTION_TASK
    cfg: dict[str, Any] = {
        "task": name,
        "tag": [TOY_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": _Function("utils.doc_to_visual"),
        "doc_to_text": _Function("utils.doc_to_text"),
        "doc_to_target": _Function("utils.doc_to_target"),
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "process_results": _Function("utils." + ("caption_process_results" if caption else "qa_process_results")),
        "metric_list": ([{"metric": "cider", "aggregation": _Function("utils.cider_aggregate"),
                          "higher_is_better": True}] if caption else [])
        + [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "",
                                                  "post_prompt": "" if caption else QA_POST_PROMPT}},
        "metadata": {"version": 1.0},
    }
    return cfg


class _Function(str):
    """A ``!function utils.name`` reference (a tagged YAML scalar lmms-eval resolves next to the YAML)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, width=1000)


def materialize_toy_tasks(split_dir: str | Path, out_dir: str | Path, max_per_task: int | None = None,
                          max_new_tokens: int = 16) -> dict[str, Any]:
    """Write the toy suite for ``split_dir`` (e.g. ``DIR/test``) into ``out_dir``; returns the ``tasks.json``
    manifest ``{"source": ..., "tasks": {name: {"yaml": path, "n_docs": n}}}``. Tasks with no docs are not
    written and are listed under ``"empty"``."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text('"""Re-exports the toy-suite task functions (see benchmarks/toy_task_fns.py)."""\n'
                                  "from benchmarks.toy_task_fns import *  # noqa: F401,F403\n")
    manifest: dict[str, Any] = {"source": str(Path(split_dir).resolve()), "tasks": {}, "empty": []}
    for name, docs in toy_docs(split_dir, max_per_task).items():
        if not docs:
            manifest["empty"].append(name)
            continue
        data_file = out / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
        yaml_path = out / f"{name}.yaml"
        yaml_path.write_text(_dump_yaml(_task_yaml(name, data_file, max_new_tokens)))
        manifest["tasks"][name] = {"yaml": str(yaml_path), "n_docs": len(docs)}
    (out / "tasks.json").write_text(json.dumps(manifest, indent=1))
    return manifest

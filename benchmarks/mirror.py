"""benchmarks/mirror.py — ``vilex eval mirror``: every task of a suite on a small local dataset in its REAL schema.

    vilex eval mirror --suite configs/benchmarks/paper15.yaml --out DIR [--rows N]
    vilex eval --config configs/benchmarks/paper15.yaml --cache DIR            (the tasks' own code, end to end)

A real sweep runs a task's code (``process_docs``, ``doc_to_visual``, ``doc_to_text``, ``process_results``, the
aggregation with its Java scorers) for the first time after hours of GPU work. A mirror runs all of it first, on
CPU, in seconds:

1. each task's dataset is rebuilt locally in the schema its hub card documents (benchmarks/mirror_schemas.py: the
   same columns, feature types and splits; answers in the task's format) from drawn scenes and packaged photos;
2. lmms-eval itself then builds the task from it — the task's own YAML and ``utils.py``, ``process_docs``
   included — while :class:`MirrorHub` stands in for the hub inside ``datasets.load_dataset`` (GQA's
   ``process_docs`` loads a second config, the images, that way too); nothing else is replaced;
3. the result goes through ``vilex eval prepare``'s own writer (benchmarks/prepare.py): ``save_to_disk`` copies and
   ``load_from_disk`` task YAMLs, exactly what a real prepared cache holds, so ``vilex eval --cache DIR`` runs
   the mirror through the same path as real prepared copies.

A mirror is marked as one everywhere: its data folders are ``DIR/<task>.mirror``, ``DIR/MIRROR.txt`` says what it
is, ``prepared.json`` (the index and each task's) and every task YAML's header carry the MIRROR note; a sweep on it
writes to ``<output_dir>-mirror``, its result keys start with ``mirror-``, each ``result.json`` and ``sweep.json``
pair says ``"mirror": true``, and ``vilex eval report`` labels the table and the plot MIRROR.
"""
from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmarks.mirror_schemas import SCHEMAS, ConfigSchema, DatasetSchema, schema_for
from benchmarks.prepare import TaskPlan, plan_task, prepare_suite, read_index
from benchmarks.sweep import SweepConfig, lmms_task_index, local_task_index, resolve_tasks
from vilex.errors import UserError

log = logging.getLogger(__name__)

MIRROR_NOTE = ("synthetic data in the task's real schema (drawn scenes and packaged photos), made by `vilex eval "
               "mirror` to run the task's own code end to end offline; NOT the benchmark: its scores mean nothing")
DEFAULT_ROWS = 8


class MirrorHub:
    """The hub, as far as ``datasets.load_dataset`` is asked for a mirrored dataset: ``rows`` rows per documented
    split of every config :mod:`benchmarks.mirror_schemas` knows. Any other dataset is refused (a mirror never
    reaches the network and never mixes in real data)."""

    def __init__(self, rows: int = DEFAULT_ROWS):
        if rows < 1:
            raise UserError(f"mirror: --rows must be at least 1 (got {rows})")
        self.rows = rows
        self._built: dict[tuple[str, str | None], Any] = {}
        self.calls: list[tuple[str, str | None, str | None]] = []  # what the task code asked for (tests read it)

    def dataset(self, path: str, name: str | None = None) -> Any:
        """The mirror DatasetDict of one dataset config (built once, every documented split)."""
        from datasets import Dataset, DatasetDict

        try:
            ds, cs = schema_for(path, name)
        except KeyError as e:
            raise UserError(f"mirror: {e.args[0]}") from None
        key = (ds.name, name)
        if key not in self._built:
            features = cs.features()
            self._built[key] = DatasetDict({split: Dataset.from_list(cs.rows(self.rows, split), features=features)
                                            for split in cs.splits})
        return self._built[key]

    def load_dataset(self, path: str | None = None, name: str | None = None, split: str | None = None,
                     **kwargs: Any) -> Any:
        """``datasets.load_dataset``'s signature; ``token``, ``cache_dir``, ``download_config`` … are irrelevant
        to local data and ignored."""
        self.calls.append((str(path), name, split))
        ds = self.dataset(str(path), name)
        if split is None:
            return ds
        if split not in ds:
            raise UserError(f"mirror: {path} {name or ''} has no split {split!r} (documented: {sorted(ds)})")
        return ds[split]

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """``datasets.load_dataset`` answered by this hub while the block runs. lmms-eval calls
        ``datasets.load_dataset`` by attribute, and a task's ``utils.py`` that does ``from datasets import
        load_dataset`` is executed afresh on every task load (lmms_eval.utils.import_function), so both see it."""
        import datasets

        original = datasets.load_dataset
        datasets.load_dataset = self.load_dataset
        try:
            yield
        finally:
            datasets.load_dataset = original


@lru_cache(maxsize=None)
def _folder_manager(folder: str) -> Any:
    """A TaskManager indexing one task folder only (a few YAMLs instead of lmms-eval's ~2000)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="WARNING", include_path=folder, include_defaults=False)


def mirror_loader(hub: MirrorHub) -> Callable[[TaskPlan, str | Path | None], Any]:
    """prepare_suite's ``load``: lmms-eval builds the task from its own YAML folder (its ``process_docs`` runs)
    while ``hub`` serves the data."""

    def load(plan: TaskPlan, include_path: str | Path | None) -> Any:
        with hub.serving():
            task = _folder_manager(str(plan.yaml.parent.resolve())).load_task_or_group([plan.name])[plan.name]
        return task.dataset

    return load


def mirror_plan(plan: TaskPlan) -> tuple[DatasetSchema, ConfigSchema]:
    """The schema a task mirrors through; UserError when there is none or the task reads an undocumented split."""
    try:
        ds, cs = schema_for(plan.config.get("dataset_path"), plan.config.get("dataset_name"))
    except KeyError as e:
        raise UserError(f"task {plan.name!r}: {e.args[0]}") from None
    undocumented = [s for s in plan.splits if s not in cs.splits]
    if undocumented:
        raise UserError(f"task {plan.name!r}: split(s) {undocumented} are not documented for {ds.name} "
                        f"(documented: {list(cs.splits)}); the mirror schema is stale for this lmms-eval version")
    return ds, cs


def mirror_suite(cfg: SweepConfig, out: str | Path, rows: int = DEFAULT_ROWS, force: bool = False,
                 full_index: Callable[[str | Path | None], dict[str, Path]] = lmms_task_index) -> dict[str, Any]:
    """Write the mirror of every task of ``cfg`` to ``out`` (a prepared cache marked MIRROR); returns its index.
    Every task is checked to have a schema before anything is written."""
    if not cfg.tasks:
        raise UserError("mirror: the suite lists no tasks")
    index_fn = lru_cache(maxsize=None)(full_index)  # prepare_suite resolves the names again: build the index once
    yamls = resolve_tasks(cfg.tasks, cfg.include_path, index_fn)
    local = local_task_index(cfg.include_path)
    plans = [plan_task(t, yamls[t], t in local) for t in cfg.tasks]
    problems, meta_tasks = [], {}
    for plan in plans:
        try:
            ds, cs = mirror_plan(plan)
        except UserError as e:
            problems.append(str(e))
            continue
        meta_tasks[plan.name] = {"dataset": plan.config.get("dataset_path"),
                                 "config": plan.config.get("dataset_name"), "schema": ds.name,
                                 "schema_sources": list(ds.sources), "required_columns": list(cs.required)}
    if problems:
        raise UserError("mirror: nothing written:\n  " + "\n  ".join(problems))
    out = Path(out)
    previous = read_index(out).get("mirror") or {}
    if previous and previous.get("rows") != rows and not force:
        log.info("mirror: %s was made with --rows %s; rebuilding with %d", out, previous.get("rows"), rows)
        force = True
    meta = {"note": MIRROR_NOTE, "rows": rows, "made_by": "vilex eval mirror", "lmms_eval": version("lmms_eval"),
            "tasks": meta_tasks}
    index = prepare_suite(cfg, out, force=force, full_index=index_fn, load=mirror_loader(MirrorHub(rows)),
                          mirror=meta)
    (out / "MIRROR.txt").write_text(
        f"MIRROR — {MIRROR_NOTE}.\n\nTasks: {', '.join(cfg.tasks)}; {rows} rows per split before each task's "
        "process_docs.\nRun: vilex eval --config SWEEP.yaml --cache THIS_FOLDER (results go to "
        "<output_dir>-mirror, labelled MIRROR).\n")
    return index


def mirrored_datasets() -> list[str]:
    """The dataset names the mirror has schemas for."""
    return [s.name for s in SCHEMAS.values()]

"""benchmarks/prepare.py — ``vilex eval prepare``: materialise a sweep's task data so the sweep runs with no network.

    vilex eval prepare --suite configs/benchmarks/paper15.yaml --cache DIR     (on a machine with network)
    vilex eval --config configs/benchmarks/paper15.yaml --cache DIR           (anywhere, offline)

For every task of the suite:

1. the task is built by lmms-eval itself (``TaskManager.load_task_or_group``: ``datasets.load_dataset(dataset_path,
   dataset_name, **dataset_kwargs)`` with its retries and cache dir, then the task's ``process_docs``), so the docs
   are exactly the ones lmms-eval would evaluate — including GQA, whose ``process_docs`` pulls its images from a
   second hub dataset;
2. the splits the task uses (``test_split``, ``validation_split``, ``training_split``, ``fewshot_split``) are written
   with ``DatasetDict.save_to_disk`` to ``DIR/<task>/`` (atomically; an existing copy is kept unless ``--force``);
3. the task YAML is flattened (its ``include`` chain merged the way lmms-eval merges it, ``!function`` references
   kept) and written to ``DIR/tasks/<task>/<task>.yaml`` with ``dataset_path: DIR/<task>``,
   ``dataset_kwargs: {load_from_disk: true}`` (lmms-eval 0.7.3 then calls ``datasets.load_from_disk``), no
   ``dataset_name`` and no ``process_docs`` (already applied); the task folder's ``*.py`` files (``utils.py`` …) and
   non-YAML include templates are copied beside it, and ``prepared.json`` records the source, the splits, their row
   counts and dataset fingerprints (it is hashed into the sweep's result key).

lmms-eval indexes built-in tasks BEFORE ``--include_path`` ones, so a copy named like a built-in task is shadowed in
a plain ``lmms-eval --include_path DIR/tasks`` run; the sweep's worker therefore loads include-path tasks with
``include_defaults=False``. By hand: ``lmms-eval --tasks DIR/tasks/<task>/<task>.yaml`` (a YAML path) runs the copy.

Refused before anything is loaded: unknown task names (close names listed), tasks whose data needs media files
downloaded outside the ``datasets`` copy (``dataset_kwargs`` ``video`` / ``From_YouTube`` / ``builder_script``),
``!function`` references from an included YAML in another folder (the copy could not resolve them), and tasks whose
code imports a module this machine lacks (benchmarks/requirements.py; what only scoring needs — Java, pycocoevalcap
resources — is logged as a warning here and refused by ``vilex eval`` before it runs anything).

``vilex eval mirror`` (benchmarks/mirror.py) writes through this same code with ``mirror=…``: its data folders are
``DIR/<task>.mirror``, and ``prepared.json`` (the index and each task folder's) and the YAML header say MIRROR. A
cache is either all mirror or all real: preparing one kind into the other's folder is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import yaml

from benchmarks.sweep import (
    SweepConfig,
    lmms_task_index,
    local_task_index,
    resolve_tasks,
)
from vilex.checkpoint import _TMP_PREFIX, atomic_dir
from vilex.errors import UserError

log = logging.getLogger(__name__)

TASKS_SUBDIR = "tasks"
MANIFEST = "prepared.json"
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
MEDIA_KWARGS = ("video", "From_YouTube", "builder_script")  # lmms-eval fetches extra files outside the dataset
DROP_KEYS = ("dataset_name", "process_docs")


class Function(str):
    """A ``!function module.name`` reference, kept as text (resolved by lmms-eval next to the YAML it lives in)."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _functions(obj: Any) -> list[Function]:
    if isinstance(obj, Function):
        return [obj]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _functions(v)]
    if isinstance(obj, list):
        return [f for v in obj for f in _functions(v)]
    return []


def flatten_task_yaml(path: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """The task config with its ``include`` chain merged exactly as lmms_eval.utils.load_yaml_config merges it
    (includes relative to the including file, the last include lowest, the file's own keys on top), plus the
    included files. ``!function`` values stay :class:`Function` strings; one defined in another folder is refused."""
    path = Path(path)
    try:
        config = yaml.load(path.read_text(), Loader=_TaskLoader)
    except yaml.YAMLError as e:
        raise UserError(f"task YAML {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"task YAML {path}: expected a mapping")
    included: list[Path] = []
    if "include" in config:
        names = config.pop("include")
        merged: dict[str, Any] = {}
        for name in reversed([names] if isinstance(names, str) else list(names)):
            inc = Path(name) if Path(name).is_file() else path.parent / name
            if not inc.is_file():
                raise UserError(f"task YAML {path}: included file not found: {name}")
            sub, sub_included = flatten_task_yaml(inc)
            if inc.parent.resolve() != path.parent.resolve() and _functions(sub):
                raise UserError(f"task YAML {path}: its include {inc} (another folder) defines !function values; "
                                "vilex eval prepare copies only the task's own folder")
            merged.update(sub)
            included += [inc, *sub_included]
        config = {**merged, **config}
    return config, included


@dataclass
class TaskPlan:
    name: str
    yaml: Path
    config: dict[str, Any]
    included: list[Path]
    local: bool  # defined under the suite's include_path (not an lmms-eval built-in)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.config[k] for k in SPLIT_KEYS if self.config.get(k)))


def plan_task(name: str, yaml_path: Path, local: bool) -> TaskPlan:
    """Read and check one task before anything is downloaded."""
    config, included = flatten_task_yaml(yaml_path)
    if config.get("task") != name:
        raise UserError(f"task {name!r}: {yaml_path} defines task {config.get('task')!r} (groups are not prepared; "
                        "list their tasks)")
    kwargs = config.get("dataset_kwargs") or {}
    media = [k for k in MEDIA_KWARGS if kwargs.get(k)]
    if media:
        raise UserError(f"task {name!r}: dataset_kwargs {media} make lmms-eval download media files outside the "
                        "datasets copy; vilex eval prepare supports image/text tasks only")
    if not config.get("dataset_path"):
        raise UserError(f"task {name!r}: {yaml_path} has no dataset_path")
    plan = TaskPlan(name, Path(yaml_path), config, included, local)
    if not plan.splits:
        raise UserError(f"task {name!r}: no test/validation/training split named in {yaml_path}")
    return plan


@lru_cache(maxsize=None)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """One lmms-eval TaskManager per (include_path, defaults) for the whole process: building its index of every
    built-in task costs seconds, and a suite loads many tasks."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="WARNING", include_path=include_path, include_defaults=include_defaults)


def load_task_dataset(plan: TaskPlan, include_path: str | Path | None) -> Any:
    """The task's DatasetDict exactly as lmms-eval builds it (load_dataset + process_docs)."""
    tm = _task_manager(str(include_path) if plan.local and include_path else None, not plan.local)
    task = tm.load_task_or_group([plan.name])[plan.name]
    return task.dataset


def _fingerprints(ds: Any) -> dict[str, Any]:
    return {s: {"rows": ds[s].num_rows, "fingerprint": getattr(ds[s], "_fingerprint", None)} for s in ds}


def _write_task_folder(plan: TaskPlan, data_dir: Path, folder: Path, splits: dict[str, Any],
                       mirror: dict[str, Any] | None = None) -> Path:
    cfg = {k: v for k, v in plan.config.items() if k not in DROP_KEYS}
    cfg["dataset_path"] = str(data_dir.resolve())
    cfg["dataset_kwargs"] = {"load_from_disk": True}
    source = {k: plan.config.get(k) for k in ("dataset_path", "dataset_name")}
    source["dataset_kwargs"] = {k: v for k, v in (plan.config.get("dataset_kwargs") or {}).items() if k != "token"}
    manifest = {"task": plan.name, "yaml": str(plan.yaml), "source": source,
                "process_docs_applied": plan.config.get("process_docs") is not None,
                "process_docs": plan.config.get("process_docs"),  # `vilex eval prepare --check` re-derives the schema
                "splits": splits, "lmms_eval": version("lmms_eval")}
    if mirror is not None:
        manifest["mirror"] = mirror
    header = ((f"# MIRROR: {mirror['note']}\n" if mirror is not None else "")
              + f"# Prepared by `vilex eval {'mirror' if mirror is not None else 'prepare'}` from {plan.yaml}\n"
              f"# (data: {source['dataset_path']}"
              + (f", {source['dataset_name']}" if source["dataset_name"] else "")
              + "; saved with save_to_disk; process_docs already applied).\n")
    with atomic_dir(folder) as tmp:
        src = plan.yaml.parent
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix == ".py":
                shutil.copy2(f, tmp / f.name)
        for fn in _functions(plan.config):  # modules in subfolders (``!function sub.utils.fn``)
            module = src.joinpath(*fn.split(".")[:-1]).with_suffix(".py")
            if module.is_file() and module.parent != src:
                (tmp / module.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(module, tmp / module.relative_to(src))
        for inc in plan.included:  # templates utils.py may read next to itself (never *.yaml: lmms-eval indexes those)
            if inc.parent.resolve() == src.resolve() and not inc.name.endswith(".yaml"):
                shutil.copy2(inc, tmp / inc.name)
        (tmp / f"{plan.name}.yaml").write_text(header + yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False,
                                                                  width=1000, allow_unicode=True))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return folder / f"{plan.name}.yaml"


MIRROR_SUFFIX = ".mirror"  # a mirror's data folder: DIR/<task>.mirror (benchmarks/mirror.py)


def data_dir_for(cache: Path, task: str, mirror: bool) -> Path:
    return cache / (f"{task}{MIRROR_SUFFIX}" if mirror else task)


def read_index(cache: str | Path) -> dict[str, Any]:
    path = Path(cache) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"tasks": {}}


def check_requirements_for_prepare(plans: list[TaskPlan]) -> list[str]:
    """UserError (nothing written) when a task's code imports a module this machine lacks (lmms-eval could not
    even load it); returns the lines for what only scoring needs (Java, pycocoevalcap files), logged as warnings:
    preparing needs neither, the machine that runs the sweep does (``vilex eval`` refuses to start without)."""
    from benchmarks.requirements import check_tasks, format_missing

    missing = check_tasks({p.name: p.yaml for p in plans})
    blocking = [m for m in missing if m.stage == "import"]
    if blocking:
        raise UserError("prepare: task code needs what this machine lacks (nothing was written):\n  "
                        + "\n  ".join(format_missing(blocking)))
    later = format_missing(m for m in missing if m.stage == "run")
    for line in later:
        log.warning("prepare: %s (needed where the sweep runs, not to prepare)", line)
    return later


def prepare_suite(cfg: SweepConfig, cache: str | Path, force: bool = False,
                  full_index: Callable[[str | Path | None], dict[str, Path]] = lmms_task_index,
                  load: Callable[[TaskPlan, str | Path | None], Any] = load_task_dataset,
                  mirror: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prepare every task of ``cfg`` under ``cache``; returns (and writes to ``cache/prepared.json``) the index
    ``{"tasks": {name: {"yaml", "data", "status", "splits"}}}``. Names, configs and the task code's requirements are
    all checked first. ``mirror`` (from ``vilex eval mirror``): ``{"note", "rows", "tasks": {name: {...}}}`` —
    marks the cache, each task folder and each data folder as a mirror."""
    if not cfg.tasks:
        raise UserError("prepare: the suite lists no tasks")
    yamls = resolve_tasks(cfg.tasks, cfg.include_path, full_index)  # typos fail here, before anything runs
    local = local_task_index(cfg.include_path)
    plans = [plan_task(t, yamls[t], t in local) for t in cfg.tasks]
    cache = Path(cache)
    tasks_dir = cache / TASKS_SUBDIR
    if TASKS_SUBDIR in cfg.tasks:
        raise UserError(f"prepare: a task may not be named {TASKS_SUBDIR!r} (the folder of prepared YAMLs)")
    index_path = cache / MANIFEST
    index = read_index(cache)
    if index["tasks"] and bool(index.get("mirror")) != (mirror is not None):
        held = "a MIRROR (vilex eval mirror)" if index.get("mirror") else "real prepared copies"
        raise UserError(f"prepare: {cache} holds {held}"
                        f"; write {'real copies' if mirror is None else 'a mirror'} to another folder (a cache is "
                        "never part mirror, part real)")
    requirements = check_requirements_for_prepare(plans)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*tasks_dir.glob(f"{_TMP_PREFIX}*"), *cache.glob(f"{_TMP_PREFIX}*")]:  # a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    if mirror is not None:
        index["mirror"] = {k: v for k, v in mirror.items() if k != "tasks"}
    for i, plan in enumerate(plans, 1):
        data_dir, folder = data_dir_for(cache, plan.name, mirror is not None), tasks_dir / plan.name
        where = f"prepare task {i}/{len(plans)} {plan.name}"
        start = time.perf_counter()
        if (data_dir / "dataset_dict.json").is_file() and not force:
            status = "kept"
        else:
            try:
                ds = load(plan, cfg.include_path)
            except UserError:
                raise
            except Exception as e:  # the hub, the network, a missing local file: name the task, keep what is saved
                offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v) == "1"]
                raise UserError(f"task {plan.name!r}: lmms-eval could not load its dataset "
                                f"({plan.config.get('dataset_path')}): {type(e).__name__}: {e}"
                                + (f" ({'/'.join(offline)}=1 is set: prepare needs the network)"
                                   if offline and mirror is None else "")
                                + f"; tasks prepared so far are kept in {cache}") from e
            missing = [s for s in plan.splits if s not in ds]
            if missing:
                raise UserError(f"task {plan.name!r}: split(s) {missing} not in its dataset (has {sorted(ds)})")
            from datasets import DatasetDict

            keep = DatasetDict({s: ds[s] for s in plan.splits})
            with atomic_dir(data_dir) as tmp:
                keep.save_to_disk(str(tmp))
            status = "saved"
        from datasets import load_from_disk

        splits = _fingerprints(load_from_disk(str(data_dir)))  # as the saved copy reads back (what runs)
        task_mirror = None if mirror is None else {"note": mirror["note"], **mirror.get("tasks", {}).get(plan.name, {})}
        yaml_path = _write_task_folder(plan, data_dir, folder, splits, task_mirror)
        index["tasks"][plan.name] = {"yaml": str(yaml_path), "data": str(data_dir), "status": status,
                                     "splits": splits, **({"mirror": True} if mirror is not None else {})}
        index_path.write_text(json.dumps(index, indent=1))
        rows = ", ".join(f"{s} {v['rows']}" for s, v in splits.items())
        log.info("%s: %s (%s rows) in %.1fs", where, "kept existing data" if status == "kept" else "saved",
                 rows, time.perf_counter() - start)
    index["requirements"] = requirements
    index_path.write_text(json.dumps(index, indent=1))
    return index

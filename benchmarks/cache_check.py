"""benchmarks/cache_check.py — ``vilex eval prepare --check DIR``: verify a prepared cache made elsewhere, relink it.

A prepared cache is typically made on a machine with network and copied to the cluster. Before a sweep trusts it,
each task is checked:

1. its task folder (``DIR/tasks/<task>``) and data folder verify against the integrity records ``vilex eval
   prepare`` wrote with them (``manifest.json``: every file's size and xxh3 hash — a truncated or altered copy is
   named file by file);
2. every split of the saved data loads, with the row count and dataset fingerprint ``prepared.json`` recorded;
3. its columns match the expected schema: the dataset's documented features (benchmarks/mirror_schemas.py) passed
   through the task's own ``process_docs`` (the copy of its ``utils.py`` in the task folder, run on two mirror
   rows). A column the task code reads that is missing or of another type fails the task; other differences
   (a column the card documents that the copy lacks, an extra column) are reported as warnings;
4. when the cache has MOVED (the YAMLs' absolute ``dataset_path`` points elsewhere) and everything above holds,
   the task folder is rewritten (atomically) to point at the data where it is now, and ``prepared.json`` with it.
   Result keys do not depend on the cache's location (benchmarks/sweep.py task_hash), so relinked tasks keep the
   results a sweep already has.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.prepare import MANIFEST, TASKS_SUBDIR, read_index
from vilex.checkpoint import MANIFEST_NAME, atomic_dir, folder_problem
from vilex.errors import UserError

log = logging.getLogger(__name__)


def _load_function(folder: Path, ref: str) -> Any:
    """A ``module.fn`` reference resolved in ``folder`` the way lmms-eval resolves ``!function`` (a fresh module)."""
    *module, fn = ref.split(".")
    path = folder.joinpath(*module).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(".".join(module), path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"{path} (for process_docs {ref})")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))  # sibling imports (``from utils import …``) as lmms-eval's loader allows
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    return getattr(mod, fn)


def expected_features(task_folder: Path, manifest: dict[str, Any]) -> tuple[Any, tuple[str, ...]] | None:
    """(the features a correct copy of this task has, the columns its code reads) or None when no schema is known
    for its dataset. Derived, not written down: the documented hub features, then the task's ``process_docs``
    (from the copied ``utils.py``) applied to a two-row mirror of them."""
    from benchmarks.mirror import MirrorHub
    from benchmarks.mirror_schemas import schema_for

    source = manifest.get("source") or {}
    try:
        schema, config = schema_for(source.get("dataset_path"), source.get("dataset_name"))
    except KeyError:
        return None
    if not manifest.get("process_docs_applied"):
        return config.features(), config.required
    ref = manifest.get("process_docs")
    if not ref:
        raise UserError(f"{task_folder}: prepared.json says process_docs was applied but not which one (a cache "
                        "from an older `vilex eval prepare`): its columns cannot be derived; prepare it again")
    hub = MirrorHub(rows=2)
    split = next(iter(manifest["splits"]))
    raw = hub.dataset(source["dataset_path"], source.get("dataset_name"))[split if split in config.splits
                                                                          else config.splits[0]]
    with hub.serving():
        processed = _load_function(task_folder, str(ref))(raw)
    return processed.features, config.required


def _check_columns(actual: Any, expected: Any, required: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(problems, warnings) comparing a split's features with the expected ones."""
    problems, warnings = [], []
    for col, feature in expected.items():
        if col not in actual:
            (problems if col in required else warnings).append(f"column {col!r} missing (expected {feature})")
        elif actual[col] != feature:
            (problems if col in required else warnings).append(
                f"column {col!r} is {actual[col]}, expected {feature}")
    extra = [c for c in actual if c not in expected]
    if extra:
        warnings.append(f"extra column(s) {extra} (not in the documented schema)")
    return problems, warnings


def _relink(folder: Path, yaml_name: str, data_dir: Path) -> None:
    """Rewrite the task folder with ``dataset_path`` pointing at ``data_dir`` (atomic; new integrity record)."""
    with atomic_dir(folder) as tmp:
        for f in folder.iterdir():
            if f.is_file() and f.name != MANIFEST_NAME:
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir() and f.name != "__pycache__":
                shutil.copytree(f, tmp / f.name)
        y = tmp / yaml_name
        y.write_text(re.sub(r"(?m)^dataset_path: .*$", f"dataset_path: {data_dir}", y.read_text()))


def check_task(cache: Path, task: str, entry: dict[str, Any], relink: bool) -> dict[str, Any]:
    """Verify one prepared task; returns {"status": ok | relinked | failed, "problems", "warnings"}."""
    from datasets import load_from_disk

    problems: list[str] = []
    warnings: list[str] = []
    folder = cache / TASKS_SUBDIR / task
    yaml_path, manifest_path = folder / f"{task}.yaml", folder / MANIFEST
    if not yaml_path.is_file() or not manifest_path.is_file():
        return {"status": "failed", "problems": [f"{folder}: no {yaml_path.name} / {MANIFEST}"], "warnings": []}
    bad = folder_problem(folder)
    if bad:
        problems.append(f"task folder {folder}: {bad}")
    manifest = json.loads(manifest_path.read_text())
    data_dir = cache / Path(entry.get("data") or task).name
    bad = folder_problem(data_dir) if data_dir.is_dir() else f"{data_dir} is missing"
    if bad:
        problems.append(f"data {data_dir}: {bad}")
        return {"status": "failed", "problems": problems, "warnings": warnings}
    try:
        ds = load_from_disk(str(data_dir))
    except Exception as e:  # noqa: BLE001 — any unreadable copy is a failed check, named
        return {"status": "failed", "problems": problems + [f"data {data_dir} does not load: {type(e).__name__}: {e}"],
                "warnings": warnings}
    records = [(manifest_path, manifest.get("splits", {}))]
    if entry.get("splits") is not None:
        records.append((cache / MANIFEST, entry["splits"]))
    for source, recorded in records:  # the task folder's record, and the cache index's
        for split, want in recorded.items():
            if split not in ds:
                problems.append(f"split {split!r} missing from {data_dir} (has {sorted(ds)}; {source} lists it)")
                continue
            if ds[split].num_rows != want["rows"]:
                problems.append(f"split {split!r} has {ds[split].num_rows} rows, {source} says {want['rows']}")
            if want.get("fingerprint") and ds[split]._fingerprint != want["fingerprint"]:
                problems.append(f"split {split!r} fingerprint {ds[split]._fingerprint} != {source}'s "
                                f"{want['fingerprint']}")
    try:
        expected = expected_features(folder, manifest)
    except Exception as e:  # noqa: BLE001 — the copied process_docs failing on documented rows is a finding
        expected = None
        problems.append(f"could not derive the expected columns: {type(e).__name__}: {e}")
    else:
        if expected is None:
            warnings.append(f"no schema known for {manifest.get('source', {}).get('dataset_path')}: columns not "
                            "checked")
        else:
            features, required = expected
            for split in manifest.get("splits", {}):
                if split in ds:
                    p, w = _check_columns(ds[split].features, features, required)
                    problems += [f"split {split!r}: {x}" for x in p]
                    warnings += [f"split {split!r}: {x}" for x in w]
    if problems:
        return {"status": "failed", "problems": problems, "warnings": warnings}
    m = re.search(r"(?m)^dataset_path: (.*)$", yaml_path.read_text())
    linked = Path(m.group(1).strip()) if m else None
    if linked is not None and linked != data_dir.resolve():
        if not relink:
            return {"status": "failed", "problems": [f"points at {linked}, the data is at {data_dir}"],
                    "warnings": warnings}
        _relink(folder, yaml_path.name, data_dir.resolve())
        return {"status": "relinked", "problems": [], "warnings": warnings, "was": str(linked)}
    return {"status": "ok", "problems": [], "warnings": warnings}


def check_cache(cache: str | Path, relink: bool = True, tasks: list[str] | None = None) -> dict[str, Any]:
    """Check every task of a prepared cache (or ``tasks``); returns ``{task: {"status", "problems", "warnings"}}``
    and, when tasks were relinked, rewrites ``prepared.json``'s paths."""
    cache = Path(cache).resolve()
    index = read_index(cache)
    if not index["tasks"]:
        raise UserError(f"prepare --check: {cache} has no {MANIFEST} listing prepared tasks")
    names = tasks or list(index["tasks"])
    absent = [t for t in names if t not in index["tasks"]]
    if absent:
        raise UserError(f"prepare --check: task(s) {absent} are not in {cache / MANIFEST} (it has "
                        f"{sorted(index['tasks'])})")
    report = {}
    for i, task in enumerate(names, 1):
        report[task] = check_task(cache, task, index["tasks"][task], relink)
        r = report[task]
        log.info("check %d/%d %s: %s%s", i, len(names), task, r["status"],
                 "".join(f"\n  problem: {x}" for x in r["problems"]) + "".join(f"\n  warning: {x}"
                                                                           for x in r["warnings"]))
    changed = False
    for task, r in report.items():
        entry = index["tasks"][task]
        data_dir = cache / Path(entry.get("data") or task).name
        yaml_path = cache / TASKS_SUBDIR / task / f"{task}.yaml"
        if r["status"] in ("ok", "relinked") and (entry.get("data") != str(data_dir) or
                                                 entry.get("yaml") != str(yaml_path)):
            entry["data"], entry["yaml"] = str(data_dir), str(yaml_path)
            changed = True
    if changed:
        tmp = cache / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(cache / MANIFEST)
    return report

"""benchmarks/sweep.py — a resumable models × tasks lmms-eval sweep (``vilex eval --config …``).

Each (model, task) runs in its own subprocess (``python -m benchmarks.worker``): lmms-eval writes results only at
the end of a run, so one pair per process means a kill loses at most the pair in flight. ``process_per: model``
runs all missing tasks of one model in ONE worker process instead (saves the per-process import and task-index
cost, ~7-10 s a pair on this machine; the worker still calls lmms-eval once per task and writes each pair's result
as soon as it is done, so resumability stays per pair). Results live under

    <output_dir>/results/<model label>/<task>/<key>/{result.json, samples.jsonl}

where ``key`` hashes the checkpoint's CONTENT, the task's config files, the lmms-eval version, the generation
kwargs, batch size and limit: a pair whose folder exists is skipped, and changing any of those makes a new key
(old results stay, never silently reused). A failing pair leaves ``<key>.error.json`` and the sweep goes on; the
summary (``sweep.json``) lists every pair as done / skipped / failed. Task names are checked before anything runs;
a typo fails listing close names.

Task resolution is two-tier for speed: names defined by YAMLs under ``include_path`` resolve by reading those
files; only other names pay for lmms-eval's full task index (~15 s). lmms-eval indexes its built-in tasks BEFORE
``include_path`` (a local YAML named like a built-in task would be silently shadowed), so the worker loads a local
task with ``include_defaults=False``: the YAML that was hashed is the YAML that runs.

``prepared_cache`` (``--cache DIR``) points at a folder written by ``vilex eval prepare`` (benchmarks/prepare.py):
tasks then resolve only from ``DIR/tasks`` (``load_from_disk`` copies) and the workers run with
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` — no network at all.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import yaml

from vilex.config import cfg_field
from vilex.errors import ConfigError, UserError

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SUMMARY_FILE = "sweep.json"


@dataclass
class SweepConfig:
    """One sweep: models (label -> checkpoint folder) × tasks, evaluated with one lmms-eval model class."""

    models: dict[str, str] = cfg_field(default_factory=dict, help="label -> checkpoint path (model_args pretrained=...)")
    tasks: list[str] = cfg_field(default_factory=list, help="lmms-eval task names")
    output_dir: Path = cfg_field(Path("runs/bench/sweep"), help="results, logs and sweep.json go here")
    include_path: Path | None = cfg_field(None, help="folder of extra task YAMLs (lmms-eval --include_path)")
    prepared_cache: Path | None = cfg_field(None, help="folder written by `vilex eval prepare`: run its load_from_disk "
                                                       "task copies, offline (replaces include_path)")
    model: str = cfg_field("vilex_vlm", help="lmms-eval model name")
    model_args: str = cfg_field("", help="extra model_args appended after pretrained=PATH")
    batch_size: int = cfg_field(1, ge=1, help="1 for final numbers (scores change with batch size)")
    process_per: Literal["pair", "model"] = cfg_field(
        "pair", help="one worker process per (model, task) pair, or one per model running its missing tasks in turn")
    limit: int | None = cfg_field(None, ge=1, help="docs per task (smoke runs only)")
    gen_kwargs: str = cfg_field("", help="lmms-eval --gen_kwargs string, part of the result key")
    use_cache: bool = cfg_field(True, help="lmms-eval response cache under output_dir/response_cache")
    device: str = cfg_field("cpu", help="torch device for the model")
    baseline: str | None = cfg_field(None, help="model label the report's delta column compares against")
    headline: dict[str, str] = cfg_field(default_factory=dict,
                                         help="task -> headline metric for the report (default: its first metric)")

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models: at least one model (label: checkpoint path) is needed")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        if self.baseline is not None and self.baseline not in self.models:
            raise ConfigError(f"baseline: {self.baseline!r} is not one of the models {sorted(self.models)}")


# ---------------------------------------------------------------- hashing
def _hash_files(h: "hashlib._Hash", root: Path, files: Iterable[Path]) -> None:
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def folder_hash(folder: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file below ``folder`` (caches excluded)."""
    root = Path(folder)
    h = hashlib.sha256()
    _hash_files(h, root, [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts])
    return h.hexdigest()


def checkpoint_hash(path: str | Path) -> str:
    """Content hash of a checkpoint folder plus every LOCAL folder its ``vlm_config.json`` references (an
    untrained LLM or tower is loaded from there, so it is part of the model)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    h = hashlib.sha256(folder_hash(path).encode() if path.is_dir() else path.read_bytes())
    meta = path / "vlm_config.json"
    if meta.is_file():
        from vlm.config import resolve_relative_references

        model = resolve_relative_references(json.loads(meta.read_text()).get("model", {}), path)
        refs = [model.get(s, {}).get(k) for s, k in (("tower", "name_or_path"), ("llm", "name_or_path"))]
        for ref in refs:
            if ref and Path(ref).is_dir():
                h.update(folder_hash(ref).encode())
    return h.hexdigest()


def task_hash(yaml_path: str | Path) -> str:
    """Hash of the task's folder of config files (YAML templates it may ``include``, utils.py, local data)."""
    folder = Path(yaml_path).parent
    h = hashlib.sha256()
    _hash_files(h, folder, [p for p in folder.iterdir() if p.is_file()])
    return h.hexdigest()


def result_key(ckpt_hash: str, tsk_hash: str, lmms_version: str, cfg: SweepConfig) -> str:
    parts = {"checkpoint": ckpt_hash, "task": tsk_hash, "lmms_eval": lmms_version, "gen_kwargs": cfg.gen_kwargs,
             "batch_size": cfg.batch_size, "limit": cfg.limit, "model": cfg.model, "model_args": cfg.model_args}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- tasks
class _IgnoreTags(yaml.SafeLoader):
    pass


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_task_index(include_path: str | Path | None) -> dict[str, Path]:
    """Task name -> YAML for the tasks defined under ``include_path`` (recursively)."""
    if include_path is None:
        return {}
    root = Path(include_path)
    if not root.is_dir():
        raise UserError(f"include_path is not a folder: {root}")
    index = {}
    for y in sorted(root.rglob("*.yaml")):
        if any(part.startswith(".") for part in y.relative_to(root).parts[:-1]):
            continue  # half-written copies (.tmp-*) of an interrupted `vilex eval prepare`
        data = yaml.load(y.read_text(), Loader=_IgnoreTags)
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            index[data["task"]] = y
    return index


def lmms_task_index(include_path: str | Path | None) -> dict[str, Path]:
    """lmms-eval's full task index (built-in + include_path): name -> YAML (groups/tags map to None-free paths)."""
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(verbosity="ERROR", include_path=str(include_path) if include_path else None)
    return {name: Path(entry["yaml_path"]) for name, entry in tm.task_index.items()
            if entry.get("type") == "task" and isinstance(entry.get("yaml_path"), str)}


def resolve_tasks(names: list[str], include_path: str | Path | None,
                  full_index: Callable[[str | Path | None], dict[str, Path]] = lmms_task_index) -> dict[str, Path]:
    """Every task name -> its YAML, or UserError naming the unknown ones with close matches."""
    index = local_task_index(include_path)
    if any(n not in index for n in names):
        index = {**full_index(include_path), **index}
    unknown = [n for n in names if n not in index]
    if unknown:
        hints = "; ".join(f"{n!r} (close: {', '.join(difflib.get_close_matches(n, index, n=5, cutoff=0.6)) or 'none'})"
                          for n in unknown)
        raise UserError(f"unknown lmms-eval task(s): {hints}")
    return {n: index[n] for n in names}


# ---------------------------------------------------------------- running
Launcher = Callable[[Path, Path], int]  # (spec.json, log file) -> exit code


def subprocess_launch(spec_path: Path, log_path: Path) -> int:
    """Run one (model, task) in a fresh Python process; its output goes to ``log_path``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if json.loads(spec_path.read_text()).get("offline"):
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "w") as logf:
        return subprocess.run([sys.executable, "-m", "benchmarks.worker", "--spec", str(spec_path)],
                              stdout=logf, stderr=subprocess.STDOUT, env=env).returncode


@dataclass
class PairOutcome:
    model: str
    task: str
    key: str
    status: str  # done | skipped | failed
    result_dir: str
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SweepSummary:
    outcomes: list[PairOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def plan_pairs(cfg: SweepConfig, tasks: dict[str, Path]) -> list[tuple[str, str, str, Path]]:
    """(model label, task, key, result dir) for every pair, in model-major order."""
    lmms_version = version("lmms_eval")
    task_hashes = {t: task_hash(p) for t, p in tasks.items()}
    pairs = []
    for label, ckpt in cfg.models.items():
        c_hash = checkpoint_hash(ckpt)
        for t in cfg.tasks:
            key = result_key(c_hash, task_hashes[t], lmms_version, cfg)
            pairs.append((label, t, key, Path(cfg.output_dir) / "results" / label / t / key))
    return pairs


def task_source(cfg: SweepConfig, full_index: Callable[[str | Path | None], dict[str, Path]] = lmms_task_index
                ) -> tuple[Path | None, dict[str, Path], dict[str, Path]]:
    """(include_path the workers get, task -> YAML, the local part of the index). With ``prepared_cache`` the tasks
    must all be prepared copies; otherwise local YAMLs first, lmms-eval's index for the rest. Raises before anything
    runs on an unknown or unprepared name."""
    if cfg.prepared_cache is None:
        return cfg.include_path, resolve_tasks(cfg.tasks, cfg.include_path, full_index), \
            local_task_index(cfg.include_path)
    root = Path(cfg.prepared_cache) / "tasks"
    if not root.is_dir():
        raise UserError(f"prepared_cache {cfg.prepared_cache}: no tasks/ folder (write it with `vilex eval prepare "
                        f"--suite SWEEP.yaml --cache {cfg.prepared_cache}`)")
    local = local_task_index(root)
    missing = [t for t in cfg.tasks if t not in local]
    if missing:
        raise UserError(f"prepared_cache {cfg.prepared_cache}: task(s) {missing} not prepared (run `vilex eval "
                        f"prepare --suite SWEEP.yaml --cache {cfg.prepared_cache}` where the network is reachable; "
                        f"prepared: {sorted(local) or 'none'})")
    return root, {t: local[t] for t in cfg.tasks}, local


def _progress(cfg: SweepConfig, label: str, task: str) -> str:
    """'model i/N LABEL · task j/M TASK' (position in the models × tasks grid)."""
    models, tasks = list(cfg.models), list(cfg.tasks)
    return (f"model {models.index(label) + 1}/{len(models)} {label} · "
            f"task {tasks.index(task) + 1}/{len(tasks)} {task}")


def _error_of(rdir: Path, key: str, rc: int, log_path: Path) -> str:
    err_file = rdir.parent / f"{key}.error.json"
    return (json.loads(err_file.read_text())["error"] if err_file.is_file()
            else f"worker exited with code {rc}; see {log_path}")


def run_sweep(cfg: SweepConfig, launch: Launcher = subprocess_launch,
              full_index: Callable[[str | Path | None], dict[str, Path]] = lmms_task_index) -> SweepSummary:
    """Evaluate every missing (model, task) pair; returns (and writes to ``sweep.json``) what happened to each.

    Logs one line per pair: ``model i/N LABEL · task j/M TASK: skipped (cached) | running | done in Xs |
    failed: ERROR`` and, after each finished pair, the sweep's elapsed time and pairs left."""
    cfg.validate()
    include_path, tasks, local = task_source(cfg, full_index)  # before anything runs
    out = Path(cfg.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pairs = plan_pairs(cfg, tasks)
    common = {"model": cfg.model, "include_path": str(Path(include_path).resolve()) if include_path else None,
              "offline": cfg.prepared_cache is not None, "batch_size": cfg.batch_size, "limit": cfg.limit,
              "gen_kwargs": cfg.gen_kwargs, "device": cfg.device,
              "use_cache": str((out / "response_cache").resolve()) if cfg.use_cache else None}
    outcomes: dict[int, PairOutcome] = {}
    sweep_start = time.perf_counter()
    for i, (label, task, key, rdir) in enumerate(pairs):
        if i in outcomes:  # ran (and was logged) with an earlier pair of its model
            continue
        if (rdir / RESULT_FILE).is_file():
            log.info("%s: skipped (cached, key %s)", _progress(cfg, label, task), key)
            outcomes[i] = PairOutcome(label, task, key, "skipped", str(rdir))
            continue
        unit = [i]
        if cfg.process_per == "model":
            unit += [j for j in range(i + 1, len(pairs))
                     if pairs[j][0] == label and not (pairs[j][3] / RESULT_FILE).is_file()]
        specs = [{"task": pairs[j][1], "key": pairs[j][2], "out": str(pairs[j][3].resolve()),
                  "include_defaults": pairs[j][1] not in local} for j in unit]
        model_args = ",".join(a for a in (f"pretrained={Path(cfg.models[label]).resolve()}", cfg.model_args) if a)
        spec = {**common, "model_args": model_args, **(specs[0] if len(unit) == 1 else {"pairs": specs})}
        name = f"{label}__{task}__{key}" if len(unit) == 1 else f"{label}__{len(unit)}-tasks__{key}"
        spec_path = out / "logs" / f"{name}.spec.json"
        log_path = spec_path.with_suffix("").with_suffix(".log")
        spec_path.write_text(json.dumps(spec, indent=1))
        for j in unit:
            (pairs[j][3].parent / f"{pairs[j][2]}.error.json").unlink(missing_ok=True)  # a stale earlier failure
        if len(unit) == 1:
            log.info("%s: running", _progress(cfg, label, task))
        else:
            log.info("model %d/%d %s: running %d tasks in one process (%s)", list(cfg.models).index(label) + 1,
                     len(cfg.models), label, len(unit), ", ".join(pairs[j][1] for j in unit))
        start = time.perf_counter()
        rc = launch(spec_path, log_path)
        wall = time.perf_counter() - start
        for j in unit:
            lbl, tsk, k, rd = pairs[j]
            where = _progress(cfg, lbl, tsk)
            if (rd / RESULT_FILE).is_file():
                seconds = (wall if len(unit) == 1  # in a group: the worker's own time for this task
                           else float(json.loads((rd / RESULT_FILE).read_text()).get("seconds", 0)))
                log.info("%s: done in %.1fs", where, seconds)
                outcomes[j] = PairOutcome(lbl, tsk, k, "done", str(rd), seconds=seconds)
            else:
                error = _error_of(rd, k, rc, log_path)
                log.error("%s: failed: %s", where, error)
                outcomes[j] = PairOutcome(lbl, tsk, k, "failed", str(rd), error, wall if len(unit) == 1 else 0.0)
        log.info("sweep: %d/%d pairs finished, %.0fs elapsed, %d left", len(outcomes), len(pairs),
                 time.perf_counter() - sweep_start, len(pairs) - len(outcomes))
    summary = SweepSummary([outcomes[i] for i in range(len(pairs))])
    (out / SUMMARY_FILE).write_text(json.dumps({"config": _config_dict(cfg),
                                                "pairs": [o.__dict__ for o in summary.outcomes]}, indent=1))
    log.info("sweep: %d done, %d skipped, %d failed -> %s", summary.count("done"), summary.count("skipped"),
             summary.count("failed"), out / SUMMARY_FILE)
    return summary


def _config_dict(cfg: SweepConfig) -> dict[str, Any]:
    from vilex.config import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))

"""benchmarks/sweep.py — a resumable models × tasks lmms-eval sweep (``vilex eval --config …``).

Each (model, task) runs in a worker subprocess (``python -m benchmarks.worker``): lmms-eval writes results only at
the end of a run, so one pair per process means a kill loses at most the pair in flight. ``process_per: model``
runs the missing tasks of one model in ONE worker process instead (pays the interpreter, lmms-eval import and task
index once per model; the worker still calls lmms-eval once per task and writes each pair's result as soon as it
is done, so resumability stays per pair). Results live under

    <output_dir>/results/<model label>/<task>/<key>/{result.json, samples.jsonl}

where ``key`` hashes the checkpoint's CONTENT, the task's config files, the lmms-eval version, the generation
kwargs, batch size and limit: a pair whose folder exists is skipped, and changing any of those makes a new key
(old results stay, never silently reused). A failing pair leaves ``<key>.error.json`` and the sweep goes on; the
summary (``sweep.json``) lists every pair as done / skipped / failed / elsewhere. Task names are checked before
anything runs; a typo fails listing close names.

``devices: [0, 1, 2, 3]`` runs that many worker processes at once, one per entry; each sees only its GPU
(``CUDA_VISIBLE_DEVICES``) and puts the model on ``cuda``. ``cpu`` entries are CPU workers (GPUs hidden), so the
scheduling runs the same code on a machine without GPUs. Work units (a pair, or a chunk of one model's tasks with
``process_per: model``) start in grid order on the first free worker.

Several sweeps may share one ``output_dir`` (two nodes, or a second sweep started later): a pair is claimed with an
``O_EXCL`` claim file before it runs (benchmarks/claims.py), so no pair runs twice; a stale claim (its process gone
from this host) is taken over with a warning. Pairs still held by another sweep when this one ends are listed as
``elsewhere``. ``plan_sweep`` resolves everything (tasks, checkpoints, devices, output_dir) and writes nothing:
``vilex eval --dry-run`` prints it.

Task resolution is two-tier for speed: names defined by YAMLs under ``include_path`` resolve by reading those
files; only other names pay for lmms-eval's full task index. lmms-eval indexes its built-in tasks BEFORE
``include_path`` (a local YAML named like a built-in task would be silently shadowed), so the worker loads a local
task with ``include_defaults=False``: the YAML that was hashed is the YAML that runs.

``prepared_cache`` (``--cache DIR``) points at a folder written by ``vilex eval prepare`` (benchmarks/prepare.py):
tasks then resolve only from ``DIR/tasks`` (``load_from_disk`` copies) and the workers run with
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` — no network at all. A prepared task's key does not depend on where the
cache lives (its YAML's ``dataset_path`` is hashed by name only), so a cache moved and relinked with ``vilex eval
prepare --check`` keeps its results. A cache written by ``vilex eval mirror`` (benchmarks/mirror.py) is a MIRROR:
the sweep then writes to ``<output_dir>-mirror``, its keys start with ``mirror-`` and every result says
``"mirror": true``, so a mirror's numbers can never pass for a benchmark's.

Before anything runs (and in ``--dry-run``) every task's code is checked for what it needs on this machine
(benchmarks/requirements.py: modules its ``utils.py`` imports, Java for the COCO caption scorers, pycocoevalcap's
files); a missing one stops the sweep with one line per task naming what to install.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import yaml

from benchmarks.claims import HOST, Holder, is_stale, new_holder, read_claim, release, try_claim
from vilex.checkpoint import MANIFEST_NAME
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
    batch_size: int = cfg_field(1, ge=1, help="requests per generate call: vilex_vlm gives the same answers at any "
                                                  "size (benchmarks/README.md, Batch size); llava_hf: 1")
    process_per: Literal["pair", "model"] = cfg_field(
        "pair", help="one worker process per (model, task) pair, or one per model running its missing tasks in turn")
    limit: int | None = cfg_field(None, ge=1, help="docs per task (smoke runs only)")
    gen_kwargs: str = cfg_field("", help="lmms-eval --gen_kwargs string, part of the result key")
    use_cache: bool = cfg_field(True, help="lmms-eval response cache under output_dir/response_cache")
    devices: list[str] = cfg_field(default_factory=list,
                                   help="one worker process per entry, all at once: a GPU index (the worker sees only "
                                        "that GPU, the model goes on cuda) or cpu; repeat an entry for two workers on "
                                        "one device. Empty: one worker on `device`")
    device: str | None = cfg_field(None, help="torch device of the one worker when `devices` is empty (default cpu)")
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
        for i, d in enumerate(self.devices):
            if d != "cpu" and not d.isdigit():
                raise ConfigError(f"devices[{i}]: expected a GPU index (0, 1, ...) or cpu, got {d!r}")
        if self.devices and self.device is not None:
            raise ConfigError("device and devices: give one (each entry of `devices` sets its worker's device: cuda "
                              "for a GPU index, cpu for cpu)")


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


PREPARED_MANIFEST = "prepared.json"  # benchmarks.prepare.MANIFEST (prepare imports this module)


def _location_free(text: str) -> str:
    """A prepared YAML with its absolute ``dataset_path`` reduced to the data folder's name."""
    return re.sub(r"(?m)^dataset_path: (.*)$", lambda m: f"dataset_path: {Path(m.group(1).strip()).name}", text)


def task_hash(yaml_path: str | Path) -> str:
    """Hash of the task's folder of config files (YAML templates it may ``include``, utils.py, local data). In a
    prepared copy (``prepared.json`` beside it) the YAML's ``dataset_path`` counts by its last part only and the
    folder's integrity record (``manifest.json``, which hashes that path) is left out: moving a cache and relinking
    it keeps its result keys (its data is in the hash through prepared.json's fingerprints)."""
    folder = Path(yaml_path).parent
    files = [p for p in folder.iterdir() if p.is_file()]
    if not (folder / PREPARED_MANIFEST).is_file():
        h = hashlib.sha256()
        _hash_files(h, folder, files)
        return h.hexdigest()
    h = hashlib.sha256()
    for f in sorted(files):
        if f.name == MANIFEST_NAME:
            continue
        data = f.read_bytes()
        if f.suffix == ".yaml":
            data = _location_free(data.decode()).encode()
        h.update(str(f.relative_to(folder)).encode() + b"\0" + data)
    return h.hexdigest()


def prepared_task_info(yaml_path: str | Path) -> dict[str, Any]:
    """The ``prepared.json`` beside a prepared task YAML ({} for other tasks)."""
    manifest = Path(yaml_path).parent / PREPARED_MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


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


# ---------------------------------------------------------------- devices
@dataclass(frozen=True)
class Slot:
    """One worker slot: the torch device its worker uses and what that worker may see."""

    name: str  # the `devices` entry ("0", "cpu"), or the one worker's device
    device: str  # torch device inside the worker
    visible: str | None  # CUDA_VISIBLE_DEVICES for the worker; None: inherited from the sweep
    threads: int | None = None  # OMP_NUM_THREADS for a CPU worker that shares the CPU with others

    def __str__(self) -> str:
        if self.visible is None or self.device == "cpu":
            return self.device
        return f"GPU {self.name}" + ("" if self.visible == self.name else f" (CUDA_VISIBLE_DEVICES={self.visible})")


def cuda_device_count() -> int:
    """GPUs this process can see (honours CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count()


def worker_slots(cfg: SweepConfig) -> list[Slot]:
    """One slot per ``devices`` entry (or the single ``device`` slot); a GPU index this machine cannot see is a
    UserError. Indices count the GPUs the sweep itself sees, so under ``CUDA_VISIBLE_DEVICES=4,5`` entry 1 is
    physical GPU 5."""
    if not cfg.devices:
        return [Slot(cfg.device or "cpu", cfg.device or "cpu", None)]
    gpus = [d for d in cfg.devices if d != "cpu"]
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus:
        n = cuda_device_count()
        missing = sorted({d for d in gpus if int(d) >= n}, key=int)
        if missing:
            seen = f" (CUDA_VISIBLE_DEVICES={parent!r})" if parent is not None else ""
            use = f"use indices 0..{n - 1} or cpu" if n else "use cpu workers (devices: [cpu, cpu])"
            raise UserError(f"devices: GPU {', '.join(missing)} not available: this machine sees {n} GPU(s){seen}; "
                            f"{use}")
    ids = [x.strip() for x in parent.split(",")] if parent else None
    n_cpu = cfg.devices.count("cpu")
    # CPU workers side by side would each start one torch thread per core; split the cores unless the user chose
    threads = (max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu > 1 and "OMP_NUM_THREADS" not in os.environ
               else None)
    return [Slot("cpu", "cpu", "", threads) if d == "cpu" else Slot(d, "cuda", ids[int(d)] if ids else d)
            for d in cfg.devices]


# ---------------------------------------------------------------- plan
@dataclass(frozen=True)
class Pair:
    """One (model, task) of the grid and where its files go."""

    index: int
    model: str
    task: str
    key: str
    result_dir: Path

    @property
    def claim_file(self) -> Path:
        return self.result_dir.parent / f"{self.key}.claim"

    @property
    def error_file(self) -> Path:
        return self.result_dir.parent / f"{self.key}.error.json"

    def finished(self) -> bool:
        return (self.result_dir / RESULT_FILE).is_file()


@dataclass
class PairOutcome:
    model: str
    task: str
    key: str
    status: str  # done | skipped | failed | elsewhere (held by another sweep when this one ended)
    result_dir: str
    error: str | None = None
    seconds: float = 0.0
    device: str | None = None  # the slot that ran it (done / failed here)
    by: str | None = None  # the other sweep that holds it (elsewhere) or failed it
    mirror: bool = False  # a mirror task's pair (vilex eval mirror): its score means nothing


@dataclass
class SweepSummary:
    outcomes: list[PairOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in ("done", "skipped", "failed", "elsewhere")}


MIRROR_KEY_PREFIX = "mirror-"


def plan_pairs(cfg: SweepConfig, tasks: dict[str, Path], mirror: set[str] | frozenset[str] = frozenset()
               ) -> list[Pair]:
    """Every pair, in model-major order, with its result key (``mirror-…`` for a mirror task)."""
    lmms_version = version("lmms_eval")
    task_hashes = {t: task_hash(p) for t, p in tasks.items()}
    pairs = []
    for label, ckpt in cfg.models.items():
        c_hash = checkpoint_hash(ckpt)
        for t in cfg.tasks:
            key = (MIRROR_KEY_PREFIX if t in mirror else "") + result_key(c_hash, task_hashes[t], lmms_version, cfg)
            pairs.append(Pair(len(pairs), label, t, key, Path(cfg.output_dir) / "results" / label / t / key))
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
    moved = []
    for t in cfg.tasks:
        m = re.search(r"(?m)^dataset_path: (.*)$", local[t].read_text())
        if m and not Path(m.group(1).strip()).exists():
            moved.append(f"{t} (its data: {m.group(1).strip()})")
    if moved:
        raise UserError(f"prepared_cache {cfg.prepared_cache}: the task copies point at data that is not there: "
                        f"{'; '.join(moved)}. A cache moved from elsewhere: verify and relink it with `vilex eval "
                        f"prepare --check {cfg.prepared_cache}`")
    return root, {t: local[t] for t in cfg.tasks}, local


def check_output_dir(output_dir: str | Path) -> None:
    """UserError unless ``output_dir`` is (or can be created as) a writable folder; creates nothing."""
    path = Path(output_dir).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output_dir {output_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {output_dir}: {probe} is not writable")


def make_units(pairs: list[Pair], process_per: str, n_slots: int) -> list[list[Pair]]:
    """Work units (one worker process each), in grid order. With ``process_per: model`` a model's pairs are cut
    into as many chunks as it takes for every worker to get one (3 models on 4 devices: 2 chunks each)."""
    if process_per == "pair":
        return [[p] for p in pairs]
    by_model: dict[str, list[Pair]] = {}
    for p in pairs:
        by_model.setdefault(p.model, []).append(p)
    chunks = math.ceil(n_slots / max(1, len(by_model)))
    units = []
    for ps in by_model.values():
        size = math.ceil(len(ps) / min(chunks, len(ps)))
        units += [ps[i:i + size] for i in range(0, len(ps), size)]
    return sorted(units, key=lambda u: u[0].index)


@dataclass
class SweepPlan:
    """What a sweep would do now; built without writing anything."""

    cfg: SweepConfig
    include_path: Path | None
    tasks: dict[str, Path]
    local: dict[str, Path]
    pairs: list[Pair]
    slots: list[Slot]
    states: dict[int, tuple[str, Holder | str | None]]  # index -> (done | run | retry | stale | held, holder)
    units: list[list[Pair]]  # the units to run (run, retry, stale pairs)
    mirror: set[str] = field(default_factory=set)  # tasks that are mirrors (vilex eval mirror)
    requirements: list[str] = field(default_factory=list)  # unmet requirements, one line per task

    def count(self, *states: str) -> int:
        return sum(s in states for s, _ in self.states.values())

    def expected_slots(self) -> dict[int, int]:
        """pair index -> slot index, if every pair took equally long (a unit starts on the first free worker)."""
        free = [0] * len(self.slots)
        where = {}
        for unit in self.units:
            s = free.index(min(free))
            free[s] += len(unit)
            where.update({p.index: s for p in unit})
        return where


def plan_sweep(cfg: SweepConfig, full_index: Callable[[str | Path | None], dict[str, Path]] | None = None
               ) -> SweepPlan:
    """Resolve everything a sweep needs — config, devices, output_dir, checkpoints, task names, result keys — and
    what each pair's state is now. Raises UserError on the first problem; writes nothing. ``full_index`` defaults
    to lmms-eval's task index (looked up at call time)."""
    from benchmarks.requirements import check_tasks, format_missing

    full_index = full_index or lmms_task_index
    cfg.validate()
    slots = worker_slots(cfg)
    missing = [f"{label}: {path}" for label, path in cfg.models.items() if not Path(path).exists()]
    if missing:
        raise UserError(f"checkpoint(s) not found: {'; '.join(missing)}")
    include_path, tasks, local = task_source(cfg, full_index)
    mirror = {t for t, p in tasks.items() if prepared_task_info(p).get("mirror")}
    if mirror and "mirror" not in Path(cfg.output_dir).name:
        # a mirror never writes into (or overwrites the sweep.json of) a real sweep's folder
        cfg.output_dir = Path(f"{cfg.output_dir}-mirror")
        log.info("sweep: MIRROR tasks (%s): results go to %s", ", ".join(sorted(mirror)), cfg.output_dir)
    check_output_dir(cfg.output_dir)
    requirements = format_missing(check_tasks(tasks))
    pairs = plan_pairs(cfg, tasks, mirror)
    me = new_holder()
    states: dict[int, tuple[str, Holder | str | None]] = {}
    for p in pairs:
        holder = read_claim(p.claim_file)
        if p.finished():
            states[p.index] = ("done", None)
        elif holder is not None:
            states[p.index] = ("stale" if is_stale(p.claim_file, holder, me) else "held", holder)
        else:
            states[p.index] = ("retry" if p.error_file.is_file() else "run", None)
    units = make_units([p for p in pairs if states[p.index][0] in ("run", "retry", "stale")], cfg.process_per,
                       len(slots))
    return SweepPlan(cfg, include_path, tasks, local, pairs, slots, states, units, mirror, requirements)


def format_plan(plan: SweepPlan) -> str:
    """The plan as text: what runs where, what is done, what another sweep holds."""
    cfg = plan.cfg
    n_run = plan.count("run", "retry", "stale")
    lines = [(f"plan: {len(cfg.models)} model(s) x {len(cfg.tasks)} task(s) = {len(plan.pairs)} pairs: "
              f"{plan.count('done')} done (skipped), {n_run} to run, {plan.count('held')} held by another sweep"),
             f"output_dir: {Path(cfg.output_dir).absolute()} (writable)"]
    lines += [f"model {label}: {Path(path).absolute()}" for label, path in cfg.models.items()]
    local = [t for t in cfg.tasks if t in plan.local]
    hub = [t for t in cfg.tasks if t not in plan.local]
    if cfg.prepared_cache is not None:
        lines.append(f"tasks: {len(local)} prepared copies under {plan.include_path} (workers run offline)"
                     + (f"; MIRROR data, not the benchmarks ({len(plan.mirror)} tasks): results are labelled MIRROR"
                        if plan.mirror else ""))
    else:
        if local:
            lines.append(f"tasks: {', '.join(local)} from include_path {plan.include_path}")
        if hub:
            lines.append(f"tasks: {', '.join(hub)} from lmms-eval's task index")
    if plan.requirements:
        lines.append(f"requirements: NOT MET for {len(plan.requirements)} task(s); the sweep would refuse to start:")
        lines += [f"  {line}" for line in plan.requirements]
    else:
        lines.append("requirements: met (task code imports, Java and pycocoevalcap files for the caption scorers)")
    workers = ", ".join(f"{i} on {slot}" for i, slot in enumerate(plan.slots, 1))
    lines.append(f"workers: {len(plan.slots)} at once ({workers}); {len(plan.units)} worker process(es) to start "
                 f"(process_per: {cfg.process_per})")
    lines.append("a worker process starts on the first free worker; the worker column assumes every pair takes as "
                 "long")
    where = plan.expected_slots()
    unit_of = {p.index: u for u, unit in enumerate(plan.units, 1) for p in unit}
    rows = [("#", "model", "task", "key", "process", "worker", "status")]
    for p in plan.pairs:
        state, holder = plan.states[p.index]
        status = {"done": "done (skipped)", "run": "to run", "retry": "to run (failed before, retried)",
                  "stale": f"to run (takes over the stale claim of {holder})",
                  "held": f"held by {holder}: left to that sweep"}[state]
        rows.append((str(p.index + 1), p.model, p.task, p.key, str(unit_of.get(p.index, "")),
                     f"{where[p.index] + 1} ({plan.slots[where[p.index]]})" if p.index in where else "", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- running
Launcher = Callable[[Path, Path], int]  # (spec.json, log file) -> exit code
WORKER_COMMAND = [sys.executable, "-m", "benchmarks.worker"]
_RUNNING: set[subprocess.Popen] = set()  # worker processes in flight, terminated when the sweep is interrupted
_RUNNING_LOCK = threading.Lock()


def worker_env(spec: dict[str, Any]) -> dict[str, str]:
    """The environment of a worker: its device visibility and thread count, offline flags for prepared tasks."""
    # lmms-eval names its response-cache shard after SLURM_JOB_ID when set: workers running side by side in one
    # job would then write the same sqlite shard, so each worker gets its own run id
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "LMMS_CACHE_RUN_ID": f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}
    if spec.get("offline"):
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if spec.get("visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec["visible_devices"]
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    return env


def subprocess_launch(spec_path: Path, log_path: Path) -> int:
    """Run one unit in a fresh Python process; its output goes to ``log_path``."""
    env = worker_env(json.loads(spec_path.read_text()))
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([*WORKER_COMMAND, "--spec", str(spec_path)], stdout=logf, stderr=subprocess.STDOUT,
                                env=env)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            return proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)


def _terminate_workers() -> None:
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        proc.terminate()


def _progress(cfg: SweepConfig, label: str, task: str) -> str:
    """'model i/N LABEL · task j/M TASK' (position in the models × tasks grid)."""
    models, tasks = list(cfg.models), list(cfg.tasks)
    return (f"model {models.index(label) + 1}/{len(models)} {label} · "
            f"task {tasks.index(task) + 1}/{len(tasks)} {task}")


def _error_of(pair: Pair, rc: int, log_path: Path) -> str:
    return (json.loads(pair.error_file.read_text())["error"] if pair.error_file.is_file()
            else f"worker exited with code {rc}; see {log_path}")


class _Runner:
    """Runs a plan's units on its worker slots, one thread per slot, claiming each pair before it runs."""

    def __init__(self, plan: SweepPlan, launch: Launcher):
        self.plan, self.cfg, self.launch = plan, plan.cfg, launch
        self.me = new_holder()
        self.out = Path(self.cfg.output_dir)
        self.start_wall, self.start = time.time(), time.perf_counter()
        self.lock = threading.Lock()
        self.outcomes: dict[int, PairOutcome] = {}
        self.held: dict[int, Holder | str | None] = {}
        self.claimed: set[int] = set()
        self.queue: deque[list[Pair]] = deque()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        include_path = plan.include_path
        self.common = {"model": self.cfg.model,
                       "include_path": str(Path(include_path).resolve()) if include_path else None,
                       "offline": self.cfg.prepared_cache is not None, "batch_size": self.cfg.batch_size,
                       "limit": self.cfg.limit, "gen_kwargs": self.cfg.gen_kwargs,
                       "use_cache": str((self.out / "response_cache").resolve()) if self.cfg.use_cache else None,
                       "sweep": str(self.me)}

    # -- claiming (under self.lock)
    def _outcome(self, pair: Pair, status: str, **kw: Any) -> None:
        self.outcomes[pair.index] = PairOutcome(pair.model, pair.task, pair.key, status, str(pair.result_dir),
                                                mirror=pair.task in self.plan.mirror, **kw)
        self.held.pop(pair.index, None)

    def _claim(self, pair: Pair) -> bool:
        where = _progress(self.cfg, pair.model, pair.task)
        cached = self.plan.states[pair.index][0] == "done"
        if pair.finished():
            log.info("%s: skipped (%s, key %s)", where, "cached" if cached else "done by another sweep", pair.key)
            self._outcome(pair, "skipped")
            return False
        ok, prev = try_claim(pair.claim_file, self.me)
        if not ok:
            if pair.index not in self.held:
                log.info("%s: held by %s (another sweep), left to it", where, prev)
            self.held[pair.index] = prev
            return False
        if prev is not None:
            log.warning("%s: took over the stale claim of %s (that process is gone): %s", where, prev,
                        pair.claim_file)
        if pair.finished():  # finished by another sweep between our look and our claim
            release(pair.claim_file, self.me)
            log.info("%s: skipped (done by another sweep, key %s)", where, pair.key)
            self._outcome(pair, "skipped")
            return False
        if pair.error_file.is_file() and pair.error_file.stat().st_mtime >= self.start_wall:
            release(pair.claim_file, self.me)  # failed in another sweep during this one: that sweep reports it
            error = _error_of(pair, 1, pair.error_file)
            log.error("%s: failed in another sweep: %s", where, error)
            self._outcome(pair, "failed", error=error)
            return False
        self.claimed.add(pair.index)
        return True

    def _take(self) -> list[Pair] | None:
        with self.lock:
            while self.queue and not self.stop.is_set():
                unit = [p for p in self.queue.popleft() if self._claim(p)]
                if unit:
                    return unit
        return None

    # -- running
    def _run_unit(self, slot: Slot, unit: list[Pair]) -> None:
        cfg, first = self.cfg, unit[0]
        try:
            if self.stop.is_set():  # interrupted between taking the unit and starting its worker
                return
            specs = [{"task": p.task, "key": p.key, "out": str(p.result_dir.resolve()),
                      "include_defaults": p.task not in self.plan.local, "mirror": p.task in self.plan.mirror}
                     for p in unit]
            model_args = ",".join(a for a in (f"pretrained={Path(cfg.models[first.model]).resolve()}",
                                              cfg.model_args) if a)
            spec = {**self.common, "model_args": model_args, "device": slot.device,
                    "visible_devices": slot.visible, "threads": slot.threads,
                    **(specs[0] if len(unit) == 1 else {"pairs": specs})}
            # unique while the unit runs: its first pair is claimed by this sweep alone
            name = (f"{first.model}__{first.task}__{first.key}" if len(unit) == 1
                    else f"{first.model}__{first.task}-and-{len(unit) - 1}-more__{first.key}")
            spec_path = self.out / "logs" / f"{name}.spec.json"
            log_path = spec_path.with_suffix("").with_suffix(".log")
            spec_path.write_text(json.dumps(spec, indent=1))
            for p in unit:
                p.error_file.unlink(missing_ok=True)  # an earlier run's failure
            on = f" on {slot}" if cfg.devices else ""
            if len(unit) == 1:
                log.info("%s: running%s", _progress(cfg, first.model, first.task), on)
            else:
                log.info("model %d/%d %s: running %d tasks in one process%s (%s)",
                         list(cfg.models).index(first.model) + 1, len(cfg.models), first.model, len(unit), on,
                         ", ".join(p.task for p in unit))
            start = time.perf_counter()
            rc = self.launch(spec_path, log_path)
            wall = time.perf_counter() - start
            with self.lock:
                for p in unit:
                    where = _progress(cfg, p.model, p.task)
                    if p.finished():
                        seconds = (wall if len(unit) == 1  # in a group: the worker's own time for this task
                                   else float(json.loads((p.result_dir / RESULT_FILE).read_text()).get("seconds", 0)))
                        log.info("%s: done in %.1fs", where, seconds)
                        self._outcome(p, "done", seconds=seconds, device=str(slot))
                    else:
                        error = _error_of(p, rc, log_path)
                        log.error("%s: failed: %s", where, error)
                        self._outcome(p, "failed", error=error, seconds=wall if len(unit) == 1 else 0.0,
                                      device=str(slot))
                done = len(self.outcomes)
                log.info("sweep: %d/%d pairs finished, %.0fs elapsed, %d left", done, len(self.plan.pairs),
                         time.perf_counter() - self.start, len(self.plan.pairs) - done)
        finally:
            with self.lock:
                for p in unit:
                    release(p.claim_file, self.me)
                    self.claimed.discard(p.index)

    def _work(self, slot: Slot) -> None:
        try:
            while not self.stop.is_set():
                unit = self._take()
                if unit is None:
                    return
                self._run_unit(slot, unit)
        except BaseException as e:  # noqa: BLE001 — re-raised by run() in the main thread
            self.errors.append(e)
            self.stop.set()

    def _drain(self) -> None:
        threads = [threading.Thread(target=self._work, args=(slot,), name=f"sweep-{slot}", daemon=True)
                   for slot in self.plan.slots]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except BaseException:
            self.stop.set()
            _terminate_workers()
            for t in threads:
                t.join()
            raise
        if self.errors:
            raise self.errors[0]

    def _revisit(self) -> list[Pair]:
        """Pairs that another sweep held earlier and that are now finished, released or stale (claiming them
        again records or runs them; one still held stays out, so this loop ends)."""
        free = []
        for index in list(self.held):
            pair = self.plan.pairs[index]
            holder = read_claim(pair.claim_file)
            if pair.finished() or holder is None or is_stale(pair.claim_file, holder, self.me):
                free.append(pair)
        return free

    def run(self) -> SweepSummary:
        self.queue = deque(sorted(self.plan.units + [[p] for p in self.plan.pairs
                                                      if self.plan.states[p.index][0] in ("done", "held")],
                                  key=lambda u: u[0].index))
        try:
            while True:
                self._drain()
                # pairs another sweep held: run the ones it gave up (its process gone), record the finished ones
                self.queue = deque(make_units(self._revisit(), self.cfg.process_per, len(self.plan.slots)))
                if not self.queue:
                    break
        finally:
            with self.lock:
                for index in list(self.claimed):
                    release(self.plan.pairs[index].claim_file, self.me)
        for index, holder in self.held.items():
            pair = self.plan.pairs[index]
            log.info("%s: still held by %s (another sweep)", _progress(self.cfg, pair.model, pair.task), holder)
            self.outcomes[index] = PairOutcome(pair.model, pair.task, pair.key, "elsewhere", str(pair.result_dir),
                                               by=str(holder), mirror=pair.task in self.plan.mirror)
        return SweepSummary([self.outcomes[i] for i in range(len(self.plan.pairs))])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_sweep(cfg: SweepConfig, launch: Launcher = subprocess_launch,
              full_index: Callable[[str | Path | None], dict[str, Path]] | None = None) -> SweepSummary:
    """Evaluate every missing (model, task) pair; returns (and writes to ``sweep.json``) what happened to each.

    Logs one line per pair: ``model i/N LABEL · task j/M TASK: skipped (cached) | running | done in Xs |
    failed: ERROR | held by …`` and, after each finished unit, the sweep's elapsed time and pairs left. SIGTERM is
    handled like Ctrl-C: the workers are stopped and this sweep's claims released."""
    plan = plan_sweep(cfg, full_index)  # before anything runs
    if plan.requirements:
        raise UserError("sweep: task requirements missing on this machine (nothing ran):\n  "
                        + "\n  ".join(plan.requirements))
    out = Path(cfg.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log.info("sweep: %d pairs, %d done, %d to run, %d held by another sweep; %d worker(s): %s",
             len(plan.pairs), plan.count("done"), plan.count("run", "retry", "stale"), plan.count("held"),
             len(plan.slots), ", ".join(map(str, plan.slots)))
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        summary = _Runner(plan, launch).run()
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    tmp = out / f".{SUMMARY_FILE}.{os.getpid()}.tmp"  # sweeps sharing output_dir: readers never see a half file
    tmp.write_text(json.dumps({"config": _config_dict(cfg), "pairs": [o.__dict__ for o in summary.outcomes]},
                              indent=1))
    os.replace(tmp, out / SUMMARY_FILE)
    log.info("sweep: %d done, %d skipped, %d failed, %d elsewhere -> %s", *summary.counts().values(),
             out / SUMMARY_FILE)
    return summary


def _config_dict(cfg: SweepConfig) -> dict[str, Any]:
    from vilex.config import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))

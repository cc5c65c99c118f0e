"""benchmarks/cli.py — the ``vilex eval`` command.

    vilex eval --config configs/benchmarks/toy.yaml [--set k=v]   run (or resume) a models × tasks sweep
    vilex eval --config SWEEP.yaml --dry-run                       resolve everything, print the plan, run nothing
    vilex eval --config SWEEP.yaml --cache DIR                     ... on prepared task copies, offline
    vilex eval prepare --suite SWEEP.yaml --cache DIR [--force]    save every task's data (needs network)
    vilex eval prepare --check DIR                                 verify a cache made elsewhere; relink it if moved
    vilex eval mirror --suite SWEEP.yaml --out DIR [--rows N]      schema-faithful local stand-ins of every task
    vilex eval report RUN_DIR [--baseline LABEL] [--compare A B]  results.csv, results.md (CIs, paired
                                                                  differences, seeds), results.png, paired.json
    vilex eval toy-tasks --split DIR/test --out TASKS_DIR          materialise the toy suite for --include_path

One top-level command with optional actions (not a command group) so the sweep itself stays ``vilex eval --config``
as the issue asks. Heavy imports stay inside the run functions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vilex.cli.main import add_config_args, command
from vilex.errors import UserError

# shown by `vilex eval --help`; tests/test_bench_docs.py runs each of them
EXAMPLES = """\
examples:
  vilex eval --config configs/benchmarks/paper15.yaml --dry-run
  vilex eval --config configs/benchmarks/paper15.yaml
  vilex eval --config configs/benchmarks/paper15.yaml --set 'devices=[0,1,2,3]'
  vilex eval report runs/bench/paper15 --baseline siglip
  vilex eval prepare --suite configs/benchmarks/paper15.yaml --cache /data/bench-cache
  vilex eval --config configs/benchmarks/paper15.yaml --cache /data/bench-cache
  vilex eval prepare --check /data/bench-cache
  vilex eval mirror --suite configs/benchmarks/paper15.yaml --out runs/bench/mirror15
  vilex eval --config configs/benchmarks/paper15.yaml --cache runs/bench/mirror15
  vilex eval toy-tasks --split runs/toy/data/test --out runs/toy/tasks

Several `vilex eval` processes may share one output_dir (other nodes, other devices): each pair runs once.
See benchmarks/README.md.
"""


def _configure(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_args(p, "output_dir=runs/bench/mine")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="run the task copies `vilex eval prepare` wrote to DIR, offline (sets prepared_cache)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve tasks, checkpoints, devices and output_dir, print the plan (pairs, the device of "
                        "each, what is done or held by another sweep) and run nothing")
    actions = p.add_subparsers(dest="eval_action", metavar="ACTION")
    prep = actions.add_parser("prepare", help="materialise each task's data (save_to_disk) + load_from_disk task "
                                             "YAMLs under DIR/tasks, for offline sweeps")
    prep.add_argument("--suite", default=None, help="a sweep YAML (its tasks and include_path)")
    prep.add_argument("--cache", type=Path, default=None, metavar="DIR")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a suite value, e.g. --set tasks=[vilex_toy_colour] (repeatable)")
    prep.add_argument("--force", action="store_true", help="re-download data already saved under DIR")
    prep.add_argument("--check", type=Path, default=None, metavar="DIR",
                      help="verify the prepared cache DIR (made elsewhere): integrity records, row counts and "
                           "fingerprints against prepared.json, each task's columns against its expected schema; "
                           "relink its task copies if the cache moved. With --suite: exactly the suite's tasks")
    mir = actions.add_parser("mirror", help="a small local dataset in each task's REAL schema (a prepared cache "
                                            "marked MIRROR): run every task's own code end to end, offline")
    mir.add_argument("--suite", required=True, help="a sweep YAML (its tasks)")
    mir.add_argument("--out", type=Path, required=True, metavar="DIR")
    mir.add_argument("--rows", type=int, default=8, metavar="N",
                     help="rows per split before each task's process_docs (default 8; MME rounds up to pairs)")
    mir.add_argument("--force", action="store_true", help="rebuild data already mirrored under DIR")
    rep = actions.add_parser("report", help="tables and a plot from a sweep's output_dir")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--baseline", default=None, help="model label for the delta columns (default: the sweep's)")
    rep.add_argument("--out", type=Path, default=None, help="where to write (default: RUN_DIR)")
    rep.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                     help="paired per-doc difference B − A with a bootstrap CI, per task, and whether B ≥ A on "
                          "every task and better on two (repeatable; a model, or NAME of NAME_seed<k> models: the "
                          "seeds' per-doc mean; the baseline against each other model is always added)")
    toy = actions.add_parser("toy-tasks", help="write the toy-world lmms-eval tasks for --include_path")
    toy.add_argument("--split", type=Path, required=True, help="a toy split folder, e.g. DIR/test")
    toy.add_argument("--out", type=Path, required=True)
    toy.add_argument("--max-per-task", type=int, default=None)


def _check(args: argparse.Namespace) -> int:
    """``prepare --check DIR``: one JSON line {task: status}; exit 1 if a task failed (its problems logged)."""
    from benchmarks.cache_check import check_cache

    tasks = None
    if args.suite is not None:
        from benchmarks.sweep import SweepConfig
        from vilex.config import load_config

        tasks = load_config(SweepConfig, args.suite, args.overrides).tasks
    report = check_cache(args.check, tasks=tasks)
    print(json.dumps({t: r["status"] for t, r in report.items()}))
    return 1 if any(r["status"] == "failed" for r in report.values()) else 0


@command("eval", help="lmms-eval benchmark sweeps (resumable), reports, toy tasks")(_configure)
def _run(args: argparse.Namespace) -> int:
    if args.eval_action == "report":
        from benchmarks.report import write_report

        paths = write_report(args.run_dir, baseline=args.baseline, out_dir=args.out,
                             compare=[tuple(p) for p in args.compare])
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return 0
    if args.eval_action == "toy-tasks":
        from benchmarks.toy_tasks import materialize_toy_tasks

        manifest = materialize_toy_tasks(args.split, args.out, max_per_task=args.max_per_task)
        print(json.dumps({name: t["n_docs"] for name, t in manifest["tasks"].items()}))
        return 0
    if args.eval_action == "prepare":
        from benchmarks.prepare import prepare_suite
        from benchmarks.sweep import SweepConfig
        from vilex.config import load_config

        if args.check is not None:
            return _check(args)
        if args.suite is None or args.cache is None:
            raise UserError("vilex eval prepare: give --suite SWEEP.yaml --cache DIR, or --check DIR")
        index = prepare_suite(load_config(SweepConfig, args.suite, args.overrides), args.cache, force=args.force)
        print(json.dumps({name: t["status"] for name, t in index["tasks"].items()}))
        return 0
    if args.eval_action == "mirror":
        from benchmarks.mirror import mirror_suite
        from benchmarks.sweep import SweepConfig
        from vilex.config import load_config

        index = mirror_suite(load_config(SweepConfig, args.suite), args.out, rows=args.rows,
                             force=args.force)
        print(json.dumps({name: {"status": t["status"], "rows": {s: v["rows"] for s, v in t["splits"].items()}}
                          for name, t in index["tasks"].items()}))
        return 0
    if not args.config:
        raise UserError("vilex eval: give --config SWEEP.yaml, or an action (report, toy-tasks, prepare, mirror)")
    from benchmarks.sweep import SweepConfig, format_plan, plan_sweep, run_sweep
    from vilex.config import load_config

    cfg = load_config(SweepConfig, args.config, args.overrides)
    if args.cache is not None:
        cfg.prepared_cache = args.cache
    if args.dry_run:
        plan = plan_sweep(cfg)
        print(format_plan(plan))
        print(json.dumps({"pairs": len(plan.pairs), "done": plan.count("done"),
                          "to_run": plan.count("run", "retry", "stale"), "held": plan.count("held"),
                          "workers": len(plan.slots), "processes": len(plan.units)}))
        return 1 if plan.requirements else 0  # the real run would refuse to start
    summary = run_sweep(cfg)
    print(json.dumps(summary.counts()))
    return 1 if summary.count("failed") else 0

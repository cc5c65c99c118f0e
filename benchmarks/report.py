"""benchmarks/report.py — ``vilex eval report RUN_DIR``: results.csv, results.md and results.png from a sweep.

Reads ``RUN_DIR/sweep.json`` (the latest run's pairs) and each pair's ``result.json``. The headline metric of a task
is the sweep config's ``headline[task]`` if set, else the first metric of its ``metric_list`` (CIDEr for the toy
captioning task, exact match for VQA; lmms-eval lists BLEU-4 first for captioning, so paper15.yaml overrides it).
``results.md`` is tasks × models with the best score per task in bold and, when a baseline model is given (argument
or the sweep's ``baseline``), a delta column per other model. Failed pairs show as ``failed``; pairs
without a result are counted in the log, never silently dropped.

A pair that ran on ``vilex eval mirror`` data (``"mirror": true`` in sweep.json or its result.json) is labelled
everywhere: the CSV's ``mirror`` column, ``TASK [MIRROR]`` in the table and the plot, a MIRROR line above the table
and the plot's title. A mirror's numbers only show that the task's code ran end to end.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from vilex.errors import UserError

log = logging.getLogger(__name__)


def headline_metric(result: dict[str, Any], override: str | None = None) -> str:
    if override:
        return override
    metric_list = (result.get("config") or {}).get("metric_list") or []
    if metric_list:
        return str(metric_list[0]["metric"])
    return next(k.split(",")[0] for k in result["metrics"] if k != "alias" and "stderr" not in k)


def metric_value(metrics: dict[str, Any], metric: str, task: str) -> float:
    """The value of ``metric`` in lmms-eval's results, whose keys are ``METRIC,FILTER``: ``none`` unless the task
    filters its responses (ai2d's ``flexible-extract``); a metric under several filters is ambiguous."""
    if f"{metric},none" in metrics:
        return float(metrics[f"{metric},none"])
    keys = [k for k in metrics if k.split(",")[0] == metric and not k.split(",")[0].endswith("_stderr")]
    if len(keys) != 1:
        raise UserError(f"report: task {task}: metric {metric!r} found under {len(keys)} filters ({keys or 'none'}; "
                        f"has {sorted(k for k in metrics if k != 'alias')})")
    return float(metrics[keys[0]])


def collect(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows {model, task, metric, score, status, error} for every pair of the sweep, and the sweep config."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "sweep.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir}: no sweep.json (run `vilex eval --config ...` with output_dir there first)")
    summary = json.loads(summary_path.read_text())
    rows = []
    for pair in summary["pairs"]:
        row = {"model": pair["model"], "task": pair["task"], "metric": "", "score": math.nan,
               "status": pair["status"], "error": pair.get("error") or "", "mirror": bool(pair.get("mirror"))}
        result_file = Path(pair["result_dir"]) / "result.json"
        if pair["status"] != "failed" and result_file.is_file():
            result = json.loads(result_file.read_text())
            row["mirror"] = row["mirror"] or bool(result.get("mirror"))
            metric = headline_metric(result, (summary.get("config", {}).get("headline") or {}).get(pair["task"]))
            row["metric"], row["score"] = metric, metric_value(result["metrics"], metric, pair["task"])
        elif pair["status"] != "failed":
            row["status"], row["error"] = "missing", f"no {result_file}"
        rows.append(row)
    missing = sum(r["status"] in ("failed", "missing") for r in rows)
    if missing:
        log.warning("report: %d of %d pairs have no score (failed or missing)", missing, len(rows))
    return rows, summary.get("config", {})


def _fmt(x: float) -> str:
    return "failed" if math.isnan(x) else f"{x:.4g}"


def write_report(run_dir: str | Path, baseline: str | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write results.csv / results.md / results.png into ``out_dir`` (default RUN_DIR); returns their paths."""
    rows, config = collect(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    baseline = baseline or config.get("baseline")
    if baseline is not None and baseline not in models:
        raise UserError(f"baseline {baseline!r} is not a model of this sweep: {models}")
    score = {(r["model"], r["task"]): r["score"] for r in rows}
    metric = {r["task"]: r["metric"] for r in rows if r["metric"]}
    mirror = {r["task"] for r in rows if r["mirror"]}
    label = {t: f"{t} [MIRROR]" if t in mirror else t for t in tasks}

    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "task", "metric", "score", "status", "error", "mirror"])
        w.writeheader()
        w.writerows(rows)

    others = [m for m in models if m != baseline] if baseline else []
    header = ["task", "metric", *models, *[f"Δ {m} vs {baseline}" for m in others]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if mirror:
        lines[:0] = [f"**MIRROR** — {len(mirror)} of {len(tasks)} task(s) ran on `vilex eval mirror` data "
                     "(synthetic, in the tasks' real schemas): these numbers show the tasks run end to end, they "
                     "are NOT benchmark scores.", ""]
    for t in tasks:
        vals = [score.get((m, t), math.nan) for m in models]
        finite = [v for v in vals if not math.isnan(v)]
        best = max(finite) if finite else None
        cells = [f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in vals]
        base = score.get((baseline, t), math.nan) if baseline else math.nan
        deltas = [_fmt(score.get((m, t), math.nan) - base) if not math.isnan(base) else "n/a" for m in others]
        deltas = [d if d in ("n/a", "failed") or d.startswith("-") else f"+{d}" for d in deltas]
        lines.append("| " + " | ".join([label[t], metric.get(t, ""), *cells, *deltas]) + " |")
    paths["md"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(models)) / 2), 3.5))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        ys = [0.0 if math.isnan(score.get((m, t), math.nan)) else score[(m, t)] for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], ys, width, label=m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))])
    ax.set_xticklabels([f"{label[t]}\n({metric.get(t, '')})" for t in tasks], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("headline metric")
    if mirror:
        ax.set_title("MIRROR data (vilex eval mirror): not benchmark scores", color="red", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths

"""benchmarks/report.py — ``vilex eval report RUN_DIR``: results.csv, results.md and results.png from a sweep.

Reads ``RUN_DIR/sweep.json`` (the latest run's pairs), each pair's ``result.json`` and its per-doc log
(``samples.jsonl``, written by the worker with lmms-eval's ``log_samples``). The headline metric of a task
is the sweep config's ``headline[task]`` if set, else the first metric of its ``metric_list`` (CIDEr for the toy
captioning task, exact match for VQA; lmms-eval lists BLEU-4 first for captioning, so paper15.yaml overrides it).
``results.md`` is tasks × models with the best score per task in bold and, when a baseline model is given (argument
or the sweep's ``baseline``), a delta column per other model. Failed pairs show as ``failed``; pairs
without a result are counted in the log, never silently dropped. Below that table, ``results.md`` has:

* **95% CI** per (model, task): score ± 1.96 · stderr across questions, the stderr being lmms-eval's own:
  ``METRIC_stderr,FILTER`` when it is a number, else ``METRIC_stderr_clt,FILTER`` (std / √n of the per-doc values,
  which lmms-eval always writes) when the task's ``metric_list`` aggregates that metric with ``mean`` — the same
  number lmms-eval's ``mean_stderr`` gives (the sweep's worker runs lmms-eval with ``bootstrap_iters=0``, which
  leaves ``METRIC_stderr`` as ``N/A``). Otherwise ``n/a``: a corpus-level metric (CIDEr) or an aggregation this report
  cannot see is a mean (POPE's F1, MME's sums) has no stderr here. ``results.csv`` has ``stderr``, ``ci_low`` and
  ``ci_high`` (empty when n/a).
* **Paired differences** of two models, ``B − A``: ``--compare A B`` (repeatable), and the baseline against every
  other model when there is one. Per task, the headline metric's per-doc values of both models on the doc ids both
  logged; the mean difference and its 95% percentile-bootstrap CI (``paired_bootstrap``: docs resampled with
  replacement, 2000 resamples, numpy ``default_rng(0)``, the same for every task and pair); n docs matched. Only
  where the per-doc values are numbers the task aggregates with ``mean`` (so their mean IS the score); otherwise
  the row says why (CIDEr is computed over the whole corpus; a doc logged twice means several filters). The toy QA
  suite has one task per question type, so its rows already are the per-type differences.
* **Across seeds**: models labelled ``NAME_seed<k>`` (two or more seeds of one NAME) are a group; per task the
  mean ± sample std (ddof 1) of their headline scores and how many seeds had one. ``--compare`` takes a group's NAME
  too: its per-doc value is the mean over its seeds (on the docs every seed logged), so the bootstrap resamples
  questions with the seeds averaged in.
* **Verdict per compared pair**: whether B ≥ A on every task that has a paired difference (mean Δ ≥ 0) and B > A on
  at least ``MIN_BETTER_TASKS`` of them with the CI excluding 0: the paper's claim C, read with B = the ViLex-trained
  tower and A = its SigLIP init. Tasks without per-doc scores (CIDEr) are listed as not compared. ``paired.json`` has
  every compared pair's rows and verdict.

A pair that ran on ``vilex eval mirror`` data (``"mirror": true`` in sweep.json or its result.json) is labelled
everywhere: the CSV's ``mirror`` column, ``TASK [MIRROR]`` in the table and the plot (``TASK (mirror)`` in the
sections below the table), a MIRROR line above the table and the plot's title. A mirror's numbers only show that
the task's code ran end to end.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from vilex.errors import UserError

log = logging.getLogger(__name__)

Z95 = 1.96
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
SEED_LABEL = re.compile(r"^(?P<name>.+)_seed(?P<seed>\d+)$")
SAMPLES_FILE = "samples.jsonl"
MIN_BETTER_TASKS = 2  # the verdict's "better on at least two tasks" (claim C)


def headline_metric(result: dict[str, Any], override: str | None = None) -> str:
    if override:
        return override
    metric_list = (result.get("config") or {}).get("metric_list") or []
    if metric_list:
        return str(metric_list[0]["metric"])
    return next(k.split(",")[0] for k in result["metrics"] if k != "alias" and "stderr" not in k)


def metric_key(metrics: dict[str, Any], metric: str, task: str) -> str:
    """The key of ``metric`` in lmms-eval's results, ``METRIC,FILTER``: ``none`` unless the task filters its
    responses (ai2d's ``flexible-extract``); a metric under several filters is ambiguous."""
    if f"{metric},none" in metrics:
        return f"{metric},none"
    keys = [k for k in metrics if k.split(",")[0] == metric]
    if len(keys) != 1:
        raise UserError(f"report: task {task}: metric {metric!r} found under {len(keys)} filters ({keys or 'none'}; "
                        f"has {sorted(k for k in metrics if k != 'alias')})")
    return keys[0]


def metric_value(metrics: dict[str, Any], metric: str, task: str) -> float:
    return float(metrics[metric_key(metrics, metric, task)])


def aggregation(result: dict[str, Any], metric: str) -> str | None:
    """How the task's ``metric_list`` aggregates ``metric`` ("mean", or a function's text), None if not listed."""
    for entry in (result.get("config") or {}).get("metric_list") or []:
        if entry.get("metric") == metric:
            agg = entry.get("aggregation")
            return None if agg is None else str(agg)
    return None


def _number(x: Any) -> float | None:
    """``x`` as a float when it is a number (lmms-eval writes "N/A" for a stderr it did not compute)."""
    if isinstance(x, (bool, int, float)) and not (isinstance(x, float) and math.isnan(x)):
        return float(x)
    return None


def stderr_of(result: dict[str, Any], metric: str, task: str) -> float | None:
    """lmms-eval's stderr of the headline score (see the module docstring), None where it gives none."""
    metrics = result["metrics"]
    filt = metric_key(metrics, metric, task).split(",", 1)[1]
    own = _number(metrics.get(f"{metric}_stderr,{filt}"))
    if own is not None:
        return own
    if aggregation(result, metric) == "mean":
        return _number(metrics.get(f"{metric}_stderr_clt,{filt}"))
    return None


def read_samples(result_dir: Path) -> list[dict[str, Any]] | None:
    """The pair's per-doc log: the worker's ``samples.jsonl`` (or lmms-eval's own ``*_samples_*.jsonl``)."""
    path = result_dir / SAMPLES_FILE
    if not path.is_file():
        found = sorted(result_dir.glob("*_samples_*.jsonl"))
        if not found:
            return None
        path = found[0]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _agg_name(agg: str | None) -> str:
    """'mean', a function's name (a config dump writes "<function cider_aggregate at 0x…>"), or 'not listed'."""
    if agg is None:
        return "not listed"
    found = re.search(r"function (?:utils\.)?([\w.]+)", agg)
    return found[1] if found else agg


def per_doc_scores(samples: list[dict[str, Any]] | None, metric: str,
                   agg: str | None) -> tuple[dict[Any, float] | None, str]:
    """doc id -> the metric's per-doc value, or None and why there is none."""
    if samples is None:
        return None, "no per-doc log (samples.jsonl)"
    scores: dict[Any, float] = {}
    for s in samples:
        value = _number(s.get(metric))
        if value is None:
            kind = type(s.get(metric)).__name__ if metric in s else "missing"
            return None, (f"no per-doc {metric} score: the log holds {kind} entries, aggregated over the whole set "
                          f"({_agg_name(agg)})")
        if s["doc_id"] in scores:
            return None, f"doc {s['doc_id']} logged twice (several filters): per-doc values are ambiguous"
        scores[s["doc_id"]] = value
    if agg != "mean":
        return None, f"{metric}'s per-doc values are aggregated by {_agg_name(agg)}, not a mean"
    return scores, ""


def paired_bootstrap(diffs: Any, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high): the mean of the per-doc differences and its 95% percentile-bootstrap interval.

    ``rng = np.random.default_rng(seed)``; resample ``r`` draws ``n`` doc indices with replacement
    (``rng.integers(0, n, (rows, n))``, rows in blocks of at most ``max(1, 2_000_000 // n)`` resamples so a
    200k-doc task stays within memory) and takes the mean; the interval is ``np.percentile(means, [2.5, 97.5])``."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("paired_bootstrap: no differences")
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // n)
    means = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        means.append(d[idx].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


def collect(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows {model, task, metric, score, stderr, ci_low, ci_high, status, error, mirror} for every pair of the
    sweep (plus ``_per_doc``: doc id -> value or the reason there is none), and the sweep config."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "sweep.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir}: no sweep.json (run `vilex eval --config ...` with output_dir there first)")
    summary = json.loads(summary_path.read_text())
    rows = []
    for pair in summary["pairs"]:
        row = {"model": pair["model"], "task": pair["task"], "metric": "", "score": math.nan, "stderr": None,
               "ci_low": None, "ci_high": None, "status": pair["status"], "error": pair.get("error") or "",
               "mirror": bool(pair.get("mirror")), "_per_doc": (None, "no result")}
        result_file = Path(pair["result_dir"]) / "result.json"
        if pair["status"] != "failed" and result_file.is_file():
            result = json.loads(result_file.read_text())
            row["mirror"] = row["mirror"] or bool(result.get("mirror"))
            metric = headline_metric(result, (summary.get("config", {}).get("headline") or {}).get(pair["task"]))
            row["metric"], row["score"] = metric, metric_value(result["metrics"], metric, pair["task"])
            se = stderr_of(result, metric, pair["task"])
            if se is not None:
                row["stderr"], row["ci_low"], row["ci_high"] = se, row["score"] - Z95 * se, row["score"] + Z95 * se
            row["_per_doc"] = per_doc_scores(read_samples(result_file.parent), metric, aggregation(result, metric))
        elif pair["status"] != "failed":
            row["status"], row["error"] = "missing", f"no {result_file}"
        rows.append(row)
    missing = sum(r["status"] in ("failed", "missing") for r in rows)
    if missing:
        log.warning("report: %d of %d pairs have no score (failed or missing)", missing, len(rows))
    return rows, summary.get("config", {})


def _fmt(x: float) -> str:
    return "failed" if math.isnan(x) else f"{x:.4g}"


def _signed(x: float) -> str:
    return f"+{x:.4g}" if x >= 0 else f"{x:.4g}"


def paired_rows(rows: list[dict[str, Any]], a: str, b: str, tasks: list[str]) -> list[dict[str, Any]]:
    """Per task: {task, metric, n, mean_a, mean_b, diff, ci_low, ci_high, note} for ``b − a`` on matched docs."""
    by = {(r["model"], r["task"]): r for r in rows}
    out = []
    for t in tasks:
        ra, rb = by.get((a, t)), by.get((b, t))
        entry: dict[str, Any] = {"task": t, "metric": (ra or rb or {}).get("metric", ""), "n": 0, "note": ""}
        if ra is None or rb is None or math.isnan(ra["score"]) or math.isnan(rb["score"]):
            entry["note"] = f"no score for {a if ra is None or math.isnan(ra['score']) else b}"
        elif ra["metric"] != rb["metric"]:
            entry["note"] = f"different headline metrics ({ra['metric']} vs {rb['metric']})"
        else:
            (sa, why_a), (sb, why_b) = ra["_per_doc"], rb["_per_doc"]
            if sa is None or sb is None:
                entry["note"] = why_a if sa is None else why_b
            else:
                common = [d for d in sa if d in sb]
                entry["n"] = len(common)
                if not common:
                    entry["note"] = "no doc id logged by both"
                else:
                    mean, low, high = paired_bootstrap([sb[d] - sa[d] for d in common])
                    entry.update(diff=mean, ci_low=low, ci_high=high,
                                 mean_a=statistics.fmean(sa[d] for d in common),
                                 mean_b=statistics.fmean(sb[d] for d in common))
                    if len(common) < max(len(sa), len(sb)):
                        entry["note"] = f"{a} logged {len(sa)} docs, {b} {len(sb)}"
        out.append(entry)
    return out


def seed_groups(models: list[str]) -> dict[str, list[str]]:
    """NAME -> its ``NAME_seed<k>`` models (in sweep order), for names with two or more seeds."""
    groups: dict[str, list[str]] = {}
    for m in models:
        match = SEED_LABEL.match(m)
        if match:
            groups.setdefault(match["name"], []).append(m)
    return {name: ms for name, ms in groups.items() if len(ms) >= 2}


def group_rows(rows: list[dict[str, Any]], groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per (seed group, task), as ``collect``'s: the score is the mean of the seeds' scores, the per-doc
    values the mean over the seeds on the docs every seed logged (so a paired comparison of two groups resamples
    questions with the seeds averaged in). A seed without a score or per-doc log leaves the group without one."""
    by = {(r["model"], r["task"]): r for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for name, members in groups.items():
        for task in tasks:
            seeds = [by.get((m, task)) for m in members]
            row = {"model": name, "task": task, "metric": "", "score": math.nan, "stderr": None, "ci_low": None,
                   "ci_high": None, "status": "done", "error": "", "mirror": any(r and r["mirror"] for r in seeds)}
            missing = [m for m, r in zip(members, seeds) if r is None or math.isnan(r["score"])]
            metrics = {r["metric"] for r in seeds if r is not None}
            if missing:
                row["_per_doc"] = (None, f"no score for {', '.join(missing)}")
            elif len(metrics) > 1:
                row["_per_doc"] = (None, f"the seeds' headline metrics differ ({', '.join(sorted(metrics))})")
            else:
                row["metric"], row["score"] = metrics.pop(), statistics.fmean(r["score"] for r in seeds)
                per_doc = [r["_per_doc"] for r in seeds]
                lacking = next((why for values, why in per_doc if values is None), None)
                if lacking is not None:
                    row["_per_doc"] = (None, lacking)
                else:
                    common = [d for d in per_doc[0][0] if all(d in values for values, _ in per_doc)]
                    row["_per_doc"] = ({d: statistics.fmean(values[d] for values, _ in per_doc) for d in common},
                                       "")
            out.append(row)
    return out


def dominance_verdict(entries: list[dict[str, Any]], min_better: int = MIN_BETTER_TASKS) -> dict[str, Any]:
    """Whether B ≥ A on every task with a paired difference and B > A (CI excluding 0) on at least ``min_better``;
    ``entries``: ``paired_rows``' rows of B − A."""
    compared = [e for e in entries if "diff" in e]
    verdict = {"compared": [e["task"] for e in compared],
               "better": [e["task"] for e in compared if e["ci_low"] > 0],
               "lower_mean": [e["task"] for e in compared if e["diff"] < 0],
               "worse": [e["task"] for e in compared if e["ci_high"] < 0],
               "not_compared": {e["task"]: e["note"] for e in entries if "diff" not in e},
               "min_better": min_better}
    verdict["holds"] = bool(compared) and not verdict["lower_mean"] and len(verdict["better"]) >= min_better
    return verdict


def _verdict_line(a: str, b: str, v: dict[str, Any]) -> str:
    listed = lambda names: ", ".join(names) or "none"  # noqa: E731
    text = (f"**{b} ≥ {a} on every compared task and better on at least {v['min_better']} (95% CI excluding 0): "
            f"{'holds' if v['holds'] else 'does not hold'}.** Compared: {len(v['compared'])} task(s); better: "
            f"{listed(v['better'])}; mean below {a}: {listed(v['lower_mean'])}; worse (CI excluding 0): "
            f"{listed(v['worse'])}.")
    if v["not_compared"]:
        text += " Not compared: " + "; ".join(f"{t} ({why})" for t, why in v["not_compared"].items()) + "."
    return text


def write_report(run_dir: str | Path, baseline: str | None = None, out_dir: str | Path | None = None,
                 compare: list[tuple[str, str]] | None = None) -> dict[str, Path]:
    """Write results.csv / results.md / results.png into ``out_dir`` (default RUN_DIR); returns their paths.
    ``compare``: (A, B) model pairs whose paired per-doc differences ``B − A`` are reported (the baseline against
    every other model is added when there is a baseline)."""
    rows, config = collect(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    baseline = baseline or config.get("baseline")
    if baseline is not None and baseline not in models:
        raise UserError(f"baseline {baseline!r} is not a model of this sweep: {models}")
    groups = seed_groups(models)
    for pair in compare or []:
        unknown = [m for m in pair if m not in models and m not in groups]
        if unknown:
            names = f"{models}" + (f" or a seed group: {list(groups)}" if groups else "")
            raise UserError(f"--compare {' '.join(pair)}: {', '.join(map(repr, unknown))} not a model of this sweep: "
                            f"{names}")
    score = {(r["model"], r["task"]): r["score"] for r in rows}
    by = {(r["model"], r["task"]): r for r in rows}
    metric = {r["task"]: r["metric"] for r in rows if r["metric"]}
    mirror = {r["task"] for r in rows if r["mirror"]}
    label = {t: f"{t} [MIRROR]" if t in mirror else t for t in tasks}
    # the sections below the main table mark a mirror task "(mirror)": "[MIRROR]" rows are the main table's, once
    # per task (tests and tools select them so), and the MIRROR line on top covers the whole file
    sub = {t: f"{t} (mirror)" if t in mirror else t for t in tasks}

    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
    fields = ["model", "task", "metric", "score", "stderr", "ci_low", "ci_high", "status", "error", "mirror"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, **{k: "" if r[k] is None else r[k] for k in ("stderr", "ci_low", "ci_high")}}
                    for r in rows)

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

    lines += ["", "## 95% confidence intervals", "",
              ("score [low, high] = score ± 1.96 · stderr across the task's questions (lmms-eval's stderr); n/a: "
               "lmms-eval gives none (a corpus-level metric such as CIDEr, or an aggregation that is not a mean)."), "",
              "| " + " | ".join(["task", "metric", *models]) + " |", "|" + "---|" * (2 + len(models))]
    for t in tasks:
        cells = []
        for m in models:
            r = by.get((m, t))
            if r is None or math.isnan(r["score"]):
                cells.append("failed")
            elif r["stderr"] is None:
                cells.append(f"{_fmt(r['score'])} (n/a)")
            else:
                cells.append(f"{_fmt(r['score'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        lines.append("| " + " | ".join([sub[t], metric.get(t, ""), *cells]) + " |")

    pairs = list(dict.fromkeys([*(tuple(p) for p in compare or []), *((baseline, m) for m in others)]))
    paired_json = []
    if pairs:
        comparable = rows + group_rows(rows, {g: ms for g, ms in groups.items()
                                              if any(g in p for p in pairs)})
        lines += ["", "## Paired differences (per doc, same doc ids)", "",
                  (f"Δ = mean over the docs both models answered of (B's per-doc score − A's); 95% CI: percentile "
                   f"bootstrap over docs ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). A CI that excludes "
                   "0 is a difference these questions resolve.")]
        for a, b in pairs:
            seeds = [f"{m}: mean of {len(groups[m])} seeds" for m in (a, b) if m in groups]
            entries = paired_rows(comparable, a, b, tasks)
            verdict = dominance_verdict(entries)
            paired_json.append({"a": a, "b": b, "rows": entries, "verdict": verdict})
            lines += ["", f"### {b} − {a}" + (f" ({'; '.join(seeds)})" if seeds else ""), "",
                      f"| task | metric | n docs | {a} | {b} | Δ | 95% CI | note |", "|" + "---|" * 8]
            for e in entries:
                if "diff" in e:
                    cells = [str(e["n"]), _fmt(e["mean_a"]), _fmt(e["mean_b"]), _signed(e["diff"]),
                             f"[{_signed(e['ci_low'])}, {_signed(e['ci_high'])}]"]
                else:
                    cells = [str(e["n"]) if e["n"] else "—", "", "", "n/a", "n/a"]
                lines.append("| " + " | ".join([sub[e["task"]], e["metric"], *cells, e["note"]]) + " |")
            lines += ["", _verdict_line(a, b, verdict)]
        paths["paired"] = out / "paired.json"
        paths["paired"].write_text(json.dumps(paired_json, indent=1) + "\n")

    if groups:
        lines += ["", "## Across seeds", "",
                  ("Models labelled NAME_seed<k>: mean ± std (sample std, ddof 1) of the headline score over the "
                   "seeds that have one."), "",
                  "| task | metric | " + " | ".join(f"{g} ({len(ms)} seeds)" for g, ms in groups.items()) + " |",
                  "|" + "---|" * (2 + len(groups))]
        for t in tasks:
            cells = []
            for ms in groups.values():
                vals = [score[(m, t)] for m in ms if not math.isnan(score.get((m, t), math.nan))]
                if len(vals) >= 2:
                    cells.append(f"{_fmt(statistics.fmean(vals))} ± {_fmt(statistics.stdev(vals))} (n={len(vals)})")
                else:
                    cells.append(f"n/a (n={len(vals)})")
            lines.append("| " + " | ".join([sub[t], metric.get(t, ""), *cells]) + " |")
    paths["md"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(models)) / 2), 3.5))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        ys = [0.0 if math.isnan(score.get((m, t), math.nan)) else score[(m, t)] for t in tasks]
        err = [Z95 * by[(m, t)]["stderr"] if (m, t) in by and by[(m, t)]["stderr"] is not None else 0.0
               for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], ys, width, yerr=err, capsize=2, label=m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))])
    ax.set_xticklabels([f"{label[t]}\n({metric.get(t, '')})" for t in tasks], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("headline metric (95% CI where known)")
    if mirror:
        ax.set_title("MIRROR data (vilex eval mirror): not benchmark scores", color="red", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths

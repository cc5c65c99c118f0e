"""`vilex eval report`: CSV rows, markdown table (bold best, deltas vs baseline), PNG plot."""
import csv
import json

import numpy as np
import pytest

from vilex.cli.main import main
from vilex.errors import UserError


def _fake_run(run, scores):
    """A sweep output dir: scores = {(model, task): value or None (failed)}; caption headline is cider."""
    pairs = []
    for (model, task), value in scores.items():
        rdir = run / "results" / model / task / "k"
        if value is None:
            pairs.append({"model": model, "task": task, "status": "failed", "result_dir": str(rdir),
                          "error": "RuntimeError: out of memory"})
            continue
        rdir.mkdir(parents=True)
        metric = "cider" if task == "cap" else "exact_match"
        (rdir / "result.json").write_text(json.dumps({
            "metrics": {"alias": task, "exact_match,none": 0.0, f"{metric},none": value,
                        f"{metric}_stderr,none": "N/A"},
            "config": {"metric_list": [{"metric": metric}, {"metric": "exact_match"}]}}))
        pairs.append({"model": model, "task": task, "status": "done", "result_dir": str(rdir), "error": None})
    (run / "sweep.json").write_text(json.dumps({"config": {"baseline": "siglip"}, "pairs": pairs}))


def test_report_files(tmp_path, capsys):
    _fake_run(tmp_path, {("siglip", "colour"): 0.5, ("siglip", "cap"): 1.25, ("vilex", "colour"): 0.75,
                         ("vilex", "cap"): None})
    assert main(["eval", "report", str(tmp_path)]) == 0
    paths = json.loads(capsys.readouterr().out)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["task"], r["metric"], r["status"]) for r in rows] == [
        ("siglip", "colour", "exact_match", "done"), ("siglip", "cap", "cider", "done"),
        ("vilex", "colour", "exact_match", "done"), ("vilex", "cap", "", "failed")]
    assert float(rows[2]["score"]) == 0.75 and rows[3]["error"] == "RuntimeError: out of memory"
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| task | metric | siglip | vilex | Δ vilex vs siglip |"
    assert md[2] == "| colour | exact_match | 0.5 | **0.75** | +0.25 |"
    assert md[3] == "| cap | cider | **1.25** | failed | failed |"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_baseline_override_and_errors(tmp_path):
    from benchmarks.report import write_report

    _fake_run(tmp_path, {("siglip", "colour"): 0.5, ("vilex", "colour"): 0.25})
    write_report(tmp_path, baseline="vilex")
    assert (tmp_path / "results.md").read_text().splitlines()[2] == "| colour | exact_match | **0.5** | 0.25 | +0.25 |"
    with pytest.raises(UserError, match=r"baseline 'nope' is not a model of this sweep: \['siglip', 'vilex'\]"):
        write_report(tmp_path, baseline="nope")
    with pytest.raises(UserError, match="no sweep.json"):
        write_report(tmp_path / "empty")


# ---------------------------------------------------------------- CIs, paired differences, seeds
def _sweep(run, pairs, baseline=None):
    """pairs: [(model, task, metrics, metric_list, samples or None)] -> a sweep folder with result.json +
    samples.jsonl per pair, as the worker writes them."""
    listed = []
    for model, task, metrics, metric_list, samples in pairs:
        rdir = run / "results" / model / task / "k"
        rdir.mkdir(parents=True)
        (rdir / "result.json").write_text(json.dumps({"metrics": {"alias": task, **metrics},
                                                      "config": {"metric_list": metric_list}}))
        if samples is not None:
            (rdir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        listed.append({"model": model, "task": task, "status": "done", "result_dir": str(rdir), "error": None})
    (run / "sweep.json").write_text(json.dumps({"config": {"baseline": baseline}, "pairs": listed}))


MEAN_EM = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]


def _em(values, first_id=0):
    return [{"doc_id": first_id + i, "exact_match": v, "resps": [["x"]]} for i, v in enumerate(values)]


def _section(md, title):
    lines = md.splitlines()
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.startswith("|")]


def test_ci_is_score_pm_1_96_stderr_from_lmms_eval_and_na_where_it_gives_none(tmp_path):
    from benchmarks.report import write_report

    cap_list = [{"metric": "cider", "aggregation": "<function cider_aggregate at 0x7f>"}, *MEAN_EM]
    pope_list = [{"metric": "pope_accuracy", "aggregation": "<function pope_aggregate_accuracy at 0x7f>"}]
    _sweep(tmp_path, [
        # lmms-eval's own stderr (bootstrap_iters > 0)
        ("a", "colour", {"exact_match,none": 0.5, "exact_match_stderr,none": 0.05}, MEAN_EM, None),
        # the sweep's worker: stderr N/A, the CLT stderr of a mean metric
        ("a", "count", {"exact_match,none": 0.5, "exact_match_stderr,none": "N/A",
                        "exact_match_stderr_clt,none": 0.1}, MEAN_EM, None),
        ("a", "cap", {"cider,none": 1.25, "cider_stderr,none": "N/A", "cider_stderr_clt,none": "N/A",
                      "exact_match,none": 0.0}, cap_list, None),
        # a CLT number exists, but the aggregation is not known to be a mean: not used
        ("a", "pope", {"pope_accuracy,none": 0.75, "pope_accuracy_stderr,none": "N/A",
                       "pope_accuracy_stderr_clt,none": 0.02}, pope_list, None),
        # a filtered metric (ai2d): the stderr under the same filter
        ("a", "ai2d", {"exact_match,flexible-extract": 0.25, "exact_match_stderr,flexible-extract": "N/A",
                       "exact_match_stderr_clt,flexible-extract": 0.01}, MEAN_EM, None),
    ])
    write_report(tmp_path)
    with open(tmp_path / "results.csv") as f:
        rows = {r["task"]: r for r in csv.DictReader(f)}
    assert float(rows["colour"]["ci_low"]) == 0.5 - 1.96 * 0.05
    assert float(rows["colour"]["ci_high"]) == 0.5 + 1.96 * 0.05
    assert float(rows["count"]["stderr"]) == 0.1 and float(rows["count"]["ci_low"]) == 0.5 - 1.96 * 0.1
    assert rows["cap"]["ci_low"] == rows["cap"]["ci_high"] == rows["cap"]["stderr"] == ""
    assert rows["pope"]["ci_low"] == ""
    assert float(rows["ai2d"]["ci_high"]) == 0.25 + 1.96 * 0.01
    assert _section((tmp_path / "results.md").read_text(), "## 95% confidence intervals") == [
        "| task | metric | a |", "|---|---|---|",
        "| colour | exact_match | 0.5 [0.402, 0.598] |",
        "| count | exact_match | 0.5 [0.304, 0.696] |",
        "| cap | cider | 1.25 (n/a) |",
        "| pope | pope_accuracy | 0.75 (n/a) |",
        "| ai2d | exact_match | 0.25 [0.2304, 0.2696] |"]


def _bootstrap_reference(diffs, resamples=2000, seed=0):
    """The documented procedure, written out independently (fits one block for these sizes)."""
    d = np.asarray(diffs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return d.mean(), low, high


def test_paired_bootstrap_values():
    from benchmarks.report import paired_bootstrap

    assert paired_bootstrap([0.5] * 7) == (0.5, 0.5, 0.5)  # every resample has the same mean
    diffs = [0.3, -0.1, 0.7, 0.2, -0.5, 0.9, 0.05, 0.4, -0.2, 0.6]
    assert paired_bootstrap(diffs) == tuple(map(float, _bootstrap_reference(diffs)))
    assert paired_bootstrap(diffs, seed=1) != paired_bootstrap(diffs)  # the seed is used
    # many docs: the percentile interval is close to mean ± 1.96 sd/sqrt(n)
    rng = np.random.default_rng(5)
    d = rng.integers(-1, 2, size=2000).astype(float)
    mean, low, high = paired_bootstrap(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert low == pytest.approx(mean - half, abs=0.1 * half) and high == pytest.approx(mean + half, abs=0.1 * half)
    # more docs than one block holds (2_000_000 // n resamples per block): same procedure, finite, ordered
    big = rng.integers(0, 2, size=3001).astype(float)
    m, lo, hi = paired_bootstrap(big, resamples=700)
    assert lo < m < hi


def test_paired_differences_on_matched_doc_ids(tmp_path, capsys):
    a = [1, 0, 1, 0, 1, 0, 1, 0]
    b = [1, 1, 1, 1, 1, 0, 1, 0, 1]  # one more doc (8): not matched
    same = [1, 0, 0, 1, 1, 1, 0, 0]
    caps = [{"doc_id": i, "cider": {"pred": "p", "refs": ["r"], "id": str(i)}, "exact_match": 0.0} for i in range(3)]
    cap_list = [{"metric": "cider", "aggregation": "<function cider_aggregate at 0x7f>"}, *MEAN_EM]
    _sweep(tmp_path, [
        ("siglip", "colour", {"exact_match,none": 0.5}, MEAN_EM, _em(a)),
        ("vilex", "colour", {"exact_match,none": 7 / 9}, MEAN_EM, _em(b)),
        ("siglip", "count", {"exact_match,none": 0.5}, MEAN_EM, _em(same)),
        ("vilex", "count", {"exact_match,none": 0.5}, MEAN_EM, _em(same)),
        ("siglip", "cap", {"cider,none": 1.0, "exact_match,none": 0.0}, cap_list, caps),
        ("vilex", "cap", {"cider,none": 1.5, "exact_match,none": 0.0}, cap_list, caps),
        ("siglip", "shape", {"exact_match,none": 0.5}, MEAN_EM, None),
        ("vilex", "shape", {"exact_match,none": 0.5}, MEAN_EM, _em([1, 0])),
    ], baseline="siglip")
    assert main(["eval", "report", str(tmp_path), "--compare", "vilex", "siglip"]) == 0
    capsys.readouterr()
    md = (tmp_path / "results.md").read_text()
    assert "2000 resamples, seed 0" in md
    _, low, high = _bootstrap_reference([b[i] - a[i] for i in range(8)])
    lines = md.splitlines()
    forward = [line for line in lines[lines.index("### vilex − siglip"):] if line.startswith("|")]
    assert forward[:6] == [
        "| task | metric | n docs | siglip | vilex | Δ | 95% CI | note |", "|" + "---|" * 8,
        f"| colour | exact_match | 8 | 0.5 | 0.75 | +0.25 | [+{low:.4g}, +{high:.4g}] | siglip logged 8 docs, vilex 9 |",
        # identical per-doc answers: no difference, and the paired interval has no width
        "| count | exact_match | 8 | 0.5 | 0.5 | +0 | [+0, +0] |  |",
        ("| cap | cider | — |  |  | n/a | n/a | no per-doc cider score: the log holds dict entries, aggregated over "
         "the whole set (cider_aggregate) |"),
        "| shape | exact_match | — |  |  | n/a | n/a | no per-doc log (samples.jsonl) |"]
    backward = [line for line in lines[lines.index("### siglip − vilex"):] if line.startswith("|")]
    assert backward[2].startswith("| colour | exact_match | 8 | 0.75 | 0.5 | -0.25 | [-")
    assert md.index("### siglip − vilex") < md.index("### vilex − siglip")  # --compare first, then the baseline's
    assert 0 <= low < 0.25 < high <= 0.5


def test_compare_names_models_of_the_sweep(tmp_path, capsys):
    _sweep(tmp_path, [("a", "t", {"exact_match,none": 0.5}, MEAN_EM, _em([1, 0]))])
    assert main(["eval", "report", str(tmp_path), "--compare", "a", "b"]) == 2
    assert capsys.readouterr().err.strip() == "error: --compare a b: 'b' not a model of this sweep: ['a']"


def test_two_filters_make_per_doc_values_ambiguous(tmp_path):
    from benchmarks.report import per_doc_scores

    twice = _em([1, 0]) + _em([1], first_id=0)
    assert per_doc_scores(twice, "exact_match", "mean") == (
        None, "doc 0 logged twice (several filters): per-doc values are ambiguous")
    assert per_doc_scores(_em([1, 0]), "exact_match", "<function f at 0x1>") == (
        None, "exact_match's per-doc values are aggregated by f, not a mean")
    assert per_doc_scores(_em([True, 0.5]), "exact_match", "mean") == ({0: 1.0, 1: 0.5}, "")


def test_spread_across_seeds(tmp_path):
    em = {"exact_match_stderr,none": "N/A"}
    _sweep(tmp_path, [
        ("vilex_seed0", "colour", {"exact_match,none": 0.5, **em}, MEAN_EM, None),
        ("vilex_seed1", "colour", {"exact_match,none": 0.6, **em}, MEAN_EM, None),
        ("vilex_seed2", "colour", {"exact_match,none": 0.7, **em}, MEAN_EM, None),
        ("siglip_seed0", "colour", {"exact_match,none": 0.25, **em}, MEAN_EM, None),
        ("siglip_seed1", "colour", {"exact_match,none": 0.75, **em}, MEAN_EM, None),
        ("other", "colour", {"exact_match,none": 0.1, **em}, MEAN_EM, None),
    ])
    from benchmarks.report import seed_groups, write_report

    assert seed_groups(["a_seed0", "b", "a_seed12", "c_seed1"]) == {"a": ["a_seed0", "a_seed12"]}
    write_report(tmp_path)
    assert _section((tmp_path / "results.md").read_text(), "## Across seeds") == [
        "| task | metric | vilex (3 seeds) | siglip (2 seeds) |", "|---|---|---|---|",
        "| colour | exact_match | 0.6 ± 0.1 (n=3) | 0.5 ± 0.3536 (n=2) |"]


def test_compare_seed_groups_averages_the_seeds_per_doc(tmp_path, capsys):
    """--compare takes a seed group's name: per doc, the mean over its seeds on the docs every seed logged."""
    s0, s1 = [1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1]  # seed 1 logged one doc more: unmatched, left out
    v0, v1 = [1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1]
    _sweep(tmp_path, [
        ("siglip_seed0", "colour", {"exact_match,none": 0.5}, MEAN_EM, _em(s0)),
        ("siglip_seed1", "colour", {"exact_match,none": 4 / 7}, MEAN_EM, _em(s1)),
        ("vilex_seed0", "colour", {"exact_match,none": 5 / 6}, MEAN_EM, _em(v0)),
        ("vilex_seed1", "colour", {"exact_match,none": 5 / 6}, MEAN_EM, _em(v1)),
    ])
    assert main(["eval", "report", str(tmp_path), "--compare", "siglip", "vilex"]) == 0
    capsys.readouterr()
    diffs = [(v0[i] + v1[i]) / 2 - (s0[i] + s1[i]) / 2 for i in range(6)]
    mean, low, high = _bootstrap_reference(diffs)
    md = (tmp_path / "results.md").read_text()
    lines = md.splitlines()
    title = "### vilex − siglip (siglip: mean of 2 seeds; vilex: mean of 2 seeds)"
    table = [line for line in lines[lines.index(title):] if line.startswith("|")]
    mean_a, mean_b = sum(s0[i] + s1[i] for i in range(6)) / 12, sum(v0[i] + v1[i] for i in range(6)) / 12
    assert table[2] == (f"| colour | exact_match | 6 | {mean_a:.4g} | {mean_b:.4g} | +{mean:.4g} | "
                        f"[{low:+.4g}, +{high:.4g}] |  |")
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert [(p["a"], p["b"]) for p in paired] == [("siglip", "vilex")]
    assert paired[0]["rows"][0]["n"] == 6 and paired[0]["rows"][0]["diff"] == pytest.approx(mean)
    # a group one of whose seeds has no per-doc log cannot be paired, and says why
    (tmp_path / "results" / "vilex_seed1" / "colour" / "k" / "samples.jsonl").unlink()
    assert main(["eval", "report", str(tmp_path), "--compare", "siglip", "vilex"]) == 0
    capsys.readouterr()
    assert "| colour | exact_match | — |  |  | n/a | n/a | no per-doc log (samples.jsonl) |" in \
        (tmp_path / "results.md").read_text()
    assert main(["eval", "report", str(tmp_path), "--compare", "siglip", "nope"]) == 2
    assert "or a seed group: ['siglip', 'vilex']" in capsys.readouterr().err


def test_dominance_verdict_is_claim_c():
    """B ≥ A on every compared task (mean) and better, CI excluding 0, on at least two; tasks without per-doc
    scores are listed, not counted."""
    from benchmarks.report import dominance_verdict

    def e(task, diff, low, high):
        return {"task": task, "diff": diff, "ci_low": low, "ci_high": high, "note": ""}

    cap = {"task": "cap", "note": "no per-doc cider score", "n": 0}
    holds = dominance_verdict([e("colour", 0.1, 0.02, 0.2), e("shape", 0.2, 0.1, 0.3), e("count", 0.0, -0.05, 0.05),
                               cap])
    assert holds["holds"] and holds["better"] == ["colour", "shape"] and holds["not_compared"] == {
        "cap": "no per-doc cider score"}
    one_better = dominance_verdict([e("colour", 0.1, 0.02, 0.2), e("shape", 0.05, -0.01, 0.1)])
    assert not one_better["holds"] and one_better["better"] == ["colour"]
    # a lower mean anywhere breaks "≥ on every task", even inside its CI
    dip = dominance_verdict([e("colour", 0.1, 0.02, 0.2), e("shape", 0.2, 0.1, 0.3), e("count", -0.01, -0.05, 0.03)])
    assert not dip["holds"] and dip["lower_mean"] == ["count"] and dip["worse"] == []
    assert not dominance_verdict([cap])["holds"]  # nothing compared holds nothing
    assert dominance_verdict([e("colour", 0.1, 0.02, 0.2)], min_better=1)["holds"]


def test_verdict_line_in_the_report(tmp_path, capsys):
    _sweep(tmp_path, [
        ("siglip", "colour", {"exact_match,none": 0.25}, MEAN_EM, _em([0, 1, 0, 0] * 10)),
        ("vilex", "colour", {"exact_match,none": 1.0}, MEAN_EM, _em([1, 1, 1, 1] * 10)),
        ("siglip", "shape", {"exact_match,none": 0.25}, MEAN_EM, _em([1, 0, 0, 0] * 10)),
        ("vilex", "shape", {"exact_match,none": 0.75}, MEAN_EM, _em([1, 1, 1, 0] * 10)),
    ])
    assert main(["eval", "report", str(tmp_path), "--compare", "siglip", "vilex"]) == 0
    capsys.readouterr()
    md = (tmp_path / "results.md").read_text()
    assert ("**vilex ≥ siglip on every compared task and better on at least 2 (95% CI excluding 0): holds.** "
            "Compared: 2 task(s); better: colour, shape; mean below siglip: none; worse (CI excluding 0): none.") in md
    assert json.loads((tmp_path / "paired.json").read_text())[0]["verdict"]["holds"] is True

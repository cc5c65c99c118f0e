"""An exported checkpoint evaluates with lmms-eval's STOCK `llava_hf` exactly like our `vilex_vlm` plugin evaluates
the original: same prompt, same pixels, same greedy tokens -> the same per-doc responses and the same scores.

Runs lmms-eval for real (simple_evaluate, the CLI's code path) on two toy tasks. `llava_hf` is run both ways
lmms-eval offers it: the default chat class (the processor's chat template: our export's list-of-parts preamble +
the LLM's template) and `force_simple` (the tokenizer's template on "<image>\\n" + text). What stock `llava_hf`
needs here: `decord` installed (imported at module level, lmms-eval's `video-legacy` extra; pinned in
requirements.txt) and `device_map=cpu` in model_args (its default `device_map=""` is refused by transformers 5).
The tiny models are untrained, so exact match is 0 for both; the per-doc response equality is the strong check.
"""
import pytest

TASKS = ["vilex_toy_colour", "vilex_toy_caption"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from toy.tiny_suite import build_tiny_toy_suite
    from vilex.cli.main import main

    root = tmp_path_factory.mktemp("bench_llava_hf")
    build_tiny_toy_suite(root, n=8, max_per_task=3)
    (ckpt,) = build_tiny_vlm_checkpoints(root, seeds=(0,), tower_type="siglip")
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(root / "hf")]) == 0
    return root, ckpt, root / "hf"


def _run(model: str, model_args: str, tasks_dir, force_simple: bool = False):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(verbosity="ERROR", include_path=str(tasks_dir), include_defaults=False, model_name=model)
    out = simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=1, device="cpu",
                          log_samples=True, task_manager=tm, bootstrap_iters=0, verbosity="ERROR",
                          force_simple=force_simple)
    scores = {t: {k: v for k, v in out["results"][t].items() if k.endswith(",none") and "stderr" not in k}
              for t in TASKS}
    responses = {t: [(s["doc_id"], s["resps"], s["filtered_resps"]) for s in out["samples"][t]] for t in TASKS}
    return scores, responses


def test_stock_llava_hf_on_the_export_matches_the_native_plugin(exported, monkeypatch):
    root, ckpt, hf = exported
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-cache"))
    ours_scores, ours = _run("vilex_vlm", f"pretrained={ckpt}", root / "tasks")
    assert set(ours_scores["vilex_toy_caption"]) == {"cider,none", "exact_match,none"}
    assert [len(ours[t]) for t in TASKS] == [3, 3]
    assert all(r[1][0][0] for t in TASKS for r in ours[t])  # the model said something for every doc

    for force_simple in (False, True):
        scores, responses = _run("llava_hf", f"pretrained={hf},device_map=cpu", root / "tasks", force_simple)
        assert responses == ours, f"force_simple={force_simple}"
        assert scores == ours_scores, f"force_simple={force_simple}"

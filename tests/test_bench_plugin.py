"""The `vilex_vlm` lmms-eval model: entry-point registration and a real toy task through simple_evaluate."""
import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vilex.errors import UserError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from toy.tiny_suite import build_tiny_toy_suite

    root = tmp_path_factory.mktemp("bench_plugin")
    manifest = build_tiny_toy_suite(root, n=8, max_per_task=3)
    (ckpt,) = build_tiny_vlm_checkpoints(root, seeds=(0,))
    return root, manifest, ckpt


def test_registered_through_the_entry_point():
    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "vilex_vlm"]
    assert ep.value == "benchmarks.lmms_entry:VILEX_VLM_MANIFEST"
    from lmms_eval.models import get_model

    from benchmarks.lmms_plugin import VilexVLM

    assert get_model("vilex_vlm") is VilexVLM


def test_toy_task_runs_for_real_through_simple_evaluate(toy):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from benchmarks.lmms_plugin import VilexVLM

    root, manifest, ckpt = toy
    model = VilexVLM(pretrained=str(ckpt))
    out = simple_evaluate(model=model, tasks=["vilex_toy_colour"], batch_size=1, log_samples=True,
                          task_manager=TaskManager(verbosity="ERROR", include_path=str(root / "tasks")),
                          bootstrap_iters=0, verbosity="ERROR")
    n_docs = manifest["tasks"]["vilex_toy_colour"]["n_docs"]
    samples = out["samples"]["vilex_toy_colour"]
    assert model.generate_calls == n_docs == len(samples) == 3
    per_doc = [s["exact_match"] for s in samples]
    assert out["results"]["vilex_toy_colour"]["exact_match,none"] == pytest.approx(sum(per_doc) / len(per_doc))
    # the logged answer is exactly what the model generates for that prompt alone (greedy)
    docs = [json.loads(x) for x in Path(manifest["tasks"]["vilex_toy_colour"]["yaml"]).with_suffix(".jsonl")
            .read_text().splitlines()]
    from benchmarks.toy_task_fns import doc_to_visual

    first = samples[0]
    fresh = VilexVLM(pretrained=str(ckpt))  # simple_evaluate calls model.clean(), which frees the weights
    again = fresh.generate_one(first["arguments"][0], first["arguments"][1], doc_to_visual(docs[first["doc_id"]]),
                               "doc 0")
    assert first["resps"][0][0] == again


def test_refuses_automatic_batch_size_and_loglikelihood(toy):
    from benchmarks.lmms_plugin import VilexVLM

    # a fixed batch size only (answers do not depend on it: tests/test_batch_invariance.py)
    with pytest.raises(UserError, match=r"vilex_vlm: batch_size must be a whole number >= 1 \(got 'auto:4'\)"):
        VilexVLM(pretrained=str(toy[2]), batch_size="auto:4")
    assert VilexVLM(pretrained=str(toy[2]), batch_size=2).batch_size == 2
    with pytest.raises(NotImplementedError, match="only generate_until"):
        VilexVLM(pretrained=str(toy[2])).loglikelihood([])

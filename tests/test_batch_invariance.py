"""Scores must not depend on the batch size: the same docs at batch 1 and batch 8 give the same per-doc answers.

lmms-eval runs for real (simple_evaluate: its model classes built from model_args, Instances, its re-ordering)
on toy-world tasks whose prompts differ in length (shape questions are a token longer than colour and position
questions, the caption prompt 10 shorter), so both batches of 8 are left-padded. Our `vilex_vlm` on the shipped toy
VLM assets/toy/vlm/vilex at batch 1 and 8, and the stock `llava_hf` on its `vilex export-hf` export at batch 1:
identical per-doc answers and scores. lmms-eval 0.7.3's
`llava_hf` does not batch at all: its generate_until asserts `batch_size_per_gpu == 1` (the loop answers only the
first doc of each chunk, so the assert is what keeps it correct); at batch 8 it stops with that AssertionError.

Below: what the plugin's invariance rests on, each checked where it can fail: position ids and masks as the LLM
receives them, and the recheck of near ties (simulated batch noise far above the real one is undone by it).
"""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VLM = ROOT / "assets" / "toy" / "vlm" / "vilex"
TASKS = ["vilex_toy_colour", "vilex_toy_shape", "vilex_toy_position", "vilex_toy_caption"]
PER_TASK = 4  # 16 requests: two batches of 8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from benchmarks.toy_tasks import materialize_toy_tasks
    from toy.scenes.generate import generate_dataset
    from vlm.export import export_hf

    root = tmp_path_factory.mktemp("batch_invariance")
    generate_dataset(root / "toy", n=PER_TASK * 3, seed=0, size=32, splits={"test": 1.0}, progress=False)
    materialize_toy_tasks(root / "toy" / "test", root / "tasks", max_per_task=PER_TASK)
    export_hf(VLM, root / "hf")
    return root


def _evaluate(model: str, model_args: str, tasks_dir: Path, batch_size: int, keep: list | None = None):
    """simple_evaluate with the model built the way it builds it (``keep`` receives the instance)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model(model).create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})
    if keep is not None:
        keep.append(lm)
    tm = TaskManager(verbosity="ERROR", include_path=str(tasks_dir), include_defaults=False, model_name=model)
    out = simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, task_manager=tm, bootstrap_iters=0,
                          verbosity="ERROR")
    answers = {t: [(s["doc_id"], s["resps"][0][0]) for s in out["samples"][t]] for t in TASKS}
    scores = {t: {k: v for k, v in out["results"][t].items() if k.endswith(",none") and "stderr" not in k}
              for t in TASKS}
    return answers, scores


def test_same_answers_at_batch_1_and_8_ours_and_stock_llava_hf(world, prompts, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(world / "hf-cache"))
    tok = AutoTokenizer.from_pretrained(VLM / "tokenizer")
    lengths = sorted((len(tok(c)["input_ids"]) for c, _ in prompts), reverse=True)  # the plugin's batch order
    assert [len(set(lengths[i:i + 8])) for i in (0, 8)] == [2, 2]  # both batches of 8 are padded

    ours1, scores1 = _evaluate("vilex_vlm", f"pretrained={VLM}", world / "tasks", 1)
    kept: list = []
    ours8, scores8 = _evaluate("vilex_vlm", f"pretrained={VLM}", world / "tasks", 8, kept)
    assert [len(ours1[t]) for t in TASKS] == [PER_TASK] * 4
    assert all(a for t in TASKS for _, a in ours1[t])  # a trained model: it answers every doc
    assert ours8 == ours1 and scores8 == scores1
    # and not only thanks to the recheck: batched scores are the alone ones up to float noise (right padding,
    # say, would differ by whole logits and send every row to the recheck)
    (lm,) = kept
    assert lm.batch_size == 8 and lm.noise < 1e-3 and lm.rechecked < 16

    stock1, stock_scores1 = _evaluate("llava_hf", f"pretrained={world / 'hf'},device_map=cpu", world / "tasks", 1)
    # llava_hf stops only at the tokenizer's EOS (its eos_token_id overrides the model's [<|im_end|>, EOS]), so it
    # writes on past the end of the turn; the answer is its first line, which the toy scorers read
    first_line = {t: [(d, a.split("\n", 1)[0]) for d, a in stock1[t]] for t in TASKS}
    assert first_line == ours1 and stock_scores1 == scores1
    with pytest.raises(AssertionError, match="Do not support batch_size_per_gpu > 1"):
        _evaluate("llava_hf", f"pretrained={world / 'hf'},device_map=cpu", world / "tasks", 8)


# ---------------------------------------------------------------- what the invariance rests on
@pytest.fixture(scope="module")
def prompts(world):
    """16 (context, visuals) pairs of the toy tasks, prompts of several lengths."""
    from benchmarks.toy_task_fns import doc_to_text, doc_to_visual
    from benchmarks.toy_tasks import QA_POST_PROMPT

    out = []
    for t in TASKS:
        for line in (world / "tasks" / f"{t}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            post = "" if t.endswith("caption") else QA_POST_PROMPT
            out.append((doc_to_text(doc, {"post_prompt": post}), doc_to_visual(doc)))
    return out


GEN = {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


def _batch(model, items):
    return model.generate_batch([c for c, _ in items], GEN, [v for _, v in items], ["t/test/doc"] * len(items))


def test_the_llm_sees_left_padding_masked_and_positions_from_each_rows_first_token(prompts):
    from benchmarks.lmms_plugin import VilexVLM

    model = VilexVLM(pretrained=str(VLM), batch_size=4)
    calls = []
    hook = model.model.llm.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append({k: kwargs[k].clone() for k in ("position_ids", "attention_mask")
                                                if kwargs.get(k) is not None}), with_kwargs=True)
    items = [prompts[0], prompts[5], prompts[10], prompts[15]]
    lengths = [len(model.model.prompt_ids(c.strip())[0]) for c, _ in items]
    assert len(set(lengths)) > 1
    try:
        model._run([(model.model.prompt_ids(c.strip())[0], model._pixels(v, "x")) for c, v in items],
                   model._options(GEN))
    finally:
        hook.remove()
    width = max(lengths)
    prefill, step = calls[0], calls[1]
    for r, n in enumerate(lengths):
        pad = width - n
        assert prefill["attention_mask"][r].tolist() == [0] * pad + [1] * n
        assert prefill["position_ids"][r, pad:].tolist() == list(range(n))  # 0 at the row's first real token
        assert step["position_ids"][r].tolist() == [n]  # the first new token follows the row's own prompt
        assert step["attention_mask"][r].tolist() == [0] * pad + [1] * (n + 1)


def test_near_ties_are_recomputed_alone_so_batch_noise_cannot_change_an_answer(prompts, monkeypatch):
    """Batch noise blown up to 0.5 (the real one is ~1e-5 in float32): the recheck still returns every doc's
    batch-1 answer; with the recheck off, the same noise changes answers."""
    from transformers import LogitsProcessor

    from benchmarks.lmms_plugin import VilexVLM

    alone = VilexVLM(pretrained=str(VLM))
    expected = [alone.generate_one(c, GEN, v, "t/test/doc") for c, v in prompts]

    class RunnerUpBoost(LogitsProcessor):  # noise of at most NOISE on each score, the worst kind: it closes a gap
        def __call__(self, input_ids, scores):
            top = scores.topk(2, dim=-1)
            return scores.scatter_add(1, top.indices[:, 1:], torch.full_like(top.values[:, 1:], NOISE))

    NOISE = 0.5

    def noisy(model):
        plain = model.model.generate

        def generate(input_ids, *args, logits_processor=None, **kwargs):
            if input_ids.shape[0] > 1 and logits_processor is not None:
                logits_processor.insert(0, RunnerUpBoost())  # before the plugin's watcher: it sees the noise
            return plain(input_ids, *args, logits_processor=logits_processor, **kwargs)

        monkeypatch.setattr(model.model, "generate", generate)
        return model

    guarded = noisy(VilexVLM(pretrained=str(VLM), batch_size=8))
    got = _batch(guarded, prompts[:8]) + _batch(guarded, prompts[8:])
    assert guarded.noise == pytest.approx(NOISE, abs=1e-3)  # the calibration batch measured the noise
    assert guarded.margin == pytest.approx(guarded.CALIBRATION_FACTOR * NOISE, abs=1e-2)
    assert got == expected and 8 < guarded.rechecked <= 16

    unguarded = noisy(VilexVLM(pretrained=str(VLM), batch_size=8, recheck_margin=0))
    monkeypatch.setattr(unguarded, "CALIBRATION_FACTOR", 0)
    got = _batch(unguarded, prompts[:8]) + _batch(unguarded, prompts[8:])
    assert got[:8] == expected[:8]  # the calibration batch is always answered alone
    assert got[8:] != expected[8:] and unguarded.rechecked == 8


def test_batch_size_and_recheck_margin_are_checked():
    from benchmarks.lmms_plugin import VilexVLM
    from vilex.errors import UserError

    with pytest.raises(UserError, match=r"vilex_vlm: batch_size must be a whole number >= 1 \(got 'auto'\)"):
        VilexVLM(pretrained=str(VLM), batch_size="auto")
    with pytest.raises(UserError, match=r"vilex_vlm: recheck_margin must be a number >= 0 \(got '-1'\)"):
        VilexVLM(pretrained=str(VLM), recheck_margin="-1")
    assert VilexVLM(pretrained=str(VLM), batch_size="8").batch_size == 8

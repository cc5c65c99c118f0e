"""Toy-world stage 2: the toy chat LLM (`vilex toy pretrain-llm`), the toy split -> LLaVA JSON converter
(`vilex toy vlm-data`) and the toy VLM configs. Tiny settings only; the real runs are recorded in vlm/README.md."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_helpers import REPO

from benchmarks.toy_tasks import CAPTION_PROMPT, QA_POST_PROMPT, toy_docs
from benchmarks.toy_task_fns import doc_to_text
from vilex.cli.main import main as vilex_main
from vilex.config import load_config, to_dict
from vilex.errors import DataError, UserError
from toy.scenes.generate import generate_dataset
from toy.pretrain_llm import LLMPretrainConfig, pretrain_llm
from toy.vlm_data import chance_levels, write_vlm_data
from vlm.config import VLMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_CONFIGS = {"toy_siglip.yaml": ("siglip", "runs/toy/vlm/siglip"),
               "toy_vilex.yaml": ("vilex", "runs/toy/vlm/vilex"),
               "toy_vilex-tokens.yaml": ("vilex_tokens", "runs/toy/vlm/vilex_tokens")}


def _tiny_llm_config(work_dir) -> LLMPretrainConfig:
    cfg = load_config(LLMPretrainConfig, REPO / "configs" / "toy" / "llm.yaml", [f"work_dir={work_dir}",
        "model.width=32", "model.layers=1", "model.heads=2", "model.kv_heads=1", "model.intermediate=64",
        "tokenizer.corpus_steps=4", "train.global_batch_size=6", "train.max_steps=6", "train.warmup_steps=1",
        "train.log_every=2", "train.pack_length=256", "eval_scenes=6", "eval_questions=6"])
    return cfg


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_llm") / "llm"
    metrics = pretrain_llm(_tiny_llm_config(out.parent / "work"), out)
    return out, metrics


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_data") / "data"
    generate_dataset(root, n=12, seed=3, size=16, splits="train=0.5,test=0.5")
    return root


def test_pretrain_llm_writes_a_loadable_chat_model(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = tiny_llm
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    # spare embedding rows for the VLM's <image> token; generation stops at the end of an assistant turn
    assert model.get_input_embeddings().num_embeddings == len(tok) + 8
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.unk_token_id and set(model.generation_config.eos_token_id) == {im_end, tok.eos_token_id}
    text = tok.apply_chat_template([{"role": "user", "content": "how many objects are there?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhow many objects "
                    "are there?<|im_end|>\n<|im_start|>assistant\n")
    # the chat-template's fixed text was in the BPE corpus: whole words, not bytes
    assert len(tok("You are a helpful assistant.", add_special_tokens=False)["input_ids"]) <= 6
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > ids.shape[1]

    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["asset"] == "llm" and recipe["config"]["train"]["max_steps"] == 6
    held = recipe["metrics"]["heldout"]
    assert held == metrics["heldout"] and 0 < held["loss"] < 7 and held["perplexity"] == pytest.approx(
        torch.tensor(held["loss"]).exp().item(), rel=1e-3)
    curve = [c["loss"] for c in metrics["loss_curve"]]
    assert metrics["steps_done"] == 6 and curve[-1] < curve[0]
    assert sum(v["n"] for v in metrics["text_qa_heldout"].values()) == 6
    # the ceiling asks the same questions with both captions as the context
    assert {t: v["n"] for t, v in metrics["text_qa_ceiling"].items()} == \
        {t: v["n"] for t, v in metrics["text_qa_heldout"].items()}


def test_qa_contexts_state_what_the_questions_ask():
    """'both' holds the fine and the coarse caption; the coarse caption names every position answer's 3x3 cell."""
    import numpy as np

    from toy.pretrain_llm import QA_CONTEXTS, qa_context
    from toy.recipe import heldout_scenes
    from toy.scenes import world

    rng = np.random.default_rng(0)
    positions = 0
    for scene in heldout_scenes(5, 40):
        coarse, fine, both = (qa_context(scene, c) for c in QA_CONTEXTS)
        assert coarse == world.caption_coarse(scene) and fine == world.caption_fine(scene)
        assert fine in both and coarse in both
        for qa in world.questions(scene, rng):
            if qa.type == "position":
                assert f"at the {qa.answer}" in coarse
                positions += 1
    assert positions > 10
    with pytest.raises(ValueError, match="QA context must be one of"):
        qa_context(scene, "web")


def test_scene_documents_mix_follows_the_data_spec():
    """qa_docs QA chats per scene, each over the same questions; their contexts follow the context probabilities."""
    import numpy as np

    from toy.pretrain_llm import LLMDataSpec, join_captions, scene_documents
    from toy.recipe import heldout_scenes
    from toy.scenes import world

    scene = heldout_scenes(7, 1)[0]
    fine, coarse = world.caption_fine(scene), world.caption_coarse(scene)

    def chats(spec):
        docs = scene_documents(scene, np.random.default_rng(0), spec)
        return [d for d in docs if isinstance(d, list) and d[0]["content"].split("\n")[0] in
                (fine, coarse, join_captions(fine, coarse))]

    one = chats(LLMDataSpec(caption_chat_prob=0.0))
    three = chats(LLMDataSpec(caption_chat_prob=0.0, qa_docs=3, both_context_prob=1.0))
    assert len(one) == 1 and len(three) == 3
    assert all(c[0]["content"].startswith(join_captions(fine, coarse) + "\n") for c in three)
    # each user turn ends with the question, then the suite's answer instruction
    questions = [sorted(m["content"].split("\n")[-2] for m in c if m["role"] == "user") for c in three]
    assert questions[0] == questions[1] == questions[2] and len(set(questions[0])) >= 3
    assert all(q.endswith("?") for q in questions[0])
    assert chats(LLMDataSpec(caption_chat_prob=0.0, fine_context_prob=1.0))[0][0]["content"].startswith(fine + "\n")


def test_the_default_document_stream_is_the_shipped_llms():
    """configs/toy/llm.yaml must still draw the documents assets/toy/llm was trained on: the digest of the first
    steps' documents, as drawn before the QA-context options existed."""
    import hashlib

    from toy.pretrain_llm import LLMDataSpec, step_documents

    docs = [step_documents(0, step, 24, LLMDataSpec()) for step in range(3)]
    assert hashlib.sha256(json.dumps(docs).encode()).hexdigest()[:16] == "9055027b60347a4c"


def test_single_object_curriculum_covers_its_steps_only(tmp_path):
    """The curriculum's steps draw one-object scenes (a caption with one shape); later steps the full world, the
    same documents as without the option; the tokenizer's corpus ignores it."""
    import dataclasses

    from toy.pretrain_llm import LLMDataSpec, LLMPretrainConfig, build_toy_llm_tokenizer, step_documents
    from toy.scenes import world

    spec = LLMDataSpec(single_object_steps=2, caption_chat_prob=0.0)

    def shape_words(doc):
        text = doc if isinstance(doc, str) else doc[0]["content"].split("\n")[0]
        return sum(text.count(f" {s}") for s in world.SHAPES)

    early = [d for step in (0, 1) for d in step_documents(0, step, 24, spec)]
    assert early and all(shape_words(d) == 1 for d in early)
    plain = dataclasses.replace(spec, single_object_steps=0)
    late = step_documents(0, 2, 24, spec)
    assert late == step_documents(0, 2, 24, plain) and max(shape_words(d) for d in late) >= 2
    cfg = LLMPretrainConfig(data=spec)
    cfg.tokenizer.corpus_steps = 2
    base = LLMPretrainConfig(data=plain)
    base.tokenizer.corpus_steps = 2
    vocab = build_toy_llm_tokenizer(cfg, tmp_path / "a").get_vocab()
    assert vocab == build_toy_llm_tokenizer(base, tmp_path / "b").get_vocab()


def test_llm_qa_cli_reports_each_context(tiny_llm, capsys):
    from toy.cli import LLM_QA_CONTEXTS
    from toy.pretrain_llm import QA_CONTEXTS

    assert LLM_QA_CONTEXTS == QA_CONTEXTS
    out, _ = tiny_llm
    assert vilex_main(["toy", "llm-qa", "--llm", str(out), "--questions", "4", "--context", "fine", "both"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"fine", "both"}
    for per_type in report.values():
        assert sum(v["n"] for v in per_type.values()) == 4
        assert all(0 <= v["accuracy"] <= 1 for v in per_type.values())
    assert vilex_main(["toy", "llm-qa", "--llm", str(out.parent / "missing")]) == 2
    assert "no toy LLM at" in capsys.readouterr().err


def test_chance_levels():
    assert chance_levels(["yes", "no", "no", "no"]) == {"uniform": 0.5, "majority": 0.75}


def test_pretrain_llm_cli_help_and_bad_config(capsys):
    with pytest.raises(SystemExit) as e:
        vilex_main(["toy", "pretrain-llm", "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
    assert vilex_main(["toy", "pretrain-llm", "--config", str(REPO / "configs/toy/llm.yaml"),
                       "--set", "model.heads=3"]) != 0
    assert "width 128 not divisible by heads 3" in capsys.readouterr().err


def test_vlm_data_passes_the_template_label_checks(tiny_llm, toy_split, tmp_path):
    """align and instruct JSON tokenize through the vlm templates with verified labels; prompts = the eval suite's."""
    from vlm.data import ConversationDataset, ImageSpec, read_llava_json
    from vlm.model import load_tokenizer
    from vlm.templates import IGNORE, build_template

    info = write_vlm_data(toy_split / "train", tmp_path, seed=0, caption_prob=1.0, text_only_prob=1.0)
    rows = [json.loads(x) for x in (toy_split / "train" / "metadata.jsonl").read_text().splitlines()]
    n = len(rows)
    assert info["files"]["align"]["samples"] == 2 * n
    assert info["files"]["instruct"]["samples"] == 3 * n  # qa + caption + text-only per scene at p = 1
    assert info["files"]["instruct"]["with_image"] == 2 * n

    tok, image_id = load_tokenizer(tiny_llm[0], "<image>")
    spec = ImageSpec(16, (0.5,) * 3, (0.5,) * 3)
    for kind in ("align", "instruct"):
        records = read_llava_json(tmp_path / f"{kind}.json")
        ds = ConversationDataset(records, tok, build_template(kind, tok, "<image>"), image_spec=spec,
                                 image_token="<image>", image_token_id=image_id, num_image_tokens=4, max_length=512,
                                 image_root=toy_split / "train")
        # tokenizing every sample raises TemplateMismatchError on any misaligned label
        assert len(ds) == len(records) and sum(ds.tokens(i).truncated_tokens > 0 for i in range(len(ds))) == 0
        ex = ds[0]
        assert ex.pixel_values.shape == (3, 16, 16)
        learned = tok.decode(ex.tokens.input_ids[1:][ex.tokens.targets[:-1] != IGNORE])
        if kind == "align":
            assert learned == rows[0]["caption"] + "<|endoftext|>"
        else:  # every answer, each followed by the end-of-turn marker, and nothing else
            answers = [c["value"] for c in records[0]["conversations"][1::2]]
            assert learned == "".join(f"{a}<|im_end|>\n" for a in answers)

    # the QA / caption prompts are exactly what the lmms-eval toy tasks send (after the plugin puts <image> first)
    instruct = read_llava_json(tmp_path / "instruct.json")
    firsts = {r["conversations"][0]["value"] for r in instruct if "image" in r}
    docs = toy_docs(toy_split / "train")
    kw = {"pre_prompt": "", "post_prompt": QA_POST_PROMPT}
    qa_prompts = ["<image>\n" + doc_to_text(d, kw) for name, ds_ in docs.items() if name != "vilex_toy_caption"
                  for d in ds_]
    assert firsts <= set(qa_prompts) | {f"<image>\n{CAPTION_PROMPT}"}
    all_turns = sorted(c["value"].removeprefix("<image>\n") for r in instruct if r["id"].endswith("/qa")
                       for c in r["conversations"][0::2])
    assert all_turns == sorted(p.removeprefix("<image>\n") for p in qa_prompts)  # every question, once
    fine = {r["id"]: r["caption_fine"] for r in rows}
    text_only = [r for r in instruct if r["id"].endswith("/text")]
    assert len(text_only) == n and all("image" not in r for r in text_only)
    assert all(r["conversations"][0]["value"].startswith(fine[r["id"].split("/")[0]] + "\n") for r in text_only)


def test_vlm_data_cli_and_errors(toy_split, tmp_path, capsys):
    assert vilex_main(["toy", "vlm-data", "--split", str(toy_split / "test"), "--out", str(tmp_path / "v"),
                       "--kind", "align"]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["align"]["samples"] == 12
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["align.json", "vlm_data.json"]
    with pytest.raises(DataError, match="no metadata.jsonl"):
        write_vlm_data(tmp_path, tmp_path / "w")
    with pytest.raises(UserError, match="text_only_prob must be in"):
        write_vlm_data(toy_split / "test", tmp_path / "w", text_only_prob=2.0)


@pytest.mark.parametrize("name", sorted(TOY_CONFIGS))
def test_toy_vlm_configs_load_and_validate(name, capsys):
    path = REPO / "configs" / "vlm" / name
    cfg = load_config(VLMConfig, path)
    tower, out = TOY_CONFIGS[name]
    assert cfg.model.tower.type == tower and str(cfg.output_dir) == out
    assert cfg.model.llm.name_or_path == "assets/toy/llm" and cfg.model.tower.feature_layer == -2
    assert (cfg.align.data.template, cfg.instruct.data.template, cfg.instruct.init_from) == ("align", "instruct",
                                                                                            "previous")
    assert cfg.align.data.image_root == cfg.instruct.data.image_root
    assert str(cfg.align.data.json).endswith("align.json") and str(cfg.instruct.data.json).endswith("instruct.json")
    assert cfg.align.strategy == cfg.instruct.strategy == "torch"
    # the toy configs differ only in the tower and the output folder
    base, this = to_dict(load_config(VLMConfig, REPO / "configs/vlm/toy_siglip.yaml")), to_dict(cfg)
    for d in (base, this):
        d["model"].pop("tower")
        d.pop("output_dir")
    assert this == base
    # the benchmark sweep evaluates the shipped copies of these runs (vilex toy ship-vlm)
    sweep = yaml.safe_load((REPO / "configs/benchmarks/toy.yaml").read_text())
    assert sweep["models"][tower] == f"assets/toy/vlm/{Path(out).name}"
    # the dry run finds the shipped LLM and tower; what it misses is what `make demo` builds first (the data) and,
    # for instruct, the align stage's checkpoint
    for stage, expected in (("align", 1), ("instruct", 2)):
        assert vilex_main(["train-vlm", "--config", str(path), "--stage", stage, "--dry-run"]) == 2
        out = capsys.readouterr().out
        assert "  tower " in out and f"{tower} from " in out and "  LLM " in out
        problems = out.split("problem(s); the run would stop:")[1].strip().splitlines()
        assert len(problems) == expected, problems
        assert all("conversation file not found: runs/toy/vlm_data/" in p or "has no checkpoint" in p
                   for p in problems), problems


def test_toy_llm_and_converted_data_train_a_vlm(tiny_llm, toy_split, tmp_path):
    """The whole toy path at tiny size: pretrain-llm folder + vlm-data JSON + a tiny tower -> align -> instruct, and
    the trained model answers a prompt built exactly like the eval plugin's."""
    from vlm.model import VLM
    from vlm.tiny import build_tiny_siglip_folder
    from vlm.train import train_vlm

    write_vlm_data(toy_split / "train", tmp_path / "data")
    siglip = build_tiny_siglip_folder(tmp_path / "siglip", image_size=16)
    cfg = load_config(VLMConfig, REPO / "configs/vlm/toy_siglip.yaml", [
        f"model.tower.name_or_path={siglip}", f"model.llm.name_or_path={tiny_llm[0]}",
        f"align.data.json={tmp_path / 'data/align.json'}", f"instruct.data.json={tmp_path / 'data/instruct.json'}",
        f"align.data.image_root={toy_split / 'train'}", f"instruct.data.image_root={toy_split / 'train'}",
        "align.global_batch_size=4", "align.micro_batch_size=4", "instruct.global_batch_size=4",
        "instruct.micro_batch_size=4", "align.max_steps=2", "instruct.max_steps=2", f"output_dir={tmp_path / 'out'}"])
    align = train_vlm(cfg, "align")
    instruct = train_vlm(cfg, "instruct")
    assert align["steps"] == instruct["steps"] == 2 and instruct["data"]["skipped"] == {}
    model = VLM.from_checkpoint(tmp_path / "out" / "instruct")
    ids = model.prompt_ids("how many objects are there?" + QA_POST_PROMPT)
    assert int((ids == model.image_token_id).sum()) == model.num_image_tokens == 16
    out = model.generate(ids, torch.zeros(1, 3, 16, 16), max_new_tokens=4)
    assert 1 <= out.shape[1] <= 4


def test_ship_vlm_drops_training_state_and_loads_from_another_directory(tmp_path, monkeypatch):
    import shutil

    import torch

    from benchmarks.sweep import checkpoint_hash
    from benchmarks.tiny import build_tiny_vlm_checkpoints
    from vilex.cli.main import main
    from vlm.model import VLM

    (saved,) = build_tiny_vlm_checkpoints(tmp_path / "w", seeds=(0,))
    ckpt = tmp_path / "run" / "instruct" / "checkpoints" / "checkpoint-7"
    shutil.copytree(saved, ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"state")
    (ckpt / "rank0.pt").write_bytes(b"state")
    out = tmp_path / "assets" / "vlm" / "tiny"
    assert main(["toy", "ship-vlm", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert not (out / "optimizer.pt").exists() and not (out / "rank0.pt").exists()
    meta = json.loads((out / "vlm_config.json").read_text())
    tower_ref = meta["model"]["tower"]["name_or_path"]
    assert tower_ref.startswith("../") and (out / tower_ref).is_dir()
    assert json.loads((out / "recipe.json").read_text())["metrics"]["checkpoint"] == str(ckpt)

    monkeypatch.chdir(tmp_path / "w")  # relative references resolve against the checkpoint, not the cwd
    a, b = VLM.from_checkpoint(saved), VLM.from_checkpoint(out)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert checkpoint_hash(out) != checkpoint_hash(saved)  # different folders, but both hash their references

    # the trained LLM can be stored in bf16 (half the bytes); it loads in its configured dtype
    llm_ckpt = ckpt.parent / "checkpoint-8"
    shutil.copytree(ckpt, llm_ckpt)
    a.llm.save_pretrained(str(llm_ckpt / "llm"))
    meta = json.loads((llm_ckpt / "vlm_config.json").read_text())
    meta["components"] = ["projector", "llm"]
    (llm_ckpt / "vlm_config.json").write_text(json.dumps(meta))
    half = tmp_path / "assets" / "vlm" / "half"
    assert main(["toy", "ship-vlm", "--run", str(tmp_path / "run"), "--out", str(half),
                 "--llm-storage-dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file

    stored = load_file(str(half / "llm" / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.bfloat16}
    c = VLM.from_checkpoint(half)
    assert next(c.llm.parameters()).dtype == torch.float32
    ref = {k: v.to(torch.bfloat16).float() for k, v in a.llm.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in c.llm.state_dict().items())

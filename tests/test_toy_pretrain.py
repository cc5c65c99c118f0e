"""Tests of stage 0 of the toy world: the BPE tokenizer, the attribute probe, and the decoder / SigLIP
pretraining commands (tiny settings, a few steps each, run through the `vilex` CLI into tmp_path)."""
import json
import shutil

import numpy as np
import pytest
import torch

from vilex.cli.main import main
from toy.scenes import world
from toy.recipe import RECIPE_KEYS, SceneBatches, read_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY_DECODER = [
    "--set", "image_size=16", "--set", "unet.block_out_channels=[16,16]",
    "--set", "unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "--set", "unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
    "--set", "text_encoder.width=32", "--set", "text_encoder.layers=1",
    "--set", "train.global_batch_size=4", "--set", "train.num_workers=0", "--set", "train.log_every=1",
    "--set", "train.bf16=false", "--set", "train.threads=1",
    "--set", "gate.n_scenes=4", "--set", "gate.ddim_steps=2", "--set", "gate.grid_images=4",
]


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe") / "probe"
    code = main(["toy", "train-probe", "--out", str(folder), "--set", f"work_dir={folder.parent / 'work'}",
                 "--set", "train.max_steps=2", "--set", "train.global_batch_size=4",
                 "--set", "train.num_workers=0", "--set", "train.threads=1", "--set", "eval_scenes=8",
                 "--set", "model.channels=[8,16]", "--set", "model.hidden=16", "--set", "model.image_size=16"])
    assert code == 0
    return folder


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_every_toy_text_and_words_are_single_tokens(toy_tokenizer):
    from transformers import CLIPTokenizer

    from toy.tokenizer import decode_text, tokenizer_stats, toy_corpus

    tok = CLIPTokenizer.from_pretrained(str(toy_tokenizer))
    texts = toy_corpus(60, seed=7)  # scenes the tokenizer was not trained on
    assert any("," in t for t in texts) and any("?" in t for t in texts)
    for text in texts:
        assert decode_text(tok, tok(text).input_ids) == text
    plain = [t for t in texts if not any(c in t for c in ",?")]
    assert plain and all(tok.decode(tok(t).input_ids, skip_special_tokens=True) == t for t in plain)
    stats = tokenizer_stats(tok, texts)
    assert stats["round_trip_failures"] == 0 and stats["single_token_word_fraction"] == 1.0
    assert len(tok("a huge light purple diamond", add_special_tokens=False).input_ids) == 5


def test_tokenizer_follows_the_clip_conventions(toy_tokenizer):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    tok = CLIPTokenizer.from_pretrained(str(toy_tokenizer))
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.pad_token_id == tok.eos_token_id
    ids = tok("A RED Circle", padding="max_length", max_length=77).input_ids
    assert ids == tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4:] == [tok.eos_token_id] * 73
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert tok.unk_token_id not in tok("zebra ünïcode 42!").input_ids[1:-1]  # bytes cover any text
    assert type(AutoTokenizer.from_pretrained(str(toy_tokenizer))).__name__ in ("CLIPTokenizer", "CLIPTokenizerFast")
    assert CLIPTokenizerFast.from_pretrained(str(toy_tokenizer))("a red circle").input_ids == ids[:5]


# ----------------------------------------------------------------------------- probe
def _scene(objects, background="gray"):
    objs = tuple(world.ToyObject(shape=s, colour=c, rgb=world.OBJECT_COLOURS[c], shade=0.0, size=z, cx=x, cy=y)
                 for s, c, z, x, y in objects)
    return world.Scene(background, world.BACKGROUND_COLOURS[background], objs)


def test_probe_targets_follow_the_largest_object():
    from toy.probe import clear_largest, default_labels, probe_targets, scene_facts

    two = _scene([("circle", "red", 0.10, 0.2, 0.2), ("square", "blue", 0.20, 0.8, 0.5)], background="beige")
    assert scene_facts(two) == {"background": "beige", "count": "2", "shape": "square", "colour": "blue",
                                "cell": "middle right", "center": (0.8, 0.5)}
    labels = default_labels()
    t = probe_targets([two], labels)
    assert labels["shape"][int(t["shape"])] == "square" and labels["cell"][int(t["cell"])] == "middle right"
    assert torch.equal(t["center"], torch.tensor([[0.8, 0.5]]))
    assert clear_largest(two)
    assert not clear_largest(_scene([("circle", "red", 0.20, 0.2, 0.2), ("square", "blue", 0.21, 0.8, 0.5)]))
    assert not clear_largest(_scene([("circle", "red", 0.15, 0.2, 0.2), ("square", "blue", 0.155, 0.8, 0.5)]))
    assert labels["cell"] == ["top left", "top center", "top right", "middle left", "center", "middle right",
                              "bottom left", "bottom center", "bottom right"]


def test_probe_forward_shapes_save_load_and_judge(tmp_path):
    from toy.probe import AttributeProbe, ProbeModelConfig, judge, load_probe, save_probe, summarize

    probe = AttributeProbe(ProbeModelConfig(image_size=16, channels=[8, 16], hidden=16)).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1  # resized to the probe's 16 px inside
    out = probe(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "background": (3, 5), "count": (3, 3), "shape": (3, 4), "colour": (3, 8), "cell": (3, 9), "center": (3, 2)}
    assert float(out["center"].min()) >= 0 and float(out["center"].max()) <= 1
    save_probe(probe, tmp_path)
    again = load_probe(tmp_path)
    assert torch.equal(again(images)["colour"], out["colour"])
    scenes = [_scene([("circle", "red", 0.1, 0.5, 0.5)])] * 3
    verdict = judge(probe, images, scenes)
    assert set(verdict) == {"background", "count", "shape", "colour", "cell", "center_error"}
    assert verdict["colour"].shape == (3,) and verdict["colour"].dtype == bool
    assert summarize(verdict)["n"] == 3


def test_train_probe_writes_a_loadable_probe_with_a_recipe(tiny_probe):
    from toy.probe import load_probe

    probe = load_probe(tiny_probe)
    assert probe.config.image_size == 16 and probe.labels["count"] == ["1", "2", "3"]
    recipe = read_recipe(tiny_probe)
    assert set(RECIPE_KEYS) <= set(recipe) and recipe["asset"] == "probe" and recipe["seed"] == 0
    assert recipe["config"]["train"]["max_steps"] == 2
    heldout = recipe["metrics"]["heldout"]
    assert heldout["all"]["n"] == 8 and 0.0 <= heldout["all"]["background_accuracy"] <= 1.0
    assert heldout["chance"]["cell_accuracy"] == round(1 / 9, 4)


# ----------------------------------------------------------------------------- data stream
def test_scene_batches_are_a_function_of_seed_and_step():
    a, b = SceneBatches(3, 0, 4, 2, 16), SceneBatches(3, 2, 4, 2, 16)
    first = list(a)
    assert [s for s, _, _ in first] == [0, 1, 2, 3]
    resumed = list(b)
    assert [s for s, _, _ in resumed] == [2, 3]
    assert np.array_equal(first[2][1], resumed[0][1]) and first[2][2] == resumed[0][2]
    assert not np.array_equal(first[0][1], first[1][1])
    assert first[0][1].shape == (2, 3, 16, 16) and first[0][1].dtype == np.uint8
    # the decoder's single-object first stage (train.max_objects=1)
    single = [scene for _, _, scenes in SceneBatches(3, 0, 6, 8, 16, scene_options={"max_objects": 1})
              for scene in scenes]
    assert {len(scene.objects) for scene in single} == {1}
    assert {len(scene.objects) for _, _, scenes in first for scene in scenes} != {1}


# ----------------------------------------------------------------------------- decoder
def _run_decoder(tmp_path, toy_tokenizer, probe, out, *extra):
    return main(["toy", "pretrain-decoder", "--out", str(out), "--set", f"tokenizer={toy_tokenizer}",
                 "--set", f"work_dir={tmp_path / 'work'}", "--set", f"gate.probe={probe}", *TINY_DECODER, *extra])


def test_pretrain_decoder_writes_a_pixel_unet_folder_that_vilex_loads(tmp_path, toy_tokenizer, tiny_probe):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from vilex.models.configs import DecoderConfig
    from vilex.models.decoders import build_frozen_decoder
    from toy.decoder_model import encode_prompts

    out = tmp_path / "decoder"
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, out, "--set", "train.max_steps=3",
                        "--set", "train.device=auto") == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model_index.json", "recipe.json", "samples.png",
                                                      "scheduler", "text_encoder", "tokenizer", "train_log.jsonl",
                                                      "unet"]
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (3, 3, 16)
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert text_encoder.config.vocab_size == len(tokenizer) and unet.config.cross_attention_dim == 32
    scheduler = DDPMScheduler.from_pretrained(str(out / "scheduler"))
    assert scheduler.config.prediction_type == "v_prediction"
    # the sampling settings every sampler built from this config inherits (see NoiseSpec)
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.clip_sample is False
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "vae" not in index

    recipe = read_recipe(out)
    assert set(RECIPE_KEYS) <= set(recipe) and recipe["metrics"]["steps_done"] == 3
    gate = recipe["metrics"]["gate"]
    assert gate["heldout_scenes_used"] == 4 and gate["generated"]["coarse_captions"]["n"] == 2
    assert set(gate["generated"]["all"]) >= {"background_accuracy", "colour_accuracy", "shape_accuracy",
                                             "cell_accuracy", "count_accuracy"}
    assert [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())] == [1, 2, 3]

    # ViLex's frozen-decoder path loads it and builds the same conditioning for a prompt
    decoder = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(out)))
    assert decoder.image_size == 16 and decoder.prediction_type == "v_prediction"
    prompt = "a small red circle at the center on a gray background"
    with torch.no_grad():
        ours = encode_prompts(tokenizer, text_encoder, [prompt])
        theirs = decoder.encode_text(prompt_ids=decoder.tokenize([prompt]))
    assert torch.allclose(ours, theirs, atol=1e-5)

    # the gate can be rerun on the saved folder alone (with other settings): it rewrites metrics.gate
    assert main(["toy", "gate-decoder", "--decoder", str(out), "--set", f"gate.probe={tiny_probe}",
                 "--set", "gate.n_scenes=2", "--set", "gate.ddim_steps=1"]) == 0
    rerun = read_recipe(out)
    assert rerun["metrics"]["gate"]["heldout_scenes_used"] == 2 and rerun["gate_config"]["ddim_steps"] == 1
    assert rerun["metrics"]["steps_done"] == 3


def test_pretrain_decoder_resume_continues_from_the_saved_step(tmp_path, toy_tokenizer, tiny_probe):
    from safetensors.torch import load_file

    steps = ["--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "gate.enabled=false"]
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tmp_path / "straight", *steps) == 0
    ckpts = tmp_path / "work" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpts / "checkpoint-4")  # as if killed after step 3
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tmp_path / "resumed", *steps, "--resume", "auto") == 0
    recipe = read_recipe(tmp_path / "resumed")
    assert recipe["metrics"]["resumed_from_step"] == 2 and recipe["metrics"]["steps_done"] == 4
    assert recipe["metrics"]["gate"].startswith("disabled")
    assert [(h["from_step"], h["to_step"]) for h in recipe["metrics"]["run_history"]] == [(0, 4), (2, 4)]
    logged = [json.loads(line)["step"] for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the rows after step 2 were replaced, not duplicated
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_warm_start_fine_tune_loads_the_unet_and_scales_the_text_encoder_lr(tmp_path, toy_tokenizer, tiny_probe,
                                                                             capsys):
    from safetensors.torch import load_file

    no_gate = ["--set", "gate.enabled=false"]
    first = tmp_path / "first"
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, first, "--set", "train.max_steps=2", *no_gate) == 0
    start_unet = load_file(str(first / "unet" / "diffusion_pytorch_model.safetensors"))
    start_te = load_file(str(first / "text_encoder" / "model.safetensors"))

    tuned = tmp_path / "tuned"
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tuned, "--set", "train.max_steps=2", *no_gate,
                        "--set", f"work_dir={tmp_path / 'work2'}", "--set", f"init_unet={first}",
                        "--set", f"text_encoder.pretrained={first / 'text_encoder'}",
                        "--set", "text_encoder.trainable=true", "--set", "text_encoder.lr_scale=1e-20",
                        "--set", "train.lr=1e-2", "--set", "train.warmup_steps=0", "--set", "train.ema_decay=0.5") == 0
    unet = load_file(str(tuned / "unet" / "diffusion_pytorch_model.safetensors"))
    te = load_file(str(tuned / "text_encoder" / "model.safetensors"))
    # the UNet started from `first` (same keys, moved by a bounded amount), the text encoder barely moved at all
    assert unet.keys() == start_unet.keys()
    drift = max(float((unet[k] - start_unet[k]).abs().max()) for k in unet)
    assert 1e-4 < drift < 0.1
    assert all(torch.allclose(te[k], start_te[k], atol=1e-12) for k in te)

    # a warm start from a UNet of another shape is refused in one line
    capsys.readouterr()
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tmp_path / "bad", "--set", "train.max_steps=1", *no_gate,
                        "--set", f"init_unet={first}", "--set", "unet.block_out_channels=[16,32]") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: init_unet {first}: its UNet differs")


def test_pretrain_decoder_without_a_probe_fails_in_one_line(tmp_path, toy_tokenizer, capsys):
    code = _run_decoder(tmp_path, toy_tokenizer, tmp_path / "no-probe", tmp_path / "decoder")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: gate.probe: attribute probe not found: ")
    assert not (tmp_path / "decoder").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_pretrain_decoder_on_a_missing_cuda_device_fails_in_one_line(tmp_path, toy_tokenizer, tiny_probe, capsys):
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tmp_path / "d", "--set", "train.device=cuda") == 2
    assert capsys.readouterr().err.strip() == "error: train.device=cuda: no CUDA device is available here"


# ----------------------------------------------------------------------------- siglip
TINY_SIGLIP = ["--set", "train.max_steps=3", "--set", "train.global_batch_size=6", "--set", "train.num_workers=0",
               "--set", "train.threads=1", "--set", "vision.width=32", "--set", "vision.layers=1",
               "--set", "vision.image_size=16", "--set", "text.width=32", "--set", "text.layers=1",
               "--set", "eval_scenes=12", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory, toy_tokenizer):
    out = tmp_path_factory.mktemp("siglip") / "siglip"
    assert main(["toy", "pretrain-siglip", "--out", str(out), "--set", f"tokenizer={toy_tokenizer}",
                 "--set", f"work_dir={out.parent / 'work'}", *TINY_SIGLIP]) == 0
    return out


def test_pretrain_siglip_saves_the_model_and_its_vision_tower(tiny_siglip):
    from transformers import SiglipModel, SiglipVisionModel

    out = tiny_siglip
    full = SiglipModel.from_pretrained(str(out))
    vision = SiglipVisionModel.from_pretrained(str(out / "vision"))
    assert vision.config.image_size == 16 and vision.config.patch_size == 4
    full_state = full.vision_model.state_dict()
    assert all(torch.equal(v, full_state[k]) for k, v in vision.state_dict().items())
    recipe = read_recipe(out)
    assert set(RECIPE_KEYS) <= set(recipe) and recipe["metrics"]["steps_done"] == 3
    fine = recipe["metrics"]["retrieval_heldout"]["fine_captions"]
    assert fine["n"] == 12 and {"top1", "top5", "chance_top1", "chance_top5"} <= set(fine)
    pixels = torch.zeros(1, 3, 16, 16)
    assert vision(pixel_values=pixels).last_hidden_state.shape == (1, 16, 32)


# ----------------------------------------------------------------------------- text encoder (LiT)
def test_pretrained_frozen_text_encoder_is_what_the_decoder_ships(tmp_path, toy_tokenizer, tiny_siglip,
                                                                  tiny_probe, capsys):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    te = tmp_path / "text_encoder"
    assert main(["toy", "pretrain-text-encoder", "--out", str(te), "--set", f"tokenizer={toy_tokenizer}",
                 "--set", f"work_dir={tmp_path / 'te_work'}",
                 "--set", f"image_tower={tiny_siglip}", "--set", "text_encoder.width=32",
                 "--set", "text_encoder.layers=1", "--set", "train.max_steps=3", "--set", "train.global_batch_size=6",
                 "--set", "train.num_workers=0", "--set", "train.log_every=1", "--set", "eval_scenes=12"]) == 0
    recipe = read_recipe(te)
    assert recipe["metrics"]["steps_done"] == 3 and recipe["metrics"]["retrieval_heldout"]["fine_captions"]["n"] == 12
    assert set(recipe["metrics"]["word_sensitivity"]["after_training"]) == {"background", "colour", "shape", "position_fine",
                                                                             "position"}
    start = CLIPTextModel.from_pretrained(str(te)).state_dict()
    assert not any(k.startswith("head") for k in start) and (te / "head.safetensors").is_file()

    out = tmp_path / "decoder"
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, out, "--set", "train.max_steps=2",
                        "--set", "gate.enabled=false", "--set", f"text_encoder.pretrained={te}",
                        "--set", "text_encoder.trainable=false") == 0
    shipped = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert shipped.keys() <= start.keys() and all(torch.equal(shipped[k], start[k]) for k in shipped)

    # a pretrained encoder of another size is refused in one line, before training
    capsys.readouterr()
    assert _run_decoder(tmp_path, toy_tokenizer, tiny_probe, tmp_path / "bad", "--set", "train.max_steps=1",
                        "--set", f"text_encoder.pretrained={te}", "--set", "text_encoder.width=64",
                        "--set", "text_encoder.heads=2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "text_encoder.pretrained" in err and "'width': 32" in err


def test_text_encoder_continues_a_pretrained_one_with_the_attribute_and_swap_margin_losses(tmp_path, toy_tokenizer,
                                                                                           tiny_siglip):
    from safetensors.torch import load_file

    common = ["--set", f"tokenizer={toy_tokenizer}", "--set", f"image_tower={tiny_siglip}",
              "--set", "text_encoder.width=32", "--set", "text_encoder.layers=1", "--set", "train.global_batch_size=6",
              "--set", "train.num_workers=0", "--set", "train.log_every=1", "--set", "eval_scenes=12"]
    first, second = tmp_path / "te1", tmp_path / "te2"
    assert main(["toy", "pretrain-text-encoder", "--out", str(first), *common, "--set", "train.max_steps=2",
                 "--set", f"work_dir={tmp_path / 'work1'}"]) == 0
    assert main(["toy", "pretrain-text-encoder", "--out", str(second), *common, "--set", "train.max_steps=2",
                 "--set", f"work_dir={tmp_path / 'work2'}",
                 "--set", f"text_encoder.pretrained={first}", "--set", "train.attribute_weight=1.0",
                 "--set", "train.swap_margin=0.5", "--set", "train.sensitivity_every=1"]) == 0
    recipe = read_recipe(second)
    assert recipe["config"]["train"]["swap_margin"] == 0.5 and recipe["config"]["text_encoder"]["pretrained"]
    heads = load_file(str(second / "head.safetensors"))
    assert any(k.startswith("attributes.") for k in heads) and "logit_bias" in heads
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # it trained on
    # the continued run started from the first one's projection head, not a fresh one
    assert float((heads["head.weight"] - load_file(str(first / "head.safetensors"))["head.weight"]).abs().max()) < 0.1


def test_word_swaps_change_exactly_one_word_of_the_named_kind():
    from toy.pretrain_text_encoder import _swap_word

    caption = "a large green diamond at the middle left and a small red circle at the top center on a white background"
    assert _swap_word(caption, "background").endswith("on a beige background")
    for kind, old, new in [("colour", "green", "blue"), ("shape", "diamond", None), ("position", "left", "right")]:
        swapped = _swap_word(caption, kind)
        diff = [(a, b) for a, b in zip(caption.split(), swapped.split()) if a != b]
        assert len(diff) == 1 and diff[0][0] == old and (new is None or diff[0][1] == new)
    assert _swap_word("a small red circle at the center on a gray background", "position") is None


def test_sigmoid_loss_treats_equal_captions_as_positives_and_chance_counts_duplicates():
    from toy.pretrain_siglip import retrieval_chance, sigmoid_loss_with_duplicates

    logits = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    low = sigmoid_loss_with_duplicates(logits, ["a", "a", "b"])
    high = sigmoid_loss_with_duplicates(logits, ["a", "c", "b"])
    assert float(low) == pytest.approx(-3 * float(torch.nn.functional.logsigmoid(torch.tensor(5.0))), rel=1e-5)
    assert float(high) > float(low) + 3
    assert retrieval_chance(["a", "b", "c", "d"], 1) == pytest.approx(0.25)
    assert retrieval_chance(["a", "a", "b", "c"], 1) == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert retrieval_chance(["a", "b"], 5) == 1.0


def test_hard_negatives_differ_in_one_word_and_a_negative_equal_to_a_caption_is_its_positive():
    from toy.pretrain_text_encoder import hard_negative_captions, sigmoid_loss_rows
    from toy.recipe import heldout_scenes

    scenes = heldout_scenes(0, 16)
    texts = [world.caption_coarse(s) for s in scenes[:8]] + [world.caption_fine(s) for s in scenes[8:]]
    negatives = hard_negative_captions(texts, 2, np.random.default_rng(0))
    assert len(negatives) == 2 * len(texts)
    for i, neg in enumerate(negatives):
        a, b = texts[i // 2].split(), neg.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [-4.0, 4.0]])  # rows: caption a, caption b, "negative" == b
    low = sigmoid_loss_rows(logits, ["a", "b", "b"], ["a", "b"])
    high = sigmoid_loss_rows(logits, ["a", "b", "c"], ["a", "b"])
    assert float(low) < 0.1 < float(high)


def test_shipped_vilex_config_references_are_made_repository_relative(tmp_path):
    from toy.claims_report import repo_relative_references

    root = tmp_path / "repo"
    (root / "assets" / "toy" / "decoder").mkdir(parents=True)
    config = tmp_path / "vilex_config.json"
    config.write_text(json.dumps({"vit": {"name_or_path": "google/siglip-so400m-patch14-224"},
                                  "decoder": {"name_or_path": str(root / "assets" / "toy" / "decoder"),
                                              "dtype": "float32"}}))
    repo_relative_references(config, root)
    written = json.loads(config.read_text())
    assert written["decoder"] == {"name_or_path": "assets/toy/decoder", "dtype": "float32"}
    assert written["vit"]["name_or_path"] == "google/siglip-so400m-patch14-224"  # hub ids untouched
    outside = {"vit": {"name_or_path": str(tmp_path / "elsewhere")}, "decoder": {"name_or_path": "/opt/sd"}}
    config.write_text(json.dumps(outside))
    repo_relative_references(config, root)
    assert json.loads(config.read_text()) == outside  # paths outside the repository stay absolute


def test_high_noise_fraction_draws_that_share_of_timesteps_from_the_noisiest_range():
    from vilex.errors import ConfigError
    from toy.pretrain_decoder import DecoderTrainSpec, sample_timesteps

    plain = sample_timesteps(32, 1000, DecoderTrainSpec(), torch.Generator().manual_seed(5))
    assert torch.equal(plain, torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(5)))  # share 0
    spec = DecoderTrainSpec(high_noise_fraction=0.25, high_noise_min_t=950)
    t = sample_timesteps(32, 1000, spec, torch.Generator().manual_seed(5))
    assert ((t[:8] >= 950) & (t[:8] < 1000)).all() and torch.equal(t[8:], plain[8:])
    assert torch.equal(t, sample_timesteps(32, 1000, spec, torch.Generator().manual_seed(5)))  # resumable
    with pytest.raises(ConfigError, match="high_noise_min_t"):
        sample_timesteps(32, 1000, DecoderTrainSpec(high_noise_fraction=0.5, high_noise_min_t=1000),
                         torch.Generator().manual_seed(5))

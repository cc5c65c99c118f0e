"""VLM training end to end on tiny models: align -> instruct (continuing from align's checkpoint), checkpoint
contents loadable on their own, exact resume after SIGKILL, and the HF Llava export round trip (greedy generate
equal)."""
import json

import pytest
import torch
from pretrain_helpers import REPO, run_and_kill, run_cli, summary

from vilex.cli.main import main as vilex_main
from vilex.errors import UserError
from vlm.model import VLM
from vlm.projector import load_projectors
from vlm.tiny import build_tiny_world
from vlm.train import train_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = REPO / "configs" / "vlm" / "tiny.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("train_world"))


@pytest.fixture(scope="module")
def two_stages(world, tmp_path_factory):
    """align (projector) then instruct (projector + LLM, init_from: previous), in-process."""
    out = tmp_path_factory.mktemp("runs")
    cfg = world.config(out)
    align = train_vlm(cfg, "align")
    instruct = train_vlm(cfg, "instruct")
    return cfg, align, instruct


def test_align_then_instruct_checkpoints(two_stages):
    cfg, align, instruct = two_stages
    assert align["steps"] == instruct["steps"] == 4  # 16 samples / global batch 4
    assert align["data"]["samples"] == instruct["data"]["samples"] == 16
    assert align["data"]["skipped"] == {} and 0 <= instruct["data"]["padding_fraction"] < 0.2
    assert all(torch.isfinite(torch.tensor(s["losses"])).all() for s in (align, instruct))

    a_ckpt, i_ckpt = cfg.stage_dir("align") / "checkpoints", cfg.stage_dir("instruct") / "checkpoints"
    assert sorted(p.name for p in a_ckpt.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    a4 = a_ckpt / "checkpoint-4"
    assert sorted(p.name for p in a4.iterdir()) == ["manifest.json", "optimizer.pt", "projector", "rank0.pt",
                                                    "tokenizer", "trainer_state.json", "vlm_config.json"]
    assert json.loads((a4 / "vlm_config.json").read_text())["components"] == ["projector"]
    i4 = i_ckpt / "checkpoint-4"
    assert {"projector", "llm", "tokenizer", "optimizer.pt"} <= {p.name for p in i4.iterdir()}
    assert not (i4 / "tower").exists()  # the frozen tower is referenced, not copied

    # the extracted parts load on their own
    from transformers import AutoModelForCausalLM

    projector = load_projectors(a4 / "projector")
    assert set(projector) == {"patch"}
    llm = AutoModelForCausalLM.from_pretrained(i4 / "llm")
    assert type(llm).__name__ == "Qwen2ForCausalLM"

    # instruct started from align's projector (not a fresh init): its first loss is align-trained
    fresh = VLM.build(cfg.model)
    started = VLM.build(cfg.model, weights_from=a4)
    for name, p in projector.state_dict().items():
        assert torch.equal(started.projectors.state_dict()[name], p)
        assert not torch.equal(fresh.projectors.state_dict()[name], p)


def test_full_stage_trains_the_tower_and_saves_it(two_stages):
    import dataclasses

    from safetensors.torch import load_file

    cfg, _, _ = two_stages
    cfg = dataclasses.replace(cfg, full=dataclasses.replace(cfg.instruct, tower_lr=5e-4, max_steps=2))
    result = train_vlm(cfg, "full")
    ckpt = cfg.stage_dir("full") / "checkpoints" / "checkpoint-2"
    assert result["steps"] == 2
    meta = json.loads((ckpt / "vlm_config.json").read_text())
    assert meta["components"] == ["projector", "tower", "llm"] and meta["stage"] == "full"
    saved = load_file(str(ckpt / "tower" / "model.safetensors"))  # a plain SiglipVisionModel folder
    original = load_file(str(cfg.model.tower.name_or_path + "/model.safetensors"))
    changed = [k for k in saved if not torch.equal(saved[k], original[k])]
    assert changed and not any(k.startswith(("post_layernorm", "encoder.layers.2")) for k in changed)  # unused: frozen
    reloaded = VLM.from_checkpoint(ckpt)
    assert torch.equal(reloaded.tower.vit.state_dict()[changed[0]], saved[changed[0]])


def test_init_from_previous_without_a_previous_run(world, tmp_path):
    cfg = world.config(tmp_path / "empty")
    with pytest.raises(UserError, match="instruct.init_from is 'previous' but stage 'align' has no checkpoint under "):
        train_vlm(cfg, "instruct")


def test_export_round_trip_greedy_generate_equal(two_stages, tmp_path):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vlm.data import ImageSpec

    cfg, _, _ = two_stages
    ckpt = cfg.stage_dir("instruct")
    assert vilex_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = LlavaProcessor.from_pretrained(tmp_path / "hf")
    assert hf.config.vision_feature_select_strategy == "full" and hf.config.vision_feature_layer == -2
    ours = VLM.from_checkpoint(ckpt)
    assert hf.config.image_seq_length == ours.num_image_tokens == 16
    assert hf.config.image_token_index == ours.image_token_id

    world_root = cfg.instruct.data.image_root
    image = Image.open(world_root / "images" / "0000.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square?"}]}]
    enc = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                    return_tensors="pt")
    ids = ours.prompt_ids("what color is the square?")
    assert torch.equal(enc["input_ids"], ids)  # processor + chat template = our training-time text
    pixels = ImageSpec(ours.image_size, (0.5,) * 3, (0.5,) * 3, "resize").render(image).unsqueeze(0)
    torch.testing.assert_close(enc["pixel_values"], pixels, atol=1e-2, rtol=0)

    ours_new = ours.generate(ids, pixels, max_new_tokens=10)
    hf_new = hf.generate(**enc, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    assert ours_new.shape[1] > 0 and torch.equal(ours_new, hf_new)
    with torch.no_grad():
        embeds, _ = ours.embed(ids, enc["pixel_values"])
        torch.testing.assert_close(hf(**enc).logits, ours.llm(inputs_embeds=embeds).logits)


def test_export_vilex_tower_and_refuse_vilex_tokens(world, tmp_path, capsys):
    for tower in ("vilex", "vilex_tokens"):
        cfg = world.config(tmp_path / tower, tower_type=tower)
        VLM.build(cfg.model).save_components((tmp_path / f"ckpt-{tower}").mkdir() or tmp_path / f"ckpt-{tower}", ())
    assert vilex_main(["export-hf", "--checkpoint", str(tmp_path / "ckpt-vilex"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert vilex_main(["export-hf", "--checkpoint", str(tmp_path / "ckpt-vilex_tokens"),
                       "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: export-hf: tower type 'vilex_tokens' cannot be exported to HF Llava")
    assert not (tmp_path / "hf2").exists()


def test_cli_reports_config_errors_in_one_line(world, tmp_path, capsys):
    args = ["train-vlm", "--config", str(TINY), "--stage", "full"]
    for o in world.overrides(tmp_path):
        args += ["--set", o]
    assert vilex_main(args) == 2
    assert capsys.readouterr().err.strip() == ("error: stage 'full' is not defined in this config "
                                              "(add a 'full:' section)")
    assert vilex_main(args[:4] + ["align", "--set", "align.lrr=1"]) == 2
    assert "unknown key 'align.lrr' (did you mean 'align.lr'?)" in capsys.readouterr().err


def test_resume_after_sigkill_gives_the_same_losses(world, tmp_path):
    """The reference runs in-process (one thread, like the OMP_NUM_THREADS=1 subprocesses: same kernels)."""
    from vilex.config import load_config
    from vlm.config import VLMConfig

    common = [*world.overrides(tmp_path / "x"), "instruct.init_from=null", "instruct.epochs=8",
              "instruct.checkpoint_every=4"]

    def args(out):
        a = ["train-vlm", "--config", str(TINY), "--stage", "instruct"]
        for o in [*common, f"output_dir={out}"]:
            a += ["--set", o]
        return a

    reference = train_vlm(load_config(VLMConfig, TINY, [*common, f"output_dir={tmp_path / 'reference'}"]),
                          "instruct")["losses"]
    assert len(reference) == 32

    killed = tmp_path / "killed"
    rc = run_and_kill(args(killed), killed / "instruct", after_checkpoint=4)
    assert rc != 0, "the run finished before it could be killed (the test did not test a kill)"
    assert not (killed / "instruct" / "summary.json").exists()
    resumed = run_cli(args(killed) + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(killed / "instruct")["losses"] == reference  # bit-identical, every step

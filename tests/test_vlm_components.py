"""VLM parts on tiny models: tower registry and feature layers, ViLex towers from a stage-1 checkpoint, projector
names/save/load, the stage -> trainable map, and LLMs loaded by path (the real-weights path)."""
import logging

import pytest
import torch

from vilex.errors import UserError
from vilex.registry import RegistryError
from vlm.config import TowerConfig
from vlm.model import STAGE_TRAINS, VLM
from vlm.projector import PROJECTORS, build_projectors, load_projectors, save_projectors
from vlm.tiny import build_tiny_llm, build_tiny_world
from vlm.towers import build_tower

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("vlm_world"), n_align=4, n_instruct=4)


def test_unknown_tower_lists_the_registered_ones():
    with pytest.raises(RegistryError) as e:
        build_tower(TowerConfig(type="eva", name_or_path="x"))
    assert str(e.value) == "unknown VLM vision tower 'eva'. Registered: siglip, vilex, vilex_tokens"
    assert PROJECTORS.names() == ["linear", "mlp2x_gelu"]


def test_siglip_tower_takes_hf_hidden_state_with_all_patch_tokens(world):
    from transformers import SiglipVisionModel

    pixels = torch.randn(2, 3, 16, 16)
    hf = SiglipVisionModel.from_pretrained(world.siglip).eval()
    ref = hf(pixels, output_hidden_states=True).hidden_states
    for layer in (-2, -1, 1):
        tower = build_tower(TowerConfig(type="siglip", name_or_path=str(world.siglip), feature_layer=layer)).eval()
        out = tower(pixels)
        assert list(out) == ["patch"]
        assert out["patch"].shape == (2, 16, 32)  # (16/4)^2 patches, no CLS dropped
        torch.testing.assert_close(out["patch"], ref[layer])  # HF Llava's vision_feature_layer convention
    # the last block and the final norm cannot reach layer -2: kept frozen even when the tower trains
    tower = build_tower(TowerConfig(type="siglip", name_or_path=str(world.siglip), feature_layer=-2))
    unused = {id(p) for p in tower.unused_parameters()}
    assert {id(p) for p in tower.vit.encoder.layers[-1].parameters()} <= unused
    assert {id(p) for p in tower.vit.post_layernorm.parameters()} <= unused
    assert not {id(p) for p in tower.vit.encoder.layers[0].parameters()} & unused
    with pytest.raises(UserError, match="tower.feature_layer=9 is out of range"):
        build_tower(TowerConfig(type="siglip", name_or_path=str(world.siglip), feature_layer=9))


def test_vilex_towers_use_the_stage1_checkpoint(world):
    from vilex.models.encoder import ViLexEncoder
    from vilex.models.vilex_model import read_vilex_config

    stage1 = ViLexEncoder.from_saved(world.vilex, read_vilex_config(world.vilex).vit).eval()
    pixels = torch.randn(2, 3, 16, 16)
    vilex = build_tower(TowerConfig(type="vilex", name_or_path=str(world.vilex))).eval()
    for (name, a), b in zip(vilex.vit.state_dict().items(), stage1.vit.model.state_dict().values()):
        assert torch.equal(a, b), name
    tokens_tower = build_tower(TowerConfig(type="vilex_tokens", name_or_path=str(world.vilex),
                                           num_vilex_tokens=4)).eval()
    out = tokens_tower(pixels)
    assert list(out) == ["patch", "vilex_tokens"]  # ViLex tokens appended after the patch tokens
    assert out["vilex_tokens"].shape == (2, 4, 24)
    assert tokens_tower.num_image_tokens == 16 + 4
    torch.testing.assert_close(out["vilex_tokens"], stage1(pixels)[:, :4])  # the first m tokens of the encoder
    with pytest.raises(UserError, match="num_vilex_tokens=7: this pooler makes 6 tokens"):
        build_tower(TowerConfig(type="vilex_tokens", name_or_path=str(world.vilex), num_vilex_tokens=7))
    with pytest.raises(UserError, match="is not a ViLex checkpoint"):
        build_tower(TowerConfig(type="vilex", name_or_path=str(world.siglip)))


def test_mlp2x_gelu_matches_hf_llava_projector_and_saves_on_its_own(tmp_path):
    from transformers import LlavaConfig, SiglipVisionConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projectors = build_projectors("mlp2x_gelu", {"patch": (16, 32)}, 48)
    cfg = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32).to_dict(),
                      text_config={"model_type": "qwen2", "hidden_size": 48}, projector_hidden_act="gelu")
    hf = LlavaMultiModalProjector(cfg)
    hf.load_state_dict(projectors["patch"].state_dict())  # same names: linear_1, linear_2
    x = torch.randn(3, 16, 32)
    torch.testing.assert_close(hf(x), projectors["patch"](x))
    save_projectors(tmp_path / "projector", projectors)
    loaded = load_projectors(tmp_path / "projector")
    torch.testing.assert_close(loaded["patch"](x), projectors["patch"](x))
    assert loaded.specs == {"patch": {"type": "mlp2x_gelu", "in_features": 32, "out_features": 48}}
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load_projectors(tmp_path / "nope")


def test_stage_map_sets_requires_grad_and_logs_one_line_per_component(world, caplog):
    assert STAGE_TRAINS == {"align": ("projector",), "instruct": ("projector", "llm"),
                            "full": ("projector", "llm", "tower")}
    vlm = VLM.build(world.config(world.root / "out").model)
    caplog.set_level(logging.INFO, logger="vlm.model")
    for stage, trains in STAGE_TRAINS.items():
        caplog.clear()
        vlm.set_trainable(trains)
        lines = [r.getMessage().split() for r in caplog.records]
        assert [(w[0], w[1]) for w in lines] == [(c, "trainable" if c in trains else "frozen")
                                                 for c in ("tower", "projector", "llm")]
        assert all(p.requires_grad for p in vlm.projectors.parameters())
        assert all(p.requires_grad == ("llm" in trains) for p in vlm.llm.parameters())
        groups = {g["name"]: g["lr"] for g in vlm.parameter_groups(1e-3, tower_lr=2e-6)}
        assert groups == {"projector": 1e-3, **({"llm": 1e-3} if "llm" in trains else {}),
                          **({"tower": 2e-6} if "tower" in trains else {})}
    trainable_tower = {id(p) for p in vlm.tower.parameters() if p.requires_grad}
    assert trainable_tower and not trainable_tower & {id(p) for p in vlm.tower.unused_parameters()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_tiny_llm_is_loaded_by_path(tmp_path, world, arch):
    from safetensors.torch import load_file

    llm_dir = build_tiny_llm(tmp_path / f"tiny-{arch}", arch=arch)
    cfg = world.config(tmp_path / "out")
    cfg.model.llm.name_or_path = str(llm_dir)
    vlm = VLM.build(cfg.model)
    assert type(vlm.llm).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    saved = load_file(str(llm_dir / "model.safetensors"))
    state = vlm.llm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # the saved weights, not a random init
    assert vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id) == "<image>"
    assert vlm.image_token_id < vlm.llm.get_input_embeddings().num_embeddings
    cfg.model.llm.name_or_path = str(tmp_path / "missing")
    with pytest.raises(UserError, match="tokenizer: folder not found"):
        VLM.build(cfg.model)


def test_continuing_from_a_checkpoint_checks_tower_and_llm(world, tmp_path, monkeypatch):
    cfg = world.config(tmp_path / "out")
    VLM.build(cfg.model).save_components((tmp_path / "ckpt").mkdir() or tmp_path / "ckpt", ())
    monkeypatch.chdir(world.root)  # a relative reference to the same folder is the same reference
    cfg.model.tower.name_or_path = "siglip"
    assert VLM.build(cfg.model, weights_from=tmp_path / "ckpt").loaded_components == ("projector",)
    cfg.model.tower.feature_layer = -3
    with pytest.raises(UserError, match=r"ckpt was trained with tower siglip:.*siglip and LLM .*llm; this config"):
        VLM.build(cfg.model, weights_from=tmp_path / "ckpt")
    with pytest.raises(UserError, match="VLM checkpoint not found"):
        VLM.build(cfg.model, weights_from=tmp_path / "missing")

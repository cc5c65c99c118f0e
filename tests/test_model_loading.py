"""Tests of the real-weights path (hub id and local folder through the same from_pretrained call, clear
offline errors), the registries, the timm tower and config validation."""
import pytest
import torch

from vilex.config import from_dict
from vilex.errors import ConfigError, UserError
from vilex.models import FROZEN_DECODERS, VISION_TOWERS, ViLexConfig, build_frozen_decoder, build_vision_tower
from vilex.models.configs import DecoderConfig, VisionTowerConfig
from vilex.models.tiny import build_tiny_pixel_decoder, build_tiny_siglip


def test_local_folder_and_hub_id_go_through_the_same_from_pretrained(tmp_path, monkeypatch):
    from transformers import SiglipVisionModel

    folder = build_tiny_siglip(tmp_path / "siglip")
    seen = []
    original = SiglipVisionModel.from_pretrained.__func__

    def spy(cls, name_or_path, *args, **kwargs):
        seen.append(name_or_path)
        return original(cls, name_or_path, *args, **kwargs)

    monkeypatch.setattr(SiglipVisionModel, "from_pretrained", classmethod(spy))
    tower = build_vision_tower(VisionTowerConfig(type="siglip", name_or_path=str(folder)))
    assert tower.hidden_size == 32 and tower(torch.rand(2, 3, 16, 16)).shape == (2, 16, 32)
    with pytest.raises(UserError, match=r"^vision tower \(siglip\): 'google/not-a-cached-model-xyz' is neither a "
                                        r"local folder nor a model in the local Hugging Face cache \(HF_HUB_OFFLINE=1"):
        build_vision_tower(VisionTowerConfig(type="siglip", name_or_path="google/not-a-cached-model-xyz"))
    assert seen == [str(folder), "google/not-a-cached-model-xyz"]


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^decoder text encoder: folder not found: /no/such/sd-folder$"):
        build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path="/no/such/sd-folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"^decoder: .*/empty is not a diffusers pipeline folder: missing unet/, "
                                        r"text_encoder/, tokenizer/, scheduler/$"):
        build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(empty)))
    (empty / "unet").mkdir()  # present but empty: the library's message, on one line
    for name in ("text_encoder", "tokenizer", "scheduler"):
        (empty / name).mkdir()
    with pytest.raises(UserError, match=r"^decoder text encoder: cannot load from folder .*empty"):
        build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(empty)))


def test_uncached_hub_id_and_mismatched_tokenizer(tmp_path):
    with pytest.raises(UserError, match=r"^decoder text encoder: 'someorg/not-cached-sd' is neither a local folder "
                                        r"nor a model in the local Hugging Face cache"):
        build_frozen_decoder(DecoderConfig(name_or_path="someorg/not-cached-sd"))
    folder = build_tiny_pixel_decoder(tmp_path / "pixel")
    for f in (folder / "tokenizer").iterdir():  # an empty tokenizer/ makes transformers build a tiny default one
        f.unlink()
    with pytest.raises(UserError, match=r"the tokenizer has \d tokens but the text encoder's vocabulary has \d+: "
                                        r"tokenizer/ and text_encoder/ must come from the same model$"):
        build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(folder)))


def test_decoder_loads_from_a_local_folder(tmp_path):
    folder = build_tiny_pixel_decoder(tmp_path / "pixel", image_size=16)
    decoder = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(folder)))
    assert (decoder.embed_width, decoder.context_length, decoder.image_size) == (32, 77, 16)
    assert decoder.model_space_shape == (3, 16, 16) and decoder.vae is None
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(decoder.from_model_space(decoder.to_model_space(images)), images)


def test_registries_name_their_entries():
    assert VISION_TOWERS.names() == ["siglip", "timm"]
    assert FROZEN_DECODERS.names() == ["pixel_unet", "stable_diffusion", "stable_diffusion_3", "stable_diffusion_xl"]
    with pytest.raises(UserError, match=r"^unknown frozen decoder 'stable_difusion'. Did you mean 'stable_diffusion'"):
        build_frozen_decoder(DecoderConfig(type="stable_difusion", name_or_path="x"))


def test_timm_tower_random_init_save_load_and_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from vilex.models.towers import TimmTower

    init = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    cfg = VisionTowerConfig(type="timm", name_or_path="vit_tiny_patch16_224", init=init, image_size=16,
                            feature_layer=-2)
    tower = build_vision_tower(cfg).eval()
    pixels = torch.rand(2, 3, 16, 16)
    tokens = tower(pixels)
    assert tokens.shape == (2, 16, 32) and tower.image_size == 16
    assert not any(p.requires_grad for p in tower.model.blocks[-1].parameters())
    expected = tower.model.forward_intermediates(pixels, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(tokens, expected)
    tower.save_pretrained(tmp_path / "vit")
    reloaded = TimmTower.from_saved(tmp_path / "vit", cfg).eval()
    torch.testing.assert_close(reloaded(pixels), tokens)
    save_file(dict(tower.model.state_dict()), str(tmp_path / "weights.safetensors"))
    cfg.checkpoint = str(tmp_path / "weights.safetensors")
    torch.testing.assert_close(build_vision_tower(cfg).eval()(pixels), tokens)
    cfg.checkpoint = str(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match=r"checkpoint file not found: .*missing.safetensors$"):
        build_vision_tower(cfg)


def test_feature_layer_out_of_range():
    from vilex.models.tiny import tiny_siglip_init

    with pytest.raises(UserError, match=r"^vit.feature_layer=-4 is out of range for a tower with 2 layers "
                                        r"\(valid: -3..2\)$"):
        build_vision_tower(VisionTowerConfig(init=tiny_siglip_init(), feature_layer=-4))


def test_config_from_yaml_dict_validates():
    cfg = from_dict(ViLexConfig, {"vit": {"name_or_path": "google/siglip-base-patch16-224", "feature_layer": -2},
                                  "pooler": {"num_tokens": 16, "width": 64, "heads": 4},
                                  "decoder": {"type": "pixel_unet", "name_or_path": "x", "dtype": "bfloat16"}})
    assert cfg.pooler.num_tokens == 16 and cfg.decoder.dtype == "bfloat16" and cfg.vit.feature_layer == -2
    with pytest.raises(ConfigError, match=r"^pooler.num_tokens: must be <= 75, got 76$"):
        from_dict(ViLexConfig, {"pooler": {"num_tokens": 76}})
    with pytest.raises(ConfigError, match=r"pooler.width \(30\) must be divisible by pooler.heads \(4\)"):
        from_dict(ViLexConfig, {"pooler": {"width": 30, "heads": 4}})
    with pytest.raises(ConfigError, match=r"give exactly one of 'name_or_path' \(pretrained\) or 'init'"):
        from_dict(ViLexConfig, {"vit": {"name_or_path": "a", "init": {"hidden_size": 32}}})
    with pytest.raises(ConfigError, match=r"^pooler.output_norm: must be one of"):
        from_dict(ViLexConfig, {"pooler": {"output_norm": "rms"}})
    with pytest.raises(ConfigError, match=r"taildrop.min_tokens \(9\) must be <= pooler.num_tokens \(8\)"):
        from_dict(ViLexConfig, {"pooler": {"num_tokens": 8}, "taildrop": {"min_tokens": 9}})

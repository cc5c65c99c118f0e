"""SDXL as a frozen decoder: diffusers' own conditioning for plain prompts, ViLex tokens in both text encoders (one
pooler head each), the same layout in training and inference, no gradient into frozen parts, a tiny pretraining run
that learns and resumes bit-identically, reconstruct/compose through the CLI, and the real-scale config at SDXL's
public parameter counts on the meta device."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import assert_learns_and_resumes_bit_identically, env, overrides

from vilex.config import load_config
from vilex.models.configs import DecoderConfig
from vilex.models.decoders import build_frozen_decoder
from vilex.models.tiny import build_tiny_sdxl
from vilex.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "vilex" / "tiny.yaml"
SDXL_HUB = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPTS = ["a red square", "two blue circles and a green triangle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toy.scenes.generate import generate_dataset

    root = tmp_path_factory.mktemp("sdxl_world")
    build_tiny_sdxl(root / "decoder")
    generate_dataset(root / "data", n=24, seed=0, size=16, overwrite=True, progress=False)
    return root


@pytest.fixture(scope="module")
def decoder(world):
    return build_frozen_decoder(DecoderConfig(type="stable_diffusion_xl", name_or_path=str(world / "decoder")))


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_plain_prompts_condition_exactly_as_diffusers_encode_prompt(world, clip_skip):
    from diffusers import StableDiffusionXLPipeline

    ours = build_frozen_decoder(DecoderConfig(type="stable_diffusion_xl", name_or_path=str(world / "decoder"),
                                              clip_skip=clip_skip))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(world / "decoder"))
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True, clip_skip=clip_skip or None)
    cond = ours.encode_text(None, None, ours.tokenize(PROMPTS))
    assert cond["prompt_embeds"].shape == (2, 77, 32 + 48) and cond["text_embeds"].shape == (2, 16)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    # classifier-free guidance contrasts with zeros, as the pipeline does without a negative prompt
    empty = ours.unconditional(2)
    assert torch.equal(empty["prompt_embeds"], negative) and torch.equal(empty["text_embeds"], negative_pooled)


def test_vilex_tokens_enter_both_encoders_and_only_the_tokens_learn(decoder):
    torch.manual_seed(0)
    assert decoder.token_heads == [32, 48] and decoder.embedding_table.shape[1] == 80
    tokens = torch.randn(2, 6, 80, requires_grad=True)
    cond, layout = decoder.encode_text(tokens, 4, return_layout=True)
    assert layout.vilex_mask[:, 1:5].all() and not layout.vilex_mask[:, 5:].any()
    loss = decoder.diffusion_loss(torch.randn(2, *decoder.model_space_shape), cond,
                                  torch.Generator().manual_seed(0)).mean()
    loss.backward()
    grad = tokens.grad
    assert grad[:, :4, :32].abs().sum() > 0 and grad[:, :4, 32:].abs().sum() > 0  # each head reaches its encoder
    assert grad[:, 4:].abs().sum() == 0  # tokens beyond m are dropped
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())


def test_training_and_inference_lay_tokens_out_alike_for_every_m(decoder):
    """Training keeps the first m of n tokens (TailDrop); inference passes m tokens: the same conditioning."""
    torch.manual_seed(1)
    tokens = torch.randn(1, 6, 80)
    pooled = []
    for m in range(1, 7):
        train = decoder.encode_text(tokens, torch.tensor([m]))
        infer = decoder.encode_text(tokens[:, :m], m)
        for key in train:
            torch.testing.assert_close(train[key], infer[key], rtol=0, atol=0)
        pooled.append(infer["text_embeds"])
    assert all(not torch.equal(a, b) for a, b in zip(pooled, pooled[1:]))  # the pooled EOS state sees every m


def test_each_pooler_head_matches_its_own_encoders_embeddings(world):
    from vilex.models import ViLexModel
    from vilex.models.tiny import tiny_vilex_config

    model = ViLexModel.from_config(tiny_vilex_config(world / "decoder", "stable_diffusion_xl"))
    pooler = model.encoder.pooler
    assert pooler.output_heads == [32, 48] and model.encoder.token_width == 80
    tables = [e.get_input_embeddings().weight.detach() for e in model.decoder.text_encoders]
    torch.testing.assert_close(pooler.embed_mean, torch.cat([t.mean(0) for t in tables]))
    tokens = model.encoder(torch.rand(3, 3, 16, 16)).detach()
    for part in ((tokens - pooler.embed_mean) / pooler.embed_std).split([32, 48], dim=-1):
        torch.testing.assert_close(part.mean(-1), torch.zeros(part.shape[:2]), atol=1e-4, rtol=0)
        torch.testing.assert_close(part.std(-1, unbiased=False), torch.ones(part.shape[:2]), atol=1e-3, rtol=0)


def _config(world, out, *extra):
    return load_config(PretrainConfig, TINY_CONFIG, overrides(
        world, out, "model.decoder.type=stable_diffusion_xl", "val.every=1000", "train.checkpoint_every=4",
        "train.optim.lr_pooler=3e-3", *extra))


def test_tiny_pretraining_learns_and_resumes_bit_identically(world, tmp_path):
    assert_learns_and_resumes_bit_identically(lambda out, *extra: _config(world, out, *extra), tmp_path)


def test_reconstruct_and_compose_through_the_cli(world, tmp_path):
    from vilex.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(_config(world, run, "train.max_steps=4"))
    image = sorted((world / "data" / "train" / "images").glob("*.png"))[0]
    ckpt = str(run / "checkpoints" / "checkpoint-4")
    for args in (["reconstruct", "--images", str(image), "--num-tokens", "1", "8", "--out", str(tmp_path / "r.png")],
                 ["compose", "--image", str(image), "--prompt", "a red square", "--out", str(tmp_path / "c.png")]):
        done = subprocess.run([sys.executable, "-m", "vilex", args[0], "--checkpoint", ckpt, *args[1:], "--steps", "2"],
                              env=env(), capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "r.png").size == (3 * 16, 16) and Image.open(tmp_path / "c.png").size == (16, 16)


def test_real_scale_config_at_sdxl_public_parameter_counts(world, tmp_path):
    """configs/vilex/sdxl_siglip_so400m.yaml, built on the meta device from config-only folders (no weights)."""
    from transformers import CLIPTokenizer, SiglipVisionConfig

    from vilex.models import ViLexModel
    from vilex.models.reference_archs import REFERENCE_ARCHS, save_config_only
    from vilex.models.registry import weightless

    sdxl = tmp_path / "sdxl"
    for part in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(world / "decoder" / part, sdxl / part)
    save_config_only(SDXL_HUB, sdxl, vocab_size=len(CLIPTokenizer.from_pretrained(sdxl / "tokenizer")))
    (sdxl / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": True}))
    SiglipVisionConfig(**REFERENCE_ARCHS["google/siglip-so400m-patch14-224"]["vision"]).save_pretrained(
        tmp_path / "siglip")
    cfg = load_config(PretrainConfig, REPO / "configs" / "vilex" / "sdxl_siglip_so400m.yaml", [
        f"model.decoder.name_or_path={sdxl}", f"model.vit.name_or_path={tmp_path / 'siglip'}"])
    with weightless():
        model = ViLexModel.from_config(cfg.model)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    decoder = model.decoder
    vocab_delta = (49408 - decoder.embedding_table.shape[0]) * (768 + 1280)  # the stand-in tokenizer's vocabulary
    # the public parameter counts of SDXL base 1.0's parts
    assert count(decoder.unet) == 2_567_463_684 and count(decoder.vae) == 83_653_863
    assert count(decoder.text_encoder) + count(decoder.text_encoder_2) + vocab_delta == 123_060_480 + 694_659_840
    assert decoder.token_heads == [768, 1280] and model.encoder.token_width == 2048
    assert (decoder.image_size, decoder.resolution_multiple, decoder.model_space_shape) == (1024, 32, (4, 128, 128))
    assert model.encoder.num_tokens == 75 and decoder.context_length - 2 == 75  # the token budget: 75 beside no prompt

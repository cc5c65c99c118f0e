"""SD3 / SD3.5 as a frozen decoder: diffusers' own conditioning for plain prompts, ViLex tokens in the chosen text
encoders (one pooler head each), the same layout in training and inference, no gradient into frozen parts, SD3's
rectified-flow loss with its noise-level density, a sampler that follows the trained velocity, Text-Free Guidance, a
tiny pretraining run that learns and resumes bit-identically, reconstruct/compose through the CLI, and the real-scale
config at SD3.5 Medium's public parameter counts on the meta device."""
from __future__ import annotations

import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from pretrain_helpers import assert_learns_and_resumes_bit_identically, env, overrides

from vilex.config import load_config
from vilex.errors import ConfigError, UserError
from vilex.models.configs import DecoderConfig
from vilex.models.decoders import build_frozen_decoder
from vilex.models.tiny import build_tiny_sd3
from vilex.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "vilex" / "tiny.yaml"
SD35_HUB = "stabilityai/stable-diffusion-3.5-medium"
PROMPTS = ["a red square", "two blue circles and a green triangle"]
ALL = ["clip_l", "clip_g", "t5"]
WIDTHS = {"clip_l": 16, "clip_g": 32, "t5": 64}  # build_tiny_sd3's defaults


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toy.scenes.generate import generate_dataset

    root = tmp_path_factory.mktemp("sd3_world")
    build_tiny_sd3(root / "decoder")
    generate_dataset(root / "data", n=24, seed=0, size=16, overwrite=True, progress=False)
    return root


def _decoder(world, **kwargs):
    """The tiny decoder; T5 gets 32 positions unless told (diffusers' 256 are tested against diffusers; fewer keep the
    CPU tests fast)."""
    kwargs.setdefault("t5_max_length", 32)
    return build_frozen_decoder(DecoderConfig(type="stable_diffusion_3", name_or_path=str(world / "decoder"), **kwargs))


@pytest.fixture(scope="module")
def decoder(world):
    return _decoder(world)


@pytest.fixture(scope="module")
def pipe(world):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(world / "decoder"))


@pytest.mark.parametrize("clip_skip, t5_length", [(0, 256), (1, 77)])
def test_plain_prompts_condition_exactly_as_diffusers_encode_prompt(world, pipe, clip_skip, t5_length):
    ours = _decoder(world, clip_skip=clip_skip, t5_max_length=t5_length)
    with torch.no_grad():  # as a frozen encoder runs (with autograd on, CPU attention takes a kernel ~1e-6 off)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, clip_skip=clip_skip or None,
            max_sequence_length=t5_length)
    cond = ours.encode_text(None, None, ours.tokenize(PROMPTS))
    assert cond["prompt_embeds"].shape == (2, 77 + t5_length, 64) and cond["pooled_projections"].shape == (2, 48)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=1e-6)
    # classifier-free guidance contrasts with the empty prompt, taken without clip skip as diffusers takes it
    empty = ours.unconditional(2)
    torch.testing.assert_close(empty["prompt_embeds"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(empty["pooled_projections"], negative_pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", [["clip_l", "clip_g"], ["t5"], ALL])
def test_tokens_enter_only_their_encoders_and_only_the_tokens_learn(world, layout):
    decoder = _decoder(world, sd3_token_encoders=layout)
    width = sum(WIDTHS[n] for n in layout)
    assert decoder.token_heads == [WIDTHS[n] for n in layout] and decoder.embedding_table.shape[1] == width
    torch.manual_seed(0)
    tokens = torch.randn(2, 6, width, requires_grad=True)
    cond, layout_used = decoder.encode_text(tokens, 4, return_layout=True)
    first = 0 if layout == ["t5"] else 1  # T5 has no BOS
    assert layout_used.vilex_mask[:, first:first + 4].all() and layout_used.vilex_mask.sum() == 8
    loss = decoder.diffusion_loss(torch.randn(2, *decoder.model_space_shape), cond,
                                  torch.Generator().manual_seed(0)).mean()
    loss.backward()
    for part in tokens.grad[:, :4].split(decoder.token_heads, dim=-1):
        assert part.abs().sum() > 0  # each head reaches its encoder
    assert tokens.grad[:, 4:].abs().sum() == 0  # tokens beyond m are dropped
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())
    # an encoder without tokens reads the (empty) prompt alone
    empty = decoder.unconditional(2)
    if "t5" not in layout:
        assert torch.equal(cond["prompt_embeds"][:, 77:], empty["prompt_embeds"][:, 77:])
    if layout == ["t5"]:
        assert torch.equal(cond["pooled_projections"], empty["pooled_projections"])
        assert torch.equal(cond["prompt_embeds"][:, :77], empty["prompt_embeds"][:, :77])


@pytest.mark.parametrize("layout", [["clip_l", "clip_g"], ALL])
def test_training_and_inference_lay_tokens_out_alike_for_every_m(world, layout):
    """Training keeps the first m of n tokens (TailDrop, m per sample); inference passes m tokens: the same
    conditioning, in every encoder."""
    decoder = _decoder(world, sd3_token_encoders=layout)
    torch.manual_seed(1)
    tokens = torch.randn(6, 6, sum(WIDTHS[n] for n in layout))
    batch = decoder.encode_text(tokens, torch.arange(1, 7))  # one m per sample, as TailDrop draws them
    pooled = []
    for m in range(1, 7):
        infer = decoder.encode_text(tokens[m - 1:m, :m], m)
        for key in infer:
            torch.testing.assert_close(batch[key][m - 1:m], infer[key], rtol=0, atol=1e-6)
        pooled.append(infer["pooled_projections"])
    assert all(not torch.equal(a, b) for a, b in pairwise(pooled))  # the pooled EOS state sees every m


def test_token_budget_and_prompts_are_checked(world, decoder):
    clip = _decoder(world, sd3_token_encoders=["clip_l", "clip_g"])
    assert clip.context_length == 77 and _decoder(world, t5_max_length=256).context_length == 77  # 75 tokens
    assert decoder.context_length == 33  # T5's 32 positions less </s> (it has no BOS) bind first: 31 tokens
    prompt = decoder.tokenize(["two blue circles and a green triangle"])
    with pytest.raises(UserError, match=f"at most {75 - len(prompt[0])} ViLex tokens with this prompt"):
        clip.encode_text(torch.zeros(1, 75, 48), 75, prompt)
    with pytest.raises(UserError, match=f"at most {31 - len(prompt[0].t5)} ViLex tokens with this prompt"):
        decoder.encode_text(torch.zeros(1, 31, 112), 31, prompt)
    with pytest.raises(ValueError, match="decoder.tokenize"):
        decoder.encode_text(None, None, [[5, 6]])  # CLIP ids alone: T5 would not see the prompt
    with pytest.raises(ConfigError, match="sd3_token_encoders"):
        _decoder(world, sd3_token_encoders=["clip_l", "t5", "t5"])
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        _decoder(world, resolution=18)  # the VAE's 2x times the transformer's 2x2 patches
    with pytest.raises(ConfigError, match="position table"):
        _decoder(world, resolution=68)  # 17 patches per side; its table holds 16
    with pytest.raises(ConfigError, match="snr_gamma"):
        _decoder(world, snr_gamma=5.0)


def test_the_loss_is_sd3_rectified_flow(world, decoder, pipe):
    """Per sample, as diffusers' SD3 training scripts compute it: u ~ logit-normal, σ = the shifted sigma at u·T,
    x_t = (1 - σ) x0 + σ ε, target ε - x0."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(2)
    x0 = torch.randn(4, *decoder.model_space_shape)
    cond = decoder.encode_text(None, None, decoder.tokenize(PROMPTS * 2))
    loss = decoder.diffusion_loss(x0, cond, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=gen)
    u = compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0, logit_std=1.0, generator=gen)
    index = (u * 1000).long()
    assert pipe.scheduler.config.shift == 3.0
    sigmas, timesteps = pipe.scheduler.sigmas[index], pipe.scheduler.timesteps[index]
    s = sigmas.view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=timesteps,
                                encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_projections"]).sample
    torch.testing.assert_close(loss, (pred - (noise - x0)).pow(2).mean((1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_the_noise_level_density_and_weighting_are_configurable(world):
    def middle_share(decoder):  # share of levels among the middle half of the schedule: logit-normal's is 0.73
        sigmas, timesteps = decoder.draw_noise_levels(8192, torch.Generator().manual_seed(0), torch.device("cpu"))
        torch.testing.assert_close(timesteps, sigmas * 1000)
        return ((sigmas <= decoder._train_sigmas[250]) & (sigmas > decoder._train_sigmas[750])).float().mean().item()

    assert middle_share(_decoder(world)) == pytest.approx(0.728, abs=0.02)
    assert middle_share(_decoder(world, flow_weighting="none")) == pytest.approx(0.5, abs=0.02)
    assert middle_share(_decoder(world, flow_logit_std=0.5)) == pytest.approx(0.972, abs=0.01)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(_decoder(world, flow_weighting="sigma_sqrt").loss_weights(sigmas), sigmas ** -2)
    torch.testing.assert_close(_decoder(world).loss_weights(sigmas), torch.ones(3))
    high = _decoder(world, high_noise_fraction=0.5, high_noise_min_t=900)
    sigmas, _ = high.draw_noise_levels(64, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (sigmas[:32] >= high._train_sigmas[99]).all() and (sigmas[32:] < high._train_sigmas[99]).any()


@pytest.fixture(scope="module")
def vilex_pipe(world):
    from vilex.models import ViLexModel
    from vilex.models.tiny import tiny_vilex_config
    from vilex.pipeline import ViLexPipeline

    torch.manual_seed(0)
    cfg = tiny_vilex_config(world / "decoder", "stable_diffusion_3")
    cfg.decoder.t5_max_length = 32
    model = ViLexModel.from_config(cfg)
    return ViLexPipeline(model.encoder, model.decoder, model.config)


def test_the_sampler_follows_the_trained_velocity(vilex_pipe, monkeypatch):
    """Euler steps of the decoder's own sampler, fed the exact velocity ε - x0 (what the loss trains), land on x0:
    training target, timestep scale (σ·T) and sampler agree."""
    decoder = vilex_pipe.decoder
    x0 = torch.rand(2, *decoder.model_space_shape) * 1.8 - 0.9
    monkeypatch.setattr(decoder, "from_model_space", lambda x: x)
    out = vilex_pipe._sample(lambda x, t: (x - x0) / (t / 1000), 2, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (x0 + 1) / 2, rtol=0, atol=1e-5)


def test_text_free_guidance_combines_velocities(vilex_pipe, world):
    from PIL import Image

    image = Image.open(min((world / "data" / "train" / "images").glob("*.png")))
    tokens = vilex_pipe.encode([image, image], 4)
    cond_v, cond_vc = vilex_pipe.compose_conditioning(tokens, "a red square")
    empty = vilex_pipe.decoder.unconditional(2)
    x, t = torch.randn(2, *vilex_pipe.decoder.model_space_shape), torch.tensor(700.0)
    guided = vilex_pipe.predict_guided(x, t, cond_v, cond_vc, empty, tfg_scale=3.0, guidance_scale=2.0)
    pv, pvc, pe = (vilex_pipe.decoder.predict(x, t.expand(2), c) for c in (cond_v, cond_vc, empty))
    assert not torch.allclose(pv, pvc)  # the prompt changes the velocity
    torch.testing.assert_close(guided, pe + 2.0 * (pv + 3.0 * (pvc - pv) - pe), rtol=1e-4, atol=1e-5)
    out = vilex_pipe.compose(image, "a red square", tfg_scale=3.0, num_tokens=4, guidance_scale=2.0,
                             num_inference_steps=3, seed=0, output_type="pt")
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_checkpointing_changes_no_gradient(world):
    """Non-reentrant checkpointing in all three encoders (T5 too) and the transformer: the same token gradients."""
    grads = []
    for checkpointing in (False, True):
        decoder = _decoder(world, sd3_token_encoders=ALL, gradient_checkpointing=checkpointing)
        tokens = torch.randn(2, 5, 112, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        cond = decoder.encode_text(tokens, torch.tensor([5, 3]), decoder.tokenize(["a cat", "a dog"]))
        decoder.diffusion_loss(torch.ones(2, *decoder.model_space_shape), cond, torch.Generator().manual_seed(1)
                               ).mean().backward()
        grads.append(tokens.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _config(world, out, *extra):
    return load_config(PretrainConfig, TINY_CONFIG, overrides(
        world, out, "val.every=1000", "train.checkpoint_every=4", "train.optim.lr_pooler=3e-3",
        "model.decoder.t5_max_length=32", *extra,
        decoder="stable_diffusion_3"))


def test_tiny_pretraining_learns_and_resumes_bit_identically(world, tmp_path):
    assert_learns_and_resumes_bit_identically(lambda out, *extra: _config(world, out, *extra), tmp_path)


@pytest.mark.slow
def test_reconstruct_and_compose_through_the_cli(world, tmp_path):
    from vilex.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(_config(world, run, "train.max_steps=4"))
    image = min((world / "data" / "train" / "images").glob("*.png"))
    ckpt = str(run / "checkpoints" / "checkpoint-4")
    for args in (["reconstruct", "--images", str(image), "--num-tokens", "1", "8", "--out", str(tmp_path / "r.png")],
                 ["compose", "--image", str(image), "--prompt", "a red square", "--out", str(tmp_path / "c.png")]):
        done = subprocess.run([sys.executable, "-m", "vilex", args[0], "--checkpoint", ckpt, *args[1:], "--steps", "2"],
                              check=False, env=env(), capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "r.png").size == (3 * 16, 16) and Image.open(tmp_path / "c.png").size == (16, 16)


def test_real_scale_config_at_sd35_medium_public_parameter_counts(world, tmp_path):
    """configs/vilex/sd3_siglip_so400m.yaml, built on the meta device from config-only folders (no weights)."""
    from transformers import CLIPTokenizer, SiglipVisionConfig

    from vilex.models import ViLexModel
    from vilex.models.reference_archs import REFERENCE_ARCHS, save_config_only
    from vilex.models.registry import weightless

    sd3 = tmp_path / "sd35"
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        shutil.copytree(world / "decoder" / part, sd3 / part)
    save_config_only(SD35_HUB, sd3, vocab_size=len(CLIPTokenizer.from_pretrained(sd3 / "tokenizer")))
    SiglipVisionConfig(**REFERENCE_ARCHS["google/siglip-so400m-patch14-224"]["vision"]).save_pretrained(
        tmp_path / "siglip")
    cfg = load_config(PretrainConfig, REPO / "configs" / "vilex" / "sd3_siglip_so400m.yaml", [
        f"model.decoder.name_or_path={sd3}", f"model.vit.name_or_path={tmp_path / 'siglip'}"])
    with weightless():
        model = ViLexModel.from_config(cfg.model)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    decoder = model.decoder
    missing = 49408 - decoder.text_encoder.get_input_embeddings().weight.shape[0]  # the stand-in CLIP vocabulary
    # the public parameter counts of SD3.5 Medium's parts (T5 keeps its real vocabulary)
    assert count(decoder.unet) == 2_243_171_520 and count(decoder.vae) == 83_819_683
    assert count(decoder.text_encoder) + missing * 768 == 123_650_304
    assert count(decoder.text_encoder_2) + missing * 1280 == 694_659_840
    assert count(decoder.text_encoder_3) == 4_762_310_656
    assert decoder.token_heads == [768, 1280, 4096] and model.encoder.token_width == 6144
    # the pooler matches each head to its own encoder's embedding statistics (T5's vocabulary differs from CLIP's)
    t5_table = decoder.text_encoder_3.get_input_embeddings().weight
    assert decoder.embedding_table.shape == (2, 6144) and t5_table.shape == (32128, 4096)
    assert (decoder.image_size, decoder.resolution_multiple, decoder.model_space_shape) == (1024, 16, (16, 128, 128))
    assert model.encoder.num_tokens == 75 and decoder.context_length - 2 == 75  # the token budget beside no prompt

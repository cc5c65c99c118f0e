"""tiny.py — tiny, randomly initialised stand-ins for the real components (tests, benchmarks, smoke runs).

Every builder writes a folder in exactly the layout the real weights come in, so the code under test
loads it through the same ``from_pretrained(name_or_path)`` path as a hub id:

* ``build_tiny_sd``           a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
                              text_encoder/, tokenizer/, scheduler/). ``pad="eos"`` gives an SD1-like
                              tokenizer (CLIP-L: pad = EOS), ``pad="!"`` an SD2-like one (OpenCLIP-H: pad id 0).
* ``build_tiny_pixel_decoder`` a pixel-space decoder folder (unet/ with 3 in/out channels, text_encoder/,
                              tokenizer/, scheduler/; no VAE) — the Imagen/DeepFloyd-IF-style "pixel_unet".
* ``build_tiny_siglip``       a ``SiglipVisionModel`` folder.
* ``write_tiny_clip_tokenizer`` a byte-level BPE CLIPTokenizer built offline from a small vocabulary written
                              here (256 byte symbols, their "</w>" forms, merges for a few words, BOS/EOS).

All sizes are parameters; defaults build in well under a second. Weights come from a local seeded RNG
(``torch.random.fork_rng``) so building never disturbs the caller's global RNG state.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from vilex.models.configs import DecoderConfig, PoolerConfig, TailDropConfig, ViLexConfig, VisionTowerConfig

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

DEFAULT_WORDS = ["a", "photo", "of", "an", "the", "and", "on", "in", "with", "at", "top", "bottom", "left", "right", "center", "small", "large", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "beige", "navy", "circle", "square", "triangle", "cat", "dog", "sitting", "beach", "painting", "style", "watercolor", "wearing", "hat", "background", "object", "objects", "two", "three"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's vocabulary order
    (printable ASCII first, so '!' gets id 0 — which is why SD2's pad id 0 means '!')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in keep] + [symbols[b] for b in range(256) if b not in keep]


def _merges_for(words: Iterable[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each word into one '<word></w>' symbol (duplicates removed)."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current = current + nxt
    return merges


def write_tiny_clip_tokenizer(folder: str | Path, pad: Literal["eos", "!"] = "eos",
                              words: Iterable[str] = DEFAULT_WORDS, context_length: int = 77):
    """Write vocab.json + merges.txt and save a ``CLIPTokenizer`` built from them into ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = _merges_for(words)
    for left, right in merges:
        vocab_list.append(left + right)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    # Real SD tokenizer folders hold vocab.json + merges.txt; load from those files like a real one.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token=EOS_TOKEN if pad == "eos" else "!",
                                              model_max_length=context_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _tiny_text_encoder(vocab_size: int, width: int, layers: int, context_length: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 16),
                         max_position_embeddings=context_length, projection_dim=width,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg)


def _tiny_unet(channels: int, sample_size: int, width: int, cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8)


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
                         steps_offset=1)


def build_tiny_sd(folder: str | Path, pad: Literal["eos", "!"] = "eos", prediction_type: str = "epsilon",
                  width: int = 32, text_layers: int = 2, image_size: int = 16, context_length: int = 77,
                  seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-like pipeline folder (VAE downsamples 2x; latents have 4 channels)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_build", pad=pad, context_length=context_length)
        text_encoder = _tiny_text_encoder(len(tokenizer), width, text_layers, context_length, tokenizer)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, width),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=image_size)
        unet = _tiny_unet(4, image_size // 2, width, width)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(folder), safe_serialization=True)
    _remove_tree(folder / "_tokenizer_build")
    return folder


def build_small_sd(folder: str | Path, image_size: int = 128, vae_channels: tuple[int, ...] = (32, 64, 128, 128),
                   unet_channels: tuple[int, ...] = (48, 96, 192), text_width: int = 256, text_layers: int = 4,
                   prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """An SD-SHAPED small pipeline folder for benchmarks: a VAE downsampling 2^(levels-1) (8x by default:
    128 px -> 16x16 latents), a cross-attention UNet, a CLIP text encoder; ~10M params in VAE + UNet."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    levels = len(unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_tiny_clip_tokenizer(folder / "_tokenizer_build")
        text_encoder = _tiny_text_encoder(len(tokenizer), text_width, text_layers, 77, tokenizer)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
                            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1,
                            norm_num_groups=32, sample_size=image_size)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2 ** (len(vae_channels) - 1), in_channels=4, out_channels=4,
            layers_per_block=1, block_out_channels=unet_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=16)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(folder), safe_serialization=True)
    _remove_tree(folder / "_tokenizer_build")
    return folder


def build_tiny_pixel_decoder(folder: str | Path, pad: Literal["eos", "!"] = "eos", prediction_type: str = "epsilon",
                             width: int = 32, text_layers: int = 2, image_size: int = 16, context_length: int = 77,
                             seed: int = 0) -> Path:
    """A tiny pixel-space decoder folder: unet/ (3 -> 3 channels), text_encoder/, tokenizer/, scheduler/."""
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_tiny_clip_tokenizer(folder / "tokenizer", pad=pad, context_length=context_length)
        _tiny_text_encoder(len(tokenizer), width, text_layers, context_length, tokenizer).save_pretrained(
            str(folder / "text_encoder"))
        _tiny_unet(3, image_size, width, width).save_pretrained(str(folder / "unet"))
        _scheduler(prediction_type).save_pretrained(str(folder / "scheduler"))
    return folder


def build_tiny_sdxl(folder: str | Path, width: int = 32, width_2: int = 48, projection_dim: int = 16,
                    text_layers: int = 2, image_size: int = 16, time_embed_dim: int = 8, seed: int = 0) -> Path:
    """A tiny SDXL-like pipeline folder: CLIP-L-like and bigG-like text encoders of different widths (the second
    with a projection), tokenizers padding with EOS and "!" as SDXL's do, a UNet with SDXL's 'text_time' added
    conditioning (6 size ids + the pooled projection) and cross-attention over both widths, a 2x VAE."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_tiny_clip_tokenizer(folder / "_tok1", pad="eos")
        tokenizer_2 = write_tiny_clip_tokenizer(folder / "_tok2", pad="!")
        text_encoder = _tiny_text_encoder(len(tokenizer), width, text_layers, 77, tokenizer)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=width_2, intermediate_size=2 * width_2,
            num_hidden_layers=text_layers + 1, num_attention_heads=max(1, width_2 // 16), max_position_embeddings=77,
            projection_dim=projection_dim, bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, width),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=0.13025)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width + width_2,
            attention_head_dim=8, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=6 * time_embed_dim +
            projection_dim)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=_scheduler("epsilon"), force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(str(folder), safe_serialization=True)
    _remove_tree(folder / "_tok1")
    _remove_tree(folder / "_tok2")
    return folder


def build_tiny_siglip(folder: str | Path, width: int = 32, layers: int = 2, image_size: int = 16,
                      patch_size: int = 4, seed: int = 0) -> Path:
    """A tiny ``SiglipVisionModel`` folder (no MAP head)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(SiglipVisionConfig(**tiny_siglip_init(width, layers, image_size, patch_size)))
    model.save_pretrained(str(folder))
    return Path(folder)


def tiny_siglip_init(width: int = 32, layers: int = 2, image_size: int = 16, patch_size: int = 4) -> dict:
    """``SiglipVisionConfig`` kwargs of a tiny tower (use as ``VisionTowerConfig(init=...)``)."""
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
                "num_attention_heads": max(1, width // 16), "image_size": image_size, "patch_size": patch_size,
                "vision_use_head": False}


def tiny_vilex_config(decoder_path: str | Path, decoder_type: str = "stable_diffusion",
                      vit_path: str | Path | None = None, num_tokens: int = 8, width: int = 32,
                      image_size: int = 16, taildrop_prob: float = 0.5) -> ViLexConfig:
    """A complete tiny ``ViLexConfig``: tiny SigLIP (from ``vit_path`` or random init), 1-block pooler."""
    vit = (VisionTowerConfig(type="siglip", name_or_path=str(vit_path)) if vit_path is not None
           else VisionTowerConfig(type="siglip", init=tiny_siglip_init(width, 2, image_size)))
    return ViLexConfig(
        vit=vit,
        pooler=PoolerConfig(num_tokens=num_tokens, depth=1, heads=2, mlp_ratio=2.0, width=width),
        taildrop=TailDropConfig(prob=taildrop_prob),
        decoder=DecoderConfig(type=decoder_type, name_or_path=str(decoder_path)),
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def write_tiny_t5_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 256):
    """Write and return a T5 (SentencePiece-Unigram) tokenizer built offline: T5's specials (<pad> 0, </s> 1,
    <unk> 2), one '▁word' piece per word, and single characters so any other text still spells out."""
    from transformers import T5Tokenizer

    pieces = [(token, 0.0) for token in T5_SPECIALS] + [("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(words)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces += [(c, -4.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return T5Tokenizer.from_pretrained(str(folder))


def build_tiny_sd3(folder: str | Path, width: int = 16, width_2: int = 32, t5_width: int = 64, text_layers: int = 2,
                   image_size: int = 16, seed: int = 0) -> Path:
    """A tiny SD3.5-like pipeline folder (StableDiffusion3Pipeline layout): CLIP-L-like and CLIP-G-like text encoders
    with projections (tokenizers padding with EOS and "!" as SD3's do), a T5 encoder (relative position bias, no
    causal mask) with a Unigram tokenizer, an MMDiT-X transformer (QK RMS-norm, a dual-attention first block) whose
    joint attention width is T5's and whose pooled input is both CLIP projections, a 2x VAE with SD3's shift and
    scale, and SD3's flow-matching scheduler (shift 3)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_tiny_clip_tokenizer(folder / "_tok1", pad="eos")
        tokenizer_2 = write_tiny_clip_tokenizer(folder / "_tok2", pad="!")
        tokenizer_3 = write_tiny_t5_tokenizer(folder / "_tok3")

        def clip(tok, hidden: int, layers: int):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 16), max_position_embeddings=77, projection_dim=hidden,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=16, d_ff=2 * t5_width, num_layers=text_layers,
            num_heads=max(1, t5_width // 16), relative_attention_num_buckets=8, relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu", pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
            pooled_projection_dim=width + width_2, pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae, text_encoder=clip(tokenizer, width, text_layers), tokenizer=tokenizer,
            text_encoder_2=clip(tokenizer_2, width_2, text_layers + 1), tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        pipe.save_pretrained(str(folder), safe_serialization=True)
    for scratch in ("_tok1", "_tok2", "_tok3"):
        _remove_tree(folder / scratch)
    return folder

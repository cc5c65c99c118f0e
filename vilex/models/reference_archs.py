"""reference_archs.py — the architecture configs of the real-scale components, written out offline.

Nothing can be downloaded here, yet we must check that the shipped real-scale experiment configs build
and know how big they are, and the GPU benchmark must run SD2.1-base/SigLIP-so400m-SHAPED models with
random weights. These dicts are the public ``config.json`` architecture fields of those checkpoints
(copied by hand from their model cards' configs; weights are never involved). ``REFERENCE_ARCHS`` maps an
exact hub id to them — an explicit table used only for meta-device builds and benchmarks, never to
choose a class for loading real weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               act_fn="silu", block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               scaling_factor=0.18215, sample_size=512)

_UNET_COMMON = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
                    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                    mid_block_scale_factor=1, center_input_sample=False, sample_size=64)

SD21_BASE = {
    "unet": dict(_UNET_COMMON, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    "vae": _SD_VAE,
    "text_encoder": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
    "prediction_type": "epsilon",
    "image_size": 512,
}

SD15 = {
    "unet": dict(_UNET_COMMON, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "vae": _SD_VAE,
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
    "prediction_type": "epsilon",
    "image_size": 512,
}

# stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder_2/ (OpenCLIP bigG, with projection) config.json;
# text_encoder/ is CLIP-L as in SD 1.5; the VAE is SD's architecture with SDXL's scaling factor
SDXL_BASE = {
    "unet": dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
                 freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
                 sample_size=128),
    "vae": dict(_SD_VAE, scaling_factor=0.13025, sample_size=1024),
    "text_encoder": SD15["text_encoder"],
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                           bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
    "prediction_type": "epsilon",
    "image_size": 1024,
}

# stabilityai/stable-diffusion-3.5-medium (MMDiT-X): transformer/, vae/, text_encoder_3/ (T5 v1.1 XXL, encoder only)
# config.json; text_encoder/ is CLIP-L (with projection) as in SD 1.5, text_encoder_2/ OpenCLIP bigG (with projection)
# as in SDXL; the VAE is SD's architecture with 16 latent channels, no quant convs and SD3's shift and scale; the
# scheduler is FlowMatchEulerDiscreteScheduler(shift=3.0). Public parameter counts of the parts: transformer
# 2,243,171,520, vae 83,819,683, text_encoder 123,650,304, text_encoder_2 694,659,840, text_encoder_3 4,762,310,656.
SD35_MEDIUM = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    "vae": dict(_SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False),
    "text_encoder": SD15["text_encoder"],
    "text_encoder_2": SDXL_BASE["text_encoder_2"],
    "text_encoder_3": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                           layer_norm_epsilon=1e-6, dropout_rate=0.1, tie_word_embeddings=False, pad_token_id=0,
                           eos_token_id=1, decoder_start_token_id=0),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    "image_size": 1024,
}

SIGLIP_SO400M_224 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=224, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_SO400M_384 = dict(SIGLIP_SO400M_224, image_size=384)
SIGLIP_BASE_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

REFERENCE_ARCHS: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-2-1-base": SD21_BASE,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL_BASE,
    "stabilityai/stable-diffusion-3.5-medium": SD35_MEDIUM,
    "google/siglip-so400m-patch14-224": {"vision": SIGLIP_SO400M_224},
    "google/siglip-so400m-patch14-384": {"vision": SIGLIP_SO400M_384},
    "google/siglip-base-patch16-224": {"vision": SIGLIP_BASE_224},
}


def build_reference(hub_id: str, part: str, device: str | torch.device = "meta") -> torch.nn.Module:
    """Build a random-weight module of a reference architecture (``meta`` device: no memory used)."""
    arch = REFERENCE_ARCHS[hub_id]
    with torch.device(device):
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**arch["unet"])
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**arch["vae"])
        if part == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
        if part == "text_encoder_2" and "text_encoder_2" in arch:
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            return CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"]))
        if part == "transformer" and "transformer" in arch:
            from diffusers import SD3Transformer2DModel

            return SD3Transformer2DModel(**arch["transformer"])
        if part == "text_encoder_3" and "text_encoder_3" in arch:
            from transformers import T5Config, T5EncoderModel

            return T5EncoderModel(T5Config(**arch["text_encoder_3"]))
        if part == "vision":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            return SiglipVisionModel(SiglipVisionConfig(**arch["vision"]))
    raise KeyError(f"{hub_id} has no part '{part}'")


def save_config_only(hub_id: str, folder: str | Path, vocab_size: int | None = None) -> Path:
    """A diffusers pipeline folder of ``hub_id``'s model parts holding their configs and NO weights: what a dry run
    (``vilex.models.registry.weightless``) builds at real shapes. Tokenizers and the scheduler are not written (copy
    a tiny one in); ``vocab_size`` resizes the text encoders to match it."""
    from transformers import CLIPTextConfig

    folder = Path(folder)
    arch = REFERENCE_ARCHS[hub_id]
    for part in ("unet", "transformer", "vae"):
        if part in arch:
            build_reference(hub_id, part).save_config(folder / part)
    for part in ("text_encoder", "text_encoder_2"):
        if part in arch:
            # a stand-in vocabulary: the real special-token ids would lie outside it
            resized = {"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
            values = dict(arch[part], **(resized if vocab_size else {}))
            CLIPTextConfig(**values).save_pretrained(folder / part)
    if "text_encoder_3" in arch:  # T5 keeps its vocabulary: a stand-in tokenizer only needs to fit inside it
        from transformers import T5Config

        T5Config(**arch["text_encoder_3"]).save_pretrained(folder / "text_encoder_3")
    return folder

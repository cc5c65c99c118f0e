"""vilex.models — Stage 1: the ViLex encoder, TailDrop, the conditioning function, frozen decoders.

Read in this order: configs.py (what is configurable) -> towers.py (ViT) -> encoder.py (pooler) ->
taildrop.py -> conditioning.py (the one place text-encoder inputs are built) -> decoders.py (frozen T2I
models, diffusion loss) -> vilex_model.py (training forward, checkpoint layout). tiny.py builds tiny
stand-ins of every component for tests and benchmarks. Inference lives in vilex/pipeline.py.
"""
from vilex.models.conditioning import SpecialTokens, TextLayout, build_text_conditioning, build_text_layout
from vilex.models.configs import DecoderConfig, PoolerConfig, TailDropConfig, ViLexConfig, VisionTowerConfig
from vilex.models.decoders import FrozenDecoder, PixelUNetDecoder, StableDiffusionDecoder, build_frozen_decoder
from vilex.models.encoder import AttentionPooler, ViLexEncoder
from vilex.models.registry import FROZEN_DECODERS, VISION_TOWERS, load_pretrained
from vilex.models.taildrop import sample_num_keep
from vilex.models.towers import SiglipTower, TimmTower, VisionTower, build_vision_tower
from vilex.models.vilex_model import ViLexModel, build_vilex_model, read_vilex_config, write_checkpoint

__all__ = [
    "FROZEN_DECODERS",
    "VISION_TOWERS",
    "AttentionPooler",
    "DecoderConfig",
    "FrozenDecoder",
    "PixelUNetDecoder",
    "PoolerConfig",
    "SiglipTower",
    "SpecialTokens",
    "StableDiffusionDecoder",
    "TailDropConfig",
    "TextLayout",
    "TimmTower",
    "ViLexConfig",
    "ViLexEncoder",
    "ViLexModel",
    "VisionTower",
    "VisionTowerConfig",
    "build_frozen_decoder",
    "build_text_conditioning",
    "build_text_layout",
    "build_vilex_model",
    "build_vision_tower",
    "load_pretrained",
    "read_vilex_config",
    "sample_num_keep",
    "write_checkpoint",
]

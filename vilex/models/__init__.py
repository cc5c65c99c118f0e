"""vilex.models — Stage 1: the ViLex encoder, TailDrop, the conditioning function, frozen decoders.

Read in this order: configs.py (what is configurable) -> towers.py (ViT) -> encoder.py (pooler) ->
taildrop.py -> conditioning.py (the one place text-encoder inputs are built) -> decoders.py (frozen T2I
models, diffusion loss) -> vilex_model.py (training forward, checkpoint layout). tiny.py builds tiny
stand-ins of every component for tests and benchmarks. Inference lives in vilex/pipeline.py.
"""
import importlib
from typing import Any

# Names resolve lazily (PEP 562): importing a config dataclass must not pull in diffusers/transformers
# (seconds per process start for the CLI, stage 2 and tests). Registries are filled by the modules that
# define their entries (towers.py, decoders.py), which the build functions import.
_WHERE = {
    "SpecialTokens": "conditioning", "TextLayout": "conditioning", "build_text_conditioning": "conditioning",
    "build_text_layout": "conditioning",
    "DecoderConfig": "configs", "PoolerConfig": "configs", "TailDropConfig": "configs", "ViLexConfig": "configs",
    "VisionTowerConfig": "configs",
    "FrozenDecoder": "decoders", "PixelUNetDecoder": "decoders", "StableDiffusionDecoder": "decoders",
    "build_frozen_decoder": "decoders",
    "AttentionPooler": "encoder", "ViLexEncoder": "encoder",
    "FROZEN_DECODERS": "registry", "VISION_TOWERS": "registry", "load_pretrained": "registry",
    "sample_num_keep": "taildrop",
    "SiglipTower": "towers", "TimmTower": "towers", "VisionTower": "towers", "build_vision_tower": "towers",
    "ViLexModel": "vilex_model", "read_vilex_config": "vilex_model",
    "write_checkpoint": "vilex_model",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vilex.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"vilex.models.{_WHERE[name]}"), name)


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
    "build_vision_tower",
    "load_pretrained",
    "read_vilex_config",
    "sample_num_keep",
    "write_checkpoint",
]

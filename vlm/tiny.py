"""vlm/tiny.py — tiny stand-ins for the VLM's real components (tests, benchmarks, smoke runs), built offline.

Each builder writes a folder in the layout the real weights come in, so the code under test loads it through the same
``from_pretrained(path)`` call as a hub id (the real-weights path):

* ``build_tiny_tokenizer``  a byte-level BPE tokenizer trained here on a few sentences (so merges exist and a
                             segment boundary can really break a merge) or on a given corpus (the toy LLM's, see
                             toy/pretrain_llm.py), ChatML special tokens and a ChatML chat template written
                             here; saved with ``save_pretrained``.
* ``build_tiny_llm``         a randomly initialised Qwen2 or Llama causal LM + that tokenizer in one folder.
* ``build_tiny_vilex_checkpoint`` a stage-1 ViLex checkpoint folder (vit/, pooler/, vilex_config.json) written by the
                             stage-1 code itself (``ViLexEncoder.build`` + ``write_checkpoint``).
* ``write_tiny_llava_data``  a LLaVA-format JSON + PNG images: captions (align) or multi-turn QA (instruct), with
                             text-only samples mixed in.
* ``tiny_vlm_config``        a ``VLMConfig`` over those folders.

Weights come from a local seeded RNG (``torch.random.fork_rng``): building never disturbs the caller's RNG.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from vlm.config import (ConversationDataConfig, LLMConfig, ProjectorConfig, StageConfig, TowerConfig, VLMConfig,
                        VLMModelConfig)

CHATML_TEMPLATE = (
    r"{% for message in messages %}"
    r"{% if loop.first and message['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = ("a red blue green yellow circle square triangle on the left right top bottom of image what color is "
          "there how many shapes two three one small large describe picture shows you are helpful assistant "
          "system user yes no answer question").split()


def _corpus(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build_tiny_tokenizer(folder: str | Path, vocab_size: int = 400, bos_token: str | None = None,
                         chat_template: str | None = CHATML_TEMPLATE, corpus: Iterable[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (EOS = pad = <|endoftext|>) saved into ``folder``.

    ``corpus``: the texts the merges are learned on (default: a few hundred random sentences of toy words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + ([bos_token] if bos_token else [])
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token=bos_token)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(folder))
    return tok


def build_tiny_llm(folder: str | Path, arch: Literal["qwen2", "llama"] = "qwen2", width: int = 32, layers: int = 2,
                   heads: int = 2, intermediate: int | None = None, seed: int = 0,
                   chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """A tiny causal LM folder (config.json, model.safetensors, tokenizer files), loadable by path."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tok = build_tiny_tokenizer(folder, bos_token="<s>" if arch == "llama" else None, chat_template=chat_template)
    common = dict(vocab_size=len(tok) + 8, hidden_size=width, intermediate_size=intermediate or 2 * width,
                  num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                  tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Qwen2ForCausalLM(Qwen2Config(**common)) if arch == "qwen2"
                 else LlamaForCausalLM(LlamaConfig(**common)))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder))
    return folder


def build_tiny_siglip_folder(folder: str | Path, width: int = 32, layers: int = 3, image_size: int = 16,
                             patch_size: int = 4, seed: int = 0) -> Path:
    """A tiny ``SiglipVisionModel`` folder (16 patch tokens at the defaults)."""
    from vilex.models.tiny import build_tiny_siglip

    return build_tiny_siglip(folder, width=width, layers=layers, image_size=image_size, patch_size=patch_size,
                             seed=seed)


def build_tiny_vilex_checkpoint(folder: str | Path, num_tokens: int = 6, width: int = 32, image_size: int = 16,
                                token_width: int = 24, seed: int = 0) -> Path:
    """A stage-1 ViLex checkpoint (vit/ = SiglipVisionModel, pooler/, vilex_config.json) as the stage-1 code writes
    it. The decoder is only referenced by the config, so none is built: the pooler's output width and embedding
    statistics come from a random stand-in embedding table of width ``token_width``."""
    from vilex.models.encoder import ViLexEncoder
    from vilex.models.tiny import tiny_vilex_config
    from vilex.models.vilex_model import write_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_vilex_config(decoder_path=folder / "decoder-not-built", num_tokens=num_tokens, width=width,
                            image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        table = torch.randn(50, token_width) * 0.02
        encoder = ViLexEncoder.build(cfg.vit, cfg.pooler, table, context_length=77)
    write_checkpoint(folder, encoder, cfg)
    return folder


_COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}


def write_tiny_llava_data(root: str | Path, n: int = 24, kind: Literal["align", "instruct"] = "instruct",
                          image_size: int = 20, text_only_every: int = 4, seed: int = 0) -> Path:
    """``root/data.json`` + ``root/images/*.png``: coloured-square images with captions or 1-3 QA turns; every
    ``text_only_every``-th sample (instruct) has no image. Returns the JSON path."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        color = rng.choice(sorted(_COLORS))
        side = rng.choice(["left", "right"])
        text_only = kind == "instruct" and text_only_every and i % text_only_every == text_only_every - 1
        record: dict = {"id": f"{kind}-{i:04d}"}
        if not text_only:
            img = Image.new("RGB", (image_size, image_size), (250, 250, 250))
            x0 = 2 if side == "left" else image_size // 2
            img.paste(_COLORS[color], (x0, 4, x0 + image_size // 2 - 2, image_size - 4))
            name = f"images/{i:04d}.png"
            img.save(root / name)
            record["image"] = name
        if kind == "align":
            caption = f"a {color} square on the {side}" + " of the image" * rng.randint(0, 2)
            record["conversations"] = [{"from": "human", "value": "<image>\n"},
                                       {"from": "gpt", "value": caption}]
        else:
            turns = []
            for t in range(rng.randint(1, 3)):
                q = rng.choice(["what color is the square?", "is the square on the left?", "describe the image"])
                a = {"what color is the square?": color, "is the square on the left?": "yes" if side == "left" else
                     "no"}.get(q, f"a {color} square on the {side}")
                if t == 0 and not text_only:
                    q = "<image>\n" + q
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            record["conversations"] = turns
        records.append(record)
    path = root / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def tiny_vlm_config(llm: str | Path, tower_path: str | Path, out: str | Path, data_json: str | Path | None = None,
                    image_root: str | Path | None = None, tower_type: str = "siglip", feature_layer: int = -2,
                    projector: str = "mlp2x_gelu", num_vilex_tokens: int | None = None) -> VLMConfig:
    """A complete tiny ``VLMConfig`` (fp32, torch strategy, 4-sample steps) over the tiny folders."""
    data = ConversationDataConfig(json=Path(data_json) if data_json else None,
                                  image_root=Path(image_root) if image_root else None, max_length=96)
    stage = dict(data=data, global_batch_size=4, micro_batch_size=2, precision="fp32", checkpoint_every=2,
                 log_every=1, warmup_ratio=0.0)
    return VLMConfig(
        model=VLMModelConfig(
            tower=TowerConfig(type=tower_type, name_or_path=str(tower_path), feature_layer=feature_layer,
                              num_vilex_tokens=num_vilex_tokens),
            projector=ProjectorConfig(type=projector),
            llm=LLMConfig(name_or_path=str(llm)),
        ),
        align=StageConfig(**{**stage, "data": ConversationDataConfig(**{**data.__dict__, "template": "align"})},
                          lr=1e-3),
        instruct=StageConfig(**{**stage, "data": ConversationDataConfig(**{**data.__dict__, "template": "instruct"})},
                             lr=1e-3, init_from="previous"),
        output_dir=Path(out),
    )


class TinyWorld:
    """Paths of a complete tiny VLM setup built under one root (see ``build_tiny_world``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.llm = self.root / "llm"
        self.siglip = self.root / "siglip"
        self.vilex = self.root / "vilex"
        self.align = self.root / "align"
        self.instruct = self.root / "instruct"

    def config(self, out: str | Path, tower_type: str = "siglip", **kwargs) -> VLMConfig:
        """``tiny_vlm_config`` over this world; align/instruct stages read their own data sets."""
        tower = self.siglip if tower_type == "siglip" else self.vilex
        cfg = tiny_vlm_config(self.llm, tower, out, tower_type=tower_type, **kwargs)
        cfg.align.data.json, cfg.align.data.image_root = self.align / "data.json", self.align
        cfg.instruct.data.json, cfg.instruct.data.image_root = self.instruct / "data.json", self.instruct
        return cfg

    def overrides(self, out: str | Path, tower_type: str = "siglip") -> list[str]:
        """``--set`` overrides pointing configs/vlm/tiny.yaml at this world."""
        tower = self.siglip if tower_type == "siglip" else self.vilex
        return [f"model.llm.name_or_path={self.llm}", f"model.tower.type={tower_type}",
                f"model.tower.name_or_path={tower}", f"align.data.json={self.align / 'data.json'}",
                f"align.data.image_root={self.align}", f"instruct.data.json={self.instruct / 'data.json'}",
                f"instruct.data.image_root={self.instruct}", f"output_dir={out}"]


def build_tiny_world(root: str | Path, n_align: int = 16, n_instruct: int = 16) -> TinyWorld:
    """Tiny LLM (Qwen2), SigLIP, stage-1 ViLex checkpoint and align/instruct data sets under ``root``."""
    world = TinyWorld(root)
    build_tiny_llm(world.llm)
    build_tiny_siglip_folder(world.siglip)
    build_tiny_vilex_checkpoint(world.vilex)
    write_tiny_llava_data(world.align, n=n_align, kind="align")
    write_tiny_llava_data(world.instruct, n=n_instruct, kind="instruct")
    return world

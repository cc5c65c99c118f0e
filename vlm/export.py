"""vlm/export.py — `vilex export-hf`: a VLM checkpoint -> a standard HF ``LlavaForConditionalGeneration`` folder.

The exported folder loads with plain transformers (no code of ours, no trust_remote_code):

    model = LlavaForConditionalGeneration.from_pretrained(out); processor = LlavaProcessor.from_pretrained(out)

and lmms-eval's stock ``llava_hf`` wrapper can evaluate it. Mapping (why it is exact):

* tower: our SigLIP towers ARE ``SiglipVisionModel`` s and select ``hidden_states[feature_layer]`` like HF Llava's
  ``vision_feature_layer``; SigLIP has no CLS token, so ``vision_feature_select_strategy="full"`` keeps every token.
  Weights go to ``model.vision_tower.*`` unchanged.
* projector: ``mlp2x_gelu`` has HF's names (linear_1, act=GELU, linear_2) -> ``model.multi_modal_projector.*``.
* LLM: its decoder -> ``model.language_model.*``, its ``lm_head`` -> ``lm_head``; the config is the LLM's own.
* ``<image>``: the same token id (``image_token_index``), ``image_seq_length`` = our image token count; the
  ``LlavaProcessor`` (SiglipImageProcessor resizing to the tower's size with mean = std = 0.5, the tokenizer with
  ``<image>``, patch_size) expands ``<image>`` to the same count, and its chat template is the LLM's own preceded by a
  small preamble that turns HF's list-of-parts messages (``{"type": "image"}``, ``{"type": "text"}``) into our
  training text (``"<image>\\n" + text``).

Refused, with one line saying why: ``vilex_tokens`` towers (the ViLex tokens go through a second projector and are
appended after the patch tokens — no stock HF class computes that; use ``vlm.model.VLM.from_checkpoint`` instead)
and the ``linear`` projector (HF Llava has only the 2-layer MLP). A tower trained with ``image_fit`` other than
``resize`` exports with a warning: the HF SigLIP processor only resizes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from vilex.checkpoint import atomic_dir
from vilex.config import from_dict
from vilex.errors import UserError
from vlm.config import VLMModelConfig
from vlm.model import VLM, read_checkpoint_meta, resolve_checkpoint
from vlm.towers import VLM_TOWERS

log = logging.getLogger(__name__)

# Jinja preamble: HF multimodal messages (content = list of parts) -> plain strings as in training.
_PARTS_TO_TEXT = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set t = namespace(s='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set t.s = t.s + IMAGE_TOKEN + '\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set t.s = t.s + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = t.s -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def processor_chat_template(llm_template: str, image_token: str) -> str:
    """The LLM's chat template behind a preamble that accepts HF's list-of-parts message content."""
    return _PARTS_TO_TEXT.replace("IMAGE_TOKEN", repr(image_token)) + llm_template


def check_exportable(config: VLMModelConfig) -> None:
    """A one-line UserError for checkpoints no stock HF Llava can represent."""
    if not getattr(VLM_TOWERS.get(config.tower.type), "exportable", False):
        raise UserError(f"export-hf: tower type '{config.tower.type}' cannot be exported to HF Llava (the ViLex tokens "
                        f"go through a second projector and are appended after the patch tokens; no stock HF class "
                        f"does that). Use vlm.model.VLM.from_checkpoint for inference instead")
    if config.projector.type != "mlp2x_gelu":
        raise UserError(f"export-hf: projector '{config.projector.type}' cannot be exported: HF Llava has only the "
                        f"2-layer GELU MLP (mlp2x_gelu)")


def llava_state_dict(vlm: VLM) -> dict[str, torch.Tensor]:
    """Our weights under ``LlavaForConditionalGeneration`` names."""
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.vision_tower.{k}": v for k, v in vlm.tower.vit.state_dict().items()})
    sd.update({f"model.multi_modal_projector.{k}": v for k, v in vlm.projectors["patch"].state_dict().items()})
    sd.update({f"model.language_model.{k}": v for k, v in vlm.llm.get_decoder().state_dict().items()})
    sd.update({f"lm_head.{k}": v for k, v in vlm.llm.get_output_embeddings().state_dict().items()})
    return sd


def build_llava(vlm: VLM):
    """An in-memory ``LlavaForConditionalGeneration`` holding ``vlm``'s weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = vlm.config
    text_config = vlm.llm.config.get_text_config()
    llava_config = LlavaConfig(
        vision_config=vlm.tower.vit.config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=vlm.image_token_id, image_seq_length=vlm.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=cfg.tower.feature_layer,
        multimodal_projector_bias=True, tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    llava_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    sd = llava_state_dict(vlm)
    if llava_config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (llava_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF Llava weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if llava_config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = vlm.tokenizer.pad_token_id
    model.generation_config.eos_token_id = vlm.llm.generation_config.eos_token_id
    return model.eval()


def build_processor(vlm: VLM):
    from transformers import LlavaProcessor, SiglipImageProcessor
    from transformers.image_utils import PILImageResampling

    tower, image_token = vlm.tower, vlm.config.llm.image_token
    image_processor = SiglipImageProcessor(
        size={"height": tower.image_size, "width": tower.image_size}, resample=PILImageResampling.BICUBIC,
        image_mean=list(tower.image_mean), image_std=list(tower.image_std), do_resize=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True)
    template = vlm.tokenizer.chat_template
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=vlm.tokenizer, patch_size=tower.patch_size,
        vision_feature_select_strategy="full", image_token=image_token, num_additional_image_tokens=0,
        chat_template=processor_chat_template(template, image_token) if template else None)


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (atomically): the HF Llava model + processor equivalent to ``checkpoint``."""
    ckpt = resolve_checkpoint(checkpoint)
    config = from_dict(VLMModelConfig, read_checkpoint_meta(ckpt)["model"])
    check_exportable(config)
    if config.tower.image_fit != "resize":
        log.warning("the model was trained with tower.image_fit=%s; the exported SiglipImageProcessor only resizes "
                    "(preprocess images yourself to match training)", config.tower.image_fit)
    vlm = VLM.from_checkpoint(ckpt)
    if vlm.tower.num_image_tokens != vlm.tower.num_patches:
        raise UserError("export-hf: the tower's token count differs from its patch count")
    model, processor = build_llava(vlm), build_processor(vlm)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    log.info("exported %s -> %s (LlavaForConditionalGeneration, %d image tokens)", ckpt, out, vlm.num_image_tokens)
    return Path(out)

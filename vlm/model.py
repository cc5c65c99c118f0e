"""vlm/model.py — the LLaVA-style VLM: vision tower -> projector(s) -> any HF causal LM.

    pixels -> tower -> {patch: (B, L, C), [vilex_tokens: (B, m, D)]} -> one projector per group -> concat (B, N, H)
    input_ids with N copies of the <image> token per image -> LLM embeddings, image features scattered in their place
    -> the LLM's decoder -> hidden states -> lm_head on the LEARNED positions only -> cross-entropy

The LLM is loaded with ``AutoModelForCausalLM.from_pretrained(name_or_path)`` — a hub id and a local folder take the
same path, and the model class comes from the checkpoint's own config, never from its name. ``<image>`` is added to
the tokenizer as a special token (embeddings are resized only when the vocabulary has no free row). Images are expanded
to N placeholder tokens in the data (like HF's LlavaProcessor), so our inputs are exactly what an exported
``LlavaForConditionalGeneration`` receives.

The loss applies ``lm_head`` only to positions with a target (targets are pre-shifted, see templates.py): the
(T x vocab) logits of masked image and prompt tokens are never materialised — at 152k vocabulary that is most of
a step's activation memory. LMs that post-process logits beyond ``lm_head`` (soft-capping, logit scaling) are refused
rather than trained on a different loss than they were built with.

Every forward runs the tower and projectors, on a zero image when the micro-batch is text only (its contribution is
multiplied by 0): all ranks then call the same modules in the same order (ZeRO-3 gathers parameters per module
collectively) and every trainable parameter gets a gradient (DDP).

Stages are the explicit map ``STAGE_TRAINS`` (defined in config.py, re-exported here); ``set_trainable`` sets
requires_grad for every component and logs one line per component. A checkpoint folder (``save_components``) holds
``projector/`` always, ``tower/`` and ``llm/`` when they were trained, ``tokenizer/`` and ``vlm_config.json``;
untrained components are referenced by their id/path.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vilex.config import from_dict, to_dict
from vilex.errors import UserError
from vilex.models.registry import load_pretrained
from vlm import varlen_attention  # noqa: F401  (registers attn_implementation "sdpa_varlen")
from vlm.config import STAGE_TRAINS, VLMModelConfig  # noqa: F401  (STAGE_TRAINS is re-exported here)
from vlm.projector import Projectors, build_projectors, check_compatible, read_projector_folder, save_projectors
from vlm.templates import IGNORE, Turn, build_template
from vilex.models.towers import enable_activation_checkpointing
from vlm.towers import build_tower, load_saved_tower

log = logging.getLogger(__name__)

COMPONENTS = ("tower", "projector", "llm")
CONFIG_FILE = "vlm_config.json"
PROJECTOR_DIR, TOWER_DIR, LLM_DIR, TOKENIZER_DIR = "projector", "tower", "llm", "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


# ----------------------------------------------------------------------------- loading the parts
def load_tokenizer(name_or_path: str | Path, image_token: str) -> tuple[Any, int]:
    """The LLM tokenizer with ``image_token`` added as a special token (and a pad token: EOS when it has none)."""
    from transformers import AddedToken, AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer")
    if image_token not in tok.get_vocab():
        tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {name_or_path} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok, int(tok.convert_tokens_to_ids(image_token))


def load_llm(name_or_path: str | Path, dtype: str, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    llm = load_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "LLM", dtype=DTYPES[dtype],
                          attn_implementation=attn_implementation)
    for attr in _LOGIT_POSTPROCESSING:
        if getattr(llm.config, attr, None) not in (None, 1, 1.0):
            raise UserError(f"LLM {name_or_path}: {attr}={getattr(llm.config, attr)} post-processes logits; the VLM "
                            f"loss applies lm_head only and would not match this model")
    return llm


TRAINING_STATE = ("optimizer.pt", "deepspeed")  # plus rank<r>.pt: what resumes a run, not part of the model


def is_training_state(name: str) -> bool:
    """Whether a checkpoint entry (a top-level name or a relative path) belongs to the training state."""
    top = name.split("/")[0]
    return top in TRAINING_STATE or (top.startswith("rank") and top.endswith(".pt"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A VLM checkpoint folder, or the newest ``checkpoint-*`` of a run/stage folder that verifies; the model files
    are checked against the manifest (a truncated or changed file is named in one line), not the training state,
    which loading a model does not read (for an LLM it is several times the weights)."""
    from vilex.checkpoint import CheckpointManager, folder_problem, verify_folder

    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        verify_folder(path, "VLM checkpoint", skip=is_training_state)
        return path
    for root in (path / "checkpoints", path):
        latest = CheckpointManager(root, keep_last=None).latest_verified(
            lambda c: folder_problem(c, skip=is_training_state))
        if latest is not None and (latest / CONFIG_FILE).is_file():
            return latest
    if not path.exists():
        raise UserError(f"VLM checkpoint not found: {path}")
    raise UserError(f"{path} is not a VLM checkpoint ({CONFIG_FILE} missing) nor a run folder with checkpoints")


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """``vlm_config.json`` of a checkpoint: model config, saved components, image token facts, stage. References
    written relative to the checkpoint ("./…", "../…") come back absolute."""
    from vlm.config import resolve_relative_references

    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    meta["model"] = resolve_relative_references(meta["model"], path)
    return meta


def load_module_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that also works on ZeRO-3-partitioned parameters (deepspeed.zero.Init).

    Partitioned parameters are gathered, filled on rank 0 and re-partitioned (``GatheredParameters(modifier_rank=0)``)
    — LLaVA loads its projector with a plain load_state_dict there, which fails on the 0-size placeholders. Call it
    BEFORE ``deepspeed.initialize``: afterwards the optimizer's fp32 master copy would not see the new values.
    """
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if not dist.is_initialized() or dist.get_rank() == 0:
                module.load_state_dict(tensors)
    else:
        module.load_state_dict(tensors)


def _normalized(value: Any) -> str:
    """A reference as compared across runs: existing local paths made absolute (checkpoints store them so)."""
    text = str(value)
    path = Path(text).expanduser()
    return str(path.resolve()) if value is not None and path.exists() else text


def _same_reference(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> bool:
    return all(_normalized(a.get(k)) == _normalized(b.get(k)) for k in keys)


# ----------------------------------------------------------------------------- the model
class VLM(nn.Module):
    """Vision tower + projectors + causal LM, with the tokenizer that knows the ``<image>`` token."""

    def __init__(self, tower: nn.Module, projectors: Projectors, llm: nn.Module, tokenizer: Any,
                 image_token_id: int, config: VLMModelConfig) -> None:
        super().__init__()
        self.tower = tower
        self.projectors = projectors
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.config = config
        self.trained: tuple[str, ...] = ()
        self.loaded_components: tuple[str, ...] = ()  # components whose weights came from a VLM checkpoint

    # ---- construction
    @classmethod
    def build(cls, config: VLMModelConfig, weights_from: str | Path | None = None) -> VLM:
        """A VLM from its config; components saved in checkpoint ``weights_from`` are loaded from there.

        ``weights_from`` is how a stage continues the previous one: its projector, and its tower / LLM when they
        were trained, replace the fresh or referenced ones. It must have been trained with the same tower and LLM.
        """
        saved: list[str] = []
        src = None
        if weights_from is not None:
            src = resolve_checkpoint(weights_from)
            meta = read_checkpoint_meta(src)
            saved = list(meta["components"])
            theirs = meta["model"]
            if not _same_reference(theirs["tower"], to_dict(config.tower),
                                   ("type", "name_or_path", "feature_layer", "num_vilex_tokens")) or \
                    not _same_reference(theirs["llm"], to_dict(config.llm), ("name_or_path",)):
                t = theirs["tower"]
                raise UserError(f"{src} was trained with tower {t['type']}:{t['name_or_path']} and LLM "
                                f"{theirs['llm']['name_or_path']}; this config uses {config.tower.type}:"
                                f"{config.tower.name_or_path} and {config.llm.name_or_path}")
        dtype = DTYPES[config.llm.dtype]
        tok_path = src / TOKENIZER_DIR if src is not None else (config.llm.tokenizer or config.llm.name_or_path)
        tokenizer, image_token_id = load_tokenizer(tok_path, config.llm.image_token)
        llm_path = src / LLM_DIR if "llm" in saved else config.llm.name_or_path
        llm = load_llm(llm_path, config.llm.dtype, config.llm.attn_implementation)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        tower = (load_saved_tower(src / TOWER_DIR, config.tower, dtype) if "tower" in saved
                 else build_tower(config.tower, dtype))
        llm_width = llm.config.get_text_config().hidden_size
        projectors = build_projectors(config.projector.type, tower.feature_groups, llm_width)
        projectors.to(dtype)
        if src is not None:
            tensors, pconf = read_projector_folder(src / PROJECTOR_DIR)
            check_compatible(projectors, pconf, src / PROJECTOR_DIR)
            load_module_state(projectors, tensors)
        if config.llm.gradient_checkpointing:
            enable_activation_checkpointing(llm)
        model = cls(tower, projectors, llm, tokenizer, image_token_id, config)
        model.loaded_components = tuple(c for c in COMPONENTS if c in saved)
        if src is not None:
            log.info("loaded %s from %s", ", ".join(["projector", *[c for c in saved if c != "projector"]]), src)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> VLM:
        """Everything needed for inference/export from one checkpoint folder (or a run folder's latest)."""
        path = resolve_checkpoint(path)
        meta = read_checkpoint_meta(path)
        config = from_dict(VLMModelConfig, meta["model"])
        model = cls.build(config, weights_from=path)
        model.eval()
        return model

    # ---- sizes
    @property
    def num_image_tokens(self) -> int:
        return int(self.tower.num_image_tokens)

    @property
    def image_size(self) -> int:
        return int(self.tower.image_size)

    # ---- stages
    def set_trainable(self, components: Sequence[str]) -> None:
        """requires_grad for every component: exactly ``components`` learn (the tower's unusable parts never)."""
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise UserError(f"unknown component(s) {sorted(unknown)}; components: {', '.join(COMPONENTS)}")
        self.requires_grad_(False)
        if "projector" in components:
            self.projectors.requires_grad_(True)
        if "llm" in components:
            self.llm.requires_grad_(True)
        if "tower" in components:
            self.tower.requires_grad_(True)
            for p in self.tower.unused_parameters():
                p.requires_grad_(False)
        self.trained = tuple(c for c in COMPONENTS if c in components)
        self.log_components()

    def components(self) -> dict[str, nn.Module]:
        """The three components by name (COMPONENTS order)."""
        return {"tower": self.tower, "projector": self.projectors, "llm": self.llm}

    def log_components(self) -> None:
        """One line per component: trainable or frozen, and how many parameters (full sizes, also when ZeRO-3 has
        partitioned them)."""
        def numel(p: nn.Parameter) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        for name, module in self.components().items():
            total = sum(numel(p) for p in module.parameters())
            trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
            state = "trainable" if trainable else "frozen"
            log.info("%-9s %-9s %15s params (%s trainable)", name, state, f"{total:,}", f"{trainable:,}")

    def parameter_groups(self, lr: float, tower_lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: projector and LLM at ``lr``, tower at ``tower_lr``."""
        groups = []
        for name, module, group_lr in (("projector", self.projectors, lr), ("llm", self.llm, lr),
                                       ("tower", self.tower, tower_lr or lr)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": group_lr, "name": name})
        if not groups:
            raise UserError("nothing to train: no component is trainable")
        return groups

    # ---- forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) -> (K, N, H): every feature group projected, concatenated in the tower's order."""
        groups = self.tower(pixel_values)
        dtype = next(self.projectors.parameters()).dtype
        return torch.cat([self.projectors[name](feats.to(dtype)) for name, feats in groups.items()], dim=1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM input embeddings with image features in place of the image tokens; also returns the features."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        if pixel_values is None:
            if bool(is_image.any()):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            zeros = torch.zeros(1, 3, self.image_size, self.image_size, device=input_ids.device)
            return embeds, self.image_features(zeros)
        feats = self.image_features(pixel_values)
        if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(is_image.sum())} image tokens in input_ids but {feats.shape[0]} image(s) x "
                             f"{feats.shape[1]} features")
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))
        return embeds, feats

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean next-token loss over the learned positions; packed rows pass ``position_ids`` and no mask."""
        embeds, feats = self.embed(input_ids, pixel_values)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
        learned = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[learned]).float()
        count = int(learned.sum())
        loss = F.cross_entropy(logits, targets[learned], reduction="sum") / max(count, 1)
        if pixel_values is None or not count:  # keep every parameter in the graph (zero image, no targets)
            loss = loss + 0.0 * (feats.float().sum() + hidden.float().sum())
        return {"loss": loss, "num_targets": torch.tensor(count)}

    # ---- inference
    def prompt_ids(self, question: str, with_image: bool = True, template: str = "instruct") -> torch.Tensor:
        """(1, T) input ids of a one-turn prompt the model continues (image tokens already expanded)."""
        image_token = self.config.llm.image_token
        tpl = build_template(template, self.tokenizer, image_token)
        if template == "instruct":
            text = tpl.prompt([Turn("user", (f"{image_token}\n" if with_image else "") + question)])
        else:
            text = (self.tokenizer.bos_token or "") + (image_token if with_image else "")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if with_image:
            at = ids.index(self.image_token_id)
            ids = ids[:at] + [self.image_token_id] * self.num_image_tokens + ids[at + 1:]
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
        """Greedy (unless kwargs say otherwise) continuation; returns only the NEW tokens (B, <= max_new_tokens).

        A batch is LEFT-padded (``attention_mask`` 0 on the padding): every row's new tokens then follow its own
        prompt. Position ids count from 0 at each row's first real token, so a padded row gets the positions it
        has alone (transformers derives the same from the mask today; passing them keeps that independent of it).
        """
        embeds, _ = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                 use_cache=True, **kwargs)

    # ---- saving
    def reference_config(self) -> dict[str, Any]:
        """The model config with local reference folders made absolute (so a checkpoint works from anywhere)."""
        data = to_dict(self.config)
        for section, key in (("tower", "name_or_path"), ("llm", "name_or_path"), ("llm", "tokenizer")):
            value = data[section].get(key)
            if value and Path(value).expanduser().exists():
                data[section][key] = str(Path(value).expanduser().resolve())
        return data

    def save_components(self, folder: str | Path, components: Sequence[str] | None = None,
                        stage: str | None = None) -> Path:
        """Write projector/ (always), tower/ and llm/ (those in ``components``, default: the trained ones),
        tokenizer/ and vlm_config.json into an existing folder. Under ZeRO-3 call it inside a parameter gather."""
        folder = Path(folder)
        components = tuple(self.trained if components is None else components)
        save_projectors(folder / PROJECTOR_DIR, self.projectors)
        if "tower" in components:
            self.tower.save_pretrained(folder / TOWER_DIR)
        if "llm" in components:
            self.llm.save_pretrained(str(folder / LLM_DIR))
        self.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
        saved = ["projector", *[c for c in components if c != "projector"]]
        meta = {"model": self.reference_config(), "components": saved, "image_token_id": self.image_token_id,
                "num_image_tokens": self.num_image_tokens, "stage": stage}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return folder

"""toy/pretrain_llm.py — a tiny chat LLM pretrained on toy text (the toy VLMs' language model).

The stage-2 VLM needs a pretrained causal LM with a chat template; none can be downloaded here, so this trains one
on the toy world's text. Two parts, one folder (``out/``, a plain HF folder loadable by
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``):

* tokenizer: byte-level BPE (``vlm.tiny.build_tiny_tokenizer``) with ChatML special tokens and a ChatML chat template,
  its merges learned on the documents of the first ``tokenizer.corpus_steps`` training steps (so the template's
  fixed text — the default system prompt, the QA instruction — becomes a few tokens);
* model: a ``Qwen2ForCausalLM`` (~0.5M parameters, tied embeddings) trained with next-token loss on toy documents
  drawn fresh every step from ``Stream.TRAIN`` scenes (``toy.recipe``):
    - captions (``caption_docs`` per scene: coarse or fine, or both) as plain text ending in ``<|endoftext|>``;
    - ChatML QA (the ``instruct`` template's format, rendered by the tokenizer's chat template): the first user turn
      holds a caption where the VLM will have ``<image>``, then every question of the scene, each with the suite's
      QA instruction (``toy.vlm_data.chat_qa_messages``), in a random order (``qa_docs`` such documents per scene;
      the caption is the coarse one, the fine one, or both: ``both_context_prob``, ``fine_context_prob``);
    - ChatML caption requests (``CAPTION_PROMPT`` after a fine caption -> the coarse caption), with ``caption_chat_prob``.
  Documents are packed into rows of ``train.pack_length`` with position ids restarting per document (no attention
  across documents; ``vlm.packing.Collator``). Plain text learns every token; chat documents go through the VLM's
  own ``instruct`` template and learn their assistant turns (``data.chat_loss: assistant``), exactly as the instruct
  stage will. Why: with every token learned the answers are a few percent of the loss, and a model can reach a low
  held-out loss while answering colour/shape/position questions from a caption at chance (docs/EXPERIMENTS.md, "Toy
  LLM v1"); the captions it must read are still learned from the plain caption documents.

``recipe.json`` records the held-out (``Stream.HELDOUT`` scenes) per-token loss and perplexity of the same document
mix, and greedy exact-match accuracy per question type when a caption stands in for the image, with the chance level
of each type: ``text_qa_heldout`` with the coarse caption, ``text_qa_ceiling`` with the fine and coarse captions
together (the text-only ceiling the VLM's image tokens have to reach; ``vilex toy llm-qa`` measures any context).

``generation_config.eos_token_id`` is ``[<|im_end|>, <|endoftext|>]`` (as Qwen2.5-Instruct's), so generation stops
at the end of an assistant turn.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Sequence, Union

import numpy as np
import torch
from torch.nn import functional as F

from toy.stage0 import Stage0Trainer, Stage0TrainSpec, decay_groups
from vilex.checkpoint import atomic_dir
from vilex.train.run_loop import RunState
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError
from toy.scenes import world
from toy.recipe import Stream, heldout_scenes, toy_rng, write_recipe
from toy.vlm_data import CAPTION_PROMPT, chance_levels, chat_qa_messages

log = logging.getLogger(__name__)

IM_END = "<|im_end|>"


@dataclass
class LLMTokenizerSpec:
    vocab_size: int = cfg_field(640, ge=300, help="BPE vocabulary incl. the 256 byte symbols and special tokens")
    corpus_steps: int = cfg_field(200, ge=1, help="merges are learned on the documents of this many training steps")


@dataclass
class LLMModelSpec:
    width: int = cfg_field(128, ge=8)
    layers: int = cfg_field(3, ge=1)
    heads: int = cfg_field(4, ge=1)
    kv_heads: int = cfg_field(2, ge=1)
    intermediate: int = cfg_field(256, ge=8, help="MLP width")
    max_positions: int = cfg_field(1024, ge=64)
    spare_rows: int = cfg_field(8, ge=0, help="embedding rows beyond the vocabulary (the VLM adds <image> there)")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"model: width {self.width} not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model: heads {self.heads} not divisible by kv_heads {self.kv_heads}")


@dataclass
class LLMDataSpec:
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "scenes_per_step": "set train.global_batch_size (scenes whose documents form one optimizer step)"}

    caption_docs: int = cfg_field(1, ge=0, le=2, help="plain captions per scene: 0, 1 (coarse or fine) or 2 (both)")
    chat_loss: Literal["assistant", "all"] = cfg_field(
        "assistant", help="ChatML documents learn their assistant turns only (as the instruct template) or all")
    qa_docs: int = cfg_field(1, ge=1, le=4, help="ChatML QA documents per scene, each with its own context and "
                             "question order (the answers are the signal that teaches reading a caption)")
    fine_context_prob: float = cfg_field(0.5, ge=0, le=1, help="QA context: fine caption (else coarse)")
    both_context_prob: float = cfg_field(0.0, ge=0, le=1, help="QA context: fine and coarse caption together "
                                         "(drawn first; else fine_context_prob decides)")
    caption_chat_prob: float = cfg_field(0.3, ge=0, le=1, help="a ChatML caption-request document per scene")
    single_object_steps: int = cfg_field(
        0, ge=0, help="a curriculum: the first this many steps draw one-object scenes only, whose caption holds a "
                      "single shape and position, so an answer is copied before it must be matched to its object")


@dataclass
class LLMTrainSpec(Stage0TrainSpec):
    max_steps: int = cfg_field(600, ge=1, help="optimizer steps")
    global_batch_size: int = cfg_field(24, ge=1, help="scenes whose documents form one optimizer step (a "
                                                      "micro-batch is a share of those documents)")
    lr: float = cfg_field(3e-3, gt=0)
    warmup_steps: int = cfg_field(30, ge=0)
    min_lr_ratio: float = cfg_field(0.05, ge=0, le=1)
    threads: int = cfg_field(1, ge=1)
    pack_length: int = cfg_field(512, ge=32, help="tokens per packed row")


@dataclass
class LLMPretrainConfig:
    """One toy-LLM pretraining experiment (configs/toy/llm.yaml)."""

    seed: int = cfg_field(0)
    work_dir: str = cfg_field("runs/toy/llm", help="checkpoints and the training log (not shipped)")
    tokenizer: LLMTokenizerSpec = field(default_factory=LLMTokenizerSpec)
    model: LLMModelSpec = field(default_factory=LLMModelSpec)
    data: LLMDataSpec = field(default_factory=LLMDataSpec)
    train: LLMTrainSpec = field(default_factory=LLMTrainSpec)
    eval_scenes: int = cfg_field(256, ge=1, help="held-out scenes for loss/perplexity")
    eval_questions: int = cfg_field(400, ge=0, help="held-out questions answered greedily (0 = skip)")


# ----------------------------------------------------------------------------- documents
Document = Union[str, list]  # plain text (every token learned) | chat messages (see LLMDataSpec.chat_loss)


def scene_documents(scene: world.Scene, rng: np.random.Generator, spec: LLMDataSpec) -> list[Document]:
    """The training documents of one scene (see the module docstring)."""
    coarse, fine = world.caption_coarse(scene), world.caption_fine(scene)
    captions = [coarse, fine] if spec.caption_docs == 2 else \
        [coarse if rng.random() < 0.5 else fine] if spec.caption_docs == 1 else []
    docs: list[Document] = [c + "<|endoftext|>" for c in captions]
    qas = [(q.question, q.answer) for q in world.questions(scene, rng)]
    for _ in range(spec.qa_docs):
        order = rng.permutation(len(qas))
        # no draw for "both" when it is off: the shipped LLM's document stream stays as it was
        both = spec.both_context_prob > 0 and rng.random() < spec.both_context_prob
        context = join_captions(fine, coarse) if both else fine if rng.random() < spec.fine_context_prob else coarse
        docs.append(chat_qa_messages(context, [qas[i] for i in order]))
    if rng.random() < spec.caption_chat_prob:
        docs.append([{"role": "user", "content": f"{fine}\n{CAPTION_PROMPT}"},
                     {"role": "assistant", "content": coarse}])
    return docs


def step_documents(seed: int, step: int, scenes: int, spec: LLMDataSpec) -> list[Document]:
    """Documents of the ``scenes`` scenes of training step ``step`` (a pure function of seed and step); during the
    ``single_object_steps`` curriculum the scenes hold one object each."""
    rng = toy_rng(seed, Stream.TRAIN, step)
    max_objects = 1 if step < spec.single_object_steps else 3
    docs: list[Document] = []
    for _ in range(scenes):
        docs += scene_documents(world.sample_scene(rng, max_objects=max_objects), rng, spec)
    return docs


def _template_renderer():
    """Renders chat messages with the ChatML template before a tokenizer exists (for the tokenizer's corpus)."""
    from jinja2 import Template

    from vlm.tiny import CHATML_TEMPLATE

    template = Template(CHATML_TEMPLATE)
    return lambda messages: template.render(messages=messages, add_generation_prompt=False)


# ----------------------------------------------------------------------------- tokenizer + model
def build_toy_llm_tokenizer(cfg: LLMPretrainConfig, folder: str | Path) -> Any:
    """The byte-level BPE + ChatML tokenizer, merges learned on the first ``corpus_steps`` steps' documents."""
    from vlm.tiny import build_tiny_tokenizer

    render = _template_renderer()
    # the merges see the full world's text, not the curriculum's one-object captions
    data = dataclasses.replace(cfg.data, single_object_steps=0)
    corpus = [d if isinstance(d, str) else render(d)
              for s in range(cfg.tokenizer.corpus_steps) for d in step_documents(cfg.seed, s, cfg.train.global_batch_size, data)]
    tok = build_tiny_tokenizer(folder, vocab_size=cfg.tokenizer.vocab_size, corpus=corpus)
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    if tok.apply_chat_template(probe, tokenize=False) != render(probe):
        raise ConfigError("the tokenizer's chat template renders differently from the corpus template")
    return tok


def build_toy_llm(spec: LLMModelSpec, tokenizer: Any) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` (tied embeddings) for ``tokenizer``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(vocab_size=len(tokenizer) + spec.spare_rows, hidden_size=spec.width,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [im_end, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def _examples(tokenizer: Any, docs: Sequence[Document], chat_loss: str) -> list[Any]:
    """Documents -> ``vlm.data.Example``s: plain text learns every next token; chat documents go through the VLM's
    own ``instruct`` template (vlm/templates.py, labels verified), learning their assistant turns (or all)."""
    from vlm.data import Example
    from vlm.templates import IGNORE, Segment, TokenizedSample, Turn, build_template, tokenize_segments

    template = build_template("instruct", tokenizer, "<image>")
    out = []
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            segments = [Segment(doc, True)]
        else:
            segments = template.segments(f"doc{i}", [Turn(m["role"], m["content"]) for m in doc], False)
            if chat_loss == "all":
                segments = [Segment(s.text, True) for s in segments]
        ids, labels = tokenize_segments(f"doc{i}", segments, tokenizer)
        ids_t = torch.tensor(ids, dtype=torch.long)
        targets = torch.tensor(labels[1:] + [IGNORE], dtype=torch.long)
        out.append(Example(TokenizedSample(f"doc{i}", ids_t, targets, has_image=False), None))
    return out


def lm_loss(model: Any, batch: Any) -> tuple[torch.Tensor, int]:
    """(mean next-token loss over learned positions, their count) of a packed ``vlm.packing.Batch``."""
    from vlm.templates import IGNORE

    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    learned = batch.targets != IGNORE
    logits = model.lm_head(hidden[learned]).float()
    n = int(learned.sum())
    return F.cross_entropy(logits, batch.targets[learned], reduction="sum") / max(n, 1), n


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_loss(model: Any, tokenizer: Any, cfg: LLMPretrainConfig, collate: Any) -> dict[str, float]:
    """Per-token loss and perplexity on the documents of ``eval_scenes`` held-out scenes."""
    rng = toy_rng(cfg.seed, Stream.HELDOUT, 1)
    docs = [d for s in heldout_scenes(cfg.seed, cfg.eval_scenes) for d in scene_documents(s, rng, cfg.data)]
    model.eval()
    total, count = 0.0, 0
    examples = _examples(tokenizer, docs, cfg.data.chat_loss)
    for start in range(0, len(examples), 64):
        loss, n = lm_loss(model, collate(examples[start:start + 64]))
        total += float(loss) * n
        count += n
    mean = total / max(count, 1)
    return {"loss": round(mean, 4), "perplexity": round(math.exp(mean), 3), "tokens": count, "documents": len(docs)}


# What stands in for the image in a text-only QA context. Neither caption alone states everything a question can
# ask: the coarse one names the 3x3 cell the position questions ask for, the fine one a 5x5 cell that fixes the 3x3
# answer for only ~81% of the position questions (a 5x5 column straddles a 3x3 border); "both" is the full text.
QA_CONTEXTS: tuple[str, ...] = ("coarse", "fine", "both")


def join_captions(fine: str, coarse: str) -> str:
    return f"{fine}; {coarse}"


def qa_context(scene: world.Scene, which: str) -> str:
    if which not in QA_CONTEXTS:
        raise ValueError(f"QA context must be one of {QA_CONTEXTS}, got {which!r}")
    coarse, fine = world.caption_coarse(scene), world.caption_fine(scene)
    return {"coarse": coarse, "fine": fine, "both": join_captions(fine, coarse)}[which]


@torch.no_grad()
def text_qa_accuracy(model: Any, tokenizer: Any, seed: int, n_questions: int,
                     context: str = "coarse") -> dict[str, Any]:
    """Greedy exact match per question type with a caption (``context``: ``QA_CONTEXTS``) in place of the image, on
    held-out scenes; the same questions whatever the context."""
    from benchmarks.toy_task_fns import normalize_answer

    model.eval()
    rng = toy_rng(seed, Stream.HELDOUT, 2)
    hits: dict[str, list[float]] = defaultdict(list)
    answers: dict[str, list[str]] = defaultdict(list)
    asked = 0
    for scene in heldout_scenes(seed + 1, max(1, n_questions)):
        for qa in world.questions(scene, rng):
            if asked >= n_questions:
                break
            text = tokenizer.apply_chat_template(chat_qa_messages(qa_context(scene, context),
                                                                  [(qa.question, "")])[:1],
                                                 tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            pred = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits[qa.type].append(float(normalize_answer(pred) == normalize_answer(qa.answer)))
            answers[qa.type].append(qa.answer)
            asked += 1
        if asked >= n_questions:
            break
    return {t: {"accuracy": round(float(np.mean(h)), 4), "n": len(h), "chance": chance_levels(answers[t])}
            for t, h in sorted(hits.items())}


# ----------------------------------------------------------------------------- training
@dataclass
class LLMRunState(RunState):
    tokens_seen: int = 0


class LLMTrainer(Stage0Trainer):
    """Next-token loss on packed rows of toy documents (plain text and ChatML chats)."""

    name = "pretrain-llm"
    state_class = LLMRunState

    def __init__(self, cfg: LLMPretrainConfig, tokenizer_dir: Path) -> None:
        from vlm.packing import Collator

        super().__init__(cfg)
        self.tokenizer = build_toy_llm_tokenizer(cfg, tokenizer_dir)  # a pure function of the config and seed
        self.model = build_toy_llm(cfg.model, self.tokenizer)
        self.prepare(self.model, decay_groups(self.model, cfg.train.lr, cfg.train.weight_decay), betas=(0.9, 0.98))
        self.collate = Collator(self.tokenizer.pad_token_id, packing=True, row_length=cfg.train.pack_length)

    def batches(self, state: RunState) -> Iterator[Any]:
        for step_index in range(state.step, self.cfg.train.max_steps):
            docs = step_documents(self.seed, step_index, self.cfg.train.global_batch_size, self.cfg.data)
            parts = self.batch.grad_accum  # accumulation: the step's documents in that many near-equal shares
            for part in range(parts):
                share = docs[len(docs) * part // parts: len(docs) * (part + 1) // parts]
                yield self.collate(_examples(self.tokenizer, share, self.cfg.data.chat_loss))

    def micro_step(self, batch: Any) -> torch.Tensor:
        loss, self._tokens = lm_loss(self.model, batch)
        return loss

    def on_micro_batch(self, batch: Any, finite: bool) -> None:
        if finite:
            self.state.tokens_seen += self._tokens


def pretrain_llm(cfg: LLMPretrainConfig, out: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) tokenizer + tiny Qwen2 on toy text, evaluate held-out, write ``out``; returns the metrics."""
    with atomic_dir(out) as tmp:
        trainer = LLMTrainer(cfg, tmp)
        model, tokenizer = trainer.model, trainer.tokenizer
        n_params = sum(p.numel() for p in model.parameters())
        log.info("tokenizer: %d tokens (merges learned on %d steps of documents); toy LLM: %.3fM params; %d steps "
                 "of %d scenes", len(tokenizer), cfg.tokenizer.corpus_steps, n_params / 1e6, cfg.train.max_steps,
                 cfg.train.global_batch_size)
        summary = trainer.train(resume)
        metrics = {
            "heldout": heldout_loss(model, tokenizer, cfg, trainer.collate),
            "text_qa_heldout": text_qa_accuracy(model, tokenizer, cfg.seed, cfg.eval_questions)
            if cfg.eval_questions else {},
            # the ceiling a VLM's image tokens can reach through this LLM: every caption as text
            "text_qa_ceiling": text_qa_accuracy(model, tokenizer, cfg.seed, cfg.eval_questions, context="both")
            if cfg.eval_questions else {},
            **trainer.run_metrics(summary), "train_tokens": trainer.state.tokens_seen,
            "parameters": n_params, "vocab_size": len(tokenizer),
        }
        model.save_pretrained(str(tmp))
        write_recipe(tmp, "llm", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
    log.info("held-out loss %.4f (perplexity %.3f)", metrics["heldout"]["loss"], metrics["heldout"]["perplexity"])
    return metrics

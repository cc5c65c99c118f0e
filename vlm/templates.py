"""vlm/templates.py — a LLaVA conversation -> tokens + next-token targets, with labels that are VERIFIED, never guessed.

Templates (registry ``TEMPLATES``):

* ``align``    LLaVA's "plain" captioning format: ``[BOS] <image> caption EOS``; only ``caption EOS`` is learned.
               As in LLaVA, the human turn contributes nothing but its image (its text is an instruction such as
               "<image>\\nDescribe the photo." that plain training drops).
* ``instruct`` the LLM tokenizer's own chat template (``apply_chat_template``); assistant turns are learned (their
               content and the end-of-turn marker the template puts after it), everything else is masked.

How the labels are built so that they can be checked. A template turns a conversation into text SEGMENTS, each
flagged learned or not; for ``instruct`` the assistant spans are found by rendering growing prefixes of the
conversation (render(turns[:i], add_generation_prompt=True) must be a prefix of render(turns[:i+1]); the difference is
assistant turn i). Every segment is tokenized on its own and the concatenation MUST equal the tokenization of the
whole text; otherwise a BPE merge crossed a segment boundary (or the template is not prefix-stable) and the mask would
be shifted. Such a sample raises ``TemplateMismatchError`` naming its id and the first differing token — LLaVA warns
"tokenization mismatch" and silently masks the whole sample instead, which can quietly drive the loss to 0.

Targets are stored already SHIFTED (``targets[t]`` = the token that position t must predict, -100 = not learned),
per sample, before any packing: no target can ever point across a sample boundary in a packed row.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vilex.errors import DataError
from vilex.registry import Registry

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

TEMPLATES: Registry[Any] = Registry("conversation template")


class SampleError(DataError):
    """A sample that cannot be turned into training tokens (message starts with the sample's id)."""


class TemplateMismatchError(SampleError):
    """Segment-wise tokenization differs from whole-text tokenization: the labels would be misaligned."""


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Segment:
    text: str
    learned: bool


@dataclass
class TokenizedSample:
    """One sample as the model sees it (image placeholders already expanded)."""

    sample_id: str
    input_ids: torch.Tensor  # (T,) long
    targets: torch.Tensor  # (T,) long, shifted next-token targets, IGNORE where nothing is learned
    has_image: bool
    truncated_tokens: int = 0  # tokens cut by max_length (0 = not truncated)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def parse_conversation(sample_id: str, conversations: Any) -> list[Turn]:
    """LLaVA ``conversations`` (``from``/``value`` dicts) -> turns; bad structure raises naming the sample."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(f"sample {sample_id!r}: 'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for i, c in enumerate(conversations):
        if not isinstance(c, dict) or "from" not in c or "value" not in c:
            raise SampleError(f"sample {sample_id!r}: conversation turn {i} needs 'from' and 'value'")
        role = ROLES.get(str(c["from"]).lower())
        if role is None:
            raise SampleError(f"sample {sample_id!r}: turn {i} has unknown role {c['from']!r} "
                              f"(known: {', '.join(sorted(ROLES))})")
        if not isinstance(c["value"], str):
            raise SampleError(f"sample {sample_id!r}: turn {i} 'value' must be a string")
        turns.append(Turn(role, c["value"]))
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise SampleError(f"sample {sample_id!r}: turns must alternate human/gpt starting with human; "
                              f"turn {i + len(turns) - len(body)} is {turn.role}")
    if not body or body[-1].role != "assistant":
        raise SampleError(f"sample {sample_id!r}: the conversation must end with a gpt turn")
    return turns


@TEMPLATES.register("align")
class AlignTemplate:
    """``[BOS] <image> caption EOS`` — LLaVA's plain template for projector alignment."""

    def __init__(self, tokenizer: Any, image_token: str) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        if tokenizer.eos_token is None:
            raise DataError("the align template needs a tokenizer with an EOS token")

    def segments(self, sample_id: str, turns: Sequence[Turn], has_image: bool) -> list[Segment]:
        body = [t for t in turns if t.role != "system"]
        if len(body) != 2:
            raise SampleError(f"sample {sample_id!r}: the align template expects one human and one gpt turn "
                              f"(a caption), got {len(body)} turns")
        caption = body[1].text.strip()
        if self.image_token in caption:
            raise SampleError(f"sample {sample_id!r}: {self.image_token} inside the caption")
        if has_image and self.image_token not in body[0].text:
            raise SampleError(f"sample {sample_id!r}: has an image but no {self.image_token} placeholder")
        segs = [Segment(self.tokenizer.bos_token, False)] if self.tokenizer.bos_token else []
        if has_image:
            segs.append(Segment(self.image_token, False))
        return segs + [Segment(caption, True), Segment(self.tokenizer.eos_token, True)]


@TEMPLATES.register("instruct")
class ChatTemplate:
    """The tokenizer's chat template; assistant spans found by rendering growing prefixes."""

    def __init__(self, tokenizer: Any, image_token: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the instruct template needs a tokenizer with a chat template (tokenizer.chat_template "
                            "is empty); use an instruct/chat model's tokenizer")
        self.tokenizer = tokenizer
        self.image_token = image_token

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        messages = [{"role": t.role, "content": t.text} for t in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt(self, turns: Sequence[Turn]) -> str:
        """The text a model continues at inference (conversation so far + the assistant header)."""
        return self.render(turns, add_generation_prompt=True)

    def segments(self, sample_id: str, turns: Sequence[Turn], has_image: bool) -> list[Segment]:
        segs: list[Segment] = []
        done = ""
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            head = self.render(turns[:i], add_generation_prompt=True)
            full = self.render(turns[: i + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise TemplateMismatchError(
                    f"sample {sample_id!r}: the chat template is not prefix-stable at assistant turn {i} (rendering "
                    f"more turns changes earlier text), so assistant spans cannot be located")
            segs += [Segment(head[len(done):], False), Segment(full[len(head):], True)]
            done = full
        whole = self.render(turns)
        if not whole.startswith(done):
            raise TemplateMismatchError(f"sample {sample_id!r}: the whole conversation renders differently from its "
                                        f"turn-by-turn prefixes")
        if len(whole) > len(done):
            segs.append(Segment(whole[len(done):], False))
        return [s for s in segs if s.text]


def build_template(name: str, tokenizer: Any, image_token: str):
    return TEMPLATES.get(name)(tokenizer, image_token)


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def tokenize_segments(sample_id: str, segments: Sequence[Segment], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(token ids, labels aligned to the ids) from segments, checked against whole-text tokenization."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if seg.learned else [IGNORE] * len(piece)
    whole = tokenizer("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    if whole != ids:
        at = _first_difference(ids, whole)
        seg_tok = tokenizer.convert_ids_to_tokens(ids[at:at + 3])
        whole_tok = tokenizer.convert_ids_to_tokens(whole[at:at + 3])
        raise TemplateMismatchError(
            f"sample {sample_id!r}: template/tokenization mismatch at token {at}: segment-wise {seg_tok} vs whole "
            f"text {whole_tok} ({len(ids)} vs {len(whole)} tokens); the labels would be misaligned")
    return ids, labels


def build_sample(sample_id: str, segments: Sequence[Segment], tokenizer: Any, *, has_image: bool,
                 image_token_id: int, num_image_tokens: int, max_length: int,
                 on_too_long: str = "truncate") -> TokenizedSample:
    """Tokenize + verify, expand the one image placeholder to ``num_image_tokens``, shift targets, truncate."""
    ids, labels = tokenize_segments(sample_id, segments, tokenizer)
    n_placeholders = sum(1 for t in ids if t == image_token_id)
    expected = 1 if has_image else 0
    if n_placeholders != expected:
        what = "an image" if has_image else "no image"
        raise SampleError(f"sample {sample_id!r}: has {what} but {n_placeholders} image placeholder(s) in its "
                          f"text (expected {expected})")
    image_end = 0
    if has_image:
        at = ids.index(image_token_id)
        ids = ids[:at] + [image_token_id] * num_image_tokens + ids[at + 1:]
        labels = labels[:at] + [IGNORE] * num_image_tokens + labels[at + 1:]
        image_end = at + num_image_tokens
    targets = labels[1:] + [IGNORE]
    truncated = 0
    if len(ids) > max_length:
        if on_too_long == "error":
            raise SampleError(f"sample {sample_id!r}: {len(ids)} tokens > max_length {max_length}")
        if image_end > max_length:
            raise SampleError(f"sample {sample_id!r}: max_length {max_length} would cut into its image tokens "
                              f"(they end at position {image_end}); raise max_length")
        truncated = len(ids) - max_length
        ids, targets = ids[:max_length], targets[:max_length]
    return TokenizedSample(sample_id, torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                           has_image, truncated)

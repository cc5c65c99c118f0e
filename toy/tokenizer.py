"""toy/tokenizer.py — the toy world's BPE tokenizer, trained offline, saved as a CLIP tokenizer folder.

Every toy text model (the decoder's CLIP text encoder, the tiny SigLIP's text tower) uses this one
tokenizer; ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it like the SD1 tokenizer:
lowercase, CLIP's word split (letters runs, single digits, punctuation runs), byte-level symbols with the
``</w>`` end-of-word suffix, ``<|startoftext|>`` BOS, ``<|endoftext|>`` EOS, pad = EOS, 77 positions.

How it is built: ``tokenizers``' ``BpeTrainer`` learns merges on a corpus of toy texts (coarse and fine
captions, questions and answers of many sampled scenes) with exactly CLIPTokenizer's normalizer and
pre-tokenizer, so every merge it learns is one the CLIP tokenizer will apply. The vocabulary is then laid
out like CLIP's: the 256 byte symbols, the same 256 with ``</w>``, one entry per merge, BOS, EOS — so any
text (not only toy words) still encodes without unknown tokens, and every toy word is a single token.

Decoding: CLIP's decoder turns each ``</w>`` into a space, so punctuation comes back as a separate word
("left , a", "circle ?"). ``decode_text`` removes exactly those spaces, which makes
``decode_text(encode(x)) == x`` for every toy text (tested); captions of 1–2 objects contain no
punctuation and round-trip through the plain ``tokenizer.decode`` too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from vilex.errors import UserError
from toy.scenes import world

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
# CLIPTokenizer's word split (transformers' tokenization_clip.py), reproduced so training sees the same words.
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPACE_BEFORE_PUNCT = re.compile(r" ([^\sA-Za-z0-9]+)(?= |$)")
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's word split, for ASCII text


def toy_corpus(n_scenes: int, seed: int) -> list[str]:
    """Texts of ``n_scenes`` sampled scenes: coarse + fine caption, every question and answer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for _ in range(n_scenes):
        scene = world.sample_scene(rng)
        texts += [world.caption_coarse(scene), world.caption_fine(scene)]
        for qa in world.questions(scene, rng):
            texts += [qa.question, qa.answer]
    return texts


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (controls, space,
    soft hyphen) are mapped, in byte order, to the code points 256, 257, …
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def learn_merges(texts: Iterable[str], max_merges: int = 4000) -> list[tuple[str, str]]:
    """BPE merges learned by ``tokenizers``' trainer with CLIP's normalizer, word split and ``</w>`` suffix."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=EOS_TOKEN, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=512 + max_merges, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=END_OF_WORD)
    tok.train_from_iterator(list(texts), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers writes merges as [left, right] pairs (older versions: "left right" strings)
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, one token per merge, BOS, EOS."""
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def train_toy_tokenizer(out_dir: str | Path, n_scenes: int = 4000, seed: int = 0,
                        context_length: int = CONTEXT_LENGTH) -> Any:
    """Learn merges on ``toy_corpus(n_scenes, seed)`` and save a CLIPTokenizer folder; returns the tokenizer."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(toy_corpus(n_scenes, seed))
    # Write the two files a CLIP tokenizer is defined by, load them as CLIP does, then let transformers save
    # its own complete folder (tokenizer.json, tokenizer_config.json) beside them.
    (out_dir / "vocab.json").write_text(json.dumps(clip_vocabulary(merges), ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                              unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                              model_max_length=context_length)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_toy_tokenizer(folder: str | Path) -> Any:
    """The CLIPTokenizer saved in ``folder`` (a missing folder is a UserError naming it)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"toy tokenizer not found: {folder} (make it with `vilex toy train-tokenizer`)")
    return CLIPTokenizer.from_pretrained(str(folder))


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """``tokenizer.decode`` without special tokens, with CLIP's space before punctuation removed."""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", tokenizer.decode(list(ids), skip_special_tokens=True))


def tokenizer_stats(tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Round-trip failures, the share of words that are one token, and the longest text (tokens, with BOS/EOS)."""
    words = sorted({w for t in texts for w in _WORDS.findall(t.lower())})
    single = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    encoded = tokenizer(list(texts), add_special_tokens=True).input_ids
    failures = [t for t, ids in zip(texts, encoded) if decode_text(tokenizer, ids) != t]
    return {
        "vocab_size": len(tokenizer),
        "texts": len(texts),
        "round_trip_failures": len(failures),
        "distinct_words": len(words),
        "single_token_words": len(single),
        "single_token_word_fraction": round(len(single) / max(len(words), 1), 4),
        "multi_token_words": [w for w in words if w not in set(single)][:20],
        "max_tokens_per_text": max((len(ids) for ids in encoded), default=0),
    }

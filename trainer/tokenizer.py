"""Tokenizers: byte-level BPE trained on the start of the training source, plain bytes, or a tokenizer.json.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer` underneath, so each one saves to and
loads from a single `tokenizer.json` that checkpoints and exports carry. Two special tokens always
exist: `eos_id` (appended after each document) and `mask_id` (`[MASK]`, the diffusion mask).
Special tokens are never produced by encoding text: the literal string "[MASK]" in a document
encodes as ordinary text.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .corpus import DataError

EOS = "<|endoftext|>"
MASK = "[MASK]"
EOS_ALIASES = (EOS, "</s>", "<eos>", "<|eos|>")
MASK_ALIASES = (MASK, "<mask>", "<|mask|>")
BPE_RECIPE_VERSION = 1  # bump when train_bpe changes: it is part of every cache key


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel pre-tokenizes to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """Text ↔ token ids with `eos_id`, `mask_id` and `vocab_size`, saved as tokenizer.json."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # text is always text: "[MASK]" in a document is not the mask
        vocab = hf.get_vocab(with_added_tokens=True)
        self.eos_id = self._special(vocab, EOS_ALIASES)
        self.mask_id = self._special(self.hf.get_vocab(with_added_tokens=True), MASK_ALIASES)
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.hf.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    def _special(self, vocab: dict[str, int], aliases: Sequence[str]) -> int:
        for name in aliases:
            if name in vocab:
                return vocab[name]
        self.hf.add_special_tokens([AddedToken(aliases[0], special=True, normalized=False)])
        return self.hf.token_to_id(aliases[0])

    # construction ---------------------------------------------------------------------------
    @classmethod
    def byte(cls) -> "Tokenizer":
        """Ids 0-255 are the bytes of the UTF-8 text; 256 is end-of-document, 257 is [MASK]."""
        vocab = {char: b for b, char in byte_to_unicode().items()}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(EOS, special=True, normalized=False), AddedToken(MASK, special=True, normalized=False)])
        return cls(hf)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE (GPT-2 pre-tokenization, all 256 bytes in the alphabet, so any text encodes),
        deterministic for the same texts in the same order. Ids 0 and 1 are end-of-document and [MASK]."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[AddedToken(EOS, special=True, normalized=False), AddedToken(MASK, special=True, normalized=False)],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def load(cls, path: str | Path, field: str = "spec.data.tokenizer.path") -> "Tokenizer":
        path = Path(path).expanduser()
        try:
            return cls.from_json((path / "tokenizer.json" if path.is_dir() else path).read_text())
        except OSError as err:
            raise DataError(f"{field}: cannot read {path}: {err.strerror or err}") from None
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"{field}: {path} is not a tokenizer.json: {str(err).splitlines()[0]}") from None

    # use ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def char_offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets in `text` of each token of `encode(text)`; the tokens of a
        character split over several tokens (byte-level) each cover that whole character."""
        return self.hf.encode(text, add_special_tokens=False).offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id})"

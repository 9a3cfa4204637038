"""Sentencepiece tokenizer: training with the special tokens every objective needs, loading, and the id
tables masking uses.

The special tokens take the lowest ids (pad 0, unk 1, bos 2, eos 3, [CLS] 4, [SEP] 5, [MASK] 6) as control
symbols, so encoding text never produces them. Normalization is the identity and whitespace is kept, so text
round-trips exactly and the Hugging Face export encodes identically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
import torch

from masktrain.data.masking import Vocab

MODEL_FILE = "spm.model"
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "<unk>", "bos": "<s>", "eos": "</s>",
                  "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
CONTROL_SYMBOLS = ["[CLS]", "[SEP]", "[MASK]"]
MAX_PIECE_INPUT = 4000  # sentencepiece ignores training "sentences" longer than its max_sentence_length


def training_lines(docs: Iterable[str], max_docs: int) -> Iterator[str]:
    """Lines of the first `max_docs` documents; long lines are cut so sentencepiece does not drop them."""
    for index, doc in enumerate(docs):
        if index >= max_docs:
            return
        for line in doc.splitlines():
            line = line.strip()
            while line:
                yield line[:MAX_PIECE_INPUT]
                line = line[MAX_PIECE_INPUT:]


def train_tokenizer(docs: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    model_type: str = "unigram", max_docs: int = 200_000, seed: int = 0,
                    threads: int = 1) -> Path:
    """Train on `docs` and write `<out_dir>/spm.model`; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(docs, max_docs),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=SPECIAL_TOKENS["pad"], unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
        control_symbols=CONTROL_SYMBOLS,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,
        max_sentence_length=MAX_PIECE_INPUT * 4,
        num_threads=threads,
        minloglevel=2,
    )
    tmp = out_dir / (MODEL_FILE + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_dir / MODEL_FILE)
    return out_dir


class Tokenizer:
    """A trained sentencepiece model plus the ids the objectives use."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.dir = path if path.is_dir() else path.parent
        model_file = self.dir / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no sentencepiece model (run `masktrain data tokenizer`)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        ids = {name: self.sp.piece_to_id(piece) for name, piece in SPECIAL_TOKENS.items()}
        for name, piece in SPECIAL_TOKENS.items():
            if self.sp.id_to_piece(ids[name]) != piece:
                raise ValueError(f"{model_file}: missing special token {piece} (not trained by masktrain?)")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids["pad"], ids["unk"], ids["bos"], ids["eos"]
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def vocab(self) -> Vocab:
        pieces = [self.sp.id_to_piece(i) for i in range(len(self))]
        special = torch.tensor([self.sp.is_control(i) or self.sp.is_unknown(i) for i in range(len(self))])
        word_start = torch.tensor([p.startswith("\u2581") for p in pieces]) | special
        return Vocab(size=len(self), pad_id=self.pad_id, mask_id=self.mask_id, special=special,
                     word_start=word_start)

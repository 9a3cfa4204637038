"""Sentencepiece tokenizer: training with the special tokens every objective needs, loading, and the id
tables masking uses.

The special tokens take the lowest ids (pad 0, unk 1, bos 2, eos 3, [CLS] 4, [SEP] 5, [MASK] 6) as control
symbols, so encoding text never produces them. Normalization is the identity and whitespace is kept, so text
round-trips exactly, and `save_hf` writes a Hugging Face fast tokenizer that encodes identically (but for text
that begins with a space or spells a special token, see `hf_tokenizer`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from masktrain.data.corpus import InputError
from masktrain.data.files import write_atomic, write_json
from masktrain.data.masking import Vocab

MODEL_FILE = "spm.model"
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "<unk>", "bos": "<s>", "eos": "</s>",
                  "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# Sentencepiece's own special ids come first, then the control symbols in order: [MASK] is id 6.
RESERVED_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)
CONTROL_SYMBOLS = ["[CLS]", "[SEP]", "[MASK]"]
MASK_ID = len(RESERVED_IDS) + CONTROL_SYMBOLS.index(SPECIAL_TOKENS["mask"])
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Byte fallback's 256 byte pieces and the special tokens; every character the corpus needs comes on top."""
MAX_PIECE_INPUT = 4000  # sentencepiece ignores training "sentences" longer than its max_sentence_length
SPACE = "\u2581"
# Byte-fallback pieces of whitespace other than the space (which sentencepiece marks with SPACE): tab, newline,
# vertical tab, form feed, carriage return. Whole-word masking treats them as word boundaries.
WHITESPACE_BYTES = {f"<0x{b:02X}>" for b in (0x09, 0x0A, 0x0B, 0x0C, 0x0D)}
# Piece scores are rounded to multiples of 1/64. Sentencepiece adds scores in float32, Hugging Face's Unigram
# in float64; with scores on this grid both sums are exact, so equal-score segmentations (runs of "*" or "=")
# tie in both and resolve the same way. The rounding moves no score by more than 0.008.
SCORE_GRID = 64


# Sentencepiece splits its training work among its threads and sums the parts in float: each thread count gives
# another tokenizer. A fixed count, not the machine's cores, makes a recipe give the same tokenizer everywhere.
TRAINING_THREADS = 16


def sample_documents(docs: Iterable[str], k: int, seed: int, max_chars: int = 0) -> list[str]:
    """A uniform sample of `k` documents from all of `docs`, seeded, in input order when there are at most k,
    and of at most `max_chars` characters in all (0: any number).

    Reservoir sampling: reads every document once and holds k, so a corpus given as many files (sorted by
    name) gives the tokenizer all of them, not just the first files. Past `max_chars`, the sample keeps the
    documents that still fit, taken in a seeded random order (and, when none does, the start of one).
    Sentencepiece holds about 20 bytes per character it trains on: 200,000 long documents would not fit in
    memory.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for index, doc in enumerate(docs):
        if index < k:
            sample.append(doc)
        elif (slot := rng.randrange(index + 1)) < k:
            sample[slot] = doc
    if not max_chars or sum(map(len, sample)) <= max_chars:
        return sample
    budget, kept = max_chars, set()
    for slot in rng.sample(range(len(sample)), len(sample)):
        if len(sample[slot]) <= budget:
            kept.add(slot)
            budget -= len(sample[slot])
    return [doc for slot, doc in enumerate(sample) if slot in kept] or [sample[0][:max_chars]]


def training_lines(docs: Iterable[str]) -> Iterator[str]:
    """Lines of `docs`; long lines are cut so sentencepiece does not drop them (by index: cutting off the rest
    each time copied it, which took hours on a line of 100 MB)."""
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            for start in range(0, len(line), MAX_PIECE_INPUT):
                yield line[start:start + MAX_PIECE_INPUT]


def interruptible(work: Callable[[], None]) -> None:
    """Run `work` in a thread while this one waits in short joins: Python takes a Ctrl-C only between bytecodes of
    the main thread, so sentencepiece's training, minutes of C++ on a large sample, ignored it to the end. (It
    releases the GIL; the thread is a daemon, ended with the process.)"""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # raised again in the caller's thread
            failures.append(err)

    worker = threading.Thread(target=run, name="sentencepiece", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failures:
        raise failures[0]


def train_tokenizer(docs: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    model_type: str = "unigram", seed: int = 0) -> Path:
    """Train on `docs` and write `<out_dir>/spm.model`; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        interruptible(lambda: spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(docs),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            **RESERVED_IDS,
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
            num_threads=TRAINING_THREADS,
            minloglevel=2,
        ))
    except RuntimeError as err:
        if (need := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))) is None:
            raise
        raise InputError(f"vocab_size {vocab_size} (data.prepare.vocab_size) is below the {need.group(1)} pieces "
                         f"these documents need ({MIN_VOCAB_SIZE} byte and special pieces, the rest characters); "
                         "raise it") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for piece in proto.pieces:
        piece.score = round(piece.score * SCORE_GRID) / SCORE_GRID
    write_atomic(out_dir / MODEL_FILE, proto.SerializeToString())
    return out_dir


class Tokenizer:
    """A trained sentencepiece model plus the ids the objectives use."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.dir = path.parent if path.is_file() else path  # the folder, or its model file
        model_file = self.dir / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no sentencepiece model (`masktrain data prepare CONFIG` builds "
                                    "it, or set data.tokenizer)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:
            raise InputError(f"{model_file}: not a readable sentencepiece model ({err})") from None
        self.model_bytes = model_file.read_bytes()
        ids = {name: self.sp.piece_to_id(piece) for name, piece in SPECIAL_TOKENS.items()}
        for name, piece in SPECIAL_TOKENS.items():
            if self.sp.id_to_piece(ids[name]) != piece:
                raise InputError(f"{model_file}: missing special token {piece} (not trained by masktrain?)")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids["pad"], ids["unk"], ids["bos"], ids["eos"]
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def fingerprint(self) -> str:
        """sha256 of the model file as loaded: shards record it, since two tokenizers of one size map ids
        differently."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """int32 id arrays, encoded on `threads` threads; arrays skip building a Python int per token."""
        return self.sp.encode(texts, num_threads=threads, return_type="numpy")

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def vocab(self) -> Vocab:
        pieces = [self.sp.id_to_piece(i) for i in range(len(self))]
        special = torch.tensor([self.sp.is_control(i) or self.sp.is_unknown(i) for i in range(len(self))])
        word_break = torch.tensor([p in WHITESPACE_BYTES for p in pieces])
        word_start = torch.tensor([p.startswith(SPACE) for p in pieces]) | special | word_break
        return Vocab(size=len(self), pad_id=self.pad_id, mask_id=self.mask_id, special=special,
                     word_start=word_start, word_break=word_break)

    def hf_tokenizer(self, template: str | None = None, max_length: int | None = None):
        """The same tokenizer as a `transformers` fast tokenizer.

        `template` adds special tokens the way the model was trained: "encoder" wraps text as [CLS] ... [SEP],
        "decoder" prefixes <s> (and pads on the left, where batched generation needs it); None adds nothing.
        `max_length`: the model's longest input, which `truncation=True` cuts to (None: no limit).

        Text encodes exactly as sentencepiece encodes it, except the special tokens' spellings ("[MASK]", "<s>",
        ...), which become those tokens, and text that begins with a space: sentencepiece
        adds its "\u2581" prefix even there, and this tokenizer does not (Hugging Face's Metaspace cannot). That
        is the price of "[MASK]" written in text (fill-mask) encoding as training made it, in place of a word:
        "the [MASK] of" is \u2581the [MASK] \u2581of, not \u2581the \u2581 [MASK] \u2581 \u2581of, which a prefix
        added to every piece of text between special tokens gave.
        """
        from tokenizers import Tokenizer as Backend
        from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import generate_merges

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        # Control pieces must never match text, as in sentencepiece, nor must byte pieces (`<0x41>` written in text
        # is 6 characters); byte fallback, which finds byte pieces by name, always offers a path.
        if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
            vocab = {self.sp.id_to_piece(i): i for i in range(len(self))}
            merges = generate_merges({p: i for p, i in vocab.items() if not self.sp.is_control(i)})
            model = models.BPE(vocab, merges, unk_token=SPECIAL_TOKENS["unk"], byte_fallback=True,
                               fuse_unk=True)
        else:
            never = {i for i in range(len(self)) if self.sp.is_control(i) or self.sp.is_byte(i)}
            pieces = [(self.sp.id_to_piece(i), -1e9 if i in never else self.sp.get_score(i)) for i in range(len(self))]
            model = models.Unigram(pieces, unk_id=self.unk_id, byte_fallback=True)
        backend = Backend(model)
        # [MASK] takes the one space before it, which the word it stands for would have held as its "\u2581";
        # nothing else (an added token's lstrip took every space, tab and newline before it).
        mask = SPECIAL_TOKENS["mask"]
        backend.normalizer = normalizers.Replace(f" {mask}", mask)
        # Sentencepiece adds the dummy prefix and splits before every space; "first": only where the input begins,
        # not after a special token.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        cls, sep, bos = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"], SPECIAL_TOKENS["bos"]
        if template == "encoder":
            backend.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                special_tokens=[(cls, self.cls_id), (sep, self.sep_id)])
        elif template == "decoder":
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_id)])
        special = {f"{name}_token": piece for name, piece in SPECIAL_TOKENS.items()}
        # Matched in normalized text, where the space before it is gone (above).
        special["mask_token"] = AddedToken(mask, lstrip=False, rstrip=False, normalized=True, special=True)
        # No token_type_ids: the models have one token type (a pair's second text as type 1 indexed past their
        # table), and a decoder's generate() refuses inputs it does not take, as transformers 4 returns them.
        return PreTrainedTokenizerFast(tokenizer_object=backend, **special, model_max_length=max_length or int(1e30),
                                       padding_side="left" if template == "decoder" else "right",
                                       clean_up_tokenization_spaces=False,
                                       model_input_names=["input_ids", "attention_mask"])

    def save_hf(self, out_dir: str | Path, template: str | None = None, max_length: int | None = None) -> Path:
        """Write the Hugging Face files (tokenizer.json, tokenizer_config.json) and the sentencepiece model."""
        out_dir = Path(out_dir)
        self.hf_tokenizer(template, max_length).save_pretrained(str(out_dir))
        # transformers 5 names its fast tokenizer "TokenizersBackend", a class transformers 4 does not know;
        # both load the same tokenizer.json under the name 4 uses.
        config_file = out_dir / "tokenizer_config.json"
        write_json(config_file, {**json.loads(config_file.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"})
        if (self.dir / MODEL_FILE).resolve() != (out_dir / MODEL_FILE).resolve():
            (out_dir / MODEL_FILE).write_bytes(self.model_bytes)
        return out_dir

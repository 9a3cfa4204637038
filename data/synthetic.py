"""A synthetic key-value retrieval task: `key value` pairs, then queries (`? key value`) for some of the keys.

It stands in for MEAP's key-information retrieval (and the lost-in-the-middle needle tests) at a scale a CPU
trains in minutes. Keys (consonant-vowel-consonant-vowel) and values (consonant-vowel-consonant) are made-up
words drawn at random, keys distinct within a context, so only retrieval predicts a queried value; a BPE
tokenizer trained on the corpus learns each word as one piece. Training documents end with several queries
(more signal per document); a probe example is a context followed by one query for the pair at a chosen
position, so accuracy by position draws the lost-in-the-middle curve. Pure text generation: tokenizing and
scoring are `masktrain.trainer.probe`'s.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
# Separate random streams, so probe contexts are never training documents.
TRAIN_STREAM, PROBE_STREAM = 0, 1


@dataclass(frozen=True)
class RetrievalTask:
    pairs: int = 8
    """Key-value pairs in one context."""
    queries: int = 8
    """Queries after the context of a training document, for distinct pairs (probe examples have one)."""
    keys: int = 64
    """Distinct key words the contexts draw from."""
    values: int = 64
    """Distinct value words."""

    def __post_init__(self):
        problems = []
        if self.pairs < 2:
            problems.append(f"pairs must be at least 2, got {self.pairs}")
        if not 1 <= self.queries <= self.pairs:
            problems.append(f"queries must be within [1, pairs={self.pairs}], got {self.queries}")
        if not self.pairs <= self.keys <= len(words("CVCV")):
            problems.append(f"keys must be within [pairs={self.pairs}, {len(words('CVCV'))}], got {self.keys}")
        if not 2 <= self.values <= len(words("CVC")):
            problems.append(f"values must be within [2, {len(words('CVC'))}], got {self.values}")
        if problems:
            raise ValueError("retrieval task: " + "; ".join(problems))

    @functools.cached_property
    def key_words(self) -> list[str]:
        return chosen(words("CVCV"), self.keys)

    @functools.cached_property
    def value_words(self) -> list[str]:
        return chosen(words("CVC"), self.values)


def words(shape: str) -> list[str]:
    """Every word of a consonant/vowel shape, e.g. "CVC" -> bab, bad, ..."""
    letters = [CONSONANTS if kind == "C" else VOWELS for kind in shape]
    return ["".join(chars) for chars in itertools.product(*letters)]


def chosen(candidates: list[str], count: int) -> list[str]:
    """`count` of the candidates, the same ones for every run seed."""
    return [candidates[i] for i in np.random.default_rng(0).permutation(len(candidates))[:count]]


@dataclass(frozen=True)
class ProbeExample:
    prompt: str
    """The context and the query up to the value: `... ? kavo`."""
    answer: str
    """The value as it follows the prompt: ` mel`."""
    position: int
    """Index of the queried pair in the context (0 = first)."""
    choices: tuple[str, ...]
    """Every value of the context as it would follow the prompt, the answer among them: answering any of them
    shows copying from the context without binding the value to its key."""


def context(task: RetrievalTask, rng: np.random.Generator) -> list[tuple[str, str]]:
    keys, values = task.key_words, task.value_words
    chosen_keys = rng.choice(len(keys), size=task.pairs, replace=False)
    chosen_values = rng.integers(0, len(values), size=task.pairs)
    return [(keys[k], values[v]) for k, v in zip(chosen_keys, chosen_values)]


def pair_text(pairs: list[tuple[str, str]]) -> str:
    # A value follows its key directly (no "=" between): retrieval is then the plain induction pattern
    # "find the earlier occurrence of this token, copy the one after it", which small models learn soonest.
    return " ".join(f"{key} {value}" for key, value in pairs)


def training_documents(task: RetrievalTask, count: int, seed: int) -> Iterator[str]:
    """`count` documents, each a context then `task.queries` queries for distinct pairs of it."""
    for index in range(count):
        rng = np.random.default_rng([seed, TRAIN_STREAM, index])
        pairs = context(task, rng)
        asked = rng.choice(task.pairs, size=task.queries, replace=False)
        queries = " ".join(f"? {pairs[i][0]} {pairs[i][1]}" for i in asked)
        yield f"{pair_text(pairs)} {queries}"


def probe_examples(task: RetrievalTask, position: int, count: int, seed: int) -> list[ProbeExample]:
    """`count` fresh contexts, each queried for its pair at `position`."""
    if not 0 <= position < task.pairs:
        raise ValueError(f"position must be within [0, {task.pairs}), got {position}")
    examples = []
    for index in range(count):
        rng = np.random.default_rng([seed, PROBE_STREAM, position, index])
        pairs = context(task, rng)
        key, value = pairs[position]
        examples.append(ProbeExample(f"{pair_text(pairs)} ? {key}", f" {value}", position,
                                     tuple(sorted({f" {v}" for _, v in pairs}))))
    return examples


def write_corpus(path: str | Path, task: RetrievalTask, count: int, seed: int) -> Path:
    """The training documents as JSON lines (`{"text": ...}`), the format `masktrain data prepare` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        for text in training_documents(task, count, seed):
            handle.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)
    return path

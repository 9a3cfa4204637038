"""Retrieval accuracy of a trained decoder on the synthetic key-value task, by position of the queried pair.

An answer counts as retrieved when greedy decoding after the prompt reproduces every token of the value.
Under teacher forcing that is the same as each answer token being the argmax at its position, so one forward
pass per example decides it. The same pass tells whether the first token predicted starts *some* value of the
context: a model that copies from the context without binding values to keys nearly always does, retrieving
the right one at a rate of about 1/pairs (a little more: a context may hold a value twice), and one that has not
learned to copy at all rarely does. Inputs are clean: MEAP's [MASK] corruption is a training-time device only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from masktrain.data.synthetic import ProbeExample, RetrievalTask, probe_examples
from masktrain.data.tokenizer import Tokenizer
from masktrain.trainer.export import load_trained
from masktrain.trainer.objectives import OBJECTIVES


@dataclass
class Encoded:
    prompt: list[int]
    """<s> + the prompt's ids."""
    answer: list[int]
    choice_starts: set[int]
    """First token of each value of the context (the answer's among them)."""


def encode(tokenizer: Tokenizer, example: ProbeExample) -> Encoded:
    """The prompt and every choice after it, encoded in one call; each choice's tokens must continue the
    prompt's unchanged, or the answer would not be a continuation the model can be scored on."""
    prompt, *continued = (ids.tolist() for ids in tokenizer.encode(
        [example.prompt, *(example.prompt + choice for choice in example.choices)]))
    tails = {}
    for choice, full in zip(example.choices, continued):
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise ValueError(f"the tokenizer does not encode {choice!r} as tokens of its own "
                             f"after the prompt ending {example.prompt[-20:]!r}")
        tails[choice] = full[len(prompt):]
    return Encoded([tokenizer.bos_id] + prompt, tails[example.answer], {tail[0] for tail in tails.values()})


def greedy_answers(model: torch.nn.Module, examples: list[Encoded], pad_id: int,
                   batch_size: int = 64) -> list[list[int]]:
    """The model's argmax at each answer position, with the true answer fed before it (teacher forcing)."""
    predicted = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            # The last answer token is only predicted, never fed.
            rows = [ex.prompt + ex.answer[:-1] for ex in chunk]
            ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
            logits = model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits
            for i, ex in enumerate(chunk):
                first = len(ex.prompt) - 1
                predicted.append(logits[i, first:first + len(ex.answer)].argmax(-1).tolist())
    return predicted


@dataclass
class PositionScore:
    retrieved: float
    """Fraction of examples whose whole answer is the greedy continuation."""
    copied: float
    """Fraction whose first predicted token starts some value of the context (retrieved ones included)."""


def score(model: torch.nn.Module, examples: list[Encoded], pad_id: int) -> PositionScore:
    answers = greedy_answers(model, examples, pad_id)
    retrieved = sum(predicted == ex.answer for predicted, ex in zip(answers, examples))
    copied = sum(predicted[0] in ex.choice_starts for predicted, ex in zip(answers, examples))
    return PositionScore(retrieved / len(examples), copied / len(examples))


def scores_by_position(checkpoint: str | Path, task: RetrievalTask, per_position: int,
                       seed: int) -> list[PositionScore]:
    """Scores on `per_position` fresh contexts, for each position of the queried pair."""
    cfg, tokenizer, model = load_trained(checkpoint)
    if OBJECTIVES[cfg.model.objective].encoder:
        raise ValueError(f"{checkpoint}: retrieval is probed on decoders; this is a {cfg.model.objective} model")
    hf = model.exported()
    scores = []
    for position in range(task.pairs):
        examples = [encode(tokenizer, ex) for ex in probe_examples(task, position, per_position, seed)]
        longest = max(len(ex.prompt) + len(ex.answer) for ex in examples)
        if longest > hf.config.max_position_embeddings:
            raise ValueError(f"probe examples need {longest} positions, the model has "
                             f"{hf.config.max_position_embeddings}: raise data.seq_len or use fewer pairs")
        scores.append(score(hf, examples, tokenizer.pad_id))
    return scores

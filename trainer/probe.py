"""Retrieval accuracy of a trained decoder on the synthetic key-value task, by position of the queried pair.

An answer counts as retrieved when greedy decoding after the prompt reproduces every token of the value.
Under teacher forcing that is the same as each answer token being the argmax at its position, so one forward
pass per example decides it. Inputs are clean: MEAP's [MASK] corruption is a training-time device only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from masktrain.data.synthetic import ProbeExample, RetrievalTask, probe_examples
from masktrain.data.tokenizer import Tokenizer
from masktrain.trainer.export import load_trained
from masktrain.trainer.objectives import OBJECTIVES


def encode(tokenizer: Tokenizer, example: ProbeExample) -> tuple[list[int], list[int]]:
    """(<s> + prompt ids, answer ids), checking the answer's tokens continue the prompt's unchanged."""
    prompt, full = (ids.tolist() for ids in tokenizer.encode([example.prompt, example.prompt + example.answer]))
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError(f"the tokenizer does not encode the answer {example.answer!r} as tokens of its own "
                         f"after the prompt ending {example.prompt[-20:]!r}")
    return [tokenizer.bos_id] + prompt, full[len(prompt):]


def retrieved(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int,
              batch_size: int = 64) -> torch.Tensor:
    """bool[N]: whether each (prompt, answer) pair's answer is the model's greedy continuation."""
    hits = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            # The last answer token is only predicted, never fed.
            rows = [prompt + answer[:-1] for prompt, answer in chunk]
            ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
            logits = model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits
            for i, (prompt, answer) in enumerate(chunk):
                predicted = logits[i, len(prompt) - 1:len(prompt) - 1 + len(answer)].argmax(-1)
                hits.append(bool((predicted == torch.tensor(answer)).all()))
    return torch.tensor(hits)


def accuracy_by_position(checkpoint: str | Path, task: RetrievalTask, per_position: int, seed: int) -> list[float]:
    """Fraction of `per_position` fresh contexts retrieved, for each position of the queried pair."""
    cfg, tokenizer, model = load_trained(checkpoint)
    if OBJECTIVES[cfg.model.objective].encoder:
        raise ValueError(f"{checkpoint}: retrieval is probed on decoders; this is a {cfg.model.objective} model")
    hf = model.exported()
    accuracy = []
    for position in range(task.pairs):
        examples = [encode(tokenizer, ex) for ex in probe_examples(task, position, per_position, seed)]
        longest = max(len(prompt) + len(answer) for prompt, answer in examples)
        if longest > hf.config.max_position_embeddings:
            raise ValueError(f"probe examples need {longest} positions, the model has "
                             f"{hf.config.max_position_embeddings}: raise data.seq_len or use fewer pairs")
        accuracy.append(float(retrieved(hf, examples, tokenizer.pad_id).float().mean()))
    return accuracy

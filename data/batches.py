"""From packed token rows to model inputs, one pure function per objective.

Each takes int64[B, T] token rows, the masking rate for this step and a seeded generator, and returns a dict
of tensors. Labels use -100 (PyTorch's ignore index) at positions that carry no loss.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from masktrain.data import masking
from masktrain.data.masking import IGNORE, PolicyOptions, Vocab


def policy_function(name: str) -> Callable[..., torch.Tensor]:
    """A selection policy by name: one of `masking.POLICIES`, or a researcher's own as `module:function`,
    importable where the ranks and their loader workers run. It is called as the built-in ones are, (ids, vocab,
    rate, gen, options), and returns bool[B, T]; it should draw only from `gen`, so that a resumed run masks as
    the uninterrupted one. Special and padding tokens are never selected, whatever it returns."""
    if name in masking.POLICIES:
        return masking.POLICIES[name]
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"unknown masking policy {name!r}: one of {', '.join(sorted(masking.POLICIES))}, or your "
                         "own as module:function")
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # the researcher's module: whatever its import raises (a SyntaxError...) is the reason
        said = str(err) if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
        raise ValueError(f"masking policy {name!r}: cannot import {module} ({said})") from None
    if not hasattr(imported, attribute):
        raise ValueError(f"masking policy {name!r}: {module} has no {attribute}")
    found = getattr(imported, attribute)
    if not callable(found):
        raise ValueError(f"masking policy {name!r}: {module}.{attribute} is not a function")
    return found


@dataclass(frozen=True)
class MaskSpec:
    """Everything a batch function needs besides the tokens: resolved once from the config."""

    vocab: Vocab
    policy: str = "random"
    mask_prob: float = 0.8
    random_prob: float = 0.1
    share_across_batch: bool = False
    options: PolicyOptions = field(default_factory=PolicyOptions)
    document_start: int | None = None
    """The token each packed document starts with, when documents attend only to themselves
    (data.document_attention): batches then carry `position_ids` (see `document_positions`)."""

    def __post_init__(self):
        policy_function(self.policy)
        if self.share_across_batch and self.policy != "random":
            raise ValueError(f"share_across_batch needs the random policy, not {self.policy!r}")

    def select(self, ids: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
        if self.share_across_batch:
            # One pattern of positions for the whole batch, drawn without looking at the tokens, as the MEAP
            # authors do (random.sample over positions); specials and padding in a row stay unmasked.
            length = ids.shape[1]
            pattern = masking.take_lowest(masking.random_keys((1, length), gen),
                                          torch.tensor([round(rate * length)]))
            return pattern.expand_as(ids) & masking.candidates(ids, self.vocab)
        selected = policy_function(self.policy)(ids, self.vocab, rate, gen, self.options)
        if self.policy in masking.POLICIES:
            return selected
        if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool or selected.shape != ids.shape:
            what = (f"{selected.dtype} {tuple(selected.shape)}" if isinstance(selected, torch.Tensor)
                    else type(selected).__name__)
            raise ValueError(f"masking policy {self.policy!r} returned {what}; a policy returns a bool tensor shaped "
                             f"as its ids, {tuple(ids.shape)}")
        return selected & masking.candidates(ids, self.vocab)


def mlm_batch(ids: torch.Tensor, spec: MaskSpec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Masked LM: corrupted inputs; labels hold the original token at selected positions only."""
    selected = spec.select(ids, rate, gen)
    inputs, labels = masking.corrupt(ids, selected, spec.vocab, spec.mask_prob, spec.random_prob, gen)
    return {"input_ids": inputs, "labels": labels, **padding_mask(ids != spec.vocab.pad_id),
            **document_positions(ids, spec)}


def padding_mask(real: torch.Tensor) -> dict[str, torch.Tensor]:
    """For rows with padding (the last validation rows), `attention_mask` (`real`, bool[B, T]: the real tokens),
    so that encoders attend to real tokens only. Full rows (all training rows) get none and keep unmasked
    attention."""
    return {} if bool(real.all()) else {"attention_mask": real}


def document_positions(ids: torch.Tensor, spec: MaskSpec) -> dict[str, torch.Tensor]:
    """With `spec.document_start`: `position_ids` (int64[B, T]), each token's position within its document,
    counted from the document's start token, or from the row's start for the rest of a document the row before
    began. The models keep attention within the runs these number (see `models.document_mask`)."""
    if spec.document_start is None:
        return {}
    index = torch.arange(ids.shape[1]).expand_as(ids)
    return {"position_ids": index - torch.where(ids == spec.document_start, index, 0).cummax(dim=1).values}


def meap_batch(ids: torch.Tensor, spec: MaskSpec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MEAP: a fraction of *inputs* become [MASK]; labels are the untouched tokens (plain next-token loss)."""
    selected = spec.select(ids, rate, gen)
    inputs, _ = masking.corrupt(ids, selected, spec.vocab, spec.mask_prob, spec.random_prob, gen)
    return {"input_ids": inputs, "labels": causal_labels(ids, spec.vocab), **document_positions(ids, spec)}


def ntp_batch(ids: torch.Tensor, spec: MaskSpec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Next-token prediction: inputs are the tokens; the model shifts labels itself."""
    return {"input_ids": ids, "labels": causal_labels(ids, spec.vocab), **document_positions(ids, spec)}


def causal_labels(ids: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """The tokens themselves (the model shifts them), with padding carrying no loss."""
    return ids.masked_fill(ids == vocab.pad_id, IGNORE)


def mae_batch(ids: torch.Tensor, spec: MaskSpec, rate: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MAE-LM: positions turned into [MASK] are removed from the encoder input.

    Returns the encoder's visible tokens left-aligned with their original positions (`visible_ids`,
    `visible_pos`, `visible_mask`; padded to the longest row), `removed` (bool[B, T]: where the decoder puts
    the [MASK] embedding instead of an encoder output) and `labels` (the original token at every selected
    position). Selected tokens replaced by a random token or kept stay visible, as in 80/10/10; the reference
    recipe (mask_prob 1.0) removes all of them. Padding is neither: rows that have it also get the decoder's
    `attention_mask` (see `padding_mask`). Document attention adds the whole rows' `position_ids`, which number
    the visible tokens too.
    """
    selected = spec.select(ids, rate, gen)
    corrupted, labels = masking.corrupt(ids, selected, spec.vocab, spec.mask_prob, spec.random_prob, gen)
    removed = selected & (corrupted == spec.vocab.mask_id)
    real = ids != spec.vocab.pad_id
    visible = ~removed & real
    counts = visible.sum(dim=1, keepdim=True)
    width = max(int(counts.max()), 1)  # an all-padding batch (ranks short of validation rows) still runs
    # Each visible token goes to slot "visible tokens before it" (a running count: no sort needed); removed
    # ones all go to one spare column past the end, dropped afterwards.
    slot = torch.where(visible, visible.cumsum(dim=1) - 1, width)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    visible_pos = torch.zeros((ids.shape[0], width + 1), dtype=torch.long).scatter_(1, slot, positions)[:, :width]
    visible_mask = torch.arange(width).unsqueeze(0) < counts
    visible_ids = corrupted.gather(1, visible_pos).masked_fill_(~visible_mask, spec.vocab.pad_id)
    return {"visible_ids": visible_ids, "visible_pos": visible_pos, "visible_mask": visible_mask,
            "removed": removed, "labels": labels, **padding_mask(real), **document_positions(ids, spec)}

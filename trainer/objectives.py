"""Objectives by name: each pairs a batch function (what the loader produces) with a model builder.

Model code imports transformers, which takes seconds; builders import it only when a model is built so that
config validation, which needs only this registry's names, stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from masktrain.data import batches


@dataclass(frozen=True)
class Objective:
    name: str
    archs: tuple[str, ...]
    """Transformers architectures it can be built on."""
    batch: Callable
    """`masktrain.data.batches` function turning packed rows into model inputs."""
    encoder: bool
    """Encoders pack documents as [CLS] doc [SEP], decoders as <s> doc </s>."""
    masked: bool
    """Whether it needs a masking rate."""
    policies: tuple[str, ...]
    """Masking policies it supports."""
    model: str
    """Builder name in `masktrain.trainer.models.BUILDERS`."""


# Every selection policy serves both kinds: encoders predict the selected tokens, MEAP decoders see them as
# [MASK] in their inputs and still predict every next token.
ENCODER_POLICIES = ("random", "whole_word", "span", "importance", "pmi")
DECODER_POLICIES = ("random", "whole_word", "span", "importance", "pmi")

OBJECTIVES: dict[str, Objective] = {
    "mlm": Objective("mlm", ("bert", "roberta"), batches.mlm_batch, encoder=True, masked=True,
                     policies=ENCODER_POLICIES, model="masked_lm"),
    "mae_lm": Objective("mae_lm", ("bert", "roberta"), batches.mae_batch, encoder=True, masked=True,
                        policies=ENCODER_POLICIES, model="mae_lm"),
    "meap": Objective("meap", ("llama",), batches.meap_batch, encoder=False, masked=True,
                      policies=DECODER_POLICIES, model="causal_lm"),
    "ntp": Objective("ntp", ("llama",), batches.ntp_batch, encoder=False, masked=False,
                     policies=DECODER_POLICIES, model="causal_lm"),
}

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
    """Whether it needs a masking rate. Every selection policy (`masking.POLICIES`) serves every masked objective:
    encoders predict the selected tokens, MEAP decoders see them as [MASK] and still predict every next token."""
    model: str
    """Builder name in `masktrain.trainer.models.BUILDERS`."""


OBJECTIVES: dict[str, Objective] = {
    "mlm": Objective("mlm", ("bert", "roberta"), batches.mlm_batch, encoder=True, masked=True, model="masked_lm"),
    "mae_lm": Objective("mae_lm", ("bert", "roberta"), batches.mae_batch, encoder=True, masked=True, model="mae_lm"),
    "meap": Objective("meap", ("llama",), batches.meap_batch, encoder=False, masked=True, model="causal_lm"),
    "ntp": Objective("ntp", ("llama",), batches.ntp_batch, encoder=False, masked=False, model="causal_lm"),
}

"""Objective models: stock `transformers` models (built from configs, never downloaded) wrapped so that
the forward pass takes a loader batch and returns the loss.

The wrappers gather the positions that carry a loss *before* the LM head, so head compute scales with the
number of targets (15% of tokens for MLM) rather than the sequence length. The wrapped Hugging Face model is
`module.hf`; exporting saves it as it is.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from masktrain.data.batches import IGNORE
from masktrain.launcher.config import ModelConfig


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over the given targets, plus the sums evaluation aggregates across ranks."""
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = torch.tensor(targets.numel(), device=logits.device)
    return {"loss": loss_sum / count.clamp(min=1), "loss_sum": loss_sum.detach(), "tokens": count,
            "correct": (logits.detach().argmax(-1) == targets).sum()}


class MaskedLM(nn.Module):
    """BERT/RoBERTa masked LM: loss only at selected positions."""

    def __init__(self, hf: nn.Module, head: str):
        super().__init__()
        self.hf = hf
        self.head_name = head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        where = labels != IGNORE
        logits = getattr(self.hf, self.head_name)(hidden[where])
        return token_loss(logits, labels[where])

    def exported(self) -> nn.Module:
        return self.hf


class CausalLM(nn.Module):
    """Llama-style decoder for NTP and MEAP: next-token loss at every position with a real next token."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = self.hf.lm_head(hidden[:, :-1][where])
        return token_loss(logits, targets[where])

    def exported(self) -> nn.Module:
        return self.hf


def max_positions(cfg: ModelConfig, seq_len: int) -> int:
    return cfg.max_position_embeddings or seq_len


def encoder_config(cfg: ModelConfig, seq_len: int, vocab_size: int, pad_id: int, layers: int | None = None):
    """A BertConfig or RobertaConfig sized by `cfg` (RoBERTa's positions start after the padding id)."""
    from transformers import BertConfig, RobertaConfig

    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=layers if layers is not None else cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                  hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                  pad_token_id=pad_id, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "roberta":
        return RobertaConfig(max_position_embeddings=max_positions(cfg, seq_len) + pad_id + 2, type_vocab_size=1,
                             **common)
    return BertConfig(max_position_embeddings=max_positions(cfg, seq_len), type_vocab_size=1, **common)


def masked_lm(cfg: ModelConfig, seq_len: int, tokenizer) -> nn.Module:
    from transformers import BertForMaskedLM, RobertaForMaskedLM

    config = encoder_config(cfg, seq_len, len(tokenizer), tokenizer.pad_id)
    if cfg.arch == "roberta":
        return MaskedLM(RobertaForMaskedLM(config), head="lm_head")
    return MaskedLM(BertForMaskedLM(config), head="cls")


def causal_lm(cfg: ModelConfig, seq_len: int, tokenizer) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
                         max_position_embeddings=max_positions(cfg, seq_len), attention_dropout=cfg.dropout,
                         initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id)
    return CausalLM(LlamaForCausalLM(config))


BUILDERS: dict[str, Callable[[ModelConfig, int, object], nn.Module]] = {
    "masked_lm": masked_lm,
    "causal_lm": causal_lm,
}


def build_model(objective, cfg: ModelConfig, seq_len: int, tokenizer) -> nn.Module:
    return BUILDERS[objective.model](cfg, seq_len, tokenizer)

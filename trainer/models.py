"""Objective models: stock `transformers` models (built from configs, never downloaded) wrapped so that
the forward pass takes a loader batch and returns the loss.

The wrappers gather the positions that carry a loss *before* the LM head, so head compute scales with the
number of targets (15% of tokens for MLM) rather than the sequence length. `exported()` is the Hugging Face
model a checkpoint becomes; `auto_class` names the `transformers` Auto class that loads it back.

Every Hugging Face model is built with `_from_config`: under ZeRO-3 (see `partitioned`) that constructs it
inside `deepspeed.zero.Init` and initializes its weights one gathered module at a time, so no rank ever holds
the whole model.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from masktrain.data.batches import IGNORE
from masktrain.launcher.config import ModelConfig


@dataclass(frozen=True)
class TokenIds:
    """What a model needs to know about the tokenizer."""

    size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    @classmethod
    def of(cls, tokenizer) -> TokenIds:
        return cls(len(tokenizer), tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy over the given targets: summed (what training scales and backpropagates) and their mean,
    plus the counts evaluation aggregates across ranks."""
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = torch.tensor(targets.numel(), device=logits.device)
    return {"loss": loss_sum / count.clamp(min=1), "loss_sum": loss_sum, "tokens": count,
            "correct": (logits.detach().argmax(-1) == targets).sum()}


def document_mask(config, dtype: torch.dtype, positions: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """A bidirectional attention mask, for `config`'s attention kernel, that keeps each token within its document
    (data.document_attention) and off padding (`real`: bool[B, T], or None). `positions` [B, T] number the tokens
    within their documents (`batches.document_positions`); a document starts wherever they do not increase, which
    also holds for a subset of a row's tokens in order (MAE-LM's visible ones)."""
    from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function

    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    states = torch.empty(*positions.shape, 0, dtype=dtype, device=positions.device)  # what the mask is built for
    return create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=real,
                                     and_mask_function=packed_sequence_mask_function(starts.cumsum(dim=1)))


def weights(module: nn.Module) -> int:
    """Entries of the weight matrices of `module` (what multiplies; biases and norms only add or scale), counted
    whole where ZeRO-3 has partitioned them."""
    return sum(math.prod(getattr(p, "ds_shape", p.shape)) for p in module.parameters()
               if len(getattr(p, "ds_shape", p.shape)) >= 2)


def attention_flops(layers: int, hidden: int, length: float) -> float:
    """Training FLOPs per token of the attention scores and their weighted sum over `length` keys (PaLM, app. B)."""
    return 12.0 * layers * hidden * length


def body_flops(base_model: nn.Module, embeddings: nn.Module, length: float) -> float:
    """Training FLOPs per token of a transformer stack: 6 per weight it multiplies (forward 2, backward 4) plus
    attention. Embedding tables are looked up, not multiplied."""
    config = base_model.config
    return (6.0 * (weights(base_model) - weights(embeddings))
            + attention_flops(config.num_hidden_layers, config.hidden_size, length))


class MaskedLM(nn.Module):
    """BERT/RoBERTa masked LM: loss only at selected positions."""

    auto_class = "AutoModelForMaskedLM"

    def __init__(self, hf: nn.Module, head: str, position_offset: int):
        super().__init__()
        self.hf = hf
        self.head_name = head
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`position_ids` (document attention): each token's position within its document."""
        if position_ids is not None:
            attention_mask = document_mask(self.hf.config, self.hf.dtype, position_ids, attention_mask)
            position_ids = position_ids + self.position_offset
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids).last_hidden_state
        where = labels != IGNORE
        logits = getattr(self.hf, self.head_name)(hidden[where])
        return token_loss(logits, labels[where])

    @staticmethod
    def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many targets `batch` holds (known before the forward)."""
        return (batch["labels"] != IGNORE).sum()

    def flops_per_token(self, rate: float, seq_len: int, mask_prob: float = 1.0) -> float:
        """Training FLOPs per input token when a `rate` share of positions carries a target: the head runs there
        only. How the targets are corrupted (`mask_prob`) changes nothing here; it does for MAE-LM."""
        base = self.hf.base_model
        return body_flops(base, base.embeddings, seq_len) + 6.0 * weights(getattr(self.hf, self.head_name)) * rate

    def exported(self) -> nn.Module:
        return self.hf


class CausalLM(nn.Module):
    """Llama-style decoder for NTP and MEAP: next-token loss at every position with a real next token."""

    auto_class = "AutoModelForCausalLM"

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`position_ids` (document attention): each token's position within its document; transformers keeps
        attention within the runs they number. Without a cache: a training model asks for one by default, which
        then switches that off, and nothing reads it."""
        hidden = self.hf.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = self.hf.lm_head(hidden[:, :-1][where])
        return token_loss(logits, targets[where])

    @staticmethod
    def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many targets `batch` holds (known before the forward): each position's next token."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def flops_per_token(self, rate: float, seq_len: int, mask_prob: float = 1.0) -> float:
        """Training FLOPs per input token; every position predicts, whatever share MEAP masks (`rate`, `mask_prob`)."""
        model = self.hf.model
        return body_flops(model, model.embed_tokens, seq_len) + 6.0 * weights(self.hf.lm_head)

    def exported(self) -> nn.Module:
        return self.hf


def max_positions(cfg: ModelConfig, seq_len: int) -> int:
    return cfg.max_position_embeddings or seq_len


def encoder_config(cfg: ModelConfig, seq_len: int, ids: TokenIds, decoder: bool = False):
    """A BertConfig or RobertaConfig sized by `cfg`, or by its MAE-LM decoder keys when `decoder` (RoBERTa's
    positions start after the padding id). The special ids are the tokenizer's: RobertaConfig's own defaults
    (bos 0, eos 2) name other tokens in an exported config.json."""
    from transformers import BertConfig, RobertaConfig

    width, feed_forward, heads = cfg.decoder_shape() if decoder else (cfg.hidden_size, cfg.intermediate_size,
                                                                      cfg.num_heads)
    common = dict(vocab_size=ids.size, hidden_size=width,
                  num_hidden_layers=cfg.decoder_layers if decoder else cfg.num_layers,
                  num_attention_heads=heads, intermediate_size=feed_forward,
                  hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                  pad_token_id=ids.pad_id, bos_token_id=ids.bos_id, eos_token_id=ids.eos_id,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                  **({"layer_norm_eps": cfg.norm_eps} if cfg.norm_eps else {}))
    if cfg.arch == "roberta":
        return RobertaConfig(max_position_embeddings=max_positions(cfg, seq_len) + ids.pad_id + 2, type_vocab_size=1,
                             **common)
    return BertConfig(max_position_embeddings=max_positions(cfg, seq_len), type_vocab_size=1, **common)


def encoder_classes(arch: str) -> tuple[type, type, str]:
    """(masked-LM class, bare encoder class, name of the masked-LM head attribute) for an encoder arch."""
    from transformers import BertForMaskedLM, BertModel, RobertaForMaskedLM, RobertaModel

    if arch == "roberta":
        return RobertaForMaskedLM, RobertaModel, "lm_head"
    return BertForMaskedLM, BertModel, "cls"


def position_offset(arch: str, pad_id: int) -> int:
    """RoBERTa numbers real tokens from pad_id + 1 (fairseq's convention); BERT from 0."""
    return pad_id + 1 if arch == "roberta" else 0


def masked_lm(cfg: ModelConfig, seq_len: int, ids: TokenIds) -> nn.Module:
    mlm_class, _, head = encoder_classes(cfg.arch)
    return MaskedLM(mlm_class._from_config(encoder_config(cfg, seq_len, ids)), head=head,
                    position_offset=position_offset(cfg.arch, ids.pad_id))


def mae_lm(cfg: ModelConfig, seq_len: int, ids: TokenIds) -> nn.Module:
    from masktrain.trainer.mae import MaeLM

    mlm_class, encoder_class, head = encoder_classes(cfg.arch)
    hf = mlm_class._from_config(encoder_config(cfg, seq_len, ids))
    decoder = encoder_class._from_config(encoder_config(cfg, seq_len, ids, decoder=True),
                                         add_pooling_layer=False)
    width = cfg.decoder_shape()[0]
    if width == cfg.hidden_size:
        # No parameters, so checkpoints of same-width models keep their keys.
        maps = nn.Identity(), nn.Identity()
    else:
        # As the reference: encoder_to_decoder has a bias, the map back to the tied output table (embed_linear)
        # has none.
        maps = (linear(cfg.hidden_size, width, True, cfg.init_std), linear(width, cfg.hidden_size, False, cfg.init_std))
    return MaeLM(hf, decoder, head, ids.mask_id, position_offset(cfg.arch, ids.pad_id), *maps)


def causal_lm(cfg: ModelConfig, seq_len: int, ids: TokenIds) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=ids.size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
                         max_position_embeddings=max_positions(cfg, seq_len), attention_dropout=cfg.dropout,
                         initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                         bos_token_id=ids.bos_id, eos_token_id=ids.eos_id, pad_token_id=ids.pad_id,
                         **({"rms_norm_eps": cfg.norm_eps} if cfg.norm_eps else {}))
    return CausalLM(LlamaForCausalLM._from_config(config))


BUILDERS: dict[str, Callable[[ModelConfig, int, TokenIds], nn.Module]] = {
    "masked_lm": masked_lm,
    "mae_lm": mae_lm,
    "causal_lm": causal_lm,
}


# The layers whose outputs are added to the residual stream: Llama's, then BERT's and RoBERTa's.
RESIDUAL_OUTPUTS = re.compile(r"(self_attn\.o_proj|mlp\.down_proj"
                              r"|attention\.output\.dense|layer\.\d+\.output\.dense)$")


@contextmanager
def initializing(module: nn.Module) -> Iterator[None]:
    """`module` with its parameters whole, to initialize in place: inside a ZeRO-3 `partitioned` build they are
    gathered, and rank 0's values are kept."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        yield


def linear(inputs: int, outputs: int, bias: bool, std: float) -> nn.Linear:
    """A linear layer initialized as transformers initializes BERT's (normal weights, zero bias). Inside a ZeRO-3
    `partitioned` build it is partitioned on construction, as `_from_config` builds models."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    building = nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        building = deepspeed.zero.Init(config_dict_or_path=deepspeed_config())
    with building:
        layer = nn.Linear(inputs, outputs, bias=bias)
    with initializing(layer):
        nn.init.normal_(layer.weight, std=std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return layer


def init_residual_outputs(model: nn.Module, std: float) -> None:
    """Draw the weights of the layers that write into the residual stream again, at `std`."""
    for name, module in model.named_modules():
        if RESIDUAL_OUTPUTS.search(name):
            with initializing(module):
                nn.init.normal_(module.weight, std=std)


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization section)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


@contextmanager
def partitioned(deepspeed_config: dict | None) -> Iterator[None]:
    """Models built in this context are ZeRO-3 partitioned from the start when `deepspeed_config` is stage 3.

    transformers' `_from_config` enters `deepspeed.zero.Init` while a `HfDeepSpeedConfig` is alive; the
    context removes it again so that nothing built later (exports, evaluation copies) is partitioned.
    """
    if zero_stage(deepspeed_config or {}) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(deepspeed_config)  # transformers keeps only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def build_model(objective, cfg: ModelConfig, seq_len: int, ids: TokenIds,
                deepspeed_config: dict | None = None) -> nn.Module:
    """The objective's model; pass the run's DeepSpeed config to build it partitioned under ZeRO-3."""
    if objective.model not in BUILDERS:
        raise KeyError(f"objective {objective.name!r} names model builder {objective.model!r}; "
                       f"known builders: {', '.join(sorted(BUILDERS))}")
    with partitioned(deepspeed_config):
        model = BUILDERS[objective.model](cfg, seq_len, ids)
        if cfg.residual_init_std:
            init_residual_outputs(model, cfg.residual_init_std)
    return model

"""MAE-LM (Meng et al., ICLR 2024; yumeng5/MAE-LM, fairseq `ae` arch): masked tokens are removed from the
encoder's input instead of being replaced by [MASK], so the encoder never sees a token it will not see when
fine-tuned, and it runs on the visible tokens only.

A shallow bidirectional decoder receives the encoder outputs scattered back to their original positions with
the [MASK] embedding in the removed slots, and the LM head predicts only at the selected positions. The encoder
alone is the pre-trained model: `exported()` is a bare BertModel/RobertaModel that `AutoModel` loads.

A decoder narrower than the encoder (`model.decoder_hidden_size`) is linked to it as the reference links one
(fairseq/models/ae/model.py): a linear map from the encoder's width into the decoder's input, and one back to
the encoder's width before the LM head, whose output table stays tied to the encoder's token embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from masktrain.data.batches import IGNORE
from masktrain.trainer.models import MaskedLM, attention_flops, body_flops, document_mask, token_loss, weights


def at_positions(values: torch.Tensor, visible_pos: torch.Tensor, visible_mask: torch.Tensor,
                 length: int) -> torch.Tensor:
    """[B, length, ...]: `values` of the real visible tokens ([N, ...], in `visible_mask` order) at their
    original positions, zeros everywhere else."""
    rows = torch.arange(visible_pos.shape[0], device=visible_pos.device).unsqueeze(1).expand_as(visible_pos)
    return values.new_zeros(visible_pos.shape[0], length, *values.shape[1:]).index_put(
        (rows[visible_mask], visible_pos[visible_mask]), values)


class MaeLM(nn.Module):
    auto_class = "AutoModel"

    def __init__(self, hf: nn.Module, decoder: nn.Module, head: str, mask_id: int, position_offset: int,
                 to_decoder: nn.Module, from_decoder: nn.Module):
        """`hf` is a masked-LM model: its base model is the encoder and its head, tied to the encoder's token
        embeddings, reads the decoder's outputs. `decoder` is a bare encoder stack of the decoder's depth and
        width; `to_decoder` and `from_decoder` map between the widths (identities when they are equal)."""
        super().__init__()
        self.hf = hf
        self.decoder = decoder
        self.to_decoder = to_decoder
        self.from_decoder = from_decoder
        self.head_name = head
        self.mask_id = mask_id
        self.position_offset = position_offset
        # The decoder's only token, [MASK], is looked up in the encoder's table (`forward`; the reference fills
        # masked slots with embed_tokens.weight[mask_idx]), so a table of its own would go unused: sharing the
        # encoder's keeps one out of the optimizer and the checkpoints.
        decoder.set_input_embeddings(hf.get_input_embeddings())

    def encode(self, visible_ids: torch.Tensor, visible_pos: torch.Tensor, visible_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None, words: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder outputs [B, V, H] of the visible tokens, each at its original position: in the row, or with
        document attention in its document (`position_ids` [B, T]), attending to its document's visible tokens.
        `words` are the visible tokens' word embeddings [B, V, H] where they have been looked up already."""
        positions, mask = visible_pos, visible_mask
        if position_ids is not None:
            positions = position_ids.gather(1, visible_pos)
            # Padding slots sit at the row's position 0, so each is a document of its own, which no real token
            # reads: masked as padding too, its row would have no key at all, which some GPU kernels turn to NaN.
            mask = document_mask(self.hf.config, self.hf.dtype, positions, None)
        return self.hf.base_model(input_ids=None if words is not None else visible_ids, inputs_embeds=words,
                                  attention_mask=mask, position_ids=positions + self.position_offset).last_hidden_state

    def forward(self, visible_ids: torch.Tensor, visible_pos: torch.Tensor, visible_mask: torch.Tensor,
                removed: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`attention_mask` (bool[B, T]) marks the real tokens of rows that have padding; `position_ids` (document
        attention) each token's position within its document."""
        # The visible tokens and [MASK] are looked up together: the backward of each lookup writes a gradient the
        # size of the whole table, which for [MASK]'s one row alone cost ~80 ms of a bert-base micro-batch (~1.5%)
        # on one CPU thread. Called as a module (not indexed as a weight) so that ZeRO-3 gathers the partitioned
        # table first.
        mask_token = torch.full((1,), self.mask_id, dtype=torch.long, device=removed.device)
        words = self.hf.get_input_embeddings()(torch.cat([visible_ids.reshape(-1), mask_token]))
        # Projected per token, so only the real visible rows are: the same as projecting every slot.
        encoded = self.to_decoder(self.encode(visible_ids, visible_pos, visible_mask, position_ids,
                                              words[:-1].view(*visible_ids.shape, -1))[visible_mask])
        slots = at_positions(encoded, visible_pos, visible_mask, removed.shape[1])
        mask_embedding = self.to_decoder(words[-1]).to(slots.dtype)
        slots = torch.where(removed.unsqueeze(-1), mask_embedding, slots)
        where = labels != IGNORE
        decoded = self.from_decoder(self.decode(slots, where, attention_mask, position_ids))
        return token_loss(getattr(self.hf, self.head_name)(decoded), labels[where])

    def decode(self, slots: torch.Tensor, where: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's outputs [N, H] at the `where` positions of `slots` [B, T, H], equal to running the whole
        decoder and keeping those rows. The last layer's attention reads every position, but nothing downstream
        reads its other rows, so its output projection and feed-forward (three quarters of its weight matmuls) run
        only where a prediction is made: the reference computes them everywhere and discards the rest."""
        *body, last = self.decoder.encoder.layer
        documents = position_ids is not None
        hidden = self.decoder.embeddings(inputs_embeds=slots,
                                         position_ids=position_ids + self.position_offset if documents else None)
        mask = (document_mask(self.decoder.config, hidden.dtype, position_ids, attention_mask) if documents else
                create_bidirectional_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=attention_mask))
        for layer in body:
            hidden = layer(hidden, attention_mask=mask)
        context, _ = last.attention.self(hidden, attention_mask=mask)
        return last.feed_forward_chunk(last.attention.output(context[where], hidden[where]))

    targets = staticmethod(MaskedLM.targets)  # labels at every selected position, removed or not (see mae_batch)

    def flops_per_token(self, rate: float, seq_len: int, mask_prob: float = 1.0) -> float:
        """Training FLOPs per input token when a `rate` share is selected: the encoder (and the map into a narrower
        decoder) runs on the visible tokens, attending to visible ones; the decoder on every position, except the
        last layer's projections after attention, the map back and the head, which run at the selected ones (see
        `decode`). Only the `mask_prob` share of the selected tokens is removed: the random and kept ones of an
        80/10/10 split stay in the encoder's input."""
        visible = 1.0 - rate * mask_prob
        encoder = self.hf.base_model
        *body, last = self.decoder.encoder.layer
        everywhere = sum(weights(layer) for layer in body) + weights(last.attention.self)
        at_targets = (weights(last) - weights(last.attention.self) + weights(self.from_decoder)
                      + weights(getattr(self.hf, self.head_name)))
        return (visible * (body_flops(encoder, encoder.embeddings, visible * seq_len) + 6.0 * weights(self.to_decoder))
                + 6.0 * everywhere + 6.0 * at_targets * rate
                + attention_flops(len(self.decoder.encoder.layer), self.decoder.config.hidden_size, seq_len))

    def exported(self) -> nn.Module:
        return self.hf.base_model

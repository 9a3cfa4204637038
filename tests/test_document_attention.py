"""data.document_attention: a packed row trains as the separate documents it holds. The loss on a document packed
after another equals its loss alone in a row, for every objective, and differs without the option."""

from __future__ import annotations

import pytest
import torch

from masktrain.data import inputs, masking
from masktrain.data.batches import IGNORE, MaskSpec, document_positions
from masktrain.data.reader import Skips
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import load_config
from masktrain.trainer import models
from masktrain.trainer.models import TokenIds, build_model
from masktrain.trainer.objectives import OBJECTIVES

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
              "model.decoder_layers=2"]


def test_positions_restart_at_each_document_start():
    start = 7
    ids = torch.tensor([[11, 12, start, 13, 14, 15, start, 16],
                        [start, 11, 12, 13, start, 14, 0, 0]])
    spec = MaskSpec(vocab=None, document_start=start)
    assert document_positions(ids, spec)["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0, 1],
                                                                      [0, 1, 2, 3, 0, 1, 2, 3]]
    assert document_positions(ids, MaskSpec(vocab=None)) == {}


def odd_ids(ids, vocab, rate, gen, options):
    """Selects by content alone, so a document is masked alike wherever it is packed."""
    return masking.candidates(ids, vocab) & (ids % 2 == 1)


@pytest.mark.parametrize("objective,arch", [("mlm", "bert"), ("mlm", "roberta"), ("mae_lm", "bert"),
                                            ("mae_lm", "roberta"), ("meap", "llama"), ("ntp", "llama")])
def test_a_document_packed_after_another_has_its_loss_alone(tiny_data, monkeypatch, objective, arch):
    monkeypatch.setitem(masking.POLICIES, "odd_ids", odd_ids)
    extra = ["model.decoder_hidden_size=16"] if objective == "mae_lm" else []  # the maps between widths too
    cfg = load_config("smoke", [*tiny_data, *TINY_MODEL, *extra, f"model.objective={objective}",
                                f"model.arch={arch}", "data.document_attention=true"])
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    target = OBJECTIVES[objective]
    torch.manual_seed(0)
    model = build_model(target, cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer)).eval()
    spec = MaskSpec(vocab=tokenizer.vocab(), policy="odd_ids", mask_prob=1.0, random_prob=0.0,
                    document_start=inputs.mask_spec(cfg, tokenizer).document_start)
    pack = inputs.packing(cfg, tokenizer, target.encoder)
    regular = tokenizer.vocab().regular_ids
    first = regular[regular % 2 == 0][10:16]  # even ids: nothing selected, so every target is the second's
    second = regular[20:29]
    doc = lambda tokens: [pack.start_id, *tokens.tolist(), pack.end_id]  # noqa: E731
    packed, alone = torch.tensor([doc(first) + doc(second)]), torch.tensor([doc(second)])

    def loss(rows: torch.Tensor, spec: MaskSpec, skip: int) -> dict[str, torch.Tensor]:
        batch = target.batch(rows, spec, 0.15, torch.Generator().manual_seed(0))
        if not target.encoder:  # no targets before the second document, its start token's included
            batch["labels"][:, :skip + 1] = IGNORE
        with torch.no_grad():
            return model(**batch)

    assert "position_ids" in target.batch(packed, spec, 0.15, torch.Generator())
    together, by_itself = loss(packed, spec, len(first) + 2), loss(alone, spec, 0)
    assert int(together["tokens"]) == int(by_itself["tokens"]) > 0
    torch.testing.assert_close(together["loss_sum"], by_itself["loss_sum"])
    one_sequence = MaskSpec(vocab=spec.vocab, policy="odd_ids", mask_prob=1.0, random_prob=0.0)
    assert not torch.allclose(loss(packed, one_sequence, len(first) + 2)["loss_sum"], by_itself["loss_sum"])

    # Validation's padded last rows, and the all-padding batch of a rank short of rows.
    batches, empty = inputs.validation_set(cfg, target.batch, target.encoder, tokenizer, 0, 1, Skips(False))
    with torch.no_grad():
        for batch in [*batches, empty]:
            assert "position_ids" in batch and torch.isfinite(model(**batch)["loss_sum"])


def test_every_token_of_mae_lms_encoder_attends_to_something(tiny_data, monkeypatch):
    """A query with no key to attend to (a padding slot masked as padding, alone in its document) is NaN on some
    GPU attention kernels, and a NaN in a discarded row still reaches the weights' gradients."""
    from masktrain.trainer import mae

    cfg = load_config("smoke", [*tiny_data, *TINY_MODEL, "model.objective=mae_lm", "data.document_attention=true"])
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    target = OBJECTIVES["mae_lm"]
    model = build_model(target, cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer)).eval()
    masks = []
    monkeypatch.setattr(mae, "document_mask", lambda *args: masks.append(models.document_mask(*args)) or masks[-1])
    # Not the all-padding batch of a rank short of validation rows: it has no token to attend to, nor a target.
    batches, _ = inputs.validation_set(cfg, target.batch, target.encoder, tokenizer, 0, 1, Skips(False))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    assert masks and any((~batch["visible_mask"]).any() for batch in batches)  # padding slots were there
    for mask in masks:
        assert mask.dtype == torch.bool and mask.any(dim=-1).all()

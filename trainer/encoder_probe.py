"""A linear probe of a trained MAE-LM encoder: how well its states of the visible tokens predict the removed
ones, read without the decoder it was trained with.

The encoder gets the input it had in pre-training (masked tokens removed, the others at their original
positions), and a linear softmax predicts each removed token from the encoder states of its nearest visible
neighbour on either side. Decoders of different shapes change a run's own validation loss partly through their
own capacity; this probe reads only the encoder, which is the part that gets exported. It stands in for
fine-tuning, the encoder's real use, which a toy-scale run cannot measure.

The probe is fitted on the first batches of the training split and scored on the run's validation batches
(trainer.eval_batches of them; 0, all). Both are masked the way the run's validation is
(data.masking.eval_rate, seeded by batch), so two runs of one config are probed on the same tokens with the same
masks. A linear softmax is a convex fit; from a fixed start, with a fixed order of minibatches, its score depends
on the features alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from masktrain.data.batches import mae_batch
from masktrain.data.inputs import validation_set
from masktrain.data.reader import Skips
from masktrain.trainer.export import load_trained
from masktrain.trainer.mae import at_positions


@dataclass
class ProbeScore:
    nll: torch.Tensor = field(repr=False)
    """float[targets]: each validation target's cross-entropy (nats), for `paired_stderr` as well."""
    correct: torch.Tensor = field(repr=False)
    """float[targets]: 1 where the probe's argmax is the target."""
    fit_targets: int

    @property
    def loss(self) -> float:
        return self.nll.double().mean().item()

    @property
    def accuracy(self) -> float:
        return self.correct.double().mean().item()

    @property
    def targets(self) -> int:
        return len(self.correct)

    @property
    def accuracy_stderr(self) -> float:
        """Binomial standard error of `accuracy`."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / max(self.targets, 1))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "accuracy_stderr": self.accuracy_stderr,
                "targets": self.targets, "fit_targets": self.fit_targets}


def paired_stderr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of `a.mean() - b.mean()` for per-target figures of two probes scored on the same targets:
    the spread of the per-target difference, smaller than either mean's own when the probes agree on most
    targets. It is the scoring's sampling noise only, not how much another training seed would move either."""
    difference = a.double() - b.double()
    return math.sqrt(difference.var(correction=0).item() / max(len(difference), 1))


def neighbour_features(encoded: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 2H], token ids [N]) for the N removed positions of an `mae_batch`: the encoder states
    `encoded` [B, V, H] of the nearest visible token left and right of each, zeros where a side has none."""
    removed, visible_pos, visible_mask = batch["removed"], batch["visible_pos"], batch["visible_mask"]
    rows, length = removed.shape
    # Column `length` stays zero: the state of a missing neighbour.
    slots = at_positions(encoded[visible_mask], visible_pos, visible_mask, length + 1)
    seen = at_positions(visible_mask[visible_mask], visible_pos, visible_mask, length)
    positions = torch.arange(length).expand(rows, length)
    # A removed position is not seen itself, so the last seen position up to it is its left neighbour and the
    # first seen from it on is its right one.
    left = torch.where(seen, positions, -1).cummax(dim=1).values
    right = torch.where(seen, positions, length).flip(1).cummin(dim=1).values.flip(1)
    left = torch.where(left < 0, length, left)
    row = positions.new_tensor(range(rows)).unsqueeze(1).expand(rows, length)[removed]
    features = torch.cat([slots[row, left[removed]], slots[row, right[removed]]], dim=1)
    return features, batch["labels"][removed]


def encoder_features(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour features and targets of every removed token of `batches`, from `model`'s encoder."""
    features, targets = [], []
    with torch.no_grad():
        for batch in batches:
            encoded = model.encode(batch["visible_ids"], batch["visible_pos"], batch["visible_mask"],
                                   batch.get("position_ids"))
            x, y = neighbour_features(encoded, batch)
            features.append(x)
            targets.append(y)
    return torch.cat(features), torch.cat(targets)


def fit_and_score(fit: tuple[torch.Tensor, torch.Tensor], scored: tuple[torch.Tensor, torch.Tensor], vocab: int,
                  epochs: int, seed: int, batch_size: int = 512, lr: float = 1e-3,
                  weight_decay: float = 1e-2) -> ProbeScore:
    """A linear softmax fitted on `fit` (features, targets) and scored on `scored`.

    It starts from zero weights and the bias of the token frequencies (add-one smoothed), the best a probe that
    reads nothing can do, and a tenth of `fit` is held out: training stops at the first epoch that does not lower
    the loss there (after at most `epochs`), and the weights before it are the ones scored, since a
    vocabulary-wide probe has more weights than a toy split has targets and overfits. Features of width 0 give
    the token frequencies' score."""
    order = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(fit[1]), generator=order)
    held = shuffled[:max(len(shuffled) // 10, 1)]
    x, y = (t[shuffled[len(held):]] for t in fit)
    weight = torch.zeros(vocab, x.shape[1], requires_grad=True)
    bias = (torch.bincount(y, minlength=vocab) + 1.0).div(len(y) + vocab).log().requires_grad_()
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)

    def held_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(F.linear(fit[0][held], weight, bias), fit[1][held]).item()

    best, kept = held_loss(), (weight.detach().clone(), bias.detach().clone())
    for _ in range(epochs if x.shape[1] else 0):
        for index in torch.randperm(len(y), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(F.linear(x[index], weight, bias), y[index]).backward()
            optimizer.step()
        loss = held_loss()
        if loss >= best:
            break
        best, kept = loss, (weight.detach().clone(), bias.detach().clone())
    x_eval, y_eval = scored
    with torch.no_grad():
        logits = F.linear(x_eval, *kept)
        nll = F.cross_entropy(logits, y_eval, reduction="none")
        correct = (logits.argmax(dim=1) == y_eval).float()
    return ProbeScore(nll, correct, len(y))


def probe_encoder(checkpoint: Path, fit_batches: int, epochs: int) -> tuple[ProbeScore, ProbeScore]:
    """(the probe of the checkpoint's encoder, the same probe reading nothing) for an MAE-LM checkpoint."""
    cfg, tokenizer, model = load_trained(checkpoint)
    if cfg.model.objective != "mae_lm":
        raise ValueError(f"{checkpoint}: the encoder probe reads MAE-LM encoders, not {cfg.model.objective!r} models")
    skips = Skips(cfg.data.strict)
    fit, _ = validation_set(cfg, mae_batch, True, tokenizer, 0, 1, skips, split="train", limit=fit_batches)
    scored, _ = validation_set(cfg, mae_batch, True, tokenizer, 0, 1, skips)
    fit_xy, scored_xy = encoder_features(model, fit), encoder_features(model, scored)
    if not len(fit_xy[1]) or not len(scored_xy[1]):
        raise ValueError(f"{checkpoint}: no removed tokens to probe in the training or validation split of "
                         f"{cfg.data.dir}")
    seed, vocab = cfg.run.seed, len(tokenizer)
    blind = tuple((x[:, :0], y) for x, y in (fit_xy, scored_xy))
    return fit_and_score(fit_xy, scored_xy, vocab, epochs, seed), fit_and_score(*blind, vocab, epochs, seed)

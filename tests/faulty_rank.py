"""A training rank for tests: the production loop and model, with the loss made NaN on chosen steps.

Run under torchrun in place of `-m masktrain.trainer.train`. The fault comes from the environment:
  FAULT_NAN_RANK, FAULT_NAN_STEPS  that rank's loss is NaN on these (1-based, comma-separated) steps
  FAULT_NAN_FROM                   every rank's loss is NaN from this step on
  FAULT_LOG                        folder for rank<r>.jsonl: a weight checksum at the start of every step
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from masktrain.launcher.loading import read_run_config
from masktrain.trainer import train as train_module


class NonFiniteLoss(nn.Module):
    def __init__(self, inner: nn.Module, grad_accum: int):
        super().__init__()
        self.inner = inner
        self.grad_accum = grad_accum
        self.micro_batches = 0
        self.rank = int(os.environ["RANK"])
        mine = int(os.environ.get("FAULT_NAN_RANK", -1)) == self.rank
        self.nan_steps = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s and mine}
        self.nan_from = int(os.environ.get("FAULT_NAN_FROM", 0)) or None
        self.log = Path(os.environ["FAULT_LOG"]) / f"rank{self.rank}.jsonl"

    def forward(self, **batch):
        out = self.inner(**batch)
        if not self.training:
            return out
        step = self.micro_batches // self.grad_accum + 1
        if self.micro_batches % self.grad_accum == 0:
            checksum = sum(p.detach().double().sum().item() for p in self.inner.parameters())
            with open(self.log, "a") as handle:
                handle.write(json.dumps({"step": step, "checksum": checksum}) + "\n")
        self.micro_batches += 1
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            nan = torch.tensor(float("nan"), device=out["loss"].device)
            out = {**out, "loss": out["loss"] * nan, "loss_sum": out["loss_sum"] * nan}
        return out


def main() -> None:
    cfg = read_run_config(sys.argv[1])
    build = train_module.build_model
    train_module.build_model = lambda *args, **kwargs: NonFiniteLoss(build(*args, **kwargs), cfg.grad_accum)
    train_module.main(sys.argv[1:])


if __name__ == "__main__":
    main()

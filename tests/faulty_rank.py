"""A training rank for tests: the production loop and model, with faults injected and the files it syncs noted.

Run under torchrun in place of `-m masktrain.trainer.rank`. The faults come from the environment:
  FAULT_NAN_RANK, FAULT_NAN_STEPS  that rank's loss is NaN on these (1-based, comma-separated) steps
  FAULT_NAN_FROM                   every rank's loss is NaN from this step on
  FAULT_SIGNAL_IN_SAVE             RANK:STEP, that rank gets SIGUSR1 while it saves the checkpoint of STEP
  FAULT_SIGNAL_IN_EVAL             RANK:N, that rank gets SIGUSR1 while it scores its N-th validation set
  FAULT_HANG                       RANK:STEP, that rank hangs in its forward of STEP (sleeps until killed)
  FAULT_BAD_DATA_RANK              that rank's loader finds a corrupt shard at its first batch (DataError)
  FAULT_SLOW_RUNNING               seconds rank 0 takes to write the "running" status (a slow file system)
  FAULT_FULL_DISK_AT_START         the run's logs cannot be started: the disk is full
  FAULT_LOG                        folder for rank<r>.jsonl: a weight checksum at the start of every step, and
                                   fsync-rank<r>.txt: every path that rank fsyncs
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from masktrain.data import files
from masktrain.data.reader import DataError
from masktrain.launcher.loading import read_run_config
from masktrain.trainer import checkpoint
from masktrain.trainer import train as train_module


class FaultyModel(nn.Module):
    def __init__(self, inner: nn.Module, grad_accum: int):
        super().__init__()
        self.inner = inner
        self.grad_accum = grad_accum
        self.micro_batches = 0
        self.rank = int(os.environ["RANK"])
        mine = int(os.environ.get("FAULT_NAN_RANK", -1)) == self.rank
        self.nan_steps = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s and mine}
        self.nan_from = int(os.environ.get("FAULT_NAN_FROM", 0)) or None
        hang_rank, hang_step = map(int, os.environ.get("FAULT_HANG", "-1:-1").split(":"))
        self.hang_step = hang_step if hang_rank == self.rank else None
        self.log = Path(os.environ["FAULT_LOG"]) / f"rank{self.rank}.jsonl"

    def targets(self, batch):
        return self.inner.targets(batch)

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
        while step == self.hang_step:
            time.sleep(60)
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            nan = torch.tensor(float("nan"), device=out["loss"].device)
            out = {**out, "loss": out["loss"] * nan, "loss_sum": out["loss_sum"] * nan}
        return out


def signal_during_save(save):
    rank, step = map(int, os.environ.get("FAULT_SIGNAL_IN_SAVE", "-1:-1").split(":"))

    def saving(self, engine, at: int, *args, **kwargs):
        if at == step and int(os.environ["RANK"]) == rank:
            signal.raise_signal(signal.SIGUSR1)
        return save(self, engine, at, *args, **kwargs)

    return saving


def signal_during_evaluation(evaluate):
    rank, nth = map(int, os.environ.get("FAULT_SIGNAL_IN_EVAL", "-1:-1").split(":"))
    calls = 0

    def evaluating(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth and int(os.environ["RANK"]) == rank:
            signal.raise_signal(signal.SIGUSR1)
        return evaluate(*args, **kwargs)

    return evaluating


class BadData:
    """A rank's loader whose first batch is in a corrupt shard; the rest it delegates."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __next__(self):
        raise DataError("corrupt shard: injected.tar: after member 0000000001.tokens.npy")


def bad_data_on(rank: int, train_loader):
    def loader(*args, **kwargs):
        real = train_loader(*args, **kwargs)
        return BadData(real) if int(os.environ["RANK"]) == rank else real

    return loader


def slow_running_status(write_status, seconds: float):
    def write(run_dir, state, *args, **kwargs):
        if state == "running":
            time.sleep(seconds)
        return write_status(run_dir, state, *args, **kwargs)

    return write


class FullDisk:
    def __init__(self, *args, **kwargs):
        raise OSError(28, "No space left on device")


def noting_fsyncs(fsync):
    log = Path(os.environ["FAULT_LOG"]) / f"fsync-rank{os.environ['RANK']}.txt"

    def noted(path):
        fsync(path)
        with open(log, "a") as handle:
            handle.write(f"{Path(path).resolve()}\n")

    return noted


def main() -> None:
    cfg = read_run_config(sys.argv[1])
    build = train_module.build_model
    train_module.build_model = lambda *args, **kwargs: FaultyModel(build(*args, **kwargs), cfg.grad_accum)
    checkpoint.Checkpointer.save = signal_during_save(checkpoint.Checkpointer.save)
    train_module.evaluate = signal_during_evaluation(train_module.evaluate)
    # Both names: checkpoint's own calls, and sync_tree's and write_atomic's in files.
    checkpoint.fsync_path = files.fsync_path = noting_fsyncs(files.fsync_path)
    if "FAULT_BAD_DATA_RANK" in os.environ:
        train_module.inputs.train_loader = bad_data_on(int(os.environ["FAULT_BAD_DATA_RANK"]),
                                                       train_module.inputs.train_loader)
    if "FAULT_SLOW_RUNNING" in os.environ:
        train_module.write_status = slow_running_status(train_module.write_status,
                                                        float(os.environ["FAULT_SLOW_RUNNING"]))
    if "FAULT_FULL_DISK_AT_START" in os.environ:
        train_module.Metrics = FullDisk
    train_module.main(sys.argv[1:])


if __name__ == "__main__":
    main()

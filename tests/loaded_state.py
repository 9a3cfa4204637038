"""A rank for tests: builds the run's engine as the trainer does, loads a checkpoint into it as the trainer does
(through DeepSpeed's universal format when the checkpoint was saved by another number of ranks), and has rank 0
write every parameter's full fp32 value and Adam moments, gathered whatever the ZeRO stage, to OUT.

Run under torchrun: loaded_state.py RUN_CONFIG CHECKPOINT OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from masktrain.data import inputs
from masktrain.data.tokenizer import Tokenizer
from masktrain.launcher.loading import read_run_config
from masktrain.trainer import engine as eng
from masktrain.trainer.checkpoint import Checkpointer, needs_universal
from masktrain.trainer.models import TokenIds, build_model
from masktrain.trainer.objectives import OBJECTIVES


def main(config_path: str, checkpoint: str, out: str) -> None:
    cfg = read_run_config(config_path)
    runtime = eng.init_distributed(cfg)
    ds = eng.deepspeed_config(cfg, "fp32")
    if needs_universal(Path(checkpoint), runtime.world_size):
        ds = {**ds, "checkpoint": {"load_universal": True}}
    torch.manual_seed(cfg.run.seed + 1)  # other initial weights than the run's: only the load can make them equal
    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    model = build_model(OBJECTIVES[cfg.model.objective], cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer), ds)
    engine = eng.build_engine(cfg, model, runtime, "fp32", ds)
    Checkpointer(cfg.output_dir, cfg.trainer.keep_last, runtime.is_main).load(engine, Path(checkpoint))
    # ZeRO-1/2 link their parameters to the loaded optimizer state only in the first step, which the full
    # state getters below need.
    getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    state = {}
    for name, param in engine.module.named_parameters():
        state[name] = safe_get_full_fp32_param(param)
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{name}:{moment}"] = safe_get_full_optimizer_state(param, moment)
    if runtime.is_main:
        torch.save(state, out)
    # Ended as the trainer ends: a rank leaving with the process group alive may abort in gloo's teardown.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

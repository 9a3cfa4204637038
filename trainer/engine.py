"""Process setup and the DeepSpeed engine: device, precision, the DeepSpeed JSON, optimizer and initialize."""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from masktrain import configs
from masktrain.launcher.config import Config
from masktrain.launcher.launch import use_cuda
from masktrain.launcher.loading import merge
from masktrain.trainer.models import zero_stage


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank facts and the device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config) -> Runtime:
    """Join the process group the launcher set up (torchrun or srun environment variables)."""
    cuda = use_cuda(cfg)
    # DeepSpeed picks its accelerator at import (or from DS_ACCELERATOR, which srun passes on from the shell).
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=cfg.launch.collective_timeout)
    # The timeout given here reaches the world group only. DeepSpeed makes its ZeRO groups with new_group(ranks),
    # which takes torch's module default (30 min for gloo), so a hung rank held the others there; every group
    # made after this takes the run's.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    if not cuda:
        load_cpu_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def load_cpu_comm_op() -> None:
    """Build or load DeepSpeed's CPU shared-memory comm op before DeepSpeed does (it keeps what was loaded).

    DeepSpeed JIT-builds it at every start, and ninja checks the build under torch's lock file, which only the
    process that made it removes: a rank killed meanwhile (a kill during start-up, a test run stopped) left it,
    and every later start of that environment waited on it forever without a word. Each rank here first takes
    an flock, which dies with its holder, so a lock file found while holding it was left by a dead process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # as DeepSpeed decides whether to build it
    folder = Path(_get_build_directory(builder.name, verbose=False))
    with open(folder / "masktrain.flock", "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (Lustre mounted without it): DeepSpeed's way alone
            return
        if (left := folder / "lock").exists():
            print(f"[masktrain] removing {left}: a process killed while building DeepSpeed's {builder.name} op "
                  "left it, and the build would wait on it forever", file=sys.stderr, flush=True)
            left.unlink(missing_ok=True)
        builder.load(verbose=False)


def precision(cfg: Config, runtime: Runtime) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    # Not is_bf16_supported() alone: by default it counts emulation, which says yes on V100 and T4 (sm 7.x),
    # where bf16 runs many times slower than fp32.
    if runtime.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: Config, dtype: str) -> dict:
    """The stage preset, the batch/clipping/precision this run needs, then the user's JSON on top."""
    ds = json.loads(configs.deepspeed_preset(cfg.trainer.zero_stage).read_text())
    merge(ds, {
        **cfg.deepspeed_batch(),
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    })
    if cfg.trainer.deepspeed_config:
        with open(cfg.trainer.deepspeed_config) as handle:
            merge(ds, json.load(handle))
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as in BERT and Llama recipes. A model built
    partitioned (ZeRO-3) holds empty 1-D tensors: its parameters' shapes are in ds_shape."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that clips the gradient norm itself and skips a step whose norm is not finite, reporting both the
    way DeepSpeed's optimizer wrappers do (`overflow`, `_global_grad_norm`), so `was_step_applied()` and
    `get_global_grad_norm()` work alike at every stage.

    For ZeRO-0 in fp32, the one setup where DeepSpeed hands the reduced gradients straight to the torch
    optimizer: there it neither checks them (NaN would reach the weights and moments) nor reports the norm."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        # The gradients are reduced already: every rank computes the same norm and makes the same decision.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)  # takes parameters, scales .grad
        return super().step(closure)


def hands_gradients_to_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed gives the torch optimizer the gradients as they are (ZeRO-0 without bf16/fp16)."""
    low_precision = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    return zero_stage(ds) == 0 and not low_precision


def build_engine(cfg: Config, model: torch.nn.Module, runtime: Runtime, dtype: str, ds: dict | None = None):
    """The DeepSpeed engine for `model`; `ds` is `deepspeed_config(cfg, dtype)` when the caller has it already."""
    import deepspeed

    if cfg.trainer.activation_checkpointing:
        from transformers import PreTrainedModel

        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = dict(ds or deepspeed_config(cfg, dtype))
    groups = param_groups(model, cfg.optim.weight_decay)
    adamw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                 fused=runtime.device.type == "cuda")
    if hands_gradients_to_optimizer(ds):
        # The optimizer clips after its finiteness check; DeepSpeed clipping first would hide an infinite norm.
        optimizer = FiniteAdamW(groups, max_norm=ds["gradient_clipping"], **adamw)
        ds["gradient_clipping"] = 0.0
    else:
        optimizer = torch.optim.AdamW(groups, **adamw)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr

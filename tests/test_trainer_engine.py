"""The DeepSpeed engine the trainer builds, at every ZeRO stage (one rank, gloo, CPU, in a child process so the
process group does not outlive the test): a step whose gradients are not finite leaves weights and optimizer
state untouched and is reported through `was_step_applied()`; a good step after it applies and is clipped; and the
trainer's micro-steps hand the optimizer the mean gradient over every target of the step; and the weights and
optimizer state each stage holds are what `masktrain model info` predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from masktrain.launcher.launch import rank_environment
from masktrain.launcher.loading import load_config

pytestmark = pytest.mark.slow


def snapshot(engine) -> list:
    """This rank's weights and optimizer state as plain numbers (ZeRO-3 keeps its partition in ds_tensor)."""
    import torch

    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = [v.detach().clone() for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    return weights + moments


def same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def probe(runtime) -> dict:
    import torch

    from masktrain.trainer import engine as eng
    from masktrain.trainer.size import held_bytes, parameter_count, state_bytes

    cfg = load_config("smoke", ["launch.nproc_per_node=1", "trainer.global_batch_size=8", "launch.accelerator=cpu",
                                "optim.grad_clip=0.5"])
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    results = {}
    for stage in (0, 1, 2, 3):
        cfg.trainer.zero_stage = stage
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))
        engine = eng.build_engine(cfg, model, runtime, "fp32")

        def step(scale: float) -> tuple[bool, float]:
            engine.backward(engine(x).pow(2).mean() * scale)
            engine.step()
            return engine.was_step_applied(), float(engine.get_global_grad_norm())

        # The first step creates the optimizer state: AdamW's first moment is then (1 - beta1) x the gradient
        # it applied, which shows whether that gradient was clipped.
        _, first_norm = step(1000.0)
        weights, _, optimizer = state_bytes("fp32", stage)
        held = held_bytes(engine)["total"] / ((weights + optimizer) * parameter_count(engine.module))
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        beta1 = inner.param_groups[0]["betas"][0]
        moment = torch.sqrt(sum(state["exp_avg"].double().pow(2).sum() for state in inner.state.values()))
        before = snapshot(engine)
        nan_applied, nan_norm = step(float("nan"))
        unchanged = same(before, snapshot(engine))
        good_applied, good_norm = step(1000.0)
        after = snapshot(engine)
        results[stage] = {"first_norm": first_norm, "applied_norm": float(moment) / (1 - beta1),
                          "nan_applied": nan_applied, "nan_norm_finite": bool(torch.isfinite(torch.tensor(nan_norm))),
                          "unchanged": unchanged, "good_applied": good_applied, "good_norm": good_norm,
                          "changed": not same(before, after),
                          "finite": all(bool(torch.isfinite(t).all()) for t in after), "held_vs_predicted": held}
    return results


def zero3_weight_decay(runtime) -> dict:
    """The weight decay of the optimizer's groups for a model built partitioned, as the trainer builds it at
    ZeRO-3 (where each parameter is an empty 1-D tensor until gathered)."""
    import deepspeed
    import torch

    from masktrain.trainer import engine as eng
    from masktrain.trainer.checkpoint import CLIENT_KEY, Checkpointer

    cfg = load_config("smoke", ["launch.nproc_per_node=1", "trainer.global_batch_size=8", "launch.accelerator=cpu",
                                "trainer.zero_stage=3", "optim.weight_decay=0.1"])
    with deepspeed.zero.Init(config_dict_or_path=eng.deepspeed_config(cfg, "fp32")):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))
    decay, no_decay = (len(group["params"]) for group in eng.param_groups(model, 0.1))
    engine = eng.build_engine(cfg, model, runtime, "fp32")
    built = [group["weight_decay"] for group in engine.optimizer.param_groups]
    # Loaded through the universal format (another rank count, or a checkpoint of one group), each group keeps
    # its own: DeepSpeed gives every group the settings of the checkpoint's first.
    engine.backward(engine(torch.randn(8, 16)).pow(2).mean())
    engine.step()
    ckpt = Checkpointer("run", keep_last=1, is_main=True)
    engine.save_checkpoint(str(ckpt.dir), tag="step-00000001", client_state={CLIENT_KEY: {"step": 1}})
    ds = eng.deepspeed_config(cfg, "fp32")
    ds["checkpoint"] = {"load_universal": True}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))
    universal = eng.build_engine(cfg, model, runtime, "fp32", ds)
    assert ckpt.load(universal, ckpt.dir / "step-00000001") == {"step": 1}
    return {"decay": decay, "no_decay": no_decay, "engine": built,
            "universal": [group["weight_decay"] for group in universal.optimizer.param_groups]}


def applied_gradient_error(runtime) -> float:
    """How far the gradient the optimizer receives from the trainer's micro-steps is from the mean over every
    target of the step, for two micro-batches of 1 and 7 targets (relative)."""
    import torch

    from masktrain.data.batches import IGNORE
    from masktrain.trainer import engine as eng
    from masktrain.trainer.models import token_loss
    from masktrain.trainer.train import micro_steps

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 5)

        @staticmethod
        def targets(batch):
            return (batch["labels"] != IGNORE).sum()

        def forward(self, x, labels):
            where = labels != IGNORE
            return token_loss(self.head(x[where]), labels[where])

    cfg = load_config("smoke", ["launch.nproc_per_node=1", "trainer.global_batch_size=2", "data.micro_batch_size=1",
                                "launch.accelerator=cpu", "trainer.zero_stage=0", "optim.grad_clip=0"])
    torch.manual_seed(0)
    model = Toy()
    expected = Toy()
    expected.load_state_dict(model.state_dict())
    engine = eng.build_engine(cfg, model, runtime, "fp32")
    applied = {}
    step = engine.optimizer.step

    def spy(closure=None):
        applied["grad"] = engine.optimizer.param_groups[0]["params"][0].grad.clone()
        return step(closure)

    engine.optimizer.step = spy
    x = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.full((2, 1, 8), IGNORE)
    labels[0, 0, :1], labels[1, 0, :7] = 1, 2
    micro_steps(engine, [{"x": x[m], "labels": labels[m]} for m in range(2)], runtime)
    engine.step()
    where = labels != IGNORE
    torch.nn.functional.cross_entropy(expected.head(x[where]), labels[where]).backward()
    reference = expected.head.weight.grad
    return float((applied["grad"] - reference).norm() / reference.norm())


def test_every_zero_stage_skips_a_non_finite_step_and_reports_it(tmp_path):
    from benchmarks.common import rendezvous  # here: the child runs this file as a script, outside the checkout

    with rendezvous() as store:
        env = {**rank_environment(load_config("smoke", []), cuda=False), **store, "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "1"}
        child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                               cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    # A step's gradient is the mean over all its targets; a mean of micro-batch means is 1.19 off here.
    assert results.pop("applied_gradient_error") < 1e-6
    # Weight decay on the two weight matrices, none on the biases and the norm, whatever ZeRO-3 has partitioned.
    assert results.pop("zero3_weight_decay") == {"decay": 2, "no_decay": 4, "engine": [0.1, 0.0],
                                                 "universal": [0.1, 0.0]}
    for stage, r in results.items():
        assert r["nan_applied"] is False and r["unchanged"], f"ZeRO-{stage} applied a NaN step: {r}"
        assert not r["nan_norm_finite"], f"ZeRO-{stage}: {r}"
        assert r["good_applied"] and r["changed"] and r["finite"], f"ZeRO-{stage}: {r}"
        assert r["good_norm"] > 0.5, f"ZeRO-{stage} reports the norm after clipping: {r}"
        assert r["first_norm"] > 0.5 and r["applied_norm"] == pytest.approx(0.5, rel=1e-3), f"ZeRO-{stage} did not clip to 0.5: {r}"
        # What `masktrain model info` predicts for weights and optimizer state is what the engine holds.
        assert r["held_vs_predicted"] == pytest.approx(1.0, abs=0.02), f"ZeRO-{stage}: {r}"
    norms = [r["good_norm"] for r in results.values()]
    assert max(norms) == pytest.approx(min(norms), rel=1e-4), f"stages disagree on the gradient norm: {norms}"


def test_a_rank_starts_past_the_lock_file_a_killed_build_of_deepspeeds_cpu_op_left(tmp_path):
    """A rank killed while DeepSpeed built (or ninja checked) its CPU comm op left torch's lock file, and every
    later start waited on it forever, silently; now it is removed, said, and the op built."""
    from benchmarks.common import rendezvous

    left = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    left.parent.mkdir(parents=True)
    left.touch()
    start = ("from masktrain.launcher.loading import load_config; from masktrain.trainer.engine import "
             "init_distributed; init_distributed(load_config('smoke', ['launch.nproc_per_node=1', "
             "'launch.accelerator=cpu']))")
    with rendezvous() as store:
        env = {**rank_environment(load_config("smoke", []), cuda=False), **store, "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "1", "TORCH_EXTENSIONS_DIR": str(left.parent.parent)}
        child = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=600,
                               cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"[masktrain] removing {left}: a process killed while building" in child.stderr
    assert (left.parent / "deepspeed_shm_comm.so").is_file() and not left.exists()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from masktrain.trainer.engine import init_distributed

    runtime = init_distributed(load_config("smoke", ["launch.nproc_per_node=1", "launch.accelerator=cpu"]))
    print(json.dumps({**probe(runtime), "applied_gradient_error": applied_gradient_error(runtime),
                      "zero3_weight_decay": zero3_weight_decay(runtime)}))

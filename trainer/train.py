"""One rank of a training run, started by `python -m masktrain.trainer.rank RUN_DIR/config.yaml`.

The launcher validated and saved the config; every rank reads that same file. The loop reads top to bottom:
set LR -> micro-batches (forward, backward) -> agree across ranks -> step -> log -> abort check -> evaluate ->
checkpoint -> stop check.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from masktrain.data import inputs
from masktrain.data.loader import seed_int
from masktrain.data.reader import DataError, Skips
from masktrain.data.schedules import rate_schedule
from masktrain.data.tokenizer import MODEL_FILE, Tokenizer
from masktrain.launcher.config import Config
from masktrain.launcher.loading import dump_yaml, read_run_config, to_dict
from masktrain.launcher.validate import schedule_notes
from masktrain.trainer import engine as eng
from masktrain.trainer.checkpoint import (Checkpointer, ConversionFailed, check_resumable, deepspeed_json,
                                          needs_universal, read_meta, regrouped, resume_point, save_due)
from masktrain.trainer.evaluation import forward_sums, to_device, val_metrics
from masktrain.trainer.hang_dump import HangDump
from masktrain.trainer.lr import lr_at
from masktrain.trainer.metrics import Interval, Metrics
from masktrain.trainer.models import TokenIds, build_model, zero_stage
from masktrain.trainer.objectives import OBJECTIVES
from masktrain.trainer.profiling import StepProfiler
from masktrain.trainer.progress import Progress, peak_flops
from masktrain.trainer.signals import StopRequest
from masktrain.trainer.size import describe
from masktrain.trainer.status import write_status

STATE_VERSION = 1


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (skipped ones included: their data was consumed)."""
    tokens: int = 0
    bad_steps: int = 0
    """Steps skipped for a non-finite loss or gradient, in total."""
    bad_in_row: int = 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def gather_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-reason counts summed over ranks. Collective, and an object collective: call it when they changed."""
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, counts)
    return dict(sum((Counter(c) for c in everyone), Counter()))


def count_metrics(prefix: str, counts: dict[str, int]) -> dict[str, float]:
    return {f"{prefix}/{reason.replace(' ', '_')}": float(n) for reason, n in sorted(counts.items())}


def failed(out_dir: Path, step: int, err: Exception, retry: bool = False) -> NoReturn:
    """End this rank with the reason in status.json, which the launcher prints once, rather than this rank's
    traceback among torchrun's. `retry`, for a failure before this launch's first step that the next attempt may
    not meet (a full disk): the run is marked crashed instead, which a restart goes on from, and as started at
    `step`, which tells the SLURM job script that a requeue now would repeat this attempt."""
    state = "crashed" if retry else "failed"
    try:
        write_status(out_dir, state, step, str(err), start=step if retry else None)
    except OSError:  # the disk may refuse even this: the verdict goes to the log instead
        print(f"[masktrain] training {state} at step {step}: {err}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def crashed(what: str, err: Exception, out_dir: Path) -> NoReturn:
    """End this rank after `what` (a checkpoint save, a write) failed, in one line with the free space: torch.save
    reports a full disk as an iostream error only. No verdict goes to status.json: a full disk or a lost mount
    may be over by the next attempt, and a save also fails when another rank died. `masktrain train` then marks
    the run crashed; a restart, or the requeue of a preempted SLURM job, goes on from the last checkpoint."""
    try:
        free = f"{shutil.disk_usage(out_dir).free / 2**20:,.0f} MiB free in {out_dir}"
    except OSError as gone:
        free = f"{out_dir} unreadable ({gone})"
    print(f"[masktrain] {what} failed ({err}); {free}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def restore_rank_state(client: dict, loader, runtime: eng.Runtime, allowed: bool) -> str:
    """Put this rank's data position and RNG state back: exactly, or on another layout of ranks and loader
    workers or with changed sources continued from every rank's position (which only trainer.allow_config_change
    permits: otherwise the config check stops a new layout earlier, and the loader a source prepared again).
    Returns a note for the log when not exactly."""
    saved = [rank["data"] for rank in client["ranks"]]
    try:
        note = loader.resume(saved, allowed)
    except ValueError as err:
        if not allowed:  # every rank fails alike, so the run ends in order, as for bad data
            raise DataError(f"{err} (trainer.allow_config_change=true goes on with the data as it now is, from the "
                            "beginning where it changed)") from None
        loader.restart(saved)
        return f"data stream and RNG restart from the beginning: {err}"
    if len(saved) != runtime.world_size:
        return f"{note}; RNG states restart (the checkpoint has {len(saved)} ranks, this run {runtime.world_size})"
    set_rng_state(client["ranks"][runtime.rank]["rng"])
    return note


def micro_steps(engine, batches: list[dict], runtime: eng.Runtime) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches; returns this rank's [loss sum, targets,
    non-finite micro-batches].

    Each micro-batch's loss is its sum over its targets, scaled so that the gradient DeepSpeed applies (which
    divides by grad_accum and averages over ranks) is the mean over every target of the step. A mean per
    micro-batch would weigh one with a single target as much as one with a hundred."""
    targets = sum(engine.module.targets(batch) for batch in batches).double()
    dist.all_reduce(targets)
    scale = (runtime.world_size * len(batches) / targets.clamp(min=1)).float()
    stats = torch.zeros(3, dtype=torch.float64, device=runtime.device)
    for micro, batch in enumerate(batches):
        out = engine(**batch)
        engine.backward(out["loss_sum"] * scale)
        loss_sum = out["loss_sum"].detach()
        stats += torch.stack([loss_sum, out["tokens"], ~torch.isfinite(loss_sum)]).double()
        if micro < len(batches) - 1:
            engine.step()
    return stats


def evaluate(engine, batches: list[dict], empty: dict, runtime: eng.Runtime, encoder: bool) -> dict[str, float]:
    """The validation metrics over every rank's batches; every rank runs the same number of forwards."""
    (count,) = all_reduce([len(batches)], runtime.device, dist.ReduceOp.MAX)
    engine.eval()
    sums = forward_sums(engine, batches, int(count), empty, runtime.device)
    engine.train()
    dist.all_reduce(sums)
    return val_metrics(sums, encoder)


def train(cfg: Config, stop: StopRequest | None = None) -> None:
    """Train until max_steps or a stop request; how it ended is written to <run>/status.json. `stop` is the
    handler `masktrain.trainer.rank` installed before the imports."""
    # First of all: a preemption signal during the minutes a large model takes to start must not kill the
    # rank; it is honoured after the first step.
    stop = stop or StopRequest().install()
    runtime = eng.init_distributed(cfg)
    is_main = runtime.is_main
    out_dir = Path(cfg.output_dir)
    hang = HangDump(cfg.launch.collective_timeout, out_dir, runtime.rank)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    tokenizer = Tokenizer(inputs.tokenizer_dir(cfg))
    objective = OBJECTIVES[cfg.model.objective]
    dtype = eng.precision(cfg, runtime)
    # Given the DeepSpeed config, ZeRO-3 builds the model partitioned: no rank ever holds all of it.
    ds = eng.deepspeed_config(cfg, dtype)
    user_json = deepspeed_json(to_dict(cfg))  # as the run read it: the file may be edited while it trains
    ckpt = Checkpointer(out_dir, cfg.trainer.keep_last, is_main, cfg.trainer.keep_every)
    ckpt.clean_partial()
    dist.barrier()
    source, origin = resume_point(cfg.trainer.resume, ckpt)
    if source is not None:
        check_resumable(source, to_dict(cfg), cfg.trainer.allow_config_change, zero_stage(ds), dtype,
                        (tokenizer.dir, tokenizer.fingerprint()))
    model = build_model(objective, cfg.model, cfg.data.seq_len, TokenIds.of(tokenizer), ds)
    groups = sum(1 for group in eng.param_groups(model, cfg.optim.weight_decay) if group["params"])
    regroup = source is not None and regrouped(source, groups)
    if source is not None and (needs_universal(source, runtime.world_size) or regroup):
        if is_main and regroup:
            print(f"[masktrain] {source}: its optimizer holds the parameters in another number of groups than this "
                  f"run's {groups} (a ZeRO-3 checkpoint of a masktrain that gave no parameter weight decay); it is "
                  "loaded parameter by parameter, and optim.weight_decay applies from here on", flush=True)
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    if is_main:
        print(f"[masktrain] model: {cfg.model.objective} on {cfg.model.arch}, {describe(model)}", flush=True)
    engine = eng.build_engine(cfg, model, runtime, dtype, ds)
    loader = inputs.train_loader(cfg, objective.batch, objective.encoder, tokenizer, runtime.rank,
                                 runtime.world_size)
    hang.workers = loader.worker_pids
    if is_main:
        for note in filter(None, (inputs.mixture_plan(cfg), inputs.uneven_epochs(cfg, loader))):
            print(f"[masktrain] data: {note}", flush=True)
        for note in schedule_notes(cfg):
            print(f"[masktrain] schedule: {note}", flush=True)
    validation: list[tuple[str, list[dict], dict, dict]] | None = None  # read on first use
    torch.manual_seed(seed_int(cfg.run.seed, runtime.rank, 1))  # dropout differs per rank

    state = TrainState()
    if source is not None:
        try:
            client = ckpt.load(engine, source)
        except ConversionFailed as err:
            failed(out_dir, read_meta(source)["step"], err, retry=True)
        state = TrainState(**client["state"])
        try:
            note = restore_rank_state(client, loader, runtime, cfg.trainer.allow_config_change)
        except DataError as err:
            failed(out_dir, state.step, err)
        if is_main:
            print(f"[masktrain] resumed from {source} at step {state.step}", flush=True)
            if note:
                print(f"[masktrain] {note}", flush=True)
    loader.align(state.step)

    interval = Interval()
    skipped_seen, skipped_by_reason = 0.0, {}
    mask_rate = rate_schedule(cfg.data.masking, cfg.trainer.max_steps)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    peak = peak_flops(cfg, runtime, dtype)
    progress = Progress(is_main, cfg.trainer.progress_bar, state.step, cfg.trainer.max_steps)
    launch_start = state.step
    last_save = time.monotonic()
    profiler = StepProfiler(cfg.trainer.profile_steps, out_dir, runtime.rank, runtime.device)
    ended, reason = "completed", None
    try:
        metrics = Metrics(out_dir, is_main, state.step)
        # At the launch's first step: a resume from an earlier checkpoint drops it with the rest of this launch.
        metrics.config(state.step + 1, dump_yaml(cfg))
        if is_main:
            write_status(out_dir, "running", state.step, start=launch_start)
    except OSError as err:  # a full disk or a lost mount, before the first step
        crashed("starting the run's logs (metrics.jsonl, status.json)", err, out_dir)
    # A rank that fails at its first batch (bad data under data.strict) writes its verdict after this one, not
    # before it, where rank 0's "running" would replace it and leave the run without a verdict.
    dist.barrier()

    def save() -> Path:
        ranks = [None] * runtime.world_size
        dist.all_gather_object(ranks, {"data": loader.state_dict(), "rng": rng_state()})
        client = {"version": STATE_VERSION, "state": asdict(state), "ranks": ranks}
        meta = {"tokens": state.tokens, "bad_steps": state.bad_steps, "world_size": runtime.world_size,
                "objective": cfg.model.objective, "resumed_from": origin, "zero_stage": zero_stage(ds),
                "precision": dtype, "deepspeed_json": user_json, "tokenizer_sha256": tokenizer.fingerprint(),
                "optimizer_groups": groups}
        # The tokenizer travels with the weights: export needs no data folder, and cannot pick up another one.
        return ckpt.save(engine, state.step, client, to_dict(cfg), meta,
                         files={f"tokenizer/{MODEL_FILE}": tokenizer.model_bytes})

    def validate() -> None:
        nonlocal validation
        if validation is None:
            validation = []
            for prefix, urls in inputs.validation_splits(cfg):
                skips = Skips(cfg.data.strict)
                batches, empty = inputs.validation_set(cfg, objective.batch, objective.encoder, tokenizer,
                                                       runtime.rank, runtime.world_size, skips, urls=urls)
                # A validation set is read once, whole by every rank, so what it skipped is fixed from here on and
                # the same on every rank.
                validation.append((prefix, batches, empty, count_metrics(f"{prefix}/skipped", dict(skips.counts))))
        results = {}
        for prefix, batches, empty, skipped in validation:
            scores = evaluate(engine, batches, empty, runtime, objective.encoder)
            results.update({prefix + key.removeprefix("val"): value for key, value in scores.items()}, **skipped)
        metrics.log(state.step, results)
        progress.message(f"step {state.step}: " + " ".join(f"{k}={v:.4g}" for k, v in results.items()))

    try:
        while state.step < cfg.trainer.max_steps:
            hang.begin(f"step {state.step + 1}")
            profiler.before(state.step + 1)
            lr = lr_at(state.step, cfg.optim, cfg.trainer.max_steps)
            eng.set_lr(engine, lr)
            started = time.perf_counter()
            batches = [to_device(next(loader), runtime.device) for _ in range(cfg.grad_accum)]
            waited = time.perf_counter() - started
            # Summed on the device and read once per step: a host sync per micro-batch would stall GPUs.
            stats = torch.zeros(6, dtype=torch.float64, device=runtime.device)
            stats[:3] = micro_steps(engine, batches, runtime)
            # One collective agrees on the loss, bad steps, skipped data, stop requests and rank 0's clock (the
            # ranks' clocks differ) before the update.
            wants_stop = stop.requested or (cfg.trainer.stop_after_steps > 0
                                            and state.step + 1 - launch_start >= cfg.trainer.stop_after_steps)
            time_due = is_main and 0 < cfg.trainer.checkpoint_minutes * 60 <= time.monotonic() - last_save
            stats[3:] = torch.tensor([sum(loader.skipped().values()), wants_stop, time_due], dtype=torch.float64)
            dist.all_reduce(stats)
            loss_sum, targets, nonfinite, skipped_data, stops, timed = stats.tolist()
            # DeepSpeed skips the update when the gradient norm is not finite (see engine.FiniteAdamW for ZeRO-0).
            engine.step()
            bad = nonfinite > 0 or not engine.was_step_applied()
            if skipped_data != skipped_seen:  # the all-reduced total moved, so every rank takes this branch
                skipped_seen, skipped_by_reason = skipped_data, gather_counts(loader.skipped())

            state.step += 1
            state.tokens += tokens_per_step
            state.bad_steps += int(bad)
            state.bad_in_row = state.bad_in_row + 1 if bad else 0

            interval.add(loss_sum, targets, tokens_per_step, time.perf_counter() - started, waited)
            first_of_launch = state.step == launch_start + 1
            aborting = state.bad_in_row >= cfg.trainer.max_bad_steps
            final = state.step == cfg.trainer.max_steps
            leaving = stops > 0 and not final
            saving = final or leaving or timed > 0 or save_due(state.step, cfg.trainer)
            # A checkpoint closes the interval: a resume from it starts a new one, and the steps since the last log
            # would be in no logged point.
            if state.step % cfg.trainer.log_every == 0 or first_of_launch or saving or bad or aborting:
                # Loss, throughput, data wait and MFU cover the steps since the last log; the rest is this step's.
                throughput = interval.tokens_per_s
                values = {"train/loss": interval.loss, "train/lr": lr,
                          # NTP masks nothing, whatever its config's masking section says.
                          **({"train/mask_rate": mask_rate(state.step - 1)} if objective.masked else {}),
                          "train/grad_norm": engine.get_global_grad_norm(),
                          "train/tokens_per_s": throughput, "train/data_wait": interval.waited / interval.seconds,
                          "train/skipped_data": skipped_data, "train/bad_steps": state.bad_steps,
                          "train/tokens_seen": state.tokens,
                          # The FLOPs of what ran: heads (and MAE-LM's encoder) depend on the share of targets.
                          "train/mfu": engine.module.flops_per_token(interval.targets / interval.tokens,
                                                                     cfg.data.seq_len, cfg.data.masking.mask_prob)
                          * throughput / (peak * runtime.world_size) if peak else None,
                          **count_metrics("train/skipped", skipped_by_reason)}
                metrics.log(state.step, {k: (float(v) if v is not None else None) for k, v in values.items()})
                progress.update(state.step, interval.loss, values)
                interval = Interval()
            if bad:
                progress.message(f"step {state.step}: skipped (non-finite loss or gradient), "
                                 f"{state.bad_in_row} in a row, {state.bad_steps} in total")
            if aborting:
                # Every rank gets here at the same step (the decision is all-reduced), so none waits in a
                # collective. No checkpoint: the last one before the bad steps is what to resume from.
                ended = "failed"
                reason = (f"{state.bad_in_row} steps in a row had a non-finite loss or gradient (steps "
                          f"{state.step - state.bad_in_row + 1}-{state.step}); lower optim.lr or check the data, then "
                          f"resume from the last checkpoint. trainer.max_bad_steps={cfg.trainer.max_bad_steps} sets "
                          f"how many in a row are tolerated")
                progress.message(f"aborting: {reason}")
                break

            evaluating = (cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0) or final
            # A stop saves first: reading and scoring the validation set could use up the grace time before it.
            if evaluating and not leaving:
                validate()
                evaluating = False
                if not (saving or final):
                    # Scoring a large validation set takes minutes: a stop asked for meanwhile saves now, not after
                    # one more step (a save due here asks below, after it).
                    (stops,) = all_reduce([float(stop.requested)], runtime.device)
                    leaving = saving = stops > 0

            if saving:
                # A resume keeps the logs up to this checkpoint: on disk before it, they survive losing the node.
                metrics.flush()
                try:
                    path = save()
                except RuntimeError as err:  # torch.save's failed writes; the last checkpoint stays `latest`
                    crashed(f"the checkpoint save of step {state.step}", err, out_dir)
                last_save = time.monotonic()
                progress.message(f"step {state.step}: checkpoint {path}")
                if is_main:  # where a restart would go on from, should this launch end without a verdict
                    write_status(out_dir, "running", state.step, start=launch_start)
                if not (final or leaving):
                    # A large model's save takes minutes. A stop asked for meanwhile leaves from this checkpoint
                    # now, rather than after one more step and a second save the grace time may not cover.
                    (stops,) = all_reduce([float(stop.requested)], runtime.device)
                    leaving = stops > 0
            if leaving:
                if evaluating:
                    validate()
                ended = "preempted"
                reason = stop.signal_name or ("stop_after_steps" if wants_stop else "a signal to another rank")
                progress.message(f"step {state.step}: stopping on {reason}; resume continues from {path}")
                break
            profiler.after(state.step)
    except DataError as err:
        # Bad data under data.strict, or none readable at all. The other ranks wait in a collective, so this one
        # cannot end the run in order.
        failed(out_dir, state.step, err)
    except OSError as err:  # a full disk or a lost mount, writing logs or a checkpoint
        crashed("a write (logs or a checkpoint)", err, out_dir)

    hang.begin(f"the end of the run after step {state.step}")
    if is_main:
        write_status(out_dir, ended, state.step, reason, start=launch_start)
    profiler.close(state.step)  # a run that stopped inside the window: what it profiled, after the verdict
    if ended == "completed":
        progress.message(f"done: {state.step} steps, {state.tokens} tokens, {state.bad_steps} skipped steps, "
                         f"skipped data: {skipped_by_reason or 'none'}")
    loader.close()
    progress.close()
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()
    hang.close()
    if ended == "failed":
        raise SystemExit(1)


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m masktrain.trainer.rank RUN_DIR/config.yaml")
    cfg = read_run_config(argv[0])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed's ZeRO calls torch collectives that torch has renamed; the notice is not ours to act on.
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")
    train(cfg, stop)


if __name__ == "__main__":
    main()

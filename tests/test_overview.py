"""`masktrain status`: a run's standing from its folder, live or left behind."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from conftest import run_cli
from masktrain.launcher.overview import duration, last_rows, overview
from masktrain.trainer.checkpoint import Checkpointer, tag_for
from masktrain.trainer.status import write_status
from test_run_lock import HOLD_IN_CHILD, start_holder


def fake_run(run, state: str, step: int) -> None:
    """A run folder as training leaves it: config, status, metrics (one evaluation far back), two saves."""
    run.mkdir(parents=True)
    config = {"trainer": {"max_steps": 1000, "global_batch_size": 64, "keep_every": 100}, "data": {"seq_len": 512}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_status(run, state, step, start=0)
    rows = [{"step": 100, "val/loss": 3.5, "val/accuracy": 0.4}]
    rows += [{"step": s, "train/loss": 3.0 + 1 / s, "train/lr": 1e-4, "train/mask_rate": 0.15,
              "train/tokens_per_s": 16384.0} for s in range(101, 251)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 251, "train/lo')
    ckpt = Checkpointer(run, 1, True, keep_every=100)
    for saved in (100, 200, 250):
        staging = ckpt.dir / f"{tag_for(saved)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, saved, {}, {})
    os.utime(ckpt.dir / tag_for(250) / "meta.json", (1_000_000.0, 1_000_000.0))


def test_a_live_run_is_held_and_shows_step_losses_time_left_and_saves(tmp_path):
    run = tmp_path / "run"
    fake_run(run, "running", 250)
    holder = start_holder([sys.executable, "-c", HOLD_IN_CHILD, str(run)], env={"SLURM_JOB_ID": "77"})
    try:
        text = overview(run, now=1_000_000.0 + 3 * 3600 + 120)
    finally:
        holder.kill()
        holder.wait()
    lines = text.splitlines()
    assert lines[0] == f"{run}: running"
    assert lines[1].startswith("  held by another launch (SLURM job 77, host ") and f"pid {holder.pid}" in lines[1]
    assert lines[2] == "  step 250 of 1000 (25.0%)"
    assert lines[3] == "  train loss 3.0040 at step 250, lr 0.0001, mask rate 0.150, 16,384 tokens/s"
    # 750 steps x 64 x 512 tokens at 16,384 tokens/s: 1,500 s.
    assert lines[4] == "  about 25m of training left at that speed (evaluation and saves not counted)"
    assert lines[5] == "  validation loss 3.5000, accuracy 0.4000 at step 100"
    assert lines[6] == f"  last checkpoint {run}/checkpoints/step-00000250 (step 250, 3h 02m ago)"
    assert lines[7] == "  kept milestones: step-00000100, step-00000200"
    assert len(lines) == 8


def test_the_stacks_of_ranks_whose_step_ran_long_are_pointed_to_the_latest_first(tmp_path):
    run = tmp_path / "run"
    fake_run(run, "crashed", 250)
    stacks = run / "stacks"
    stacks.mkdir()
    for rank, when in ((0, 1_000_000.0), (1, 1_000_060.0), (2, 1_000_030.0)):
        (stacks / f"rank{rank}.txt").write_text(f"rank {rank}: step 251 has not ended after 600 s "
                                                "(launch.collective_timeout); host n1, pid 7, 2026-11-30T01:00:00\n")
        os.utime(stacks / f"rank{rank}.txt", (when, when))
    assert overview(run, now=1_000_000.0 + 3600).splitlines()[-1] == (
        "  stacks written by 3 ranks, the latest 59m ago (rank 1: step 251 has not ended after 600 s "
        f"(launch.collective_timeout)): {stacks / 'rank1.txt'}")


def test_a_run_marked_running_that_no_launch_holds_was_killed_and_says_where_it_goes_on(tmp_path):
    run = tmp_path / "run"
    fake_run(run, "running", 250)
    text = overview(run)
    assert ("no launch holds the folder: the last one ended without a verdict (killed, or its node lost); a restart "
            "goes on from step 250") in text
    write_status(run, "failed", 250, "too many non-finite steps\n(5 in a row)")
    assert overview(run).splitlines()[:2] == [f"{run}: failed: too many non-finite steps", "  step 250 of 1000 (25.0%)"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):  # a parent or data folder is not a run
        overview(fresh)
    (fresh / "config.yaml").write_text("trainer: {max_steps: 10}\n")  # launched: the ranks have not begun
    assert overview(fresh) == f"{fresh}: not started\n  step 0 of 10 (0.0%)\n  no checkpoint yet"
    result = run_cli("status", str(run), str(tmp_path / "absent"))
    assert result.returncode == 1 and f"masktrain: {tmp_path / 'absent'}: no such run folder" in result.stderr
    parent = run_cli("status", str(tmp_path))
    assert parent.returncode == 1 and parent.stderr == (
        f"masktrain: {tmp_path}: not a run folder (none of config.yaml, status.json, run.lock, metrics.jsonl, "
        "checkpoints, slurm in it)\n")
    assert result.stdout.startswith(f"{run}: failed: too many non-finite steps\n")  # the runs before it are shown


def test_a_run_that_logged_non_finite_losses_or_lost_its_config_sections_is_still_shown(tmp_path, monkeypatch):
    """A run ended by trainer.max_bad_steps logs its last losses as null: status, needed most then, died on them.
    Without file locks, a live run was said to have ended without a verdict."""
    from masktrain.launcher import run_lock
    from masktrain.trainer.checkpoint import meta_or_none

    run = tmp_path / "run"
    fake_run(run, "failed", 250)
    write_status(run, "failed", 250, "too many non-finite steps")
    with open(run / "metrics.jsonl", "a") as log:
        log.write("\n" + json.dumps({"step": 252, "val/loss": None, "val/accuracy": None}) + "\n")
        log.write(json.dumps({"step": 253, "train/loss": None, "train/lr": 1e-4, "train/mask_rate": 0.15,
                              "train/tokens_per_s": None}) + "\n")
    (run / "config.yaml").write_text("trainer:\ndata: 3\n")
    lines = overview(run).splitlines()
    assert lines[1:3] == ["  train loss non-finite at step 253, lr 0.0001, mask rate 0.150",
                          "  validation loss non-finite, accuracy non-finite at step 252"]
    monkeypatch.setattr(run_lock, "try_lock", lambda fd, path, shared=False: None)
    (run / "run.lock").touch()  # every launch leaves one
    write_status(run, "running", 250)
    text = overview(run)
    assert "whether a launch holds the folder is unknown: its file system has no file locks" in text
    assert "ended without a verdict" not in text
    run_lock.check_free(run)  # a launch there goes on unprotected, as it says
    assert meta_or_none(tmp_path / "pruned") is None  # a checkpoint pruned while status looked


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (-3, 42, 60, 3599, 3600 + 61, 86400 * 3 + 7200 + 59)] == [
        "0s", "42s", "1m", "59m", "1h 01m", "3d 2h"]


def test_the_last_rows_are_found_from_the_end_of_a_large_log(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "val/loss": 2.0}] + [{"step": s, "train/loss": 1.0} for s in range(2, 5000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert last_rows(path, ("train/loss", "val/loss")) == {"train/loss": rows[-1], "val/loss": rows[0]}
    monkeypatch.setattr("masktrain.launcher.overview.TAIL_BYTES", 1000)  # the evaluation lies beyond the tail
    assert last_rows(path, ("train/loss", "val/loss")) == {"train/loss": rows[-1]}

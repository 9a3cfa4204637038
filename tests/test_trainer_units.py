"""The trainer's pure parts, in process: LR schedules, checkpoint bookkeeping, resume checks, metrics files,
the DeepSpeed JSON and the launcher's reading of how a run ended."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import scalars
from masktrain.launcher.config import OptimConfig
from masktrain.launcher.launch import FORWARDED_SIGNALS, StopForwarding, outcome, rank_environment
from masktrain.launcher.loading import ConfigError, load_config, merge, to_dict
from masktrain.trainer.checkpoint import (Checkpointer, config_changes, resume_point, rollback_note, save_due,
                                          saved_config, tag_for)
from masktrain.trainer.engine import deepspeed_config
from masktrain.trainer.lr import lr_at
from masktrain.trainer.metrics import Interval, Metrics
from masktrain.trainer.status import REQUEUE_EXIT, read_status, write_status


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "damped_cosine", "wsd"])
def test_lr_warms_up_linearly_then_follows_the_schedule_to_its_floor(schedule):
    optim = OptimConfig(lr=1e-3, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, cycles=4, damping=0.5)
    lrs = [lr_at(step, optim, 110) for step in range(110)]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert max(lrs) == pytest.approx(1e-3)
    final = {"constant": 1e-3}.get(schedule, 1e-4)
    assert lr_at(110, optim, 110) == pytest.approx(final)
    assert min(lrs) >= 1e-4 - 1e-12


def test_damped_cosine_restarts_each_cycle_at_a_damped_peak():
    optim = OptimConfig(lr=1.0, warmup_steps=0, schedule="damped_cosine", min_lr_ratio=0.0, cycles=4, damping=0.5)
    assert [lr_at(step, optim, 100) for step in (0, 25, 50, 75)] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    # Once the damped peak falls under min_lr the LR stays at min_lr, instead of dipping under it and rising.
    floored = replace(optim, min_lr_ratio=0.1, cycles=5)
    assert all(lr_at(step, floored, 100) >= 0.1 - 1e-12 for step in range(100))
    assert [lr_at(step, floored, 100) for step in (60, 70, 80, 90)] == pytest.approx([0.125, 0.1125, 0.1, 0.1])


def test_wsd_holds_the_peak_until_its_decay_whatever_the_run_length_then_falls_as_one_minus_sqrt():
    optim = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.25)
    # 100 steps after warmup: the peak to step 85, then 0.9 * sqrt(u) off it over the last 25.
    assert [lr_at(step, optim, 110) for step in (10, 50, 85)] == [1.0, 1.0, 1.0]
    assert lr_at(85 + 25 // 4, optim, 110) == pytest.approx(1.0 - 0.9 * math.sqrt(6 / 25))
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    # A run extended before its decay goes on at the same LR: raised to 210 steps, step 50 to 85 are unchanged.
    assert [lr_at(step, optim, 210) for step in range(86)] == [lr_at(step, optim, 110) for step in range(86)]


def make_checkpoint(ckpt: Checkpointer, step: int, complete: bool = True) -> None:
    path = ckpt.dir / tag_for(step)
    path.mkdir(parents=True)
    if complete:
        (path / "meta.json").write_text("{}")


def test_latest_follows_the_pointer_and_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, keep_last=2, is_main=True)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        make_checkpoint(ckpt, step)
    make_checkpoint(ckpt, 40, complete=False)  # published folders always have meta.json; this one is damaged
    (ckpt.dir / "step-00000050.partial").mkdir()
    (ckpt.dir / "latest").write_text("step-00000020")
    assert ckpt.latest().name == "step-00000020"
    # A crash between publishing step 30 and pointing `latest` at it, or a pointer to a deleted folder:
    (ckpt.dir / "latest").write_text("step-00000099")
    assert ckpt.latest().name == "step-00000030"
    assert [p.name for p in ckpt.complete()] == ["step-00000010", "step-00000020", "step-00000030"]
    # The crash came after step 30 was published and before `latest` moved on from step 20: what was published
    # last wins (checkpoints without a serial, from before it was recorded, follow the pointer as above).
    for serial, step in enumerate((10, 20, 30), start=1):
        (ckpt.dir / tag_for(step) / "meta.json").write_text(json.dumps({"serial": serial}))
    (ckpt.dir / "latest").write_text("step-00000020")
    assert ckpt.latest().name == "step-00000030"
    # A meta.json damaged since leaves its checkpoint out, with a warning, unless it is the one `latest` names:
    # going on from an older one instead would lose steps without a word.
    (ckpt.dir / "step-00000010" / "meta.json").write_text("{")
    (ckpt.dir / "step-00000020" / "meta.json").write_text(json.dumps({"serial": "2"}))  # edited by hand
    assert [p.name for p in ckpt.complete()] == ["step-00000030"]
    (ckpt.dir / "step-00000020" / "meta.json").write_text(json.dumps({"serial": 2}))
    assert [p.name for p in ckpt.complete()] == ["step-00000020", "step-00000030"]
    assert "step-00000010/meta.json is damaged: that checkpoint is left out" in capsys.readouterr().err
    (ckpt.dir / "latest").write_text("step-00000030")
    assert ckpt.latest().name == "step-00000030"
    (ckpt.dir / "step-00000030" / "meta.json").write_text("[]")
    with pytest.raises(SystemExit, match="step-00000030/meta.json: damaged .* move .* aside"):
        ckpt.latest()
    for serial, step in enumerate((10, 30), start=1):
        (ckpt.dir / tag_for(step) / "meta.json").write_text(json.dumps({"serial": serial * 2}))
    ckpt.prune()
    ckpt.clean_partial()
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["latest", "step-00000020", "step-00000030",
                                                          "step-00000040"]


def test_a_checkpoint_is_named_by_its_folder_or_by_its_run_from_anywhere(tmp_path, monkeypatch):
    from masktrain.trainer.checkpoint import resolve_checkpoint

    ckpt = Checkpointer(tmp_path / "run", keep_last=2, is_main=True)
    for step in (10, 20):
        make_checkpoint(ckpt, step)
    (ckpt.dir / "latest").write_text("step-00000020")
    newest = ckpt.dir / "step-00000020"
    for given in (ckpt.dir / "step-00000020", tmp_path / "run", ckpt.dir, ckpt.dir / "latest"):
        assert resolve_checkpoint(given) == newest, given
    monkeypatch.chdir(ckpt.dir)
    assert resolve_checkpoint("latest") == newest and resolve_checkpoint(".") == newest
    with pytest.raises(FileNotFoundError, match="step-00000099: no such file or folder"):
        resolve_checkpoint("step-00000099")
    # A pointer may name a folder the step-* pattern does not list (renamed by hand): it is taken as it is.
    (ckpt.dir / "step-00000020").rename(ckpt.dir / "mine")
    (ckpt.dir / "step-00000010").rename(ckpt.dir / "old")
    (ckpt.dir / "latest").write_text("mine")
    assert ckpt.latest() == ckpt.dir / "mine"


def test_milestones_are_saved_on_their_steps_and_never_pruned(tmp_path):
    trainer = load_config("smoke", ["trainer.checkpoint_every=4", "trainer.keep_every=10"]).trainer
    assert [step for step in range(1, 25) if save_due(step, trainer)] == [4, 8, 10, 12, 16, 20, 24]
    trainer.checkpoint_every = 0
    assert [step for step in range(1, 25) if save_due(step, trainer)] == [10, 20]

    ckpt = Checkpointer(tmp_path, keep_last=2, is_main=True, keep_every=10)
    for step in (4, 8, 10, 12, 16, 20, 24, 28):
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, step, {"run": {}}, {})
    assert [p.name for p in ckpt.complete()] == ["step-00000010", "step-00000020", "step-00000024",
                                                 "step-00000028"]
    assert ckpt.latest().name == "step-00000028"


def test_milestones_stay_when_a_resume_changes_keep_every(tmp_path):
    """keep_every may change on resume (it changes nothing the run computes): the milestones saved under the old
    value were pruned at the next save, judged by the new one."""
    for keep_every, steps in ((100, range(50, 401, 50)), (1000, (450,)), (0, (500,))):
        ckpt = Checkpointer(tmp_path, keep_last=2, is_main=True, keep_every=keep_every)
        for step in steps:
            staging = ckpt.dir / f"{tag_for(step)}.partial"
            staging.mkdir(parents=True)
            ckpt.publish(staging, step, {"run": {}}, {})
    assert [p.name for p in ckpt.complete()] == ["step-00000100", "step-00000200", "step-00000300",
                                                 "step-00000400", "step-00000450", "step-00000500"]


def test_after_a_rollback_the_new_line_is_kept_and_resumed_from_not_the_higher_steps_it_abandoned(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3, is_main=True)

    def publish(step: int) -> None:
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        (staging / "state.pt").write_bytes(b"weights")
        ckpt.publish(staging, step, {"run": {}}, {"tokens": step})

    for step in (10, 20, 30):
        publish(step)
    # Restarted from an archived step-5 checkpoint: its saves go on at 5, 15, 20 ...
    publish(5)
    assert [p.name for p in ckpt.complete()] == ["step-00000020", "step-00000030", "step-00000005"]
    (ckpt.dir / "latest").unlink()  # a crash before `latest` moved: still the new line, not step 30
    assert ckpt.latest().name == "step-00000005"
    publish(15)
    publish(20)  # after the abandoned line's step 20 was pruned
    assert [p.name for p in ckpt.complete()] == ["step-00000005", "step-00000015", "step-00000020"]
    assert [json.loads((p / "meta.json").read_text())["serial"] for p in ckpt.complete()] == [4, 5, 6]
    assert ckpt.latest().name == "step-00000020" and (ckpt.latest() / "state.pt").is_file()
    assert not list(ckpt.dir.glob("*.partial"))


def test_resume_check_ignores_keys_that_do_not_change_the_run(tmp_path):
    saved = to_dict(load_config("smoke", []))
    same = to_dict(load_config("smoke", ["trainer.checkpoint_every=7", "trainer.keep_last=9", "run.name=other",
                                         "data.prepare.max_docs=5", "trainer.stop_after_steps=3"]))
    assert config_changes(saved, same) == []
    # A final_rate under the constant schedule never had an effect; checkpoints saved before validation refused
    # it still hold one, and removing it does not change the run.
    legacy = to_dict(load_config("smoke", ["data.masking.schedule=constant", "data.masking.rate=0.15"]))
    legacy["data"]["masking"]["final_rate"] = 0.1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert config_changes(saved_config(tmp_path), to_dict(load_config("smoke", ["data.masking.schedule=constant",
                                                                                "data.masking.rate=0.15"]))) == []
    changed = to_dict(load_config("smoke", ["optim.lr=0.1", "trainer.zero_stage=3"]))
    assert config_changes(saved, changed) == ["optim.lr: 0.002 -> 0.1", "trainer.zero_stage: 2 -> 3"]
    # Saved before a key existed (here: two masking keys a later masktrain added): the run had the default,
    # and resumes under an upgrade; setting the new key otherwise is a change.
    older = to_dict(load_config("smoke", []))
    del older["data"]["masking"]["span_max"], older["model"]["decoder_hidden_size"]
    assert config_changes(older, saved) == []
    span = ["data.masking.eval_policy=span", "data.masking.span_max=4"]
    assert config_changes(older, to_dict(load_config("smoke", span))) == [
        "data.masking.eval_policy: '' -> 'span'", "data.masking.span_max: 10 -> 4"]
    # The same ranks on other nodes compute the same run; other ranks do not.
    four_by_eight = to_dict(load_config("smoke", ["launch.nnodes=4", "launch.nproc_per_node=8", "trainer.global_batch_size=256"]))
    eight_by_four = to_dict(load_config("smoke", ["launch.nnodes=8", "launch.nproc_per_node=4", "trainer.global_batch_size=256"]))
    assert config_changes(four_by_eight, eight_by_four) == []
    assert config_changes(four_by_eight, saved) == ["ranks (launch.nnodes x launch.nproc_per_node): 32 -> 2",
                                                     "trainer.global_batch_size: 256 -> 16"]


def test_no_key_that_changes_what_a_run_computes_is_resume_safe():
    """RESUME_SAFE keys are dropped from the comparison: one that changes the model, the optimizer, the masking,
    the batches or the data order there would let a resume change the run without a word."""
    from masktrain.trainer.checkpoint import RESUME_SAFE, flatten

    flat = flatten(to_dict(load_config("smoke", [])))
    computing = {key for key in flat if key.split(".")[0] in ("model", "optim") or key.startswith("data.masking.")}
    computing |= {"data.seq_len", "data.micro_batch_size", "data.dir", "data.train_shards", "data.num_workers",
                  "data.shuffle_block", "trainer.max_steps", "trainer.global_batch_size", "trainer.zero_stage",
                  "trainer.precision", "trainer.deepspeed_config", "run.seed"}
    assert computing <= set(flat) and not computing & RESUME_SAFE
    assert RESUME_SAFE <= set(flat), "a resume-safe key that no longer exists"


def test_write_atomic_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    from masktrain.data import files

    path = tmp_path / "meta.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, "new")
    assert path.read_text() == "old"
    monkeypatch.undo()
    files.write_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_folder_the_file_system_cannot_sync_is_no_error_but_a_file_is(tmp_path, monkeypatch):
    """Some FUSE mounts refuse fsync on a folder (EINVAL): its renames stand as the file system keeps them. A file
    that cannot be synced is still an error: its bytes may not be on disk."""
    import errno

    from masktrain.data import files

    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(files.os, "fsync", refused)
    files.fsync_path(tmp_path)
    (tmp_path / "a").write_text("a")
    with pytest.raises(OSError, match="Invalid argument"):
        files.fsync_path(tmp_path / "a")


def test_metrics_resume_cuts_later_steps_and_a_torn_last_line_and_writes_strict_json(tmp_path):
    first = Metrics(tmp_path, True, 0)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": 1.0 / step, "train/mfu": None})
    first.log(4, {"train/loss": math.nan})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "train/lo')  # killed mid-write
    resumed = Metrics(tmp_path, True, 2)
    resumed.log(3, {"train/loss": 0.5, "train/grad_norm": math.inf})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5},
                    {"step": 3, "train/loss": 0.5, "train/grad_norm": None}]


def test_a_logged_point_covers_every_step_of_its_interval():
    interval = Interval()
    interval.add(loss_sum=30.0, targets=10.0, tokens=100, seconds=1.0, waited=0.1)
    interval.add(loss_sum=math.nan, targets=10.0, tokens=100, seconds=1.0, waited=0.1)  # a skipped step
    interval.add(loss_sum=10.0, targets=30.0, tokens=100, seconds=2.0, waited=0.6)
    # Per target over the steps with a finite loss (40 / 40), not the mean of step means ((3 + 1/3) / 2).
    assert interval.loss == 1.0
    assert interval.tokens_per_s == 300 / 4.0 and interval.waited / interval.seconds == 0.2
    assert interval.targets / interval.tokens == 50 / 300  # what ran, skipped step included, for MFU
    only_bad = Interval()
    only_bad.add(loss_sum=math.inf, targets=5.0, tokens=100, seconds=1.0, waited=0.0)
    assert math.isnan(only_bad.loss)


def test_resume_removes_an_abandoned_launchs_events_from_the_files_themselves(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    original = EventFileLoader.__init__
    tb = tmp_path / "tb"
    first = Metrics(tmp_path, True, 0)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": 1.0 / step})
    first.log(4, {"val/loss": 9.0})  # after the checkpoint at 2: the resumed run may never log it again
    first.close()
    with open(next(tb.glob("*tfevents*")), "ab") as handle:
        handle.write(b"\x10\x00\x00")  # killed mid-record
    foreign = tb / "events.out.tfevents.1.other-tool"
    foreign.write_bytes(next(tb.glob("*tfevents*")).read_bytes())
    resumed = Metrics(tmp_path, True, 2)
    resumed.log(3, {"train/loss": 0.5})
    resumed.close()
    ours = sorted(tb.glob("*tfevents*.masktrain"))
    assert scalars(tb, ours) == {"train/loss": [(1, 1.0), (2, 0.5), (3, 0.5)]}
    assert scalars(tb, [foreign])["val/loss"] == [(4, 9.0)]  # another tool's file is not ours to cut

    # The torn record is gone too, not just skipped by readers.
    records = [event.SerializeToString() for event in EventFileLoader(str(ours[0])).Load()]
    assert ours[0].stat().st_size == sum(12 + len(record) + 4 for record in records)  # TFRecord framing

    # A later resume reads only the files written since: the first launch's is indexed as ending at step 2.
    assert json.loads((tb / "event-files.json").read_text()) == {ours[0].name: 2}
    read = []
    monkeypatch.setattr(EventFileLoader, "__init__", lambda self, path, *a, **k: (read.append(Path(path).name),
                                                                                    original(self, path, *a, **k))[1])
    Metrics(tmp_path, True, 3).close()
    assert read == [ours[1].name]
    assert scalars(tb, ours) == {"train/loss": [(1, 1.0), (2, 0.5), (3, 0.5)]}
    # Rolling back to an earlier checkpoint reads them all again, and so does a start with an unreadable index.
    read.clear()
    Metrics(tmp_path, True, 1).close()
    assert read[:2] == [ours[0].name, ours[1].name]
    assert scalars(tb, sorted(tb.glob("*tfevents*.masktrain"))) == {"train/loss": [(1, 1.0)]}
    for broken in ("", "[]", "{"):
        (tb / "event-files.json").write_text(broken)
        read.clear()
        Metrics(tmp_path, True, 1).close()
        assert ours[0].name in read


def test_flush_puts_every_logged_event_on_disk_before_close(tmp_path):
    """What the trainer calls before each checkpoint: a node lost later must not take the steps the resume keeps."""
    metrics = Metrics(tmp_path, True, 0)
    metrics.log(1, {"train/loss": 2.0})
    metrics.flush()
    assert scalars(tmp_path / "tb") == {"train/loss": [(1, 2.0)]}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.0}
    metrics.close()


def test_deepspeed_json_is_the_stage_preset_plus_the_run_plus_the_users_overrides(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}))
    cfg = load_config("smoke", ["trainer.zero_stage=3", "trainer.global_batch_size=32",
                                f"trainer.deepspeed_config={user}"])
    ds = deepspeed_config(cfg, "fp32")
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000  # the preset's, kept
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (32, 8, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}


def test_launcher_exit_code_comes_from_the_status_the_ranks_wrote(tmp_path, capsys):
    # The ranks never got to write one: a restart goes on from the newest checkpoint.
    newest = tmp_path / "checkpoints" / "step-00000500"
    newest.mkdir(parents=True)
    (newest / "meta.json").write_text(json.dumps({"tag": newest.name, "step": 500, "serial": 1}))
    assert outcome(tmp_path, 1) == 1
    assert "a restart goes on from step 500" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "status.json").unlink()
    write_status(tmp_path, "running", 3)
    # A rank killed (here torchrun itself, by SIGKILL) leaves no verdict: the launcher marks the run crashed and
    # exits as a shell reports a signal, never with a negative code (sys.exit(-9) would be 247).
    assert outcome(tmp_path, -9) == 137
    status = read_status(tmp_path)
    assert (status["state"], status["step"]) == ("crashed", 3)
    err = capsys.readouterr().err
    assert "the ranks ended without a verdict (torchrun exited 137)" in err and "goes on from step 3" in err
    # Stopped by a signal the launcher passed on, before the ranks could checkpoint: the last checkpoint stands.
    write_status(tmp_path, "running", 3)
    assert outcome(tmp_path, 1, stopped="SIGUSR1") == REQUEUE_EXIT
    assert "stopped on SIGUSR1 before the ranks could checkpoint" in capsys.readouterr().err
    write_status(tmp_path, "preempted", 5, "SIGUSR1")
    assert outcome(tmp_path, 1) == REQUEUE_EXIT
    write_status(tmp_path, "completed", 9)
    assert outcome(tmp_path, 1) == 0
    write_status(tmp_path, "failed", 7, "3 steps in a row had a non-finite loss")
    assert outcome(tmp_path, 0) == 1
    assert "training failed at step 7: 3 steps in a row had a non-finite loss" in capsys.readouterr().err
    # A status.json that is none (emptied by a power loss, edited by hand) is read as no verdict, not a traceback
    # in `status`, `slurm status` and the rerun of a finished run.
    for damaged in ("", "{", "[1]", "null", '{"state": "failed", "step": 7}', '{"state": "done", "step": 1}'):
        (tmp_path / "status.json").write_text(damaged)
        assert read_status(tmp_path) == {}, damaged
        assert outcome(tmp_path, 1) == 1
    (tmp_path / "status.json").write_bytes(b"\xff\xfe")
    assert read_status(tmp_path) == {}


KILLED_RANK = """import os, signal, time
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


def test_torchrun_reports_a_killed_rank_in_a_line_and_exits_as_a_shell_would(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(KILLED_RANK)
    ended = subprocess.run([sys.executable, "-m", "masktrain.launcher.torchrun", "--standalone",
                            "--nproc-per-node=2", str(script)], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 137, ended.stderr[-3000:]
    lines = [line for line in ended.stderr.splitlines() if line.startswith("torchrun: ")]
    assert re.fullmatch(r"torchrun: rank 1 \(local rank 1, pid \d+\) was killed by SIGKILL", lines[0]), lines
    assert len(lines) == 2 and "Traceback" not in ended.stderr


CHILD = """import signal, sys, time
from pathlib import Path
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
Path(sys.argv[1] + ".ready").touch()
time.sleep(2)
Path(sys.argv[1]).write_text(" ".join(got))
"""


def test_the_launcher_passes_on_the_first_stop_signal_only(tmp_path, capsys):
    """torchrun takes each signal as a new, harsher shutdown; the third cut its wait for the ranks short."""
    record = tmp_path / "got"
    with StopForwarding() as stop:
        child = stop.start([sys.executable, "-c", CHILD, str(record)], dict(os.environ))
        while not Path(f"{record}.ready").exists():
            time.sleep(0.01)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1):
            os.kill(os.getpid(), sig)
            time.sleep(0.1)
        assert child.wait(timeout=30) == 0
    assert record.read_text() == "SIGUSR1" and stop.received == "SIGUSR1"
    assert capsys.readouterr().err.count("already stopping on SIGUSR1; waiting for the ranks' checkpoint") == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers it replaced are back


def test_a_stop_signal_before_the_ranks_start_starts_nothing(tmp_path, monkeypatch, capsys):
    """A signal while the launcher checks the data (seconds on a shared file system): nothing to save yet."""
    from masktrain.data import inputs
    from masktrain.launcher.launch import launch_local

    monkeypatch.setattr(inputs, "check_ready", lambda cfg: os.kill(os.getpid(), signal.SIGUSR1))
    run = tmp_path / "run"
    assert launch_local(load_config("smoke", [f"run.output_dir={run}", "launch.accelerator=cpu"])) == REQUEUE_EXIT
    assert "stopped on SIGUSR1 before the ranks started" in capsys.readouterr().err
    assert not run.exists()  # the launch ended there: nothing written, no rank started


def test_torchrun_is_told_to_forward_sigusr1_to_the_ranks(monkeypatch):
    env = rank_environment(load_config("smoke", []), cuda=False)
    assert set(env["PET_SIGNALS_TO_HANDLE"].split(",")) == {s.name for s in FORWARDED_SIGNALS}
    assert signal.SIGUSR1 in FORWARDED_SIGNALS and signal.SIGTERM in FORWARDED_SIGNALS
    # The accelerator is the launch's, not one left in the shell by a CPU session.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert rank_environment(load_config("smoke", []), cuda=True)["DS_ACCELERATOR"] == "cuda"


def test_an_explicit_resume_must_name_a_complete_checkpoint(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [f"trainer.resume={tmp_path / 'step-00000004'}"])
    assert err.value.problems[0].startswith("trainer.resume: must be auto, never or a complete checkpoint folder")

    # Once the run has started from it and saved since, keep_last may prune it: the run's config, which its
    # requeues and `export` read again, stays valid, as the requeues go on from the run's own saves.
    run = tmp_path / "run"
    rollback = run / "checkpoints" / "step-00000004"
    ckpt = Checkpointer(run, keep_last=1, is_main=True)
    for step, meta in ((4, {}), (5, {"resumed_from": str(rollback.resolve())})):
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, step, {"run": {}}, meta)
    assert not rollback.exists()
    cfg = load_config("smoke", [f"run.output_dir={run}", f"trainer.resume={rollback}"])
    assert resume_point(cfg.trainer.resume, ckpt) == (run / "checkpoints" / "step-00000005", str(rollback.resolve()))
    assert rollback_note(cfg.trainer.resume, ckpt).endswith(f"step-00000005 ({rollback} itself has been pruned)")
    with pytest.raises(ConfigError):  # another run never started from it
        load_config("smoke", [f"run.output_dir={tmp_path / 'other'}", f"trainer.resume={rollback}"])


def test_a_second_rollback_to_the_same_checkpoint_is_said_with_how_to_make_it(tmp_path):
    """A rollback's line of checkpoints descends from trainer.resume, so the same trainer.resume given again (a
    second rollback, after the first line went bad too) goes on from that line: said before the ranks start, with
    what rolls back again."""
    run = tmp_path / "run"
    target = run / "checkpoints" / "step-00000004"
    ckpt = Checkpointer(run, keep_last=10, is_main=True)
    for step, meta in ((4, {}), (6, {}), (5, {"resumed_from": str(target.resolve())}),
                       (6, {"resumed_from": str(target.resolve())})):
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, step, {"run": {}}, meta)
    assert rollback_note("auto", ckpt) is None
    assert resume_point(str(target), ckpt)[0] == run / "checkpoints" / "step-00000006"
    note = rollback_note(str(target), ckpt)
    assert note == (f"trainer.resume={target}: this run has gone on from there and saved since, so it goes on from "
                    f"its latest checkpoint, {run}/checkpoints/step-00000006. To roll back to {target} again, move "
                    "aside the checkpoints saved since (step-00000005, step-00000006) or train into a new "
                    "run.output_dir")
    # Done as it says, the rollback is taken again.
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("step-00000005", "step-00000006"):
        (run / "checkpoints" / name).rename(aside / name)
    assert resume_point(str(target), ckpt) == (target, str(target.resolve()))
    assert rollback_note(str(target), ckpt) is None


def test_every_checkpoint_of_a_run_means_those_of_its_current_line(tmp_path, capsys):
    """After a rollback to step 20, the abandoned line's later saves stay until pruned: scored among the new
    line's, they made one curve of two trainings."""
    from masktrain.trainer.evaluation import checkpoints_of

    ckpt = Checkpointer(tmp_path, keep_last=10, is_main=True)
    for step in (10, 20, 30, 40, 22, 32):
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, step, {"run": {}}, {})
    names = lambda paths: [path.name for path in paths]  # noqa: E731
    assert [names(paths) for paths in ckpt.lines()] == [["step-00000010", "step-00000020", "step-00000022",
                                                         "step-00000032"], ["step-00000030", "step-00000040"]]
    assert names(checkpoints_of([str(tmp_path)], every=True)) == names(ckpt.lines()[0])
    assert capsys.readouterr().err == (f"masktrain: {tmp_path}: not scoring the checkpoints of a line a rollback "
                                       "abandoned (step-00000030, step-00000040); name them to score them\n")


def test_resume_never_starts_over_only_in_a_run_folder_without_checkpoints(tmp_path):
    """Started over in place, a run pruned the earlier run's checkpoints, mixed its own among them and cut its
    metrics, without a word."""
    from masktrain.launcher.launch import check_resume_compatible

    run = tmp_path / "run"
    cfg = load_config("smoke", [f"run.output_dir={run}", "trainer.resume=never"])
    assert check_resume_compatible(cfg) is None
    ckpt = Checkpointer(run, keep_last=3, is_main=True)
    staging = ckpt.dir / f"{tag_for(30)}.partial"
    staging.mkdir(parents=True)
    ckpt.publish(staging, 30, {"run": {}}, {})
    with pytest.raises(ConfigError) as err:
        check_resume_compatible(cfg)
    assert err.value.problems == [
        f"trainer.resume: never, but {run} holds the checkpoints of an earlier run (the latest step-00000030), which "
        "a new start would prune and mix with its own; use another run.output_dir (or run.name), or remove that "
        "run's folder"]


def test_a_zero3_checkpoint_of_one_optimizer_group_is_loaded_parameter_by_parameter(tmp_path):
    """masktrain read ZeRO-3's partitioned parameters as 1-D, so such runs held every parameter in one group,
    without weight decay: this run's two groups would not load that optimizer state as it is."""
    from masktrain.trainer.checkpoint import regrouped

    ckpt = Checkpointer(tmp_path, keep_last=10, is_main=True)
    for step, meta in ((1, {"zero_stage": 3}), (2, {"zero_stage": 2}), (3, {"zero_stage": 3, "optimizer_groups": 2})):
        staging = ckpt.dir / f"{tag_for(step)}.partial"
        staging.mkdir(parents=True)
        ckpt.publish(staging, step, {"run": {}}, meta)
    assert [regrouped(ckpt.dir / tag_for(step), 2) for step in (1, 2, 3)] == [True, False, False]
    assert regrouped(ckpt.dir / tag_for(3), 3)


def test_auto_precision_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation by default: it says yes on V100/T4 (sm 7.x)."""
    import torch

    from masktrain.trainer.engine import Runtime, precision

    cfg = load_config("smoke", [])
    gpu = Runtime(0, 0, 1, torch.device("cuda", 0))
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
        assert precision(cfg, gpu) == ("bf16" if native else "fp32")
    assert precision(cfg, Runtime(0, 0, 1, torch.device("cpu"))) == "fp32"


def test_a_zero_checkpoint_on_another_rank_count_is_a_change_to_allow_and_loads_through_the_universal_format(
        tmp_path):
    """DeepSpeed loads ZeRO 1-3 optimizer partitions on another count only through its universal format; the rank
    count changes the run, so the move is allowed or refused as any change is. ZeRO-0 holds the full state."""
    from masktrain.trainer.checkpoint import check_resumable, needs_universal

    saved = to_dict(load_config("smoke", []))  # 2 ranks
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    torch.save({}, tmp_path / "mp_rank_00_model_states.pt")  # a whole file, as check_intact asks
    (tmp_path / "meta.json").write_text('{"serial": 1}')  # saved before meta.json recorded stage and precision
    one_rank = to_dict(load_config("smoke", ["launch.nproc_per_node=1"]))
    assert not needs_universal(tmp_path, 1)  # ZeRO-0: the full state is in one file
    for prefix in ("", "bf16_"):  # DeepSpeed names them so in bf16
        for rank in range(2):
            torch.save({}, tmp_path / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        assert needs_universal(tmp_path, 1) and needs_universal(tmp_path, 4) and not needs_universal(tmp_path, 2)
        check_resumable(tmp_path, one_rank, True, 2, None)
        with pytest.raises(SystemExit, match=r"ranks \(launch.nnodes x launch.nproc_per_node\): 2 -> 1"):
            check_resumable(tmp_path, one_rank, False, 2, None)
        for rank in range(2):
            (tmp_path / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").unlink()
    check_resumable(tmp_path, to_dict(load_config("smoke", ["launch.nnodes=2", "launch.nproc_per_node=1"])), False, 0,
                    None)


CONVERTING_RANK = """
import sys
from pathlib import Path
from masktrain.trainer import checkpoint
from masktrain.trainer.signals import StopRequest
stop = StopRequest().install()  # as a rank does first
checkpoint.to_universal(Path(sys.argv[1]), Path(sys.argv[2]))
print("converted; stop requested by", stop.signal_name)
"""

FAKE_CONVERTER = """
import os, signal, sys, time
os.killpg(0, signal.SIGUSR1)  # a preemption, which torchrun passes to the ranks' whole process group
time.sleep(0.5)
out = sys.argv[sys.argv.index("--output_folder") + 1]
os.makedirs(out)
open(os.path.join(out, "done"), "w").close()
"""


SLOW_CONVERTER = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor

def work(out):  # in a worker process, as DeepSpeed's converter does its work
    with open(os.path.join(out, "worker"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    out = sys.argv[sys.argv.index("--output_folder") + 1]
    os.makedirs(out)
    with open(os.path.join(out, "pid"), "w") as handle:
        handle.write(str(os.getpid()))
    with ProcessPoolExecutor(max_workers=1) as pool:
        pool.submit(work, out).result()
"""


def test_a_preemption_during_the_universal_conversion_leaves_it_to_finish_and_the_rank_to_stop_after(tmp_path):
    """On the local SLURM cluster a USR1 sent while rank 0 converted a 2-rank checkpoint for 1 killed the
    converter (exit -10), and the rank with it ('DeepSpeed's universal conversion ... failed'): the converter
    ignores the stop signals, as loader workers do, and the rank honours the stop after its first step."""
    # DeepSpeed's converter, as the rank's subprocess finds it first on its path.
    fake = tmp_path / "fake" / "deepspeed" / "checkpoint"
    fake.mkdir(parents=True)
    for package in (fake.parent, fake):
        (package / "__init__.py").write_text("")
    (fake / "ds_to_universal.py").write_text(FAKE_CONVERTER)
    target = tmp_path / "copy" / "universal"
    # A session of its own: the signal goes to the whole process group, as torchrun sends it.
    rank = subprocess.run([sys.executable, "-c", CONVERTING_RANK, str(tmp_path), str(target)], capture_output=True,
                          text=True, timeout=120, start_new_session=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent.parent),
                                                                             os.environ.get("PYTHONPATH", "")])})
    assert rank.returncode == 0, rank.stdout + rank.stderr
    assert "converted; stop requested by SIGUSR1" in rank.stdout
    assert (target / "done").is_file()

    # Ignoring them, it must not outlive a rank killed outright, writing into what the next start converts into;
    # nor must its workers.
    (fake / "ds_to_universal.py").write_text(SLOW_CONVERTER)
    target = tmp_path / "copy2" / "universal"
    rank = subprocess.Popen([sys.executable, "-c", CONVERTING_RANK, str(tmp_path), str(target)],
                            stdout=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(fake.parent.parent)})
    deadline = time.monotonic() + 60
    while not all((target / name).is_file() and (target / name).read_text() for name in ("pid", "worker")):
        assert time.monotonic() < deadline and rank.poll() is None, "the converter and its worker did not start"
        time.sleep(0.1)
    processes = {who: Path("/proc") / (target / name).read_text()
                 for who, name in (("converter", "pid"), ("converter's worker", "worker"))}
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 10
    try:
        for who, process in processes.items():
            while running(process):
                assert time.monotonic() < deadline, f"the {who} outlived its rank"
                time.sleep(0.1)
    finally:
        for process in processes.values():
            if running(process):
                os.kill(int(process.name), signal.SIGKILL)


def running(process: Path) -> bool:
    """Whether /proc/<pid> `process` is a process that has not ended (a zombie has)."""
    try:
        return "\tZ" not in (process / "status").read_text()
    except FileNotFoundError:
        return False


def test_a_checkpoint_resumes_only_under_a_zero_stage_and_precision_deepspeed_can_load_it_with(tmp_path):
    """Saved under ZeRO-2 in fp32: ZeRO-1 loads it; ZeRO-0 and 3 and bf16 would fail in every rank after
    start-up, so they are refused first, whatever is allowed. The DeepSpeed JSON's contents count as config."""
    from masktrain.trainer.checkpoint import check_resumable, deepspeed_json

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    config = to_dict(load_config("smoke", [f"trainer.deepspeed_config={ds_file}"]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "meta.json").write_text(json.dumps({"serial": 1, "zero_stage": 2, "precision": "fp32",
                                                 "deepspeed_json": deepspeed_json(config),
                                                 "tokenizer_sha256": "a" * 64}))
    for stage, precision in ((2, "fp32"), (1, "fp32"), (2, None)):
        check_resumable(ckpt, config, False, stage, precision)
    check_resumable(ckpt, config, False, 2, "fp32", (tmp_path / "tok", "a" * 64))
    # The data folder's tokenizer replaced by one of the same size: the weights' ids would mean other tokens.
    with pytest.raises(SystemExit, match=f"cannot resume from {ckpt}: it was trained with another tokenizer \\(sha256 "
                                         f"aaaaaaaaaaaa\\) than the run's, {tmp_path / 'tok'} \\(bbbbbbbbbbbb\\).*"
                                         "even with trainer.allow_config_change"):
        check_resumable(ckpt, config, True, 2, "fp32", (tmp_path / "tok", "b" * 64))
    for stage in (0, 3):
        with pytest.raises(SystemExit, match=f"cannot resume from {ckpt} under ZeRO-{stage}: it was saved under "
                                             "ZeRO-2, and DeepSpeed loads its state files only under ZeRO-1/2; set "
                                             "trainer.zero_stage=2 .* even with trainer.allow_config_change"):
            check_resumable(ckpt, config, True, stage, "fp32")
    with pytest.raises(SystemExit, match="in bf16: it was saved in fp32, .* set trainer.precision=fp32, even with"):
        check_resumable(ckpt, config, True, 2, "bf16")
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    with pytest.raises(SystemExit, match="trainer.deepspeed_config contents: zero_optimization.overlap_comm: False "
                                         "-> True"):
        check_resumable(ckpt, config, False, 2, "fp32")
    check_resumable(ckpt, config, True, 2, "fp32")
    # What allow_config_change then does to the data is said before it is allowed.
    with pytest.raises(SystemExit, match=r"(?s)data.shuffle_block: 256 -> 8\n.*allow_config_change=true \(with "
                                         "data.shuffle_block changed, the data stream then starts again from its "
                                         "beginning"):
        check_resumable(ckpt, merge(copy.deepcopy(config), {"data": {"shuffle_block": 8}}), False, 2, "fp32")
    for other in ({"optim": {"lr": 0.5}}, {"data": {"num_workers": 2}}):  # other workers continue the position
        with pytest.raises(SystemExit) as refused:
            check_resumable(ckpt, merge(copy.deepcopy(config), other), False, 2, "fp32")
        assert "starts again" not in str(refused.value)


def test_export_consolidates_a_bf16_zero_checkpoint_from_its_partitions(tmp_path, monkeypatch):
    """DeepSpeed names bf16 ZeRO partitions bf16_zero_pp_rank_*: they are consolidated, not mistaken for ZeRO-0
    (whose model file would hold no weights under ZeRO-3). BF16_Optimizer's, which zero_to_fp32 refuses, are
    tested after a real run in test_export."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32
    import torch

    from masktrain.trainer.export import load_weights

    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    (checkpoint / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    calls = []
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda folder, tag: calls.append((folder, tag)) or {"weight": torch.ones(1, 2)})
    model = torch.nn.Linear(2, 1, bias=False)
    load_weights(model, checkpoint)
    assert torch.equal(model.weight, torch.ones(1, 2)) and calls == [(str(tmp_path), "step-00000004")]

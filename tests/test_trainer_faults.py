"""Bad steps, bad data and badly timed signals in a 2-rank run: a NaN loss on one rank skips the step on both
and is counted, too many in a row abort with a message; skipped data is counted per reason (both reach
TensorBoard); a stop signal during a checkpoint leaves from that checkpoint."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import scalars
from masktrain.data.shards import file_size_and_sha256
from masktrain.launcher.launch import outcome, rank_environment, write_run_config
from masktrain.launcher.loading import load_config
from masktrain.launcher.overview import overview

pytestmark = pytest.mark.slow

FAULTY_RANK = Path(__file__).parent / "faulty_rank.py"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def spoil_shards(data_dir: Path) -> None:
    """Put an undecodable sample and an empty document at the start of every training shard, as if written so: the
    manifest records the shards as they now are (a copy cut short is another test's)."""
    bad = {"aaa-bad-sample.tokens.npy": b"not an npy file", "aaa-empty-doc.tokens.npy": npy(np.zeros(0, np.uint16))}
    for shard in sorted((data_dir / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for name, payload in bad.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            for member, payload in members:
                tar.addfile(member, io.BytesIO(payload))
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        shard["bytes"], shard["sha256"] = file_size_and_sha256(data_dir / shard["path"])
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_nan_steps_are_skipped_counted_and_abort_a_run_that_stays_nan(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.dir=")), data)
    spoil_shards(data)
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"data.dir={data}", f"run.output_dir={run}", "trainer.zero_stage=0",
                                "trainer.max_steps=20", "trainer.log_every=4", "trainer.checkpoint_every=0",
                                "trainer.max_bad_steps=3"])
    config_path = write_run_config(cfg)
    env = {**rank_environment(cfg, cuda=False), "FAULT_LOG": str(tmp_path), "FAULT_NAN_RANK": "1",
           "FAULT_NAN_STEPS": "3", "FAULT_NAN_FROM": "7"}
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(FAULTY_RANK), str(config_path)], env=env, capture_output=True, text=True,
                           timeout=600)
    log = ranks.stdout[-3000:] + ranks.stderr[-3000:]
    assert outcome(run, ranks.returncode) == 1, log

    # Step 3 (NaN on rank 1 only) is skipped on both ranks: the weights entering step 4 are those of step 3.
    for rank in (0, 1):
        checksums = {}
        for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            checksums[row["step"]] = row["checksum"]
        assert checksums[4] == checksums[3], f"rank {rank}: the skipped step changed the weights"
        assert len({checksums[s] for s in (1, 2, 3, 5, 6, 7)}) == 6, f"rank {rank}: a good step was not applied"

    # Steps 7, 8, 9 are NaN everywhere: the third in a row aborts with a message, without a checkpoint.
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 9, status
    assert "3 steps in a row had a non-finite loss or gradient (steps 7-9)" in status["reason"]
    assert "trainer.max_bad_steps=3" in status["reason"] and "aborting:" in ranks.stdout
    assert not (run / "checkpoints").exists()

    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 3, 4, 7, 8, 9]  # every 4th, the first, and every bad step
    # A logged loss covers the steps since the last log that had a finite loss: step 3's row holds step 2's,
    # step 7's those of steps 5 and 6; steps 8 and 9 are alone in their intervals and have none.
    assert rows[3]["train/loss"] > 0 and rows[3]["train/bad_steps"] == 1
    assert rows[4]["train/loss"] > 0 and rows[4]["train/bad_steps"] == 1
    assert rows[7]["train/loss"] > 0 and rows[8]["train/loss"] is None and rows[9]["train/loss"] is None
    assert rows[9]["train/bad_steps"] == 4
    counts = {k: v for k, v in rows[9].items() if k.startswith("train/skipped/")}
    assert set(counts) == {"train/skipped/bad_sample", "train/skipped/empty_document"}, rows[9]
    assert counts["train/skipped/bad_sample"] == counts["train/skipped/empty_document"] >= 2
    assert rows[9]["train/skipped_data"] == sum(counts.values())

    tb = scalars(run / "tb")
    assert tb["train/bad_steps"][-1] == (9, 4.0)
    assert tb["train/skipped/bad_sample"][-1] == (9, counts["train/skipped/bad_sample"])
    assert sorted(dict(tb["train/loss"])) == [1, 3, 4, 7]  # non-finite values (8, 9) stay out of TensorBoard


def test_a_master_port_in_use_is_refused_in_a_line_and_a_free_one_serves_the_launch(tiny_data, tmp_path):
    """torchrun, finding its rendezvous port taken, joined whatever held it and waited there with no end."""
    import socket

    from conftest import run_cli

    args = ["train", "smoke", *tiny_data, f"run.output_dir={tmp_path / 'run'}", "trainer.max_steps=1",
            "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress_bar=false"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli(*args, f"launch.master_port={port}", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"launch.master_port: port {port} is in use on this machine" in result.stderr
    run_cli(*args, f"launch.master_port={port}", check=True)


def test_bad_data_under_strict_ends_the_run_as_failed_with_the_member_named(tiny_data, tmp_path):
    from conftest import run_cli

    data = tmp_path / "data"
    shutil.copytree(next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.dir=")), data)
    spoil_shards(data)
    run = tmp_path / "run"
    result = run_cli("train", "smoke", *tiny_data, f"data.dir={data}", f"run.output_dir={run}", "data.strict=true",
                     "trainer.max_steps=4", "trainer.checkpoint_every=0", "trainer.progress_bar=false")
    status = json.loads((run / "status.json").read_text())
    assert result.returncode == 1 and status["state"] == "failed" and status["step"] == 0, status
    assert "aaa-bad-sample.tokens.npy" in status["reason"]
    assert f"masktrain: training failed at step 0: {status['reason'].splitlines()[0]}" in result.stderr
    # The first rank to fail comes first; torchrun then stops the other, which may not get to fail on its own.
    first = next(line for line in result.stderr.splitlines() if line.startswith("torchrun: "))
    assert re.fullmatch(r"torchrun: rank (\d) \(local rank \1, pid \d+\) exited with code 1", first), first
    assert "Traceback" not in result.stderr


def test_bad_data_on_one_rank_ends_the_run_as_failed_even_when_rank_0_is_slow_to_say_it_runs(tiny_data, tmp_path):
    """Rank 1's first batch is in a corrupt shard while rank 0, on a slow file system, is still writing "running":
    the verdict comes after it (it replaced the verdict, and the run ended without one)."""
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"run.output_dir={run}", "data.strict=true", "trainer.max_steps=4",
                                "trainer.progress_bar=false"])
    ranks = run_faulty_ranks(cfg, {"FAULT_LOG": str(tmp_path), "FAULT_BAD_DATA_RANK": "1", "FAULT_SLOW_RUNNING": "3",
                                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    assert outcome(run, ranks.returncode) == 1, ranks.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "failed", "step": 0,
                      "reason": "corrupt shard: injected.tar: after member 0000000001.tokens.npy"}, status


def run_faulty_ranks(cfg, env: dict[str, str]) -> subprocess.CompletedProcess:
    config_path = write_run_config(cfg)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(FAULTY_RANK), str(config_path)], env={**rank_environment(cfg, cuda=False), **env},
                          capture_output=True, text=True, timeout=600)


def test_a_stop_signal_during_a_checkpoint_leaves_from_it_and_each_file_is_synced_once_by_its_writer(
        tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"run.output_dir={run}", "trainer.zero_stage=2", "trainer.max_steps=8",
                                "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.progress_bar=false"])
    ranks = run_faulty_ranks(cfg, {"FAULT_LOG": str(tmp_path), "FAULT_SIGNAL_IN_SAVE": "1:4"})
    log = ranks.stdout[-3000:] + ranks.stderr[-3000:]
    assert outcome(run, ranks.returncode) == 75, log

    # Rank 1 was signalled while saving step 4: both ranks leave from that checkpoint, with no fifth step and
    # no second save.
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "preempted", "step": 4, "reason": "a signal to another rank"}, status
    assert re.findall(r"step (\d+): checkpoint ", ranks.stdout) == ["2", "4"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"

    # Each file of a checkpoint is fsynced once: DeepSpeed's state files by the rank that wrote them, the rest
    # (scripts, config, meta, the tokenizer in its folder) and the folders by rank 0.
    synced = {r: (tmp_path / f"fsync-rank{r}.txt").read_text().splitlines() for r in (0, 1)}
    folder = (run / "checkpoints" / "step-00000004").resolve()
    staged = f"{folder}.partial"
    files = {p.name for p in folder.iterdir() if p.is_file()}
    by_rank = {r: [Path(p).name for p in synced[r] if p.startswith(staged + "/")] for r in (0, 1)}
    assert sorted(by_rank[0] + by_rank[1]) == sorted(files - {"config.yaml", "meta.json"} | {"tokenizer"}), by_rank
    assert by_rank[1] == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in by_rank[0]
    assert staged in synced[0] and staged not in synced[1]


def test_a_stop_signal_during_evaluation_saves_at_once(tiny_data, tmp_path):
    """Scoring the validation set can take minutes of the grace time: the ranks save at that step, rather than
    train one more before they see the signal."""
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"run.output_dir={run}", "trainer.zero_stage=2", "trainer.max_steps=8",
                                "trainer.log_every=1", "trainer.checkpoint_every=5", "trainer.eval_every=3",
                                "trainer.progress_bar=false"])
    ranks = run_faulty_ranks(cfg, {"FAULT_LOG": str(tmp_path), "FAULT_SIGNAL_IN_EVAL": "0:1"})
    assert outcome(run, ranks.returncode) == 75, ranks.stdout[-3000:] + ranks.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "preempted", "step": 3, "reason": "SIGUSR1"}, status
    assert re.findall(r"step (\d+): checkpoint ", ranks.stdout) == ["3"]
    assert max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_full_disk_as_the_run_starts_is_said_in_a_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"run.output_dir={run}", "trainer.max_steps=2",
                                "trainer.progress_bar=false"])
    ranks = run_faulty_ranks(cfg, {"FAULT_LOG": str(tmp_path), "FAULT_FULL_DISK_AT_START": "1",
                                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    assert ranks.returncode != 0
    assert re.search(r"\[masktrain\] starting the run's logs \(metrics.jsonl, status.json\) failed \(\[Errno 28\] No "
                     r"space left on device\); [\d,]+ MiB free in ", ranks.stderr), ranks.stderr[-3000:]
    assert "FullDisk" not in ranks.stderr, ranks.stderr[-3000:]  # no traceback through it


def test_a_resume_onto_another_shard_list_ends_the_run_as_failed_naming_it(tiny_data, tmp_path):
    """Prepared again in place (data added): the saved position indexes a list that is gone. Each rank fails
    alike, before any step, with the reason in status.json, which the launcher prints."""
    from conftest import run_cli

    data = tmp_path / "data"
    shutil.copytree(next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.dir=")), data)
    run = tmp_path / "run"
    args = ["smoke", *tiny_data, f"data.dir={data}", f"run.output_dir={run}", "trainer.max_steps=4",
            "trainer.checkpoint_every=2", "trainer.progress_bar=false"]
    assert run_cli("train", *args, "trainer.stop_after_steps=2").returncode == 75
    manifest = json.loads((data / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1
    manifest["splits"]["train"]["shards"] = shards[:-1]
    (data / "manifest.json").write_text(json.dumps(manifest))

    result = run_cli("train", *args)
    status = json.loads((run / "status.json").read_text())
    assert result.returncode == 1 and status["state"] == "failed" and status["step"] == 2, status
    assert f"cannot resume the data position exactly: shards was {len(shards)} shards" in status["reason"]
    assert "(trainer.allow_config_change=true goes on with the data as it now is" in status["reason"]
    assert f"masktrain: training failed at step 2: {status['reason'].splitlines()[0]}" in result.stderr


def test_a_hung_rank_writes_its_stacks_and_the_run_ends_after_launch_collective_timeout(tiny_data, tmp_path):
    """Rank 1 hangs in its forward of step 3 (as one stuck reading a dead mount would). Rank 0 waits for it in a
    ZeRO collective only for launch.collective_timeout, not gloo's 30 minutes (DeepSpeed makes its groups with
    torch's default), and the run ends crashed at its last checkpoint. Rank 1's own watchdog has written where it
    hung: nothing else would say, since torchrun kills it."""
    run = tmp_path / "run"
    cfg = load_config("smoke", [*tiny_data, f"run.output_dir={run}", "trainer.max_steps=200",
                                "trainer.checkpoint_every=2", "launch.collective_timeout=5",
                                "trainer.progress_bar=false"])
    started = time.monotonic()
    ranks = run_faulty_ranks(cfg, {"FAULT_LOG": str(tmp_path), "FAULT_HANG": "1:3",
                                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    log = ranks.stdout[-3000:] + ranks.stderr[-6000:]
    # Start-up, two steps, 5 s in the collective and 5 s for the hung rank to take torchrun's SIGTERM.
    assert time.monotonic() - started < 120, log
    assert outcome(run, ranks.returncode) == 1, log
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "crashed" and status["step"] == 2, (status, log)

    stacks = run / "stacks" / "rank1.txt"
    assert (f"[masktrain] rank 1: step 3 has not ended after 5 s (launch.collective_timeout); the stack of each of "
            f"its threads goes to {stacks}") in ranks.stderr, log
    dump = stacks.read_text()
    assert dump.startswith("rank 1: step 3 has not ended after 5 s (launch.collective_timeout); host "), dump
    assert re.search(r'line \d+, in micro_steps\n(.*\n)*.*faulty_rank\.py", line \d+, in forward\n', dump), dump
    # Rank 0, waiting in the collective, may have written its own too.
    assert re.search(r"stacks written by [12] ranks?, the latest \S+ ago \(rank [01]: step 3 has not ended after 5 s "
                     r"\(launch.collective_timeout\)\): ", overview(run)), overview(run)

"""SLURM jobs: the rendered script for a 4 x 8 GPU job, and a real 2-node run on a local SLURM cluster that is
preempted with USR1, requeued, resumed and finishes exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import run_cli
from masktrain import slurm as slurm_files
from masktrain.launcher.loading import ConfigError, load_config
from masktrain.launcher.run_lock import holding
from masktrain.launcher.slurm import JobSpec, job_config, node_command, render

LOCAL_CLUSTER = Path(slurm_files.__file__).parent / "local-cluster.sh"
JOB_ARGS = ["--time=10", "--partition=local", "--signal-grace=30", "--cpus-per-task=1"]


def job_env(cluster: Path | None = None, stubs: Path | None = None) -> dict[str, str]:
    env = {"SLURM_CONF": str(cluster / "slurm.conf")} if cluster else {}
    if stubs:
        env["PATH"] = f"{stubs}{os.pathsep}{os.environ['PATH']}"
    return env


def write_stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path) -> Path:
    """Stand-ins for the SLURM commands, for running a job script outside a cluster. srun prints what it was
    asked to start, leaves STUB_STATE behind as the ranks' status if set (at step 7, the launch having started
    at STUB_START, 0 by default, for STUB_REASON), lasts STUB_SLEEP s and notes a SIGUSR1 it gets (in got-usr1); scontrol
    answers for nodes gpu07-gpu10 and logs requeues; sbatch logs its arguments and hands out ids 101, 102..."""
    folder = tmp_path / "bin"
    folder.mkdir()
    write_stub(folder, "scontrol", '''case "$1 $2" in
    "show hostnames") printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n" ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=$3" ;;
    "requeue "*) echo "$2" >>"$(dirname "$0")/requeued" ;;
esac
''')
    # The status goes down before the SRUN line: a test that signals on seeing the line finds it written.
    write_stub(folder, "srun", '''trap 'touch "$(dirname "$0")/got-usr1"' USR1
[[ -n ${STUB_STATE:-} ]] && echo "{\\"state\\": \\"$STUB_STATE\\", \\"step\\": 7, \\"start\\": ${STUB_START:-0}, \\"reason\\": \\"${STUB_REASON:-}\\"}" \\
    >"$(dirname "${@: -1}")/status.json"
echo "SRUN $* MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
sleep "${STUB_SLEEP:-0}"
''')
    write_stub(folder, "sbatch", '''echo "$*" >>"$(dirname "$0")/sbatch-calls"
echo $((100 + $(wc -l <"$(dirname "$0")/sbatch-calls")))
''')
    return folder


QUEUE_STUB = '[[ $1 == -h && $2 == -j && $4 == -o && $5 == "%i %T %j" ]] && cat "$(dirname "$0")/queue"\n'
"""squeue as the tests need it: what the file `queue` beside it lists (lines of job id, state and name)."""


def run_script(script: Path, stubs: Path, nodes: int, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **job_env(stubs=stubs), "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": "gpu[07-10]", **extra}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)


def test_render_4_nodes_x_8_gpus_gives_valid_script_and_rendezvous(tmp_path, stubs):
    run = tmp_path / "run"
    overrides = [f"run.output_dir={run}", "launch.accelerator=cuda", "trainer.global_batch_size=256"]
    script = tmp_path / "job.sbatch"
    rendered = run_cli("slurm", "render", "smoke", *overrides, "--nodes=4", "--gpus-per-node=8", "--time=4:00:00",
                       "--partition=gpu", "--account=proj", "--sbatch=--exclusive", f"--out={script}", check=True)
    assert str(script) in rendered.stderr
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    for option in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=16",
                   "--partition=gpu", "--account=proj", "--time=4:00:00", "--signal=B:USR1@180", "--requeue",
                   "--open-mode=append", f"--output={run}/slurm/%x-%j.out", "--exclusive"):
        assert option in sbatch, option

    # The batch part's rendezvous values are what srun is started with.
    done = run_script(script, stubs, nodes=4)
    port = 15000 + 123456 % 15000
    assert f"rendezvous at 10.1.0.7:{port} (node gpu07)" in done.stdout, done.stdout + done.stderr
    srun = [line for line in done.stdout.splitlines() if line.startswith("SRUN ")]
    assert len(srun) == 1 and f"MASTER_ADDR=10.1.0.7 MASTER_PORT={port}" in srun[0]
    assert "--nodes=4 --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1" in srun[0]
    assert f"slurm node {run}/config.yaml" in srun[0]
    # Nothing trained and no signal came: a failure, not requeued.
    assert done.returncode == 1 and "not requeued" in done.stdout
    assert not (stubs / "requeued").exists()
    saved = load_config(str(run / "config.yaml"))
    assert (saved.launch.nnodes, saved.launch.nproc_per_node, saved.trainer.global_batch_size) == (4, 8, 256)

    # What each node's launcher then runs: 4 nodes x 8 ranks meeting at the first node's store.
    slurm_env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "4", "MASTER_ADDR": "10.1.0.7",
                 "MASTER_PORT": str(port), "SLURM_RESTART_COUNT": "2"}
    for node_id, host in (("0", "1"), ("3", "0")):
        command = node_command(saved, str(run / "config.yaml"), {**slurm_env, "SLURM_NODEID": node_id})
        assert command[1:3] == ["-m", "masktrain.launcher.torchrun"]
        for arg in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint=10.1.0.7:{port}",
                    "--rdzv-id=123456-2", f"--rdzv-conf=is_host={host}", "--shutdown-timeout=300"):
            assert arg in command, arg
        assert command[-2:] == ["masktrain.trainer.rank", str(run / "config.yaml")]
    with pytest.raises(Exception, match="launch.nnodes"):
        node_command(saved, "config.yaml", {**slurm_env, "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "2"})
    # A run config that is not YAML (cut short, edited by hand) is named in a line, not a parser's traceback.
    (tmp_path / "torn.yaml").write_text("trainer: {max_steps: 4\n")
    torn = run_cli("slurm", "node", str(tmp_path / "torn.yaml"))
    assert torn.returncode == 2 and torn.stderr.startswith(
        f"masktrain: invalid configuration ({tmp_path}/torn.yaml):\n  - not valid YAML: "), torn.stderr


def test_preempted_job_requeues_itself_or_hands_over_to_its_chain(tmp_path, stubs):
    run = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    run_cli("slurm", "render", "smoke", f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=2", *JOB_ARGS,
            f"--out={script}", check=True)
    assert "--gpus-per-node" not in script.read_text()  # launch.accelerator=cpu: no GPUs asked for

    chained = run_script(script, stubs, nodes=1, STUB_STATE="preempted", MASKTRAIN_CHAINED="1")
    assert chained.returncode == 0 and "the next job of the chain continues" in chained.stdout, chained.stdout
    assert not (stubs / "requeued").exists()

    last = run_script(script, stubs, nodes=1, STUB_STATE="preempted")
    assert last.returncode == 0 and "requeued job 123456" in last.stdout, last.stdout
    assert (stubs / "requeued").read_text().split() == ["123456"]

    # SIGTERM is scancel (or the time limit): the job ends for good, whatever the ranks managed to save.
    (stubs / "requeued").unlink()
    env = {**os.environ, **job_env(stubs=stubs), "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "gpu07", "STUB_STATE": "preempted", "STUB_SLEEP": "3"}
    cancelled = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in cancelled.stdout:
        lines.append(line)
        if line.startswith("SRUN "):
            cancelled.send_signal(signal.SIGTERM)
    assert cancelled.wait(timeout=60) != 0
    assert "not requeued by this script" in "".join(lines), "".join(lines)
    assert not (stubs / "requeued").exists()

    # A USR1 that comes while the ranks fail does not make the failure a preemption: no requeue. Ranks that end
    # without a verdict, signalled or not (a lost rank, a timed-out collective, a failed save), go on from their
    # last checkpoint, unless this attempt saved none: the next would repeat it (a save failing on a full disk,
    # or a broken node, would requeue the job for ever).
    # A USR1 before the ranks started (no status at all: the launchers were importing or at the rendezvous,
    # where nothing catches it) lost nothing and tried nothing: requeued.
    for state, start, usr1, requeued in (("failed", "0", True, False), ("running", "0", True, True),
                                         ("running", "7", True, False), ("running", "0", False, True),
                                         ("running", "7", False, False), ("", "0", True, True)):
        job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True,
                               env={**env, "STUB_STATE": state, "STUB_START": start,
                                    "STUB_REASON": "corrupt shard: shard-000007.tar"})
        lines = []
        for line in job.stdout:
            lines.append(line)
            if line.startswith("SRUN ") and usr1:
                job.send_signal(signal.SIGUSR1)
        code, text = job.wait(timeout=60), "".join(lines)
        assert (code == 0) == requeued and ("requeued job 123456" in text) == requeued, text
        assert (stubs / "requeued").exists() == requeued
        assert ("without a checkpoint since this attempt started at step 7" in text) == (start == "7"), text
        # A verdict's reason is in the job's log, not only in status.json.
        assert ("training failed at step 7: corrupt shard: shard-000007.tar (launchers exited" in text) == (
            state == "failed"), text
        assert ("stopped on SIGUSR1 before the ranks started" in text) == (state == ""), text
        # The ranks got the signal, which is what makes them checkpoint.
        assert (stubs / "got-usr1").exists() == usr1 and ("got SIGUSR1: passing it to the ranks" in text) == usr1
        (stubs / "got-usr1").unlink(missing_ok=True)
        (stubs / "requeued").unlink(missing_ok=True)

    # A crash the ranks name (a failed universal conversion) is said in the log, here and by the chain's next job.
    why = "DeepSpeed's universal conversion of checkpoint step-00000007 failed (exit 1: KeyError)"
    named = run_script(script, stubs, nodes=1, STUB_STATE="crashed", STUB_START="7", STUB_REASON=why)
    assert named.returncode == 1 and not (stubs / "requeued").exists(), named.stdout
    assert f"crashed ({why}) and without a checkpoint since this attempt started at step 7" in named.stdout
    after = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101")
    assert after.returncode == 1 and "SRUN" not in after.stdout, after.stdout
    assert f"job 101 ended crashed ({why}) and without a checkpoint since step 7; not restarting" in after.stdout

    # A chained job that finds the run complete starts nothing.
    (run / "status.json").write_text(json.dumps({"state": "completed", "step": 60}))
    done = run_script(script, stubs, nodes=1)
    assert done.returncode == 0 and "already complete" in done.stdout and "SRUN" not in done.stdout
    # Nor does one that follows a job which left the run failed: it would fail the same way, and the verdict
    # (status.json) stays for the user. A job submitted again by hand after a fix does start.
    (run / "status.json").write_text(json.dumps({"state": "failed", "step": 12, "reason": "too many NaN\nsteps"}))
    after = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101")
    assert after.returncode == 1 and "SRUN" not in after.stdout, after.stdout
    assert (f"the run is marked failed at step 12 ({run}/status.json): too many NaN; not restarting it after job "
            "101") in after.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    # Nor one that follows a job which ended without a verdict and saved nothing: it would repeat that attempt,
    # as it would one whose ranks never started (the job before says so in status.json).
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 40, "start": 40}))
    after = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101")
    assert after.returncode == 1 and "SRUN" not in after.stdout, after.stdout
    assert "job 101 ended without a verdict and without a checkpoint since step 40; not restarting" in after.stdout
    # The same status left by this job's own attempt, SLURM having requeued the job (a node lost, a preemption),
    # is taken up, as it is outside a chain.
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 40, "start": 40}))
    again = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101", SLURM_RESTART_COUNT="1", STUB_STATE="completed")
    assert again.returncode == 0 and "SRUN" in again.stdout, again.stdout
    (run / "status.json").write_text(json.dumps({"state": "preempted", "step": 40, "start": 20}))
    never = run_script(script, stubs, nodes=1)  # the stub writes no status: the ranks never started
    assert never.returncode == 1 and "before the ranks started" in never.stdout, never.stdout
    assert json.loads((run / "status.json").read_text()) == {
        "state": "crashed", "step": 40, "start": 40, "reason": "the launchers exited 0 before the ranks started"}
    after = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101")
    assert after.returncode == 1 and "SRUN" not in after.stdout, after.stdout
    # A status.json of a masktrain from before `start` was recorded says nothing of progress: taken up.
    (run / "status.json").write_text(json.dumps({"state": "running", "step": 40}))
    assert run_cli("slurm", "status", "--full", str(run), check=True).stdout == "running 40 -1\n"
    after = run_script(script, stubs, nodes=1, MASKTRAIN_AFTER="101", STUB_STATE="completed")
    assert after.returncode == 0 and "SRUN" in after.stdout, after.stdout
    # Without --full, the two fields job scripts rendered before it read (a requeue runs the script it was
    # submitted with, under the masktrain installed now).
    assert run_cli("slurm", "status", str(run), check=True).stdout == "completed 7\n"
    # A config the script cannot write (a full disk) leaves the run's own in place and starts nothing.
    saved_config = (run / "config.yaml").read_text()
    (run / "config.yaml.tmp").mkdir()
    unwritable = run_script(script, stubs, nodes=1)
    assert unwritable.returncode == 1 and "SRUN" not in unwritable.stdout, unwritable.stdout
    assert f"cannot write {run}/config.yaml.tmp" in unwritable.stdout
    assert (run / "config.yaml").read_text() == saved_config
    (run / "config.yaml.tmp").rmdir()
    again = run_script(script, stubs, nodes=1, STUB_STATE="completed")
    assert again.returncode == 0 and "SRUN" in again.stdout, again.stdout


def test_a_signal_before_the_ranks_start_is_passed_on_once_they_do(tmp_path, stubs):
    """SIGUSR1 can reach the job script in its first second (SLURM may send it 60 s early; a preemption comes when
    it comes): it must neither end the script, unlogged and never requeued, nor be lost."""
    run = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    run_cli("slurm", "render", "smoke", f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=2", *JOB_ARGS,
            f"--out={script}", check=True)
    env = {**os.environ, **job_env(stubs=stubs), "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "gpu07"}
    job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if "job 123456 attempt 0" in line:  # the first line: the run folder's lock and status are still ahead
            job.send_signal(signal.SIGUSR1)
    code, text = job.wait(timeout=60), "".join(lines)
    # The launch started and got the signal (which may end the stand-in srun before it prints a line).
    assert code == 0 and "got SIGUSR1: passing it to the ranks" in text, (code, text)
    assert "stopped on SIGUSR1 before the ranks started" in text and "requeued job 123456" in text, text
    assert (stubs / "requeued").read_text().split() == ["123456"]


def test_submit_chain_links_jobs_with_afterany(tmp_path, stubs, tiny_data):
    run = tmp_path / "run"
    result = run_cli("slurm", "submit", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=2",
                     "--gpus-per-node=1", *JOB_ARGS, "--chain=3", env=job_env(stubs=stubs), check=True)
    script = run / "slurm" / "job.sbatch"
    calls = (stubs / "sbatch-calls").read_text().splitlines()
    assert calls == [f"--parsable --export=ALL,MASKTRAIN_CHAINED=1 {script}",
                     f"--parsable --dependency=afterany:101 --export=ALL,MASKTRAIN_CHAINED=1,MASKTRAIN_AFTER=101 "
                     f"{script}",
                     f"--parsable --dependency=afterany:102 --export=ALL,MASKTRAIN_AFTER=102 {script}"]
    for job in (101, 102, 103):
        assert f"{run}/slurm/smoke-{job}.out" in result.stdout
    assert "submitted job 103 (3 of 3, starts after job 102 ends)" in result.stdout


def test_a_chain_that_fails_part_way_cancels_the_jobs_it_submitted(tmp_path, stubs, tiny_data):
    write_stub(stubs, "sbatch", '''echo "$*" >>"$(dirname "$0")/sbatch-calls"
n=$(wc -l <"$(dirname "$0")/sbatch-calls")
((n < 3)) || { echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; }
echo $((100 + n))
''')
    write_stub(stubs, "scancel", 'echo "$*" >>"$(dirname "$0")/scancel-calls"\n')
    result = run_cli("slurm", "submit", "smoke", *tiny_data, f"run.output_dir={tmp_path / 'run'}", "--nodes=2",
                     "--gpus-per-node=1", *JOB_ARGS, "--chain=3", env=job_env(stubs=stubs))
    assert result.returncode == 1, result.stderr
    assert "QOSMaxSubmitJobPerUserLimit" in result.stderr
    assert "jobs 101, 102 of the chain were already submitted: cancelled them" in result.stderr
    assert (stubs / "scancel-calls").read_text() == "101 102\n"


def test_a_run_in_use_is_neither_submitted_nor_started_by_a_job(tmp_path, stubs, tiny_data):
    run = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    run_cli("slurm", "render", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=1",
            *JOB_ARGS, f"--out={script}", check=True)
    (run / "status.json").write_text('{"state": "running", "step": 3}')
    with holding(run):  # another launch of this run, e.g. the same job submitted twice
        submitted = run_cli("slurm", "submit", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=1",
                            "--gpus-per-node=1", *JOB_ARGS, env=job_env(stubs=stubs))
        assert submitted.returncode == 1 and f"masktrain: {run} is in use by another launch" in submitted.stderr
        assert not (stubs / "sbatch-calls").exists()
        started = run_script(script, stubs, nodes=1, STUB_STATE="completed")
        assert started.returncode == 1 and "SRUN" not in started.stdout, started.stdout
        assert "not starting: the run folder is taken" in started.stdout
        assert f"{run} is in use by another launch (host" in started.stderr
        assert not (run / "config.yaml").exists()
        assert (run / "status.json").read_text() == '{"state": "running", "step": 3}'
    started = run_script(script, stubs, nodes=1, STUB_STATE="completed")
    assert started.returncode == 0 and "SRUN" in started.stdout, started.stdout + started.stderr
    assert json.loads((run / "run.lock").read_text())["job"] == "123456"


def test_a_run_whose_requeued_job_waits_in_the_queue_is_neither_submitted_nor_trained(tmp_path, stubs, tiny_data):
    """A requeued job lets the folder go while it waits (seconds on an idle cluster, hours on a busy one), then
    takes it back: a submission or a local train of the run meanwhile started beside it (the job found the
    folder taken when it started, and failed), and `masktrain status` said nothing of the job."""
    run = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    run_cli("slurm", "render", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=1",
            *JOB_ARGS, f"--out={script}", check=True)
    # An attempt that got USR1 (the script sbatch'ed by hand): its ranks checkpointed, the script requeued the job
    # and let the folder go.
    assert run_script(script, stubs, nodes=1, STUB_STATE="preempted", SLURM_JOB_NAME="smoke").returncode == 0
    assert (stubs / "requeued").read_text().split() == ["123456"]
    write_stub(stubs, "squeue", QUEUE_STUB)
    (stubs / "queue").write_text("123456 PENDING smoke\n")
    submit = ["slurm", "submit", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=1",
              *JOB_ARGS]
    submitted = run_cli(*submit, env=job_env(stubs=stubs))
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    assert f"masktrain: {run} is to be taken up by SLURM job 123456 (pending), in the queue" in submitted.stderr
    assert "scancel 123456" in submitted.stderr and not (stubs / "sbatch-calls").exists()
    trained = run_cli("train", "smoke", *tiny_data, f"run.output_dir={run}", "launch.nproc_per_node=1",
                      env=job_env(stubs=stubs), timeout=300)
    assert trained.returncode == 1 and "is to be taken up by SLURM job 123456" in trained.stderr, trained.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"  # the job's, untouched
    status = run_cli("status", str(run), env=job_env(stubs=stubs), check=True).stdout
    assert "  SLURM job 123456 is in the queue (pending): it takes the run up when it starts" in status, status
    # On its way back to the queue, the requeued job is COMPLETING for a moment (squeue's CG).
    (stubs / "queue").write_text("123456 COMPLETING smoke\n")
    submitted = run_cli(*submit, env=job_env(stubs=stubs))
    assert submitted.returncode == 1 and "SLURM job 123456 (completing)" in submitted.stderr, submitted.stderr
    # Once the job has left the queue (done, cancelled, failed), the run is free.
    (stubs / "queue").write_text("")
    assert "in the queue" not in run_cli("status", str(run), env=job_env(stubs=stubs), check=True).stdout
    run_cli(*submit, env=job_env(stubs=stubs), check=True)
    # A `masktrain train` inside an allocation records its job too, which runs on after it: that holds nothing.
    record = json.loads((run / "run.lock").read_text())
    assert record["job_script"] is True
    del record["job_script"]
    (run / "run.lock").write_text(json.dumps(record))
    (stubs / "queue").write_text("123456 RUNNING smoke\n")
    run_cli(*submit, env=job_env(stubs=stubs), check=True)


def test_a_complete_run_is_neither_trained_nor_submitted_again_until_it_is_extended(tmp_path, stubs, tiny_data):
    """Both started it again (the ranks, or a job after its wait in the queue) only to find nothing to train.
    `train` now says so at once and succeeds (a rerun of a finished job is not a failure); `slurm submit` refuses.
    Raising trainer.max_steps, allowed as a change, extends it."""
    run = tmp_path / "run"
    args = ["smoke", *tiny_data, f"run.output_dir={run}", "launch.nproc_per_node=1", "trainer.global_batch_size=8",
            "trainer.max_steps=2", "trainer.eval_every=0"]
    submit = ["slurm", "submit", *args, "--nodes=1", "--gpus-per-node=1", *JOB_ARGS]
    run_cli("train", *args, check=True)
    complete = (f"{run}: the run is complete: its checkpoint {run / 'checkpoints' / 'step-00000002'} is at step 2, "
                "trainer.max_steps is 2. To train it further, raise trainer.max_steps with "
                "trainer.allow_config_change=true")
    # A finished job run again has nothing to do: no error. Had the ranks died after the final save (the run
    # left crashed), that save was the run's end all the same.
    (run / "status.json").write_text(json.dumps({"state": "crashed", "step": 2, "start": 0, "reason": "lost"}))
    again = run_cli("train", *args, timeout=300)
    assert again.returncode == 0 and again.stdout.startswith(f"masktrain: {complete}"), again.stdout
    assert "model:" not in again.stdout + again.stderr  # no rank started
    assert {k: v for k, v in json.loads((run / "status.json").read_text()).items() if k in ("state", "step")} == {
        "state": "completed", "step": 2}
    status = (run / "status.json").read_text()
    refused = run_cli(*submit, env=job_env(stubs=stubs))
    assert refused.returncode == 1 and refused.stderr.startswith(complete), refused.stderr
    assert refused.stderr.count("\n") == 1 and "; nothing submitted" in refused.stderr, refused.stderr
    assert (run / "status.json").read_text() == status and not (stubs / "sbatch-calls").exists()

    extended = run_cli("train", *args, "trainer.max_steps=3", "trainer.allow_config_change=true", check=True)
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in extended.stdout
    assert json.loads((run / "status.json").read_text())["step"] == 3
    run_cli(*submit, "trainer.max_steps=4", "trainer.allow_config_change=true", env=job_env(stubs=stubs), check=True)
    assert len((stubs / "sbatch-calls").read_text().splitlines()) == 1


def test_a_run_whose_submitted_jobs_wait_in_the_queue_is_not_submitted_again(tmp_path, stubs, tiny_data):
    """On the local cluster, a run submitted while its first job still waited for nodes was accepted: both jobs
    waited, and the second, started once the first held the folder, failed ("not starting: the run folder is
    taken"); status said "not started". A chain's later jobs wait the same way, to go on with the run."""
    run = tmp_path / "run"
    submit = ["slurm", "submit", "smoke", *tiny_data, f"run.output_dir={run}", "--nodes=1", "--gpus-per-node=1",
              *JOB_ARGS]
    write_stub(stubs, "squeue", QUEUE_STUB)
    run_cli(*submit, "--chain=2", env=job_env(stubs=stubs), check=True)
    for queue, job in (("101 PENDING smoke\n102 PENDING smoke\n", "101"), ("102 PENDING smoke\n", "102")):
        (stubs / "queue").write_text(queue)
        again = run_cli(*submit, env=job_env(stubs=stubs))
        assert again.returncode == 1 and f"is to be taken up by SLURM job {job} (pending)" in again.stderr, again.stderr
        status = run_cli("status", str(run), env=job_env(stubs=stubs), check=True).stdout
        assert status.splitlines()[:2] == [f"{run}: not started", f"  SLURM job {job} is in the queue (pending): it "
                                           "takes the run up when it starts"], status
    assert len((stubs / "sbatch-calls").read_text().splitlines()) == 2
    assert (run / "slurm" / "submitted").read_text() == "101 smoke\n102 smoke\n"
    # Done (or cancelled); and a job of another name under one of its ids is another cluster's (a shared folder).
    (stubs / "queue").write_text("102 PENDING other-run\n")
    assert "submitted job 103" in run_cli(*submit, env=job_env(stubs=stubs), check=True).stdout


def test_a_rendered_script_can_be_submitted_as_it_is(tmp_path, stubs):
    run = tmp_path / "run"
    result = run_cli("slurm", "render", "smoke", f"run.output_dir={run}", "--nodes=2", "--gpus-per-node=1",
                     *JOB_ARGS, env=job_env(stubs=stubs), check=True)
    output = next(line.split("=", 1)[1] for line in result.stdout.splitlines() if line.startswith("#SBATCH --output="))
    assert Path(output).parent.is_dir()  # SLURM opens the log before the script runs: it cannot make it
    # Only the script reaches stdout (messages go to stderr): `... render ... > job.sbatch` gives the same file
    # as --out, and bash reads it.
    script = tmp_path / "job.sbatch"
    run_cli("slurm", "render", "smoke", f"run.output_dir={run}", "--nodes=2", "--gpus-per-node=1", *JOB_ARGS,
            f"--out={script}", env=job_env(stubs=stubs), check=True)
    assert result.stdout == script.read_text() and result.stdout.startswith("#!/bin/bash")
    piped = tmp_path / "piped.sbatch"
    piped.write_text(result.stdout)
    assert subprocess.run(["bash", "-n", str(piped)], capture_output=True).returncode == 0
    # A run folder this user may not create (/sys refuses even root): one line naming it, no traceback.
    denied = run_cli("slurm", "render", "smoke", "run.output_dir=/sys/masktrain-run", "--nodes=2",
                     "--gpus-per-node=1", *JOB_ARGS, env=job_env(stubs=stubs))
    assert denied.returncode == 1 and "Traceback" not in denied.stderr
    assert denied.stderr.strip().endswith("'/sys/masktrain-run'") and denied.stderr.startswith("masktrain: ")


def test_bad_job_shape_fails_before_sbatch(tmp_path, stubs):
    # 16 sequences per step cannot be split over 3 nodes x 1 rank x 8 per micro-batch.
    result = run_cli("slurm", "submit", "smoke", f"run.output_dir={tmp_path / 'run'}", "--nodes=3",
                     "--gpus-per-node=1", *JOB_ARGS, env=job_env(stubs=stubs))
    assert result.returncode == 2
    assert "trainer.global_batch_size" in result.stderr and "3 nodes x 1" in result.stderr
    result = run_cli("slurm", "submit", "smoke", "--nodes=2", "--gpus-per-node=1", "--time=1:00",
                     "--partition=local", "--signal-grace=120", env=job_env(stubs=stubs))
    assert result.returncode == 2 and "--signal-grace" in result.stderr
    # Data that is not there fails here, not on the nodes after the queue wait.
    result = run_cli("slurm", "submit", "smoke", f"data.dir={tmp_path / 'none'}", f"run.output_dir={tmp_path / 'r'}",
                     "--nodes=2", "--gpus-per-node=1", *JOB_ARGS, env=job_env(stubs=stubs))
    assert result.returncode == 1 and f"{tmp_path / 'none' / 'tokenizer' / 'spm.model'}: no " in result.stderr
    assert not (stubs / "sbatch-calls").exists()
    with pytest.raises(Exception, match="--time"):
        job_config("smoke", [], JobSpec(nodes=1, gpus_per_node=1, time="soon", partition="local"))
    with pytest.raises(ConfigError, match=r"--signal-grace: .* at most 65535 \(sbatch --signal's limit\), got 70000"):
        job_config("smoke", [], JobSpec(nodes=1, gpus_per_node=2, time="3-00:00:00", partition="local", grace=70000))
    # The later #SBATCH line wins: an --sbatch that reshapes the job would fail it after the queue wait.
    with pytest.raises(ConfigError) as err:
        job_config("smoke", [], JobSpec(nodes=1, gpus_per_node=2, time="1:00:00", partition="local", job_name="a/b",
                                        sbatch=["--nodes=2", "-ox.log", "--gpus=8", "--no-requeue"]))
    assert err.value.problems == ["--sbatch: '--nodes=2' sets what --nodes sets",
                                  "--sbatch: '-ox.log' sets what the script sets (the log in the run folder)",
                                  "--sbatch: '--no-requeue' sets what the script sets (preemption requeues)",
                                  "--job-name: 'a/b' holds a '/', which the log file's name (%x) cannot"]
    # sbatch's --time=0 is no time limit: any grace fits in it.
    unlimited = JobSpec(nodes=1, gpus_per_node=2, time="0", partition="local")
    assert "#SBATCH --time=0" in render(job_config("smoke", [], unlimited), unlimited)
    spec = JobSpec(nodes=1, gpus_per_node=2, time="1:00:00", partition="local")
    # Every requeue would carry `never` and start the run over from step 0.
    with pytest.raises(ConfigError, match="trainer.resume: never would make every requeued attempt"):
        job_config("smoke", ["trainer.resume=never"], spec)
    # sbatch takes `#` as a comment and strips quotes: the job would be `ablation`, its log `.../ablation`.
    with pytest.raises(ConfigError) as err:
        render(job_config("smoke", [f"run.output_dir={tmp_path / 'ablation#3'}", "run.name=it's"], spec), spec)
    assert [problem.split(":")[0] for problem in err.value.problems] == ["#SBATCH lines cannot hold whitespace, #, "
                                                                         "quotes or backslashes"] * 2
    assert "\"--job-name=it's\"" in err.value.problems[0] and "ablation#3/slurm/%x-%j.out" in err.value.problems[1]
    with pytest.raises(ConfigError, match=r"the run folder holds a '%', which SLURM would expand"):
        render(job_config("smoke", [f"run.output_dir={tmp_path / 'lr%3'}"], spec), spec)
    assert "#SBATCH --job-name=ablation-3" in render(job_config("smoke", ["run.name=ablation-3"], spec), spec)


def test_a_run_name_with_a_slash_gives_a_job_name_without_one(tmp_path, stubs, tiny_data):
    """run.name=ablation/lr-3e-4 keeps its run folder; SLURM, which names the log after the job (%x), would fail
    the job at launch with no log at all."""
    run = tmp_path / "run"
    result = run_cli("slurm", "submit", "smoke", *tiny_data, "run.name=ablation/lr-3e-4", f"run.output_dir={run}",
                     "--nodes=1", "--gpus-per-node=2", *JOB_ARGS, env=job_env(stubs=stubs), check=True)
    assert "#SBATCH --job-name=ablation-lr-3e-4\n" in (run / "slurm" / "job.sbatch").read_text()
    assert f"log of job 101: {run}/slurm/ablation-lr-3e-4-101.out" in result.stdout


# --- A real cluster ---------------------------------------------------------------------------------------

def cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their users)"
    if shutil.which("slurmd") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """Two slurmd nodes on this machine (slurm/local-cluster.sh), stopped by their PIDs afterwards."""
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    # Not under pytest's private temp folder: munged, running as its own user, must reach its socket.
    folder = Path(tempfile.mkdtemp(prefix="masktrain-slurm-"))
    started = subprocess.run([str(LOCAL_CLUSTER), "start", str(folder), "2"], capture_output=True, text=True,
                             timeout=600)
    try:
        assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
        yield folder
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "stop", str(folder)], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def slurm_command(cluster: Path, *args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True,
                          env={**os.environ, **job_env(cluster)}).stdout


def losses(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def submit(cluster: Path, run: Path, common: list[str]) -> str:
    result = run_cli("slurm", "submit", "smoke", *common, f"run.output_dir={run}", "--nodes=2",
                     "--gpus-per-node=1", *JOB_ARGS, env=job_env(cluster), check=True)
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert f"{run}/slurm/smoke-{job}.out" in result.stdout
    return job


def wait_for(condition, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs if p.is_file())
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{text}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_preempted_requeued_and_resumed_exactly(slurm_cluster, tiny_data, tmp_path):
    # Enough steps that the signal, sent after step 2, lands mid-run even on a fast machine (~1 s to arrive).
    steps = 24
    common = [*tiny_data, f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.checkpoint_every=0",
              "launch.threads_per_rank=1", "trainer.progress_bar=false"]
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    # Both jobs fit side by side (one CPU per node each): the reference is never signalled.
    ref_job = submit(slurm_cluster, reference, common)
    job = submit(slurm_cluster, preempted, common)
    log, ref_log = preempted / "slurm" / f"smoke-{job}.out", reference / "slurm" / f"smoke-{ref_job}.out"

    def queued(*jobs: str) -> list[str]:
        return slurm_command(slurm_cluster, "squeue", "-h", "-o", "%i", "-j", ",".join(jobs)).split()

    # Generous: on a fresh machine the first DeepSpeed start compiles its CPU comm op (minutes on 2 busy cores).
    wait_for(lambda: len(losses(preempted)) >= 2 or not queued(job), 480, "2 steps of the job", [log])
    assert len(losses(preempted)) >= 2, f"the job ended before its second step:\n{log.read_text()[-4000:]}"
    slurm_command(slurm_cluster, "scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: not queued(job, ref_job), 400, "both jobs to finish", [log, ref_log])

    text = log.read_text()
    # It really ran across the two slurmd nodes, and was signalled, requeued and resumed.
    assert "node 0 (n1)" in text and "node 1 (n2)" in text, text
    assert "got SIGUSR1" in text and f"requeued job {job}" in text, text
    assert f"job {job} attempt 0" in text and f"job {job} attempt 1" in text, text
    assert re.search(r"Restarts=1\b", slurm_command(slurm_cluster, "scontrol", "show", "job", job))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert 2 <= resumed < steps
    # The signal's checkpoint, kept beside the final one.
    assert (preempted / "checkpoints" / f"step-{resumed:08d}" / "meta.json").is_file()
    assert (preempted / "checkpoints" / "latest").read_text() == f"step-{steps:08d}"
    assert json.loads((preempted / "status.json").read_text())["state"] == "completed"

    # Exactly the configured steps, and the same losses as the run nobody interrupted.
    got, want = losses(preempted), losses(reference)
    assert [s for s, _ in got] == list(range(1, steps + 1)) == [s for s, _ in want], ref_log.read_text()
    assert got[-1][1] == want[-1][1]
    assert got == want

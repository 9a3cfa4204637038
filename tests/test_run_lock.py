"""One launch per run folder: a second launch, submission or job of a run in use is refused, naming the
holder, and the folder is free again however its holder ended."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import MASKTRAIN, run_cli
from masktrain.launcher import run_lock
from masktrain.launcher.run_lock import RunInUse, check_free, hold, holding, in_use

HOLD_IN_CHILD = textwrap.dedent("""
    import sys, time
    from masktrain.launcher.run_lock import hold
    hold(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")


def start_holder(command: list[str], env: dict | None = None) -> subprocess.Popen:
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_folder_is_refused_naming_its_holder_and_free_once_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = start_holder([sys.executable, "-c", HOLD_IN_CHILD, str(run)], env={"SLURM_JOB_ID": "4242"})
    try:
        for attempt in (lambda: hold(run), lambda: check_free(run)):
            with pytest.raises(RunInUse, match=rf"{run} is in use by another launch \(SLURM job 4242, host \S+, "
                                               rf"pid {holder.pid}, since 20\d\d-.*\): two launches"):
                attempt()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the lock must go with the process
        holder.wait()
    check_free(run)
    with holding(run) as fd:
        assert fd is not None
        assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunInUse):  # another open of the file, even in this process
            hold(run)
    check_free(run)


def test_a_job_script_holds_the_folder_through_an_inherited_descriptor(tmp_path):
    """The job script's way: the shell opens the lock file, `masktrain slurm hold` locks its descriptor and
    exits, and the lock stays with the shell (and whatever it starts) until they end."""
    run = tmp_path / "run"
    run.mkdir()
    script = (f'exec 9>>"{run}/run.lock"; "{MASKTRAIN}" slurm hold --fd 9 "{run}" || exit 3; echo held; '
              "sleep 120")
    shell = start_holder(["bash", "-c", script])
    try:
        with pytest.raises(RunInUse, match=rf"host \S+, pid {shell.pid}, since"):
            check_free(run)
        second = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3 and f"masktrain: {run} is in use by another launch" in second.stderr
    finally:
        shell.kill()
        shell.wait()
    check_free(run)


def test_a_job_script_descriptor_that_is_not_the_run_lock_is_refused_in_a_line(tmp_path):
    """`slurm hold` locks what the script opened: a number that is not open gave an EBADF traceback, and one open
    on another file would have locked that file, refusing no second launch."""
    run = tmp_path / "run"
    run.mkdir()
    closed = subprocess.run(["bash", "-c", f'"{MASKTRAIN}" slurm hold --fd 9 "{run}"'], capture_output=True,
                            text=True, timeout=60)
    assert closed.returncode == 1, closed.stderr
    assert closed.stderr == f"masktrain slurm: --fd 9 is not open: the job script opens {run}/run.lock on a " \
                            "descriptor and passes its number\n"
    (run / "run.lock").touch()
    other = subprocess.run(["bash", "-c", f'exec 9>>"{tmp_path}/elsewhere"; "{MASKTRAIN}" slurm hold --fd 9 "{run}"'],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and other.stderr == (f"masktrain slurm: --fd 9 is not open on {run}/run.lock: the "
                                                      "lock would refuse no other launch\n"), other.stderr
    check_free(run)


LOOK_IN_CHILD = textwrap.dedent("""
    import sys, time
    from masktrain.launcher.run_lock import in_use
    print("held", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        in_use(sys.argv[1])
""")


def test_looking_at_a_run_refuses_no_launch_and_sees_no_other_looker_as_one(tmp_path):
    """`masktrain status` (or a submission's check) takes the lock for an instant to look: a launch starting then
    was refused, naming the launch before it, and two lookers at once saw each other as a launch."""
    run = tmp_path / "run"
    with holding(run):
        pass  # leaves a holder's record behind, as every ended launch does
    looker = start_holder([sys.executable, "-c", LOOK_IN_CHILD, str(run), "3"])
    try:
        seen = [in_use(run) for _ in range(3000)]
        for _ in range(300):
            os.close(hold(run))
    finally:
        looker.kill()
        looker.wait()
    assert [s for s in seen if s is not None] == []


def test_without_file_locks_the_run_goes_on_unprotected_and_says_so(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with holding(tmp_path / "run") as fd:
        assert fd is None
    assert "no file locks on this filesystem" in capsys.readouterr().err


def test_a_second_local_launch_is_refused_before_it_writes_anything(tmp_path, tiny_data):
    run = tmp_path / "run"
    holder = start_holder([sys.executable, "-c", HOLD_IN_CHILD, str(run)])
    try:
        (run / "status.json").write_text('{"state": "running", "step": 3}')
        result = run_cli("train", "smoke", *tiny_data, f"run.output_dir={run}", "launch.nproc_per_node=1",
                         timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr
    assert f"masktrain: {run} is in use by another launch (host" in result.stderr
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    assert (run / "status.json").read_text() == '{"state": "running", "step": 3}'  # the holder's, untouched


def test_smoke_and_repro_leave_a_held_run_folder_alone(tmp_path):
    """Both start from an empty run folder: they removed a running launch's folder, its lock file with it, and
    trained beside it (the running launch crashed on its vanished files)."""
    from masktrain.launcher.repro import Arm, train_arm
    from masktrain.launcher.smoke import smoke

    out, data = tmp_path / "repro", tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)  # a running launch reads it: --fresh must not remove it either
    fresh = ["smoke", [f"run.output_dir={tmp_path / 'run'}", f"data.dir={data}"]]
    for run, attempt in ((tmp_path / "run", lambda run: smoke(*fresh, fresh_data=True)),
                         (out / "a", lambda run: train_arm("smoke", [f"data.dir={data}"], Arm("a", ()), out))):
        holder = start_holder([sys.executable, "-c", HOLD_IN_CHILD, str(run)])
        try:
            (run / "status.json").write_text('{"state": "running", "step": 3}')
            with pytest.raises(RunInUse):
                attempt(run)
        finally:
            holder.kill()
            holder.wait()
        assert sorted(p.name for p in run.iterdir()) == ["run.lock", "status.json"]
    assert (data / "tokenizer").is_dir()
    (out / "a" / "checkpoints").mkdir()
    with holding(out / "a"):
        pass
    run_lock.start_afresh(out / "a")
    assert [p.name for p in (out / "a").iterdir()] == ["run.lock"]

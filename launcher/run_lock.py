"""One launch per run folder: `<run>/run.lock`, locked with flock for as long as the launch lives.

Two launches into one folder (a job submitted twice, a `masktrain train` beside a SLURM job of the same run)
would both resume from the same checkpoint, then write the same step-N checkpoints, metrics and status.json
over each other. flock rather than a pid file: the kernel (the file server, for a node that is gone) drops the
lock when its holder ends, so a killed launch never leaves the folder locked and nothing needs breaking by
hand. The file's text only names the holder, for the refusal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

LOCK = "run.lock"
# How filesystems without flock answer (Lustre mounted without -o flock, some FUSE ones): the run goes on
# unprotected rather than not at all.
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
PROBE_WAIT = 0.5
"""Seconds a launch retries a lock it finds taken: `in_use` (status, submit) takes it for an instant to look,
which must not refuse a launch, whereas a launch holds it for as long as it runs."""


class RunInUse(RuntimeError):
    """Another launch holds the run folder."""


# squeue's states of a job that has yet to start, or has started (again) and may not have taken the folder yet.
# COMPLETING too: a requeued job passes through it on its way back to PENDING (a job ending for good as well, for
# the seconds it takes, when a refusal only asks to wait).
QUEUED = {"PENDING", "COMPLETING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD"}


def holder(run_dir: str | Path) -> str:
    """Who holds the folder, as its lock file says."""
    try:
        record = json.loads((Path(run_dir) / LOCK).read_text())
        job = f"SLURM job {record['job']}, " if record.get("job") else ""
        return f"another launch ({job}host {record['host']}, pid {record['pid']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # taken an instant ago, its record not yet written
        return "another launch"


def refusal(run_dir: str | Path) -> RunInUse:
    return RunInUse(f"{run_dir} is in use by {holder(run_dir)}: two launches into one run folder would write the "
                    "same checkpoints over each other. Wait for it to end or stop it, or give this run another "
                    "run.name (or run.output_dir)")


def try_lock(fd: int, path: Path, shared: bool = False) -> bool | None:
    """flock `fd` (`shared`: alongside other shared holders): True when taken, False when someone else holds it,
    None where the filesystem has no locks."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        print(f"masktrain: {path}: no file locks on this filesystem ({err.strerror}): a second launch into this "
              "run folder would not be refused", file=sys.stderr)
        return None


def hold(run_dir: str | Path, fd: int | None = None, pid: int | None = None,
         job_script: bool = False) -> int | None:
    """Take the run folder for this launch, or raise RunInUse naming who has it. The lock lasts while `fd` is
    open, here or in a process that inherited it: without `fd` one is opened here (not inherited by children);
    a job script passes the descriptor it holds open, with its own `pid`, and `job_script` (see `queued`). Returns
    the descriptor held, None where the filesystem has no locks."""
    path = Path(run_dir) / LOCK
    if fd is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + PROBE_WAIT
    while (taken := try_lock(fd, path)) is False and time.monotonic() < deadline:
        time.sleep(0.01)
    if not taken:
        os.close(fd)
        if taken is None:
            return None
        raise refusal(run_dir)
    record = {"host": socket.gethostname(), "pid": pid or os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              **({"job_script": True, "job_name": os.environ.get("SLURM_JOB_NAME")} if job_script else {})}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def holding(run_dir: str | Path):
    """The run folder is this launch's inside the block; gives the descriptor that holds it (None: no locks)."""
    fd = hold(run_dir)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


NO_LOCKS = "its file system has no file locks"
"""What `in_use` says where the lock cannot be asked."""


def in_use(run_dir: str | Path) -> str | None:
    """Who holds the folder now (see `holder`), None when no launch does, NO_LOCKS when it cannot tell."""
    path = Path(run_dir) / LOCK
    try:
        # Read-only is enough for a shared lock (NFS emulates it with a byte-range read lock): another user's run
        # can be looked at too.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # Shared: two lookers at once (a status beside a submit) must not see each other as a launch.
        taken = try_lock(fd, path, shared=True)
        return holder(run_dir) if taken is False else NO_LOCKS if taken is None else None
    finally:
        os.close(fd)  # also releases the lock this took


SUBMITTED = Path("slurm") / "submitted"
"""The ids of the jobs `masktrain slurm submit` sent for the run, one a line, oldest first (see `queued`)."""
RECENT = 32
"""How many of the last submitted ids `queued` asks squeue about."""


def note_submitted(run_dir: str | Path, job: str, name: str) -> None:
    path = Path(run_dir) / SUBMITTED
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(f"{job} {name}\n")


def queued(run_dir: str | Path) -> tuple[str, str] | None:
    """(job id, its state) of a SLURM job of the run that is in the queue without holding the folder: submitted and
    waiting to start (a chain's later jobs too), or requeued (preempted, or its ranks lost after a checkpoint),
    which lets the folder go while it waits and takes it back to go on. Candidates: the jobs `slurm submit` noted
    (`SUBMITTED`) and the job whose script held the folder last (a script sbatch'ed by hand). Only a job script's
    hold counts: a `masktrain train` inside an allocation (salloc) records its job too, which runs on after the
    train ended. A job counts under its own name only: a folder on a file system that two clusters share may name
    a job id that the other cluster gave another job. None when there is none, or squeue cannot tell (no SLURM)."""
    run = Path(run_dir)
    jobs: dict[str, str | None] = {}  # id: name (None: not recorded)
    try:
        record = json.loads((run / LOCK).read_text())
        if record.get("job_script") and record.get("job"):
            jobs[str(record["job"])] = record.get("job_name")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        for line in (run / SUBMITTED).read_text().splitlines()[-RECENT:]:
            job, _, name = line.strip().partition(" ")
            if job:
                jobs[job] = name or None
    except OSError:
        pass
    if not jobs or shutil.which("squeue") is None:
        return None
    try:
        listed = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T %j"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    for line in listed.stdout.splitlines():
        job, state, name = (line.split(maxsplit=2) + ["", ""])[:3]
        if job in jobs and state in QUEUED and jobs[job] in (None, name):
            return job, state.lower()
    return None


def check_free(run_dir: str | Path) -> None:
    """Raise RunInUse when a launch holds the folder now, or a SLURM job of the run waits in the queue to take it
    (for a submission, which starts nothing yet, and a local launch: either would leave that job to be refused)."""
    if in_use(run_dir) not in (None, NO_LOCKS):  # without locks the launch goes on unprotected and says so
        raise refusal(run_dir)
    if (waiting := queued(run_dir)) is not None:
        job, state = waiting
        raise RunInUse(f"{run_dir} is to be taken up by SLURM job {job} ({state}), in the queue: it trains the run "
                       "when it starts, and would be refused were another launch holding it then. Wait for it, or "
                       f"cancel it first (scancel {job}), or give this run another run.name (or run.output_dir)")


def start_afresh(run_dir: str | Path) -> None:
    """Empty the run folder for a run from scratch (smoke, repro), or raise RunInUse while a launch holds it:
    removed whole under a running launch, it lost its lock file with the rest, and the next launch locked a new
    file and trained beside the running one."""
    with holding(run_dir):
        for path in Path(run_dir).iterdir():
            if path.name == LOCK:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

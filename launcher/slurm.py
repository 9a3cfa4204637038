"""SLURM jobs: render the sbatch template for N nodes x G ranks, submit it (as a chain of K jobs if asked),
and the two commands the job script runs on the cluster (`slurm node` on every node, `slurm status`).

The config is loaded with launch.nnodes / launch.nproc_per_node taken from --nodes / --gpus-per-node and
validated before anything is written or submitted, so a bad config or batch arithmetic fails on the login
node, not in the queue. The rendered script holds the resolved config and writes it into the run folder at
the start of every attempt: it is complete on its own and can be handed to `sbatch` as it is.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


from masktrain import slurm as slurm_files
from masktrain.launcher.config import Config
from masktrain.launcher.launch import (already_complete, check_gpus, check_resume_compatible, rank_environment,
                                       torchrun_command, use_cuda)
from masktrain.launcher.loading import ConfigError, dump_yaml, load_config, read_run_config
from masktrain.launcher.run_lock import check_free, note_submitted
from masktrain.trainer.status import REQUEUE_EXIT, read_status

TEMPLATE = Path(slurm_files.__file__).parent / "train.sbatch"
HEREDOC_END = "MASKTRAIN_CONFIG"
# sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
TIME_FORMS = [r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
              r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)",
              r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"]


class SlurmError(RuntimeError):
    """Submitting or starting a job failed for a reason outside the run config (sbatch refused, no SLURM)."""


@dataclass
class JobSpec:
    """What the job asks SLURM for (the run itself is described by the config)."""

    nodes: int
    gpus_per_node: int
    """Ranks per node: GPUs per node, or CPU processes per node when launch.accelerator=cpu."""
    time: str
    partition: str
    account: str = ""
    cpus_per_task: int = 0
    """CPUs for each node's task; 0 asks for one per rank plus one per loader worker of each rank."""
    grace: int = 180
    """Seconds before the time limit at which SLURM sends SIGUSR1, for the ranks to checkpoint and leave."""
    job_name: str = ""
    """Defaults to run.name."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, one per #SBATCH line (e.g. --exclusive, --mem=0, --qos=high)."""
    chain: int = 1
    """Jobs submitted one after another (each starts when the one before ends, --dependency=afterany)."""


def time_seconds(text: str) -> int | None:
    """`--time` in seconds, or None when it is not one of sbatch's forms."""
    for form in TIME_FORMS:
        match = re.fullmatch(form, text.strip())
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            return ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
    return None


SIGNAL_MAX = 65535  # seconds: sbatch refuses a longer --signal=...@time


def spec_problems(spec: JobSpec) -> list[str]:
    problems = []
    if spec.nodes < 1:
        problems.append(f"--nodes: must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 1:
        problems.append(f"--gpus-per-node: must be >= 1 (ranks per node), got {spec.gpus_per_node}")
    if spec.cpus_per_task < 0:
        problems.append(f"--cpus-per-task: must be >= 0, got {spec.cpus_per_task}")
    if spec.chain < 1:
        problems.append(f"--chain: must be >= 1, got {spec.chain}")
    if not spec.partition.strip():
        problems.append("--partition: must not be empty")
    seconds = time_seconds(spec.time)
    if seconds is None:
        problems.append(f"--time: {spec.time!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                        "D-HH:MM:SS)")
    # --time=0 is sbatch's "no time limit" (the partition's own still applies).
    elif not 0 < spec.grace < min(seconds or SIGNAL_MAX + 1, SIGNAL_MAX + 1):
        problems.append(f"--signal-grace: must be > 0, shorter than --time ({seconds} s) and at most {SIGNAL_MAX} "
                        f"(sbatch --signal's limit), got {spec.grace}")
    for option in spec.sbatch:
        if not option.startswith("-") or "\n" in option:
            problems.append(f"--sbatch: {option!r} is not an sbatch option (write it as --sbatch=--exclusive)")
        elif owner := owned_by(option):
            # The later #SBATCH line wins: a job shaped otherwise than the run config fails after the wait.
            problems.append(f"--sbatch: {option!r} sets what {owner}")
    if "/" in spec.job_name:
        problems.append(f"--job-name: {spec.job_name!r} holds a '/', which the log file's name (%x) cannot")
    return problems


# sbatch options the script sets itself: (long name, short name, what sets it instead).
OWNED = [("--job-name", "-J", "--job-name sets"), ("--partition", "-p", "--partition sets"),
         ("--account", "-A", "--account sets"), ("--time", "-t", "--time sets"), ("--nodes", "-N", "--nodes sets"),
         ("--gpus-per-node", "", "--gpus-per-node sets"), ("--cpus-per-task", "-c", "--cpus-per-task sets"),
         ("--ntasks-per-node", "", "the script sets (one task per node starts its ranks)"),
         ("--ntasks", "-n", "the script sets (one task per node starts its ranks)"),
         ("--chdir", "-D", "the script sets (the folder relative config paths mean)"),
         ("--output", "-o", "the script sets (the log in the run folder)"),
         ("--open-mode", "", "the script sets (requeued attempts append to one log)"),
         ("--signal", "", "--signal-grace sets"), ("--requeue", "", "the script sets (preemption requeues)"),
         ("--no-requeue", "", "the script sets (preemption requeues)")]


def owned_by(option: str) -> str | None:
    """What sets the sbatch option `option` in the script instead, or None for an option it leaves alone."""
    name = option.split("=", 1)[0]
    for long, short, owner in OWNED:
        if name == long or (short and not name.startswith("--") and name[:2] == short):
            return owner
    return None


def job_config(config: str, overrides: list[str], spec: JobSpec) -> Config:
    """The validated run config with its world size set from the job's shape (the flags win)."""
    problems = spec_problems(spec)
    if problems:
        raise ConfigError("masktrain slurm", problems)
    shape = [f"launch.nnodes={spec.nodes}", f"launch.nproc_per_node={spec.gpus_per_node}"]
    cfg = load_config(config, list(overrides) + shape)
    if cfg.trainer.resume == "never":
        # The job's config goes into every requeued attempt and chained job: each would start over from step 0.
        raise ConfigError("masktrain slurm", [
            "trainer.resume: never would make every requeued attempt and --chain job train again from step 0 over "
            "the run's checkpoints; use auto (a run folder with no checkpoint starts from step 0) with a new "
            "run.name, or remove the old run folder"])
    return cfg


def masktrain_command() -> str:
    """The `masktrain` script of this environment: the job runs the same installation as the submitter."""
    beside = Path(sys.executable).parent / "masktrain"
    found = str(beside) if beside.is_file() else shutil.which("masktrain")
    if found is None:
        raise SlurmError("cannot find the `masktrain` command to run inside the job; install masktrain "
                         "(pip install -e .) in this environment")
    return str(Path(found).absolute())


def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir).absolute()


def job_name(cfg: Config, spec: JobSpec) -> str:
    """--job-name, or run.name with '/' (fine in a run folder's path) made '-' for the log's name (%x)."""
    return spec.job_name or cfg.run.name.replace("/", "-")


def log_pattern(cfg: Config) -> Path:
    return run_dir(cfg) / "slurm" / "%x-%j.out"


def cpus_per_task(cfg: Config, spec: JobSpec) -> int:
    return spec.cpus_per_task or spec.gpus_per_node * (1 + cfg.data.num_workers)


def sbatch_lines(cfg: Config, spec: JobSpec) -> list[str]:
    options = [f"--job-name={job_name(cfg, spec)}", f"--partition={spec.partition}"]
    options += [f"--account={spec.account}"] if spec.account else []
    options += [f"--time={spec.time}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={cpus_per_task(cfg, spec)}"]
    if cfg.launch.accelerator != "cpu":
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    # Relative paths in the config (data.dir, ...) mean the same inside the job as they do here.
    options += [f"--chdir={Path.cwd()}", f"--output={log_pattern(cfg)}", "--open-mode=append",
                f"--signal=B:USR1@{spec.grace}", "--requeue"]
    # sbatch reads an #SBATCH line as a shell would, roughly: whitespace splits it, `#` starts a comment, quotes and
    # backslashes are taken away. A run name `ablation#3` became the job `ablation` and the log file `.../ablation`.
    # The user's own --sbatch options may quote on purpose; only whitespace would split them.
    problems = [f"#SBATCH lines cannot hold whitespace, #, quotes or backslashes: {option!r} (a run name or folder "
                "holding one? run from, and write to, folders named without them)"
                for option in options if any(c.isspace() or c in "#'\"\\" for c in option)]
    problems += [f"#SBATCH lines cannot hold whitespace: {option!r}" for option in spec.sbatch
                 if any(c.isspace() for c in option)]
    if "%" in str(folder := run_dir(cfg)):
        problems.append(f"{folder}: the run folder holds a '%', which SLURM would expand in the log's path "
                        "(--output); name the run or output folder without one")
    if problems:
        raise ConfigError("masktrain slurm", problems)
    return [f"#SBATCH {option}" for option in options + spec.sbatch]


def render(cfg: Config, spec: JobSpec) -> str:
    """The job script for `cfg` (already loaded with `job_config`) and `spec`."""
    config_yaml = dump_yaml(cfg)
    if HEREDOC_END in config_yaml.splitlines():
        raise ConfigError("masktrain slurm", [f"a config value is the line {HEREDOC_END!r}, which ends the "
                                              "config block of the job script"])
    values = {
        "sbatch": "\n".join(sbatch_lines(cfg, spec)),
        "shape": f"{spec.nodes} node(s) x {spec.gpus_per_node} rank(s) per node "
                 f"({'CPU, gloo' if cfg.launch.accelerator == 'cpu' else 'GPU, NCCL'})",
        "ranks_per_node": str(spec.gpus_per_node),
        "grace": str(spec.grace),
        "run_dir": shlex.quote(str(run_dir(cfg))),
        "masktrain": shlex.quote(masktrain_command()),
        "max_steps": str(cfg.trainer.max_steps),
        "config_yaml": config_yaml,
        "cpus_per_task": str(cpus_per_task(cfg, spec)),
        "requeue_exit": str(REQUEUE_EXIT),
    }
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], TEMPLATE.read_text())


def write_script(cfg: Config, text: str, path: str | Path | None = None) -> Path:
    """Write the script (default `<run>/slurm/job.sbatch`) and make the log folder SLURM writes into."""
    log_pattern(cfg).parent.mkdir(parents=True, exist_ok=True)
    target = Path(path) if path else run_dir(cfg) / "slurm" / "job.sbatch"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(0o755)
    return target


def sbatch(args: list[str]) -> str:
    """Run sbatch; the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("`sbatch` is not on PATH: submit from a SLURM login node, or start the local cluster "
                         "(slurm/local-cluster.sh)")
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"sbatch {shlex.join(args)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip().split(";")[0]


def submit(cfg: Config, spec: JobSpec, log=print) -> list[str]:
    """Render, write and submit `spec.chain` jobs; returns their ids in order."""
    from masktrain.data.inputs import check_ready  # imports torch: only for a submission

    check_free(run_dir(cfg))  # a job that would start beside a running launch of this run only to be refused
    if complete := already_complete(cfg, check_resume_compatible(cfg)):  # a job would wait in the queue for nothing
        raise SystemExit(f"{complete[1]}; nothing submitted")
    check_ready(cfg)  # here, not after the queue wait
    script = write_script(cfg, render(cfg, spec))
    name = job_name(cfg, spec)
    ids: list[str] = []
    for index in range(spec.chain):
        args = [f"--dependency=afterany:{ids[-1]}"] if ids else []
        # MASKTRAIN_CHAINED: the script hands a preempted run to the next job instead of requeueing itself.
        # MASKTRAIN_AFTER: the job it follows, whose failed run it must not restart.
        exports = [*(["MASKTRAIN_CHAINED=1"] if index < spec.chain - 1 else []),
                   *([f"MASKTRAIN_AFTER={ids[-1]}"] if ids else [])]
        if exports:
            args.append(f"--export={','.join(['ALL', *exports])}")
        try:
            ids.append(sbatch([*args, str(script)]))
            note_submitted(run_dir(cfg), ids[-1], name)  # a second submission while it waits is refused
        except SlurmError as err:
            if not ids:
                raise
            # A chained job with no successor would hand its preempted run to nobody: cancel what went in.
            cancelled = subprocess.run(["scancel", *ids], capture_output=True, text=True).returncode == 0
            raise SlurmError(f"{err}\njobs {', '.join(ids)} of the chain were already submitted: "
                             + ("cancelled them" if cancelled else f"cancelling them failed; run scancel "
                                f"{' '.join(ids)}")) from None
        after = f", starts after job {ids[-2]} ends" if len(ids) > 1 else ""
        log(f"submitted job {ids[-1]} ({index + 1} of {spec.chain}{after})")
    log(f"script: {script}")
    for job in ids:
        log(f"log of job {job}: {log_pattern(cfg).parent / f'{name}-{job}.out'} (every attempt appends)")
    log(f"run folder: {run_dir(cfg)}  (squeue -j {','.join(ids)}; scancel {' '.join(ids)} stops the chain)")
    return ids


def node_command(cfg: Config, config_path: str, env: dict[str, str]) -> list[str]:
    """torchrun for this node's ranks, from the variables SLURM and the job script set."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "MASTER_ADDR", "MASTER_PORT")
               if k not in env]
    if missing:
        raise SlurmError(f"{', '.join(missing)} not set: `masktrain slurm node` runs inside the job script that "
                         "`masktrain slurm render` writes")
    nodes = int(env["SLURM_JOB_NUM_NODES"])
    if nodes != cfg.launch.nnodes:
        raise ConfigError(config_path, [f"launch.nnodes: the run config says {cfg.launch.nnodes} but the job has "
                                        f"{nodes} nodes; render the script again with --nodes {nodes}"])
    rendezvous = [f"--nnodes={nodes}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                  f"--rdzv-id={env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT', '0')}",
                  # The first node hosts the store; said outright, because the hostname heuristic cannot
                  # tell nodes apart when they share an address (as the local test cluster's do).
                  f"--rdzv-conf=is_host={int(env['SLURM_NODEID'] == '0')}"]
    return torchrun_command(cfg, Path(config_path), rendezvous)


def node(config_path: str) -> None:
    """Inside the job, once per node: become torchrun for this node's ranks (never returns)."""
    from masktrain.data.inputs import check_ready

    cfg = read_run_config(config_path)
    command = node_command(cfg, config_path, dict(os.environ))
    cuda = use_cuda(cfg)
    check_gpus(cfg, cuda, config_path)
    check_ready(cfg)
    print(f"[masktrain-slurm] node {os.environ['SLURM_NODEID']} ({os.environ.get('SLURMD_NODENAME', '?')}): "
          f"{shlex.join(command)}", flush=True)
    os.execve(command[0], command, rank_environment(cfg, cuda))


def status(run: str, full: bool = False) -> str:
    """`<state> <step>` of the run's last launch ("none 0" before any), for the job script to read; `full` adds
    the step the launch started from (-1 when a masktrain of before did not say: unknown, so never "no
    progress") and the first line of the reason."""
    saved = read_status(run)
    state, step = saved.get("state", "none"), saved.get("step", 0)
    if not full:
        return f"{state} {step}"
    reason = (saved.get("reason") or "").splitlines()
    return f"{state} {step} {saved.get('start', -1 if saved else 0)} {reason[0] if reason else ''}".rstrip()

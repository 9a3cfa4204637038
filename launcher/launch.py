"""Local launch: validate, save the resolved config into the run folder, start the ranks under torchrun.

torchrun reports a failed worker with its own exit code, so the trainer's outcome travels through
`<run>/status.json` instead: the launcher exits with REQUEUE_EXIT when the run stopped to be resumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from masktrain.data.files import write_atomic
from masktrain.launcher.config import Config
from masktrain.launcher.loading import ConfigError, dump_yaml, to_dict
from masktrain.launcher.run_lock import check_free, holding
from masktrain.trainer.status import REQUEUE_EXIT, STATUS, read_status, shell_code, write_status

# torchrun's own defaults plus SIGUSR1, the signal SLURM jobs are commonly given ahead of their time limit.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


def check_resume_compatible(cfg: Config) -> Path | None:
    """Fail before spawning anything when the checkpoint the ranks will resume from was made with a different
    config. Returns that checkpoint (None: the run starts from scratch)."""
    from masktrain.data.inputs import tokenizer_dir
    from masktrain.data.tokenizer import MODEL_FILE, Tokenizer
    from masktrain.trainer.checkpoint import Checkpointer, check_resumable, resume_point, rollback_note
    from masktrain.trainer.engine import deepspeed_config
    from masktrain.trainer.models import zero_stage

    ckpt = Checkpointer(cfg.output_dir, 1, False)
    if cfg.trainer.resume == "never" and (latest := ckpt.latest()) is not None:
        # Started over there, the new run would prune the earlier one's checkpoints and cut its metrics.
        raise ConfigError("masktrain train", [
            f"trainer.resume: never, but {cfg.output_dir} holds the checkpoints of an earlier run (the latest "
            f"{latest.name}), which a new start would prune and mix with its own; use another run.output_dir (or "
            "run.name), or remove that run's folder"])
    source, _ = resume_point(cfg.trainer.resume, ckpt)
    if note := rollback_note(cfg.trainer.resume, ckpt):
        print(f"masktrain: {note}", file=sys.stderr)
    if source is not None and (source / "config.yaml").is_file():
        precision = None if cfg.trainer.precision == "auto" else cfg.trainer.precision  # auto: the ranks check
        folder = tokenizer_dir(cfg)  # not prepared yet (train prepares it): the ranks check
        tokenizer = (folder, Tokenizer(folder).fingerprint()) if (folder / MODEL_FILE).is_file() else None
        check_resumable(source, to_dict(cfg), cfg.trainer.allow_config_change,
                        zero_stage(deepspeed_config(cfg, precision or "fp32")), precision, tokenizer)
    return source


def already_complete(cfg: Config, source: Path | None) -> tuple[int, str] | None:
    """(the step, why the run has nothing left to train) when `source`, the checkpoint it resumes from (see
    `check_resume_compatible`), is at trainer.max_steps, else None. Said before the ranks start (minutes for a
    large model) or a job waits in the SLURM queue, only to train no step."""
    from masktrain.trainer.checkpoint import read_meta

    step = read_meta(source).get("step", 0) if source is not None else 0
    if step < cfg.trainer.max_steps:
        return None
    return step, (f"{cfg.output_dir}: the run is complete: its checkpoint {source} is at step {step}, "
                  f"trainer.max_steps is {cfg.trainer.max_steps}. To train it further, raise trainer.max_steps with "
                  "trainer.allow_config_change=true (the LR and masking schedules stretch to the new end); to train "
                  "it again, use a new run.output_dir")


def write_run_config(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    write_atomic(path, dump_yaml(cfg), tmp_name="config.tmp")
    return path


def rank_environment(cfg: Config, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Said either way: a DS_ACCELERATOR=cpu inherited from a CPU session's shell would run a GPU job's DeepSpeed
    # on its CPU accelerator.
    env["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    threads = cfg.launch.threads_per_rank or max(1, len(os.sched_getaffinity(0)) // cfg.launch.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    # torchrun then passes SIGUSR1 on to the ranks (and waits for their checkpoint) instead of dying on it and
    # orphaning them. torchrun reads its --signals-to-handle default from PET_SIGNALS_TO_HANDLE and overwrites
    # TORCHELASTIC_SIGNALS_TO_HANDLE with it, so only the PET_ variable has an effect.
    env["PET_SIGNALS_TO_HANDLE"] = ",".join(sig.name for sig in FORWARDED_SIGNALS)
    # DeepSpeed JIT-builds a CPU communication op at start-up into a cache keyed by the op's name only: two Python
    # environments sharing ~/.cache rebuild each other's copy (minutes) on every start. One cache per environment.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun_command(cfg: Config, config_path: Path, rendezvous: list[str]) -> list[str]:
    """torchrun starting this node's ranks; `rendezvous` says how the nodes find each other."""
    return [sys.executable, "-m", "masktrain.launcher.torchrun", f"--nproc-per-node={cfg.launch.nproc_per_node}",
            f"--shutdown-timeout={cfg.launch.shutdown_timeout}", *rendezvous,
            "-m", "masktrain.trainer.rank", str(config_path)]


class StoppedBeforeStart(Exception):
    """A stop signal came before torchrun started: there is nothing to save."""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent(prctl) -> Callable[[], None]:
    """For torchrun, run between fork and exec: SIGTERM (a stop: the ranks checkpoint) when the launcher dies,
    which in its own process group it would otherwise outlive. `prctl` is looked up before the fork."""
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class StopForwarding:
    """The launcher's stop signals (SIGTERM, SIGUSR1, SIGINT, and SIGHUP, a closed terminal, passed on as
    SIGTERM), from its first moment.

    Before torchrun starts there is nothing to save: the first one raises StoppedBeforeStart, which ends the
    launch. Then the first goes to torchrun, which passes it to the ranks and waits for their checkpoint. Later
    ones are not passed on: torchrun takes each as a new, harsher shutdown, and the third cuts its wait for the
    ranks short, leaving them saving while the launcher exits. torchrun runs in a process group of its own, so a
    Ctrl-C in the terminal reaches it only through here."""

    def __enter__(self) -> "StopForwarding":
        self.received: str | None = None
        self.process: subprocess.Popen | None = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGUSR1,
                                                                          signal.SIGINT, signal.SIGHUP)}
        return self

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"masktrain: {name}: already stopping on {self.received}; waiting for the ranks' checkpoint",
                  file=sys.stderr, flush=True)
            return
        self.received = name
        if self.process is None:
            raise StoppedBeforeStart(name)
        self.process.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    def start(self, command: list[str], env: dict[str, str], keep: tuple[int, ...] = ()) -> subprocess.Popen:
        """Start torchrun; `keep`: descriptors it inherits."""
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.process = subprocess.Popen(command, env=env, process_group=0, preexec_fn=stop_with_parent(prctl),
                                        pass_fds=keep)
        return self.process

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stopped_before_start(err: StoppedBeforeStart) -> int:
    print(f"masktrain: stopped on {err} before the ranks started; a restart resumes from the last checkpoint",
          file=sys.stderr)
    return REQUEUE_EXIT


def launch_local(cfg: Config, stop: StopForwarding | None = None) -> int:
    """Run the training job on this machine; returns 0, REQUEUE_EXIT or the failure code. `stop`: the stop
    signals' handling, when the caller installed it before loading the config (which imports torch)."""
    if cfg.launch.nnodes != 1:  # torchrun here starts this machine's ranks only; the others would never come
        raise ConfigError("masktrain train", [f"launch.nnodes: `masktrain train` runs on this machine only, got "
                                     f"{cfg.launch.nnodes} nodes; submit multi-node runs with `masktrain slurm "
                                     "submit` (its --nodes sets launch.nnodes)"])
    with contextlib.nullcontext(stop) if stop is not None else StopForwarding() as stop:
        try:
            from masktrain.data.inputs import check_ready

            cuda = use_cuda(cfg)
            check_gpus(cfg, cuda, "masktrain train")
            source = check_resume_compatible(cfg)
            if complete := already_complete(cfg, source):  # nothing to do, as a rerun of a finished job expects
                step, message = complete
                check_free(cfg.output_dir)
                with holding(cfg.output_dir):
                    # Left crashed, had the ranks died after the final save: that save was the run's end.
                    if read_status(cfg.output_dir).get("state") != "completed":
                        write_status(cfg.output_dir, "completed", step)
                print(f"masktrain: {message}")
                return 0
            check_ready(cfg)
            check_free(cfg.output_dir)  # a job of this run waiting in the SLURM queue is not holding it yet
            if cfg.launch.master_port:
                check_port(cfg.launch.master_port)
            with holding(cfg.output_dir) as lock:
                config_path = write_run_config(cfg)
                (Path(cfg.output_dir) / STATUS).unlink(missing_ok=True)
                if cfg.launch.master_port:
                    # is_host: torchrun must serve the rendezvous itself. Finding the port taken it would join
                    # whatever holds it, as a client, and wait there for good.
                    rendezvous = ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-conf=is_host=1",
                                  f"--rdzv-endpoint=127.0.0.1:{cfg.launch.master_port}"]
                else:
                    rendezvous = ["--standalone"]
                # torchrun holds the folder too: were the launcher killed, the ranks it stops still checkpoint.
                process = stop.start(torchrun_command(cfg, config_path, rendezvous), rank_environment(cfg, cuda),
                                     keep=(lock,) if lock is not None else ())
                # The verdict is written before the folder is let go.
                return outcome(cfg.output_dir, process.wait(), stop.received)
        except StoppedBeforeStart as err:
            return stopped_before_start(err)


def check_port(port: int) -> None:
    """`launch.master_port` must be free here: said in a line, before torchrun fails on it with a traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's port in TIME_WAIT is free
        try:
            probe.bind(("", port))
        except OSError as err:
            raise ConfigError("masktrain train", [f"launch.master_port: port {port} is in use on this machine "
                                                  f"({err.strerror}): another run's, or another program's; pick "
                                                  "another, or 0 for a free one"]) from None


def use_cuda(cfg: Config) -> bool:
    """Whether the ranks run on GPUs: launch.accelerator, or with `auto` whether this machine has one."""
    if cfg.launch.accelerator != "auto":
        return cfg.launch.accelerator == "cuda"
    import torch  # seconds to import: only when the config leaves the choice to the machine

    return torch.cuda.is_available()


def check_gpus(cfg: Config, cuda: bool, where: str) -> None:
    """With `cuda`, this node must have a GPU per rank: otherwise each rank dies in torch.cuda.set_device with a
    traceback of its own (no GPU) or two ranks share one and run out of its memory."""
    if not cuda:
        return
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(where, [f"launch.accelerator: {cfg.launch.accelerator} asks for GPUs, but torch "
                                  f"{torch.__version__} ({build}) sees none on this machine; use cpu here"])
    if cfg.launch.nproc_per_node > count:
        raise ConfigError(where, [f"launch.nproc_per_node: {cfg.launch.nproc_per_node} ranks, but this machine has "
                                  f"{count} GPU(s): one rank per GPU"])


def last_checkpoint_step(run_dir: str | Path) -> int:
    """The step of the run's newest checkpoint (0: none), for ranks that ended before writing any status."""
    from masktrain.trainer.checkpoint import Checkpointer, meta_or_none

    with contextlib.suppress(OSError, SystemExit):  # a damaged one: the next start says so, in full
        if (latest := Checkpointer(run_dir, 1, False).latest()) is not None:
            return (meta_or_none(latest) or {}).get("step", 0)
    return 0


def outcome(run_dir: str | Path, code: int, stopped: str | None = None) -> int:
    """The launcher's exit code from how the ranks said the run ended (torchrun's own code says little), given
    the stop signal the launcher passed on, if any. A run whose ranks wrote no verdict is marked crashed, as the
    ranks mark it themselves for a failure they can name (a checkpoint's universal conversion)."""
    status = read_status(run_dir)
    state = status.get("state")
    code = shell_code(code)
    if state == "preempted":
        return REQUEUE_EXIT
    if state == "completed":
        return 0
    if state in ("failed", "crashed"):  # crashed by the ranks' own verdict: a restart may not meet it again
        print(f"masktrain: training {state} at step {status['step']}: {status['reason']}", file=sys.stderr)
        return code or 1
    if stopped is not None:  # the ranks were stopped before they could checkpoint: the last one stands
        print(f"masktrain: stopped on {stopped} before the ranks could checkpoint; a restart resumes from the last "
              "checkpoint", file=sys.stderr)
        return REQUEUE_EXIT
    step = status["step"] if "step" in status else last_checkpoint_step(run_dir)
    reason = (f"the ranks ended without a verdict (torchrun exited {code}): a rank was killed or crashed, "
              f"which the log above shows; a restart goes on from step {step}")
    with contextlib.suppress(OSError):  # a full disk may refuse this too
        write_status(run_dir, "crashed", step, reason, start=status.get("start"))
    print(f"masktrain: {reason}", file=sys.stderr)
    return code or 1

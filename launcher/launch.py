"""Local launch: validate, save the resolved config into the run folder, start the ranks under torchrun.

torchrun reports a failed worker with its own exit code, so the trainer's outcome travels through
`<run>/status.json` instead: the launcher exits with REQUEUE_EXIT when the run stopped to be resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from masktrain.launcher.config import Config
from masktrain.launcher.loading import to_dict

from masktrain.trainer.status import REQUEUE_EXIT, STATUS, read_status


def check_resume_compatible(cfg: Config) -> None:
    """Fail before spawning anything when the run folder's checkpoint was made with a different config."""
    from masktrain.trainer.checkpoint import Checkpointer, check_resumable

    if cfg.trainer.resume == "never":
        return
    auto = cfg.trainer.resume == "auto"
    latest = Checkpointer(cfg.output_dir, 1, False).latest() if auto else Path(cfg.trainer.resume)
    if latest is not None and (latest / "config.yaml").is_file():
        check_resumable(latest, to_dict(cfg), cfg.trainer.allow_config_change)


def write_run_config(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def rank_environment(cfg: Config, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    threads = cfg.launch.threads_per_rank or max(1, len(os.sched_getaffinity(0)) // cfg.launch.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    # torchrun then passes SIGUSR1 on to the ranks (and waits for their checkpoint) instead of dying on it.
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    env["PYTHONUNBUFFERED"] = "1"
    # DeepSpeed JIT-builds its CPU comm op at start; a build cache shared with other environments (the default,
    # ~/.cache) is rebuilt, for minutes, whenever another environment built it last.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def torchrun_command(cfg: Config, config_path: Path, rendezvous: list[str]) -> list[str]:
    """torchrun starting this node's ranks; `rendezvous` says how the nodes find each other."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.launch.nproc_per_node}",
            f"--shutdown-timeout={cfg.launch.shutdown_timeout}", *rendezvous,
            "-m", "masktrain.trainer.train", str(config_path)]


def launch_local(cfg: Config) -> int:
    """Run the training job on this machine; returns 0, REQUEUE_EXIT or the failure code."""
    import torch

    check_resume_compatible(cfg)
    config_path = write_run_config(cfg)
    (Path(cfg.output_dir) / STATUS).unlink(missing_ok=True)
    cuda = cfg.launch.accelerator == "cuda" or (cfg.launch.accelerator == "auto" and torch.cuda.is_available())
    if cfg.launch.master_port:
        rendezvous = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{cfg.launch.master_port}"]
    else:
        rendezvous = ["--standalone"]
    process = subprocess.Popen(torchrun_command(cfg, config_path, rendezvous), env=rank_environment(cfg, cuda))

    def forward(signum, frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = read_status(cfg.output_dir).get("state")
    if status == "preempted":
        return REQUEUE_EXIT
    if status == "completed":
        return 0
    return code or 1

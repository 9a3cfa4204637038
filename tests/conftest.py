"""Shared fixtures: a small prepared dataset (built once per session) and a runner for the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A suite started in the background by a shell without job control inherits SIGINT ignored, and so would every
# job it starts: the tests that interrupt one would wait for it in vain.
signal.signal(signal.SIGINT, signal.default_int_handler)

MASKTRAIN = str(Path(sys.executable).parent / "masktrain")

# A small slice of the built-in corpus: enough for losses to fall, small enough to build in seconds.
TINY_DATA = ["data.prepare.max_docs=2500", "data.prepare.vocab_size=1000", "data.prepare.shard_bytes=65536"]


def run_cli(*args: str, timeout: float = 600, check: bool = False, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([MASKTRAIN, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"masktrain {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}")
    return result


def scalars(tb_dir: Path, files: list[Path] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points, in step order, as the event files (default: all in `tb_dir`) store them:
    read raw, without the Python loader's purge logic, which TensorBoard's default data server lacks."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    points: dict[str, list[tuple[int, float]]] = {}
    for path in tb_dir.glob("*tfevents*") if files is None else files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":  # the run's config, not a scalar
                    continue
                number = float(make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                points.setdefault(value.tag, []).append((event.step, number))
    return {tag: sorted(values) for tag, values in points.items()}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """Overrides that point a config at a prepared tiny dataset (tokenizer + shards)."""
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    root = tmp_path_factory.mktemp("data")
    overrides = TINY_DATA + [f"data.dir={root}"]
    prepare(load_config("smoke", overrides), log=lambda text: None)
    return overrides


@pytest.fixture
def disk_journal(monkeypatch) -> list[tuple[str, ...]]:
    """The fsyncs, renames and unlinks made while the test runs, in order, by resolved path: the steps a power
    loss may put on disk in another order, or not at all, unless an fsync comes between. Calls relative to a
    folder's descriptor (shutil.rmtree's) are left out."""
    events: list[tuple[str, ...]] = []

    def fsync(fd, real=os.fsync):
        real(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def recorded(kind: str, real):
        def call(*paths, **kwargs):
            named = [str(Path(path).resolve()) for path in paths]
            real(*paths, **kwargs)
            if not kwargs:
                events.append((kind, *named))
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", recorded("rename", os.rename))
    monkeypatch.setattr(os, "replace", recorded("rename", os.replace))
    monkeypatch.setattr(os, "unlink", recorded("unlink", os.unlink))
    return events

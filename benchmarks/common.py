"""What every benchmark shares: machine facts, timing, and writing `benchmarks/results/<name>.json`.

Each benchmark is `benchmarks/bench_<name>.py` with a `main(quick: bool = False) -> dict` that measures what
it compares side by side in one process (this machine is shared and noisy: ratios measured together are
what count), returns its result and writes it with `write_result`, which records `quick`. `quick=True` must
finish in seconds (tests run it); a plain `python -m benchmarks.bench_<name>` runs the full measurement.
`make bench` (benchmarks/run.py) runs every bench_*.py in its own process and rebuilds the README's results
table from the JSON files.

The headline figures go in the result as `"summary"`, a list of entries the README table shows one row each:

    "summary": [
        {"metric": "MAE-LM / MLM step time", "value": 0.62, "target": "< 1", "unit": "x"},
        {"metric": "loader tokens/s per rank", "value": 181000.0, "target": ">= 100000", "unit": "tokens/s"},
    ]

- metric (str): what is measured; a ratio names both sides, "A / B" reading as A divided by B.
- value (number): the figure measured in this run (finite).
- target (str): the goal as a comparison `<op> <number>` with op one of <, <=, >, >= (in the entry's unit);
  the table marks it met or not. "" (or a remark such as "context for the row above") for a figure that
  only informs: shown as written, never marked.
- unit (str): "x" for ratios, else e.g. "tokens/s", "MiB", "s", "%"; "" for a plain number.

Everything else in the result (raw timings, sizes, settings) stays in the JSON for whoever digs deeper. A
missing or malformed summary is reported by the runner, naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

from masktrain.data.files import write_atomic
from masktrain.launcher.machine import stamp

RESULTS = Path(__file__).parent / "results"
QUICK_RESULTS = Path(__file__).parent / "out" / "quick"
RESULTS_ENV = "MASKTRAIN_BENCH_RESULTS"
"""The runner's choice of results folder, passed to the benchmark processes it starts."""


def timings(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
            cpu_clock: Callable[[], float] = time.process_time) -> dict[str, dict[str, list[float]]]:
    """Seconds of `repeats` timed calls of each function, by wall clock and by `cpu_clock`:
    {"wall": {name: [...]}, "cpu": {name: [...]}}.

    Calls alternate between the functions so drift hits all alike, after `warmup` untimed calls of each. Every
    timed call also follows an untimed call of the same function, so the allocator's state (glibc keeps freed
    blocks and adapts its mmap threshold to recent sizes) is the function's own, not what the function before
    it left: without that, a model's step time moved by up to 20% with its neighbour in the order.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, dict[str, list[float]]] = {"wall": {name: [] for name in fns}, "cpu": {name: [] for name in fns}}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start_wall, start_cpu = time.perf_counter(), cpu_clock()
            fn()
            times["cpu"][name].append(cpu_clock() - start_cpu)
            times["wall"][name].append(time.perf_counter() - start_wall)
    return times


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds per call of each function, timed as `timings` does."""
    return medians(timings(fns, repeats, warmup)["wall"])


@contextlib.contextmanager
def rendezvous() -> Iterator[dict[str, str]]:
    """The environment for ranks this process starts on this host: it hosts their TCP store, on a port the kernel
    picks when the store binds, and every rank connects to it as a client, as under torchrun's agent. Picking a
    free port and handing the number to rank 0 instead races with any process that binds it in between."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def results_dir(quick: bool) -> Path:
    """The runner's folder, else the published one for full runs and out/quick for quick ones: a quick run
    started by hand (`python -m benchmarks.bench_engine --quick`) never replaces a published figure."""
    chosen = os.environ.get(RESULTS_ENV)
    return Path(chosen) if chosen else QUICK_RESULTS if quick else RESULTS


def write_result(name: str, result: dict, quick: bool) -> Path:
    folder = results_dir(quick)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"benchmark": name, **stamp(), "quick": quick, **result}
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    return path

"""`make bench` / `masktrain bench`: run every benchmarks/bench_*.py, then rebuild the README's results table.

Each benchmark runs in a fresh interpreter as `main(quick=...)`, so one that crashes, hangs or holds on to
memory cannot skew the next one's figures; its output goes to benchmarks/out/logs/<name>.log. A benchmark that
fails or times out gets a result file saying so in place of its previous one: the table always shows one run.
A runner stopped part-way (Ctrl-C) leaves the previous one.
Quick runs (for tests) write to benchmarks/out/quick/ and print the table instead of writing the README.
Run from the repository root (`masktrain bench` does that):

    python -m benchmarks.run                    # all, full size; README.md updated
    python -m benchmarks.run loader masking     # some
    python -m benchmarks.run --table-only       # only rebuild the README from the existing results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import RESULTS, RESULTS_ENV, stamp
from masktrain.data.files import write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def discover(folder: Path, names: list[str]) -> list[str]:
    """Benchmark names (bench_<name>.py) in `folder`, all or the ones asked for, sorted."""
    found = sorted(path.stem.removeprefix("bench_") for path in folder.glob("bench_*.py"))
    unknown = [name for name in names if name not in found]
    if unknown:
        raise SystemExit(f"no benchmark {', '.join(map(repr, unknown))} in {folder}; "
                         f"found: {', '.join(found) or 'none'}")
    return [name for name in found if not names or name in names]


def stop(process: subprocess.Popen) -> None:
    """Kill the benchmark with every process it started (multi-rank benchmarks launch their own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_one(folder: Path, name: str, quick: bool, results: Path, logs: Path,
            timeout: float) -> tuple[str | None, float]:
    """Run one benchmark: (None when it wrote its result, else what went wrong, also written as its result;
    the seconds it took)."""
    # The benchmark writes into a folder of its own: the published result stays until this run's replaces it,
    # even when the runner itself is stopped.
    staging = logs.parent / "running"
    staging.mkdir(exist_ok=True)
    written = staging / f"{name}.json"
    written.unlink(missing_ok=True)
    log = logs / f"{name}.log"
    code = f"from {folder.name}.bench_{name} import main; main(quick={quick})"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=folder.parent, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, RESULTS_ENV: str(staging)},
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            problem = f"exited with code {returncode}" if returncode else None
        except subprocess.TimeoutExpired:
            stop(process)
            problem = f"timed out after {timeout:.0f}s"
        except BaseException:
            stop(process)
            raise
    seconds = time.perf_counter() - started
    if problem is None and not written.is_file():
        problem = f"finished without writing {written.name}"
    run = {"quick": quick, "seconds": round(seconds, 1), "log": str(log), "command": sys.argv}
    if problem:
        payload = {"benchmark": name, **stamp(), "error": f"{problem} (log: {log.name})", "run": run}
    else:
        payload = {**json.loads(written.read_text()), "run": run}
    write_atomic(results / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    written.unlink(missing_ok=True)
    return problem, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masktrain bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (bench_<name>.py); default: all")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds each (what the tests run)")
    parser.add_argument("--table-only", action="store_true", help="run nothing; rebuild the README from the results")
    parser.add_argument("--dir", type=Path, default=HERE, help="folder holding the bench_*.py files")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"where results go (default {RESULTS.relative_to(ROOT)}; with --quick, out/quick "
                             "next to the benchmarks)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to update (default README.md; none with --quick)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one benchmark may run")
    args = parser.parse_args(argv)
    # Checked before anything is created: a mistyped path made its folder and reported "no results yet", exit 0.
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: no such folder")
    if args.table_only and args.results and not args.results.is_dir():
        parser.error(f"--results {args.results}: no such folder (--table-only reads results, it writes none)")
    if args.readme and not args.readme.is_file():
        parser.error(f"--readme {args.readme}: no such file")
    if not args.timeout > 0:
        parser.error(f"--timeout: must be > 0 seconds, got {args.timeout:g}")

    folder = args.dir.resolve()
    results = (args.results or (folder / "out" / "quick" if args.quick else RESULTS)).resolve()
    readme = args.readme or (None if args.quick else ROOT / "README.md")
    results.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.table_only:
        logs = folder / "out" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        names = discover(folder, args.names)
        print(f"bench: {len(names)} benchmark(s) in {folder}{' (quick)' if args.quick else ''}: {', '.join(names)}",
              flush=True)
        for name in names:
            problem, took = run_one(folder, name, args.quick, results, logs, args.timeout)
            print(f"bench: {name}: {'FAILED, ' + problem if problem else 'ok'} ({took:.0f}s; log {logs / name}.log)",
                  flush=True)
            if problem:
                failed.append(name)
    found = report.read_results(results)
    if readme is None:
        print(report.section(found, results, Path.cwd()), end="")
    else:
        report.update_readme(readme, report.section(found, results, readme.resolve().parent))
        print(f"bench: results section of {readme} rebuilt from {results}", flush=True)
    problems = [problem for result in found for problem in result.problems]
    for problem in problems:
        print(f"bench: {problem}", file=sys.stderr)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())

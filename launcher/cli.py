"""The `masktrain` command: a thin dispatcher; each subcommand's work lives in its own module.

Configs are loaded and validated here, in the launching process, so a bad config fails before any rank or
job is started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from masktrain.launcher.loading import ConfigError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file, or the name of a shipped config (e.g. smoke)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=40 data.masking.rate=0.3")


def cmd_train(args) -> int:
    from masktrain.launcher.launch import launch_local
    from masktrain.launcher.loading import load_config

    return launch_local(load_config(args.config, args.overrides))


def cmd_smoke(args) -> int:
    from masktrain.launcher.smoke import smoke

    return smoke(args.config, args.overrides, fresh_data=args.fresh)


def cmd_config_show(args) -> int:
    from masktrain.launcher.loading import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_data_prepare(args) -> int:
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    prepare(load_config(args.config, args.overrides))
    return 0


def cmd_export(args) -> int:
    from masktrain.trainer.export import export

    print(f"exported to {export(args.checkpoint, args.out_dir)}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    # Benchmarks are part of the source checkout, not of the installed package.
    checkouts = [Path.cwd(), Path(__file__).resolve().parent.parent]
    root = next((path for path in checkouts if (path / "benchmarks" / "run.py").is_file()), None)
    if root is None:
        print("masktrain bench: no benchmarks/run.py here or in the checkout masktrain is installed from; "
              "run it from the repository root", file=sys.stderr)
        return 2
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *args.rest],
                           env={**os.environ, "PYTHONPATH": path})


def cmd_repro(args) -> int:
    from masktrain.data.synthetic import RetrievalTask
    from masktrain.launcher import repro

    out = Path(args.out or f"runs/repro-{args.experiment}")
    results = Path(args.results) if args.results else out
    if args.experiment == "schedule":
        repro.schedule(args.overrides, out, results)
        return 0
    try:
        task = RetrievalTask(pairs=args.pairs, queries=args.queries, keys=args.keys, values=args.values)
        for flag, value in (("--documents", args.documents), ("--probe-examples", args.probe_examples)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
    except ValueError as err:
        print(f"masktrain repro meap: {err}", file=sys.stderr)
        return 2
    repro.meap(args.overrides, out, results, task, args.documents, args.probe_examples)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="masktrain", description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="validate a config and train (resumes from the run folder's checkpoint)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("smoke", help="the whole path on this machine: data, 2-rank train, resume, export")
    p.add_argument("config", nargs="?", default="smoke")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--fresh", action="store_true", help="rebuild the tokenizer and shards too")
    p.set_defaults(func=cmd_smoke)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="tokenizer and shards").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="build the tokenizer and shards a config reads")
    add_config_args(p)
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/smoke/checkpoints/step-00000060")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)

    # The runner parses its own options (masktrain bench --help shows them).
    p = sub.add_parser("bench", add_help=False, help="run benchmarks/bench_*.py and rebuild the README results table")
    p.set_defaults(func=cmd_bench, passes_through=True)

    repro = sub.add_parser("repro", help="toy-scale reproductions of the papers' claims, with a JSON report and a plot")
    experiments = repro.add_subparsers(dest="experiment", required=True)
    from masktrain.data.synthetic import RetrievalTask

    task = RetrievalTask()
    for name, text in (("meap", "NTP vs MEAP decoders: key-value retrieval accuracy by position of the key"),
                       ("schedule", "MLM with constant 15% vs linear 30%->15% masking: validation loss at 15%")):
        p = experiments.add_parser(name, help=text.replace("%", "%%"), description=text)
        p.add_argument("overrides", nargs="*", help=f"dotted overrides of configs/repro-{name}.yaml for both arms")
        p.add_argument("--out", help=f"run folders and data (default runs/repro-{name})")
        p.add_argument("--results", help=f"where repro-{name}.json and .png go (default: --out)")
        p.set_defaults(func=cmd_repro)
    meap = experiments.choices["meap"]
    meap.add_argument("--documents", type=int, default=20000, help="training documents to generate")
    meap.add_argument("--pairs", type=int, default=task.pairs, help="key-value pairs per context")
    meap.add_argument("--queries", type=int, default=task.queries, help="queries per training document")
    meap.add_argument("--keys", type=int, default=task.keys, help="distinct key words")
    meap.add_argument("--values", type=int, default=task.values, help="distinct value words")
    meap.add_argument("--probe-examples", type=int, default=100, help="probe contexts per position")
    return root


def main(argv: list[str] | None = None) -> None:
    root = parser()
    args, rest = root.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        root.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        code = args.func(args)
    except ConfigError as err:
        print(f"masktrain: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)

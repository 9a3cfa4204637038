"""The `masktrain` command: a thin dispatcher; each subcommand's work lives in its own module.

Configs are loaded and validated here, in the launching process, so a bad config fails before any rank or
job is started.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path

from masktrain.data.corpus import DataError, InputError
from masktrain.launcher.loading import ConfigError
from masktrain.launcher.run_lock import RunInUse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file, or the name of a shipped config (e.g. smoke)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=40 data.masking.rate=0.3")


def cmd_train(args) -> int:
    from masktrain.launcher.launch import (StopForwarding, StoppedBeforeStart, launch_local,
                                           stopped_before_start)
    from masktrain.launcher.loading import load_config

    with StopForwarding() as stop:  # before validation, which imports torch (seconds on a shared file system)
        try:
            cfg = load_config(args.config, args.overrides)
        except StoppedBeforeStart as err:
            return stopped_before_start(err)
        return launch_local(cfg, stop)


def cmd_smoke(args) -> int:
    from masktrain.launcher.smoke import smoke

    return smoke(args.config, args.overrides, fresh_data=args.fresh)


def cmd_status(args) -> int:
    from masktrain.launcher.overview import overview

    for index, run in enumerate(args.runs):  # each as it is read: a bad name further on hides none before it
        print(("\n" if index else "") + overview(run), flush=True)
    return 0


def cmd_config_show(args) -> int:
    from masktrain.launcher.loading import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_model_info(args) -> int:
    from masktrain.launcher.loading import load_config
    from masktrain.trainer.size import model_info

    print(model_info(load_config(args.config, args.overrides)))
    return 0


def cmd_data_prepare(args) -> int:
    from masktrain.data.prepare import prepare
    from masktrain.launcher.loading import load_config

    prepare(load_config(args.config, args.overrides))
    return 0


def cmd_data_importance(args) -> int:
    from masktrain.data.importance import build_for_config
    from masktrain.launcher.loading import load_config

    build_for_config(load_config(args.config, args.overrides))
    return 0


def cmd_data_collocations(args) -> int:
    from masktrain.data.collocations import build_for_config
    from masktrain.launcher.loading import load_config

    build_for_config(load_config(args.config, args.overrides))
    return 0


def cmd_data_verify(args) -> int:
    from masktrain.data.shards import MANIFEST, verify_shards

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"{args.dir}: no such folder")
    if not (Path(args.dir) / MANIFEST).is_file():
        raise FileNotFoundError(f"{args.dir}: no {MANIFEST}, so not a dataset folder of `masktrain data prepare` or "
                                "`data shards`")
    problems, totals = verify_shards(args.dir, args.workers)
    for problem in problems:
        print(problem)
    if totals["shards"] == 0:
        print(f"{Path(args.dir) / MANIFEST}: lists no shard")
        return 1
    hashed, count = totals["hashed"], totals["shards"]
    checked = ("size and sha256" if hashed == count else "size only: the manifest records no sha256 (written "
               "before manifests did)" if hashed == 0 else f"size, and sha256 for the {hashed} the manifest has one for")
    print(f"{args.dir}: {totals['shards'] - len(problems)} of {totals['shards']} shards as the manifest records "
          f"them ({checked}; {totals['bytes']:,} bytes)")
    return 1 if problems else 0


def prepare_settings(args) -> dict:
    """The `data.prepare` fields given as flags (dest `prepare.<field>`); absent ones keep their defaults."""
    return {dest.removeprefix("prepare."): value for dest, value in vars(args).items() if dest.startswith("prepare.")}


def cmd_data_tokenizer(args) -> int:
    from masktrain.data.prepare import build_tokenizer, command_config, refuse_output_in_inputs

    cfg = command_config({**prepare_settings(args), "inputs": args.inputs}, args.seed, args.strict)
    refuse_output_in_inputs(args.out, cfg.data.prepare.inputs)
    build_tokenizer(cfg.data.prepare, args.out, cfg.run.seed, args.strict, args.template)
    return 0


def cmd_data_shards(args) -> int:
    from masktrain.data.prepare import build_shards, command_config, refuse_output_in_inputs, shard_outputs

    cfg = command_config({**prepare_settings(args), "inputs": args.inputs}, args.seed, args.strict)
    refuse_output_in_inputs(args.out, cfg.data.prepare.inputs, shard_outputs(args.out))
    build_shards(cfg.data.prepare, args.tokenizer, args.out, cfg.run.seed, args.strict)
    return 0


def add_data_args(parser: argparse.ArgumentParser, *flags: tuple[str, type, str]) -> None:
    """Inputs, common options, and the `data.prepare` fields in `flags` as (field, type, help)."""
    parser.add_argument("inputs", nargs="+", help="text files (.txt, .md, ...), .gz, JSON lines (.jsonl), "
                        "directories, globs, or builtin:python-docs")
    parser.add_argument("--out", required=True, help="output folder")
    for name, kind, text in (("text_field", str, "field holding the text in JSON lines"),
                             ("max_docs", int, "stop after this many input documents (0: all)"),
                             ("workers", int, "threads that encode documents (0: one per core)"), *flags):
        parser.add_argument("--" + name.replace("_", "-"), dest=f"prepare.{name}", type=kind,
                            metavar=name.split("_")[-1].upper(), help=f"{text} (data.prepare.{name})")
    parser.add_argument("--seed", type=int, help="random seed (run.seed)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad input (undecodable text, empty document) instead of counting it")


def cmd_export(args) -> int:
    from masktrain.trainer.checkpoint import resolve_checkpoint
    from masktrain.trainer.export import export

    checkpoint = resolve_checkpoint(args.checkpoint)
    out_dir = export(checkpoint, args.out_dir)
    print(f"exported {checkpoint} to {out_dir} (how to load it: {out_dir / 'README.md'})")
    return 0


def cmd_eval(args) -> int:
    import json

    import torch

    from masktrain.data.files import write_atomic
    from masktrain.trainer.evaluation import (check_out, checkpoints_of, eval_changes, evaluate_checkpoint,
                                              split_items, summary)

    given, overrides = split_items(args.items + args.overrides)
    if not given:
        raise FileNotFoundError(f"no checkpoint or run folder given, only overrides ({' '.join(overrides)}); a "
                                "folder named like one is given as ./NAME")
    changes = eval_changes(overrides, "the command line")
    check_out(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for checkpoint in checkpoints_of(given, args.all):
        try:
            results.append(evaluate_checkpoint(checkpoint, changes, device))
        except FileNotFoundError:
            if not args.all or checkpoint.exists():
                raise
            # A run still training prunes its checkpoints (trainer.keep_last) while the others are scored.
            print(f"masktrain: {checkpoint} was removed while it was read (pruned): skipped", file=sys.stderr)
            continue
        print(summary(results[-1]), flush=True)
    if args.out:
        write_atomic(Path(args.out), json.dumps({"overrides": overrides, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")
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
    # -P: the working folder does not go first on the path, where another project's benchmarks/ would shadow ours.
    return subprocess.call([sys.executable, "-P", "-m", "benchmarks.run", *args.rest],
                           env={**os.environ, "PYTHONPATH": path})


TASK_SIZES = {"pairs": "key-value pairs per context", "queries": "queries per training document",
              "keys": "distinct key words", "values": "distinct value words"}


def at_least_one(text: str) -> int:
    """An argparse type for counts: a flag given 0 is refused before anything runs."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_repro(args) -> int:
    from masktrain.data.synthetic import RetrievalTask
    from masktrain.launcher import repro

    out = Path(args.out or f"runs/repro-{args.experiment}")
    results = Path(args.results) if args.results else out
    # Made now: a path that cannot be a folder fails here rather than after the runs, which take an hour.
    for flag, folder in (("--out", out), ("--results", results)):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{flag} {folder}: a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    if args.experiment == "schedule":
        repro.schedule(args.overrides, out, results)
        return 0
    if args.experiment == "mae-decoder":
        repro.mae_decoder(args.overrides, out, results, args.probe_batches, args.probe_epochs)
        return 0
    try:
        # Unset sizes keep RetrievalTask's defaults; building the parser does not import the task (numpy).
        sizes = {key: getattr(args, key) for key in TASK_SIZES if getattr(args, key) is not None}
        task = RetrievalTask(**sizes)
    except ValueError as err:
        print(f"masktrain repro meap: {err}", file=sys.stderr)
        return 2
    repro.meap(args.overrides, out, results, task, args.documents, args.probe_examples)
    return 0


def slurm_spec(args):
    from masktrain.launcher.slurm import JobSpec

    return JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
                   account=args.account, cpus_per_task=args.cpus_per_task, grace=args.signal_grace,
                   job_name=args.job_name, sbatch=args.sbatch, chain=getattr(args, "chain", 1))


def slurm_errors(action) -> int:
    """Run a `slurm` subcommand; what SLURM refuses is reported in a line, without a traceback."""
    from masktrain.launcher.slurm import SlurmError

    try:
        return action()
    except SlurmError as err:
        print(f"masktrain slurm: {err}", file=sys.stderr)
        return 1


def cmd_slurm_render(args) -> int:
    from masktrain.launcher import slurm

    def render() -> int:
        spec = slurm_spec(args)
        cfg = slurm.job_config(args.config, args.overrides, spec)
        text = slurm.render(cfg, spec)
        if args.out:
            print(f"wrote {slurm.write_script(cfg, text, args.out)}", file=sys.stderr)
        else:
            slurm.log_pattern(cfg).parent.mkdir(parents=True, exist_ok=True)  # SLURM opens the log before the script
            print(text, end="")
        return 0

    return slurm_errors(render)


def cmd_slurm_submit(args) -> int:
    from masktrain.launcher import slurm

    def submit() -> int:
        spec = slurm_spec(args)
        slurm.submit(slurm.job_config(args.config, args.overrides, spec), spec)
        return 0

    return slurm_errors(submit)


def cmd_slurm_node(args) -> int:
    from masktrain.launcher.slurm import node

    return slurm_errors(lambda: node(args.run_config))


def cmd_slurm_hold(args) -> int:
    from masktrain.launcher.run_lock import LOCK, hold
    from masktrain.launcher.slurm import SlurmError

    def take() -> int:
        lock = Path(args.run_dir) / LOCK
        try:
            held = os.fstat(args.fd)
        except OSError:
            raise SlurmError(f"--fd {args.fd} is not open: the job script opens {lock} on a descriptor and passes "
                             "its number") from None
        # A lock on any other file would refuse no second launch.
        if not (lock.is_file() and os.path.samestat(held, lock.stat())):
            raise SlurmError(f"--fd {args.fd} is not open on {lock}: the lock would refuse no other launch")
        hold(args.run_dir, fd=args.fd, pid=os.getppid(), job_script=True)
        return 0

    return slurm_errors(take)


def cmd_slurm_status(args) -> int:
    from masktrain.launcher.slurm import status

    print(status(args.run_dir, args.full))
    return 0


def add_job_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="ranks per node: GPUs, or CPU processes when launch.accelerator=cpu")
    parser.add_argument("--time", required=True, help="time limit, e.g. 4:00:00 or 2-00:00:00")
    parser.add_argument("--partition", required=True)
    parser.add_argument("--account", default="")
    parser.add_argument("--cpus-per-task", type=int, default=0,
                        help="CPUs per node (default: one per rank plus one per loader worker of each rank)")
    parser.add_argument("--signal-grace", type=int, default=180,
                        help="seconds before the time limit at which the ranks are told to checkpoint and stop")
    parser.add_argument("--job-name", default="", help="default: run.name")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, repeatable: --sbatch=--exclusive --sbatch=--mem=0")


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

    p = sub.add_parser("status", help="where runs stand: held by a launch or not, step, losses, speed, time left, "
                                      "checkpoints")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, e.g. runs/smoke")
    p.set_defaults(func=cmd_status)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    model = sub.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("info", help="parameter count and training state per rank, without building weights")
    add_config_args(p)
    p.set_defaults(func=cmd_model_info)

    data = sub.add_parser("data", help="tokenizer and shards").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="build the tokenizer and shards a config reads")
    add_config_args(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("importance", help="build the IDF table of the importance masking policy "
                                           "(default <data.dir>/idf.npy)")
    add_config_args(p)
    p.set_defaults(func=cmd_data_importance)
    p = data.add_parser("collocations", help="build the word-pair table of the pmi masking policy "
                                             "(default <data.dir>/collocations.npy)")
    add_config_args(p)
    p.set_defaults(func=cmd_data_collocations)

    p = data.add_parser("tokenizer", help="train a sentencepiece tokenizer (+ Hugging Face files) on text")
    add_data_args(p, ("vocab_size", int, "vocabulary size at most, special tokens included"),
                  ("tokenizer_type", str, "unigram or bpe"),
                  ("tokenizer_sample_docs", int, "train on a sample of this many documents"),
                  ("tokenizer_sample_chars", int, "and on at most this many characters (fewer documents when they "
                                                  "are long)"))
    p.add_argument("--template", choices=("encoder", "decoder"),
                   help="Hugging Face files add [CLS]/[SEP] (encoder) or <s> (decoder) around text")
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("shards", help="tokenize text into WebDataset shards with a manifest")
    add_data_args(p, ("shard_bytes", int, "target shard size in bytes"),
                  ("val_fraction", float, "fraction of documents held out for validation"),
                  ("shuffle_buffer", int, "documents shuffled together before writing (0: input order)"))
    p.add_argument("--tokenizer", required=True, help="folder of a tokenizer from `masktrain data tokenizer`")
    p.set_defaults(func=cmd_data_shards)
    p = data.add_parser("verify", help="check that a dataset folder's shards are those its manifest lists (after a "
                                       "copy to a cluster's file system, say): present, same size, same sha256")
    p.add_argument("dir", help="dataset folder (with manifest.json)")
    p.add_argument("--workers", type=int, default=4, help="files hashed at a time")
    p.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/smoke/checkpoints/step-00000060, or a run "
                                      "folder (its newest complete checkpoint)")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="validation loss (and accuracy or perplexity) of saved checkpoints, as training "
                                    "computes it, or on other data or masking")
    p.add_argument("items", nargs="+", metavar="CHECKPOINT|KEY=VALUE",
                   help="checkpoint folders or run folders (their newest complete checkpoint), and overrides of what "
                        "is scored: data.dir, data.val_shards, data.micro_batch_size, data.strict, data.masking.*, "
                        "trainer.eval_batches (e.g. data.masking.eval_rate=0.15)")
    p.add_argument("--all", action="store_true", help="every complete checkpoint of each run folder's current line, oldest first")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval, overrides=[])  # main adds overrides that follow the options

    # The runner parses its own options (masktrain bench --help shows them).
    p = sub.add_parser("bench", add_help=False, help="run benchmarks/bench_*.py and rebuild the README results table")
    p.set_defaults(func=cmd_bench, passes_through=True)

    repro = sub.add_parser("repro", help="toy-scale reproductions of the papers' claims, with a JSON report and a plot")
    experiments = repro.add_subparsers(dest="experiment", required=True)
    for name, text in (("meap", "NTP vs MEAP decoders: key-value retrieval accuracy by position of the key"),
                       ("schedule", "MLM with constant 15% vs linear 30%->15% masking: validation loss at 15%"),
                       ("mae-decoder", "MAE-LM decoders of full, half width and half depth: validation loss and a "
                                       "linear probe of the encoder")):
        p = experiments.add_parser(name, help=text.replace("%", "%%"), description=text)
        p.add_argument("overrides", nargs="*", help=f"dotted overrides of configs/repro-{name}.yaml for both arms")
        p.add_argument("--out", help=f"run folders and data (default runs/repro-{name})")
        p.add_argument("--results", help=f"where repro-{name}.json and .png go (default: --out)")
        p.set_defaults(func=cmd_repro)
    meap = experiments.choices["meap"]
    meap.add_argument("--documents", type=at_least_one, default=20000, help="training documents to generate")
    for key, text in TASK_SIZES.items():
        meap.add_argument(f"--{key}", type=int, help=f"{text} (default: the task's, see data/synthetic.py)")
    meap.add_argument("--probe-examples", type=at_least_one, default=100, help="probe contexts per position")
    mae = experiments.choices["mae-decoder"]
    mae.add_argument("--probe-batches", type=at_least_one, default=1000,
                     help="training-split micro-batches the encoder probe is fitted on (fewer if the split is shorter)")
    mae.add_argument("--probe-epochs", type=at_least_one, default=30, help="most epochs of the probe's fit")

    slurm = sub.add_parser("slurm", help="SLURM jobs: render and submit the sbatch script").add_subparsers(
        dest="slurm_command", required=True)
    p = slurm.add_parser("render", help="print (or --out: write) the job script for N nodes x G ranks")
    add_job_args(p)
    p.add_argument("--out", help="write the script here instead of printing it")
    p.set_defaults(func=cmd_slurm_render)
    p = slurm.add_parser("submit", help="render the job script and sbatch it; prints job ids and log files")
    add_job_args(p)
    p.add_argument("--chain", type=int, default=1,
                   help="submit K jobs, each starting when the one before ends, for runs longer than --time")
    p.set_defaults(func=cmd_slurm_submit)
    p = slurm.add_parser("node", help="(run by the job script on every node) start this node's ranks")
    p.add_argument("run_config", help="<run>/config.yaml")
    p.set_defaults(func=cmd_slurm_node)
    p = slurm.add_parser("hold", help="(run by the job script) lock the run folder for this job, or fail naming "
                                      "the launch that has it")
    p.add_argument("run_dir")
    p.add_argument("--fd", type=int, required=True, help="a descriptor of <run>/run.lock the script keeps open")
    p.set_defaults(func=cmd_slurm_hold)
    p = slurm.add_parser("status", help="(read by the job script) print the run's last state and step")
    p.add_argument("run_dir")
    # Job scripts rendered before --full read two fields, and a requeue runs the script it was submitted with.
    p.add_argument("--full", action="store_true", help="also the step its launch started from, and the reason")
    p.set_defaults(func=cmd_slurm_status)
    return root


def stdout_gone() -> bool:
    """Whether nothing reads stdout any more (`masktrain ... | head -1` once head has its line): the write end
    of a pipe whose reader has closed polls as an error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # no stdout, or one that is no file (replaced, closed)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def main(argv: list[str] | None = None) -> None:
    root = parser()
    args, extra = root.parse_known_args(argv)
    args.rest = extra
    # Overrides may also follow options (`slurm render smoke --nodes 2 trainer.max_steps=40`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra and not getattr(args, "passes_through", False):
        root.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that left is handled, rather than at exit ('Exception ignored')
    except BrokenPipeError:
        if not stdout_gone():  # another pipe (a child's): a real error
            raise
        # Python ignores SIGPIPE, which ends other commands quietly there: end as they do, with the shell's code for
        # it. What is still buffered goes to /dev/null, or the flush at exit would report the pipe again.
        from masktrain.trainer.rank import to_devnull

        to_devnull(sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except ConfigError as err:
        print(f"masktrain: {err}", file=sys.stderr)
        code = 2
    # Bad data (the message names the file and line or member), a missing input or a folder this user may not
    # write (the message has its path).
    except (InputError, DataError, RunInUse, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as err:
        print(f"masktrain: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # what a command writes appears whole or not at all: the folders are as they were
        print("masktrain: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def run() -> None:
    """The `masktrain` command: `main` in a process of its own, which then exits quickly."""
    from masktrain.trainer.rank import exit_quickly

    try:
        main()
    finally:
        exit_quickly()

"""`masktrain repro meap|schedule|mae-decoder`: toy-scale experiments trained through the real path: checks of
two papers' claims, and what MAE-LM's decoder trades cost the encoder.

Each experiment trains two or three arms from one shipped config (configs/repro-<name>.yaml) that differ in a
single setting, with the same seed, data and steps, each launched like `masktrain train` (2 CPU ranks, DeepSpeed).
It then measures what the paper's claim is about and writes `repro-<name>.json` (with a `summary` in the
benchmarks' convention, so the README table shows it) and `repro-<name>.png` into the results folder.

- meap: NTP vs MEAP decoders on a synthetic key-value retrieval corpus generated for the run; retrieval
  accuracy by position of the queried pair. MEAP (Zhuang et al. 2025, arXiv 2502.07490) claims better
  key-information retrieval and less lost-in-the-middle than NTP.
- schedule: MLM with constant 15% masking vs linear 30% -> 15% on the built-in corpus; validation
  masked-token loss at 15% masking. Ankner et al. 2023 (arXiv 2305.15096) report the decreasing schedule
  reaching a better model in the same number of steps.
- mae-decoder: MAE-LM with the config's decoder, one of half its width and one of half its depth (the kinds of
  trade that bring a step's FLOPs under issue 6's 0.70x of MLM: at full size, 4 layers of half width 0.695x, 1
  layer 0.66x); each arm's validation loss through its own decoder, and a linear probe of each exported encoder
  alone (trainer/encoder_probe.py).

The figures are reported as they come out; nothing here is tuned to agree with the papers.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from masktrain.data.files import write_atomic
from masktrain.data.synthetic import RetrievalTask, training_documents, write_corpus
from masktrain.launcher.launch import launch_local
from masktrain.launcher.loading import dump_yaml, load_config
from masktrain.launcher.machine import stamp
from masktrain.launcher.run_lock import start_afresh
from masktrain.launcher.smoke import series
from masktrain.trainer.checkpoint import Checkpointer


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    """What this arm changes in the experiment's config."""


MEAP_ARMS = (Arm("ntp", ("model.objective=ntp",)), Arm("meap", ("model.objective=meap",)))
SCHEDULE_ARMS = (Arm("constant 15%", ("data.masking.schedule=constant", "data.masking.rate=0.15")),
                 Arm("linear 30%->15%", ("data.masking.schedule=linear", "data.masking.rate=0.3",
                                         "data.masking.final_rate=0.15")))


def log(text: str) -> None:
    print(f"[repro] {text}", flush=True)


def folder_name(arm: Arm) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in arm.name).strip("-")


def train_arm(config: str, overrides: list[str], arm: Arm, out: Path) -> tuple[Path, dict]:
    """Train one arm from scratch in `out/<arm>`; returns (its final checkpoint, facts for the report)."""
    run_dir = out / folder_name(arm)
    cfg = load_config(config, [*overrides, *arm.overrides, f"run.output_dir={run_dir}"])
    start_afresh(run_dir)
    log(f"{arm.name}: {cfg.trainer.max_steps} steps, {cfg.world_size} ranks -> {run_dir}")
    started = time.perf_counter()
    code = launch_local(cfg)
    if code != 0:
        raise SystemExit(f"repro: the {arm.name} run exited with code {code}; its logs are in {run_dir}")
    seconds = time.perf_counter() - started
    losses = series(run_dir, "train/loss")
    facts = {"run_dir": str(run_dir), "seconds": round(seconds, 1), "steps": cfg.trainer.max_steps,
             "final_train_loss": losses[-1][1], "config_changes": list(arm.overrides)}
    return Checkpointer(run_dir, 1, False).latest(), facts


def write_report(results: Path, name: str, report: dict, draw) -> Path:
    """`repro-<name>.json` plus the PNG `draw(path)` makes, in `results`."""
    results.mkdir(parents=True, exist_ok=True)
    plot = draw(results / f"repro-{name}.png")
    payload = {"experiment": name, **stamp(), **report, "plot": plot.name}
    path = results / f"repro-{name}.json"
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    log(f"report: {path}\n[repro] plot:   {plot}")
    for row in payload["summary"]:
        log(f"  {row['metric']}: {row['value']:.4g} {row['unit']}  (paper: {row['target'] or '-'})")
    return path


def document_tokens(cfg, task: RetrievalTask, documents: int, seed: int) -> int:
    """The token count every training document has; an error when the tokenizer split some word."""
    from masktrain.data.inputs import tokenizer_dir
    from masktrain.data.tokenizer import Tokenizer

    texts = list(training_documents(task, documents, seed))
    lengths = {len(ids) for ids in Tokenizer(tokenizer_dir(cfg)).encode(texts)}
    if len(lengths) != 1:
        raise SystemExit(f"repro: documents tokenize to {min(lengths)} to {max(lengths)} tokens, so the tokenizer "
                         "split some keys or values into several pieces; raise data.prepare.vocab_size "
                         f"(now {cfg.data.prepare.vocab_size}) or use fewer --keys/--values")
    return lengths.pop()


def meap(overrides: list[str], out: Path, results: Path, task: RetrievalTask, documents: int,
         probe_examples: int) -> Path:
    from masktrain.data.prepare import prepare
    from masktrain.launcher.plots import retrieval_plot
    from masktrain.trainer.probe import scores_by_position

    started = time.perf_counter()
    data_dir, corpus = out / "data", out / "corpus.jsonl"
    overrides = [f"data.dir={data_dir}", f"data.prepare.inputs={json.dumps([str(corpus)])}", *overrides]
    cfg = load_config("repro-meap", overrides)
    seed = cfg.run.seed
    # Regenerated every time: the prepared-data check compares settings, not the corpus file's contents.
    shutil.rmtree(data_dir, ignore_errors=True)
    write_corpus(corpus, task, documents, seed)
    prepare(cfg, log=log)
    # One document per packed row: packing would put earlier documents, whose pairs bind the same keys to
    # other values, in front of a query. Every document has as many tokens as words, so rows of that length
    # plus <s> and </s> each hold exactly one.
    overrides.append(f"data.seq_len={document_tokens(cfg, task, documents, seed) + 2}")
    log(f"rows of one document each: {overrides[-1]}")

    arms = {}
    for arm in MEAP_ARMS:
        checkpoint, facts = train_arm("repro-meap", overrides, arm, out)
        scores = scores_by_position(checkpoint, task, probe_examples, seed)
        accuracy, copied = [s.retrieved for s in scores], [s.copied for s in scores]
        arms[arm.name] = {**facts, "accuracy_by_position": accuracy, "mean_accuracy": sum(accuracy) / len(accuracy),
                          "copied_by_position": copied, "mean_copied": sum(copied) / len(copied)}
        log(f"{arm.name}: retrieval accuracy by position {[round(100 * a) for a in accuracy]} %, "
            f"answered with some value of the context {[round(100 * c) for c in copied]} %")

    ntp, meap_arm = arms["ntp"], arms["meap"]
    # The middle half of the positions, where lost-in-the-middle shows.
    middle = slice(task.pairs // 4, task.pairs - task.pairs // 4)

    def middle_mean(arm: dict) -> float:
        values = arm["accuracy_by_position"][middle]
        return sum(values) / len(values)

    summary = [
        {"metric": "accuracy of answering any value of the context (no retrieval)", "value": 100 / task.pairs,
         "target": "", "unit": "%"},
        {"metric": "retrieval accuracy, NTP (all positions)", "value": 100 * ntp["mean_accuracy"],
         "target": "", "unit": "%"},
        {"metric": "retrieval accuracy, MEAP (all positions)", "value": 100 * meap_arm["mean_accuracy"],
         "target": "", "unit": "%"},
        {"metric": "answered with some value of the context (copying, bound or not), NTP",
         "value": 100 * ntp["mean_copied"], "target": "", "unit": "%"},
        {"metric": "answered with some value of the context (copying, bound or not), MEAP",
         "value": 100 * meap_arm["mean_copied"], "target": "", "unit": "%"},
        {"metric": "MEAP - NTP retrieval accuracy (all positions)",
         "value": 100 * (meap_arm["mean_accuracy"] - ntp["mean_accuracy"]), "target": "> 0", "unit": "points"},
        {"metric": "MEAP - NTP retrieval accuracy (middle half of positions)",
         "value": 100 * (middle_mean(meap_arm) - middle_mean(ntp)), "target": "> 0", "unit": "points"},
    ]
    report = {"task": asdict(task), "documents": documents, "probe_examples_per_position": probe_examples,
              "config": dump_yaml(load_config("repro-meap", overrides)), "arms": arms, "summary": summary,
              "seconds": round(time.perf_counter() - started, 1)}
    steps = ntp["steps"]
    title = (f"Key-value retrieval after {steps} steps: {task.pairs} pairs per context, "
             f"{probe_examples} probes per position")
    curves = {f"{name.upper()} (mean {100 * arm['mean_accuracy']:.1f}%)": arm["accuracy_by_position"]
              for name, arm in arms.items()}
    return write_report(results, "meap", report, lambda path: retrieval_plot(path, curves, 1 / task.pairs, title))


def schedule(overrides: list[str], out: Path, results: Path) -> Path:
    from masktrain.data.inputs import eval_rate
    from masktrain.data.prepare import prepare
    from masktrain.launcher.plots import loss_plot

    started = time.perf_counter()
    cfg = load_config("repro-schedule", overrides)
    prepare(cfg, log=log)
    rate = f"{100 * eval_rate(cfg):g}%"
    arms = {}
    for arm in SCHEDULE_ARMS:
        _, facts = train_arm("repro-schedule", overrides, arm, out)
        run_dir = Path(facts["run_dir"])
        val = series(run_dir, "val/loss")
        arms[arm.name] = {**facts, "val_loss": val, "final_val_loss": val[-1][1],
                          "mask_rate": series(run_dir, "train/mask_rate")}
        log(f"{arm.name}: validation loss at {rate} masking {val[-1][1]:.4f} after {val[-1][0]} steps")

    constant, linear = (arms[arm.name] for arm in SCHEDULE_ARMS)
    summary = [
        {"metric": f"MLM validation loss at {rate} masking, constant 15%", "value": constant["final_val_loss"],
         "target": "", "unit": "nats"},
        {"metric": f"MLM validation loss at {rate} masking, linear 30%->15%", "value": linear["final_val_loss"],
         "target": "", "unit": "nats"},
        {"metric": "linear - constant validation loss", "value": linear["final_val_loss"] - constant["final_val_loss"],
         "target": "< 0", "unit": "nats"},
    ]
    report = {"config": dump_yaml(cfg), "arms": arms, "summary": summary,
              "seconds": round(time.perf_counter() - started, 1)}
    title = f"MLM masking-rate schedules, {constant['steps']} steps, same seed and data"
    losses = {name: arm["val_loss"] for name, arm in arms.items()}
    rates = {name: arm["mask_rate"] for name, arm in arms.items()}
    return write_report(results, "schedule", report,
                        lambda path: loss_plot(path, losses, title, f"validation masked-token loss\n({rate} masking)",
                                               rates))


def decoder_arms(cfg) -> tuple[Arm, ...]:
    """The config's decoder, and the two trades that make an MAE-LM step cheaper: half its width, half its
    depth."""
    layers, (width, _, _) = cfg.model.decoder_layers, cfg.model.decoder_shape()
    if cfg.model.objective != "mae_lm":
        raise SystemExit(f"repro mae-decoder: model.objective must be mae_lm, got {cfg.model.objective!r}")
    if layers < 2:
        raise SystemExit(f"repro mae-decoder: model.decoder_layers must be at least 2 to halve it, got {layers}")
    shape = "reference shape" if width == cfg.model.hidden_size else "the config's"  # the reference's is full width
    return (Arm(f"{layers} layers x {width} ({shape})", ()),
            Arm(f"{layers} layers x {width // 2}", (f"model.decoder_hidden_size={width // 2}",)),
            Arm(f"{layers // 2} layers x {width}", (f"model.decoder_layers={layers // 2}",)))


def mae_decoder(overrides: list[str], out: Path, results: Path, probe_batches: int, probe_epochs: int) -> Path:
    from masktrain.data.inputs import eval_rate
    from masktrain.data.prepare import prepare
    from masktrain.launcher.plots import loss_plot
    from masktrain.trainer.encoder_probe import paired_stderr, probe_encoder

    started = time.perf_counter()
    cfg = load_config("repro-mae-decoder", overrides)
    arms_run = decoder_arms(cfg)
    # Every arm's config is checked before the first trains for minutes (a half width the heads do not divide).
    for arm in arms_run:
        load_config("repro-mae-decoder", [*overrides, *arm.overrides])
    prepare(cfg, log=log)
    arms, probes, blind = {}, {}, None
    for arm in arms_run:
        checkpoint, facts = train_arm("repro-mae-decoder", overrides, arm, out)
        run_dir = Path(facts["run_dir"])
        val = series(run_dir, "val/loss")
        probe, blind = probe_encoder(checkpoint, probe_batches, probe_epochs)
        probes[arm.name] = probe
        arms[arm.name] = {**facts, "val_loss": val, "final_val_loss": val[-1][1], "probe": probe.as_dict()}
        log(f"{arm.name}: validation loss {val[-1][1]:.4f} through its decoder; encoder probe accuracy "
            f"{100 * probe.accuracy:.2f}% (+-{100 * probe.accuracy_stderr:.2f}), loss {probe.loss:.4f}")

    rate = 100 * eval_rate(cfg)
    reference, *trades = arms_run
    summary = []
    for arm in arms_run:
        probe = probes[arm.name]
        summary += [
            {"metric": f"validation loss at {rate:g}% masking through its own decoder, decoder {arm.name}",
             "value": arms[arm.name]["final_val_loss"], "target": "", "unit": "nats"},
            {"metric": f"encoder probe loss (removed tokens, linear), decoder {arm.name}", "value": probe.loss,
             "target": "", "unit": "nats"},
            {"metric": f"encoder probe accuracy, decoder {arm.name}", "value": 100 * probe.accuracy, "target": "",
             "unit": "%"}]
    summary += [{"metric": "probe loss reading nothing (token frequencies)", "value": blind.loss, "target": "",
                 "unit": "nats"},
                {"metric": "probe accuracy reading nothing (token frequencies)", "value": 100 * blind.accuracy,
                 "target": "", "unit": "%"}]
    base = probes[reference.name]
    for arm in trades:
        trade = probes[arm.name]
        noise = {"loss": paired_stderr(trade.nll, base.nll), "accuracy": paired_stderr(trade.correct, base.correct)}
        arms[arm.name]["probe_difference_stderr"] = noise
        summary += [
            {"metric": f"encoder probe loss, decoder {arm.name} - {reference.name} (scoring noise "
                       f"+-{noise['loss']:.3f})", "value": trade.loss - base.loss, "target": "", "unit": "nats"},
            {"metric": f"encoder probe accuracy, decoder {arm.name} - {reference.name} (scoring noise "
                       f"+-{100 * noise['accuracy']:.2f})", "value": 100 * (trade.accuracy - base.accuracy),
             "target": "", "unit": "points"}]
    report = {"config": dump_yaml(cfg), "arms": arms, "probe_reading_nothing": blind.as_dict(),
              "probe_batches": probe_batches, "probe_epochs": probe_epochs, "summary": summary,
              "seconds": round(time.perf_counter() - started, 1)}
    title = (f"MAE-LM decoders, {cfg.model.num_layers}-layer encoder, {cfg.trainer.max_steps} steps at "
             f"{100 * cfg.data.masking.rate:g}% masking, one seed")
    losses = {f"{name} (probe {100 * arm['probe']['accuracy']:.1f}%)": arm["val_loss"] for name, arm in arms.items()}
    return write_report(results, "mae-decoder", report,
                        lambda path: loss_plot(path, losses, title,
                                               f"validation masked-token loss\n({rate:g}% masking, own decoder)"))

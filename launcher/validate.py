"""Every range and cross-field check of a run configuration, in one place.

Runs in the launching process before any rank is spawned, and again in each rank on the saved config.
Problems are collected, not raised one by one, so a user fixes everything in one round.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from masktrain.launcher.config import Config, MaskingConfig


def read_json_object(path: str) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), or (None, why it is not one): DeepSpeed reads it only inside the
    ranks."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, ValueError) as err:
        return None, f"not valid JSON ({err})"
    return (value, None) if isinstance(value, dict) else (None, f"expected a JSON object, got {type(value).__name__}")


BATCH_OWNERS = {"train_batch_size": "trainer.global_batch_size",
                "train_micro_batch_size_per_gpu": "data.micro_batch_size",
                "gradient_accumulation_steps": "the batch sizes"}
"""Which config keys set each of `Config.deepspeed_batch`, for messages."""


def deepspeed_json_problems(ds: dict, cfg: Config, batches_valid: bool) -> list[str]:
    """What in a user's DeepSpeed JSON contradicts the run config. DeepSpeed asserts the batch sizes in every
    rank after start-up (compared here only when `batches_valid`: the config's own are consistent); precision,
    optimizer and scheduler come from the config, and the JSON would silently train another recipe or clash
    with the optimizer the trainer hands DeepSpeed."""
    problems = []
    if batches_valid:
        for key, wanted in cfg.deepspeed_batch().items():
            if key in ds and ds[key] != wanted:
                problems.append(f"{key} is {ds[key]!r}, but {BATCH_OWNERS[key]} makes it {wanted}; remove it from "
                                "the file")
    clip = ds.get("gradient_clipping", 0.0)
    if clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf):
        # DeepSpeed's schema takes any value here, and the first step fails on it.
        problems.append(f"gradient_clipping must be a finite number >= 0, got {clip!r}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"{key} comes from optim.* (the trainer hands DeepSpeed its own); remove it from the file")
    # DeepSpeed's classes coerce a few forms the trainer reads as they are ("3", "false", `true` for the
    # section): the two would train different setups, so only the plain JSON types pass.
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"zero_optimization must be a mapping, e.g. {{\"stage\": 2}}, got {zero!r}")
    elif "stage" in zero and (type(zero["stage"]) is not int or zero["stage"] not in range(4)):
        problems.append(f"zero_optimization.stage must be the number 0, 1, 2 or 3, got {zero['stage']!r}")
    elif (isinstance(offload := zero.get("offload_optimizer"), dict) and offload.get("device") in ("cpu", "nvme")
          and ds.get("zero_force_ds_cpu_optimizer", True) is not False):
        problems.append("zero_optimization.offload_optimizer: DeepSpeed offloads the optimizer it prefers, its CPU "
                        "Adam, and refuses the AdamW the trainer hands it unless \"zero_force_ds_cpu_optimizer\" is "
                        "false; add that to the file to offload it")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False) not in (True, False, "auto"):
            problems.append(f"{key}.enabled must be true or false, got {ds[key]['enabled']!r}")
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") is True:
        problems.append("fp16.enabled: masktrain trains in fp32 or bf16 (trainer.precision); remove it from the file")
    if isinstance(ds.get("bf16"), dict) and isinstance(ds["bf16"].get("enabled"), bool):
        precision, enabled = cfg.trainer.precision, ds["bf16"]["enabled"]
        if precision == "auto":
            problems.append("bf16.enabled: trainer.precision auto chooses on each machine; set trainer.precision "
                            "instead")
        elif enabled != (precision == "bf16"):
            problems.append(f"bf16.enabled is {enabled!r}, but trainer.precision is {precision}; remove it from "
                            "the file")

    def placeholders(value, where: str) -> None:
        if value == "auto":
            problems.append(f"{where}: 'auto' is a Hugging Face Trainer placeholder, which DeepSpeed cannot read; "
                            "give a value or remove the key")
        elif isinstance(value, dict):
            for key, inner in value.items():
                placeholders(inner, f"{where}.{key}" if where else key)

    placeholders({key: value for key, value in ds.items() if key not in BATCH_OWNERS}, "")
    return problems


def validate(cfg: Config, policies: tuple[str, ...] = ("policy", "eval_policy")) -> list[str]:
    """Every problem with `cfg`, as 'key: what is wrong' lines (empty when valid). `policies`: the keys of
    data.masking whose policies will mask (export masks nothing): a policy of the researcher's own is imported."""
    from masktrain.data.batches import policy_function
    from masktrain.data.schedules import SCHEDULES
    from masktrain.data.tokenizer import MIN_VOCAB_SIZE
    from masktrain.trainer.lr import LR_SCHEDULES
    from masktrain.trainer.objectives import OBJECTIVES

    problems: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    def choice(value: str, key: str, valid) -> bool:
        check(value in valid, key, f"unknown value {value!r}; valid: {', '.join(str(v) for v in sorted(valid))}")
        return value in valid

    def positive(value, key: str) -> None:
        check(0 < value < math.inf, key, f"must be a finite number > 0, got {value!r}")

    def non_negative(value, key: str) -> None:
        check(0 <= value < math.inf, key, f"must be a finite number >= 0, got {value!r}")

    def fraction(value, key: str) -> None:
        check(value is None or 0.0 <= value <= 1.0, key, f"must be within [0, 1], got {value!r}")

    # run
    check(bool(cfg.run.name.strip()), "run.name", "must not be empty")
    # Sentencepiece takes the seed as a 32-bit unsigned integer, numpy's shuffles as a non-negative one.
    check(0 <= cfg.run.seed < 2**32, "run.seed", f"must be within [0, {2**32 - 1}], got {cfg.run.seed}")

    # data
    d = cfg.data
    positive(d.seq_len, "data.seq_len")
    check(d.seq_len >= 8, "data.seq_len", f"must be at least 8, got {d.seq_len}")
    positive(d.micro_batch_size, "data.micro_batch_size")
    non_negative(d.num_workers, "data.num_workers")
    positive(d.shuffle_block, "data.shuffle_block")
    for index, source in enumerate(d.mixture):
        key = f"data.mixture[{index}]"
        check(bool(source.dir or source.shards), key, "needs dir (a prepared dataset folder) or shards (shard URLs)")
        check(not (source.dir and source.shards), key, "has both dir and shards; keep one")
        check(not (source.val_shards and not source.shards), f"{key}.val_shards",
              "goes with shards; a folder's validation split is the one its manifest lists")
        # The name becomes a metric path (val/<name>/loss) and the log's label for the source.
        check(re.fullmatch(r"[\w.-]*", source.name) is not None, f"{key}.name",
              f"must be letters, digits, '.', '-' or '_', got {source.name!r}")
        check(0 < source.weight < math.inf, f"{key}.weight", f"must be a positive number, got {source.weight}")
    dirs = [str(Path(source.dir).resolve()) for source in d.mixture if source.dir]
    check(len(set(dirs)) == len(dirs), "data.mixture", "lists a folder twice; give it the sum of the weights")
    lists = [tuple(source.shards) for source in d.mixture if source.shards]
    check(len(set(lists)) == len(lists), "data.mixture", "lists the same shards twice; give them the sum of the weights")
    names = [source.name for source in d.mixture if source.name]
    check(len(set(names)) == len(names), "data.mixture", "gives two sources the same name")
    check(not (d.mixture and d.train_shards), "data.mixture",
          "and data.train_shards both say what to train on; keep one")
    p = d.prepare
    check(bool(p.inputs), "data.prepare.inputs", "needs at least one input")
    check(all(item.strip() for item in p.inputs), "data.prepare.inputs",
          f"holds an empty path (a shell variable that is not set?), got {p.inputs}")
    check(p.vocab_size >= MIN_VOCAB_SIZE, "data.prepare.vocab_size",
          f"must be at least {MIN_VOCAB_SIZE} (256 byte pieces and the special tokens), got {p.vocab_size}")
    choice(p.tokenizer_type, "data.prepare.tokenizer_type", ("unigram", "bpe"))
    positive(p.tokenizer_sample_docs, "data.prepare.tokenizer_sample_docs")
    positive(p.tokenizer_sample_chars, "data.prepare.tokenizer_sample_chars")
    check(p.shard_bytes >= 4096, "data.prepare.shard_bytes", f"must be at least 4096, got {p.shard_bytes}")
    check(0.0 <= p.val_fraction < 1.0, "data.prepare.val_fraction", f"must be within [0, 1), got {p.val_fraction}")
    non_negative(p.workers, "data.prepare.workers")
    non_negative(p.shuffle_buffer, "data.prepare.shuffle_buffer")
    non_negative(p.max_docs, "data.prepare.max_docs")

    m = d.masking
    for key in policies:
        if name := getattr(m, key):  # a policy of the researcher's own is imported here, before any process starts
            try:
                policy_function(name)
            except ValueError as err:
                check(False, f"data.masking.{key}", str(err))
    choice(m.schedule, "data.masking.schedule", SCHEDULES)
    for key in ("rate", "final_rate", "eval_rate", "mask_prob", "random_prob"):
        fraction(getattr(m, key), f"data.masking.{key}")
    check(m.mask_prob + m.random_prob <= 1.0 + 1e-9, "data.masking.mask_prob",
          f"mask_prob + random_prob must be <= 1 (the rest is kept), got {m.mask_prob} + {m.random_prob}")
    # Rate, final_rate and schedule replace the objective's three together, so one set alone (final_rate=0.1,
    # or schedule=cosine) left the other two at the class defaults: a constant rate, without a word.
    moves = m.final_rate is not None and m.final_rate != m.rate
    if m.schedule == "constant":
        check(not moves, "data.masking.final_rate",
              f"the constant schedule keeps data.masking.rate ({m.rate}) throughout, never {m.final_rate}; set "
              "data.masking.schedule (linear, cosine or step) for a rate that moves")
    elif m.schedule in SCHEDULES:  # equal ends set on purpose (a sweep's point) are taken
        check(m.final_rate is not None, "data.masking.final_rate",
              f"the {m.schedule} schedule moves from data.masking.rate ({m.rate}) to final_rate, which is unset: "
              "it would never move; set final_rate, or schedule constant")
    non_negative(m.schedule_steps, "data.masking.schedule_steps")
    non_negative(m.warmup_steps, "data.masking.warmup_steps")
    positive(m.step_count, "data.masking.step_count")
    check(m.schedule != "step" or m.step_count >= 2, "data.masking.step_count",
          f"the step schedule needs at least 2 plateaus (one at rate, one at final_rate), got {m.step_count}")
    check(m.span_max >= 1, "data.masking.span_max", f"must be >= 1, got {m.span_max}")
    check(1.0 <= m.span_mean <= max(m.span_max, 1), "data.masking.span_mean",
          f"must be within [1, span_max ({m.span_max})], got {m.span_mean}")
    check(not m.share_across_batch or m.policy == "random" and m.eval_policy in ("", "random"),
          "data.masking.share_across_batch", f"one pattern for the whole batch only works with policy random "
          f"(whole words and spans differ per row), got policy {m.policy!r}, eval_policy {m.eval_policy!r}")
    non_negative(m.importance_power, "data.masking.importance_power")
    positive(m.collocation_min_count, "data.masking.collocation_min_count")
    positive(m.collocation_pairs, "data.masking.collocation_pairs")

    # model
    mo = cfg.model
    if choice(mo.objective, "model.objective", OBJECTIVES):
        objective = OBJECTIVES[mo.objective]
        choice(mo.arch, "model.arch", objective.archs)
        if objective.masked:
            # Schedules move monotonically from rate to final_rate: both ends > 0 keep every step > 0, and a
            # step with nothing masked has no loss at all.
            for key in ("rate", "final_rate", "eval_rate"):
                value = getattr(m, key)
                check(value is None or value > 0, f"data.masking.{key}",
                      f"objective {mo.objective} needs a masking rate > 0, got {value}")
        if mo.objective == "mae_lm":
            check(m.mask_prob > 0, "data.masking.mask_prob",
                  "mae_lm removes the tokens chosen for [MASK] from the encoder input; with 0 none are removed")
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "decoder_layers"):
        positive(getattr(mo, key), f"model.{key}")
    for key in ("num_kv_heads", "decoder_hidden_size", "decoder_intermediate_size", "decoder_num_heads"):
        non_negative(getattr(mo, key), f"model.{key}")
    if mo.num_heads > 0:
        check(mo.hidden_size % mo.num_heads == 0, "model.hidden_size",
              f"must be divisible by model.num_heads ({mo.num_heads}), got {mo.hidden_size}")
        if mo.objective == "mae_lm" and 0 < mo.num_heads <= mo.hidden_size:
            width, feed_forward, heads = mo.decoder_shape()
            check(mo.decoder_intermediate_size or feed_forward > 0, "model.decoder_intermediate_size",
                  f"the decoder's feed-forward size resolves to {feed_forward}; set it > 0")
            check(heads > 0, "model.decoder_hidden_size",
                  f"the decoder's width {width} is narrower than one of the encoder's heads "
                  f"({mo.hidden_size // mo.num_heads}); set model.decoder_num_heads")
            check(heads == 0 or width % heads == 0,
                  "model.decoder_num_heads" if mo.decoder_num_heads else "model.decoder_hidden_size",
                  f"the decoder's width {width} must be divisible by its {heads} heads "
                  f"(model.decoder_num_heads; 0 keeps the encoder's head size, {mo.hidden_size // mo.num_heads})")
        # Rotary embeddings turn pairs of a head's dimensions.
        check(mo.arch != "llama" or (mo.hidden_size // mo.num_heads) % 2 == 0, "model.num_heads",
              f"llama needs an even head size (model.hidden_size / model.num_heads), got {mo.hidden_size} / "
              f"{mo.num_heads}")
        if mo.num_kv_heads:
            check(mo.num_heads % mo.num_kv_heads == 0, "model.num_kv_heads",
                  f"must divide model.num_heads ({mo.num_heads}), got {mo.num_kv_heads}")
    non_negative(mo.max_position_embeddings, "model.max_position_embeddings")
    if mo.max_position_embeddings:
        check(mo.max_position_embeddings >= d.seq_len, "model.max_position_embeddings",
              f"must be >= data.seq_len ({d.seq_len}), got {mo.max_position_embeddings}")
    check(0.0 <= mo.dropout < 1.0, "model.dropout", f"must be within [0, 1), got {mo.dropout}")
    positive(mo.init_std, "model.init_std")
    non_negative(mo.residual_init_std, "model.residual_init_std")
    non_negative(mo.norm_eps, "model.norm_eps")

    # optim
    o = cfg.optim
    positive(o.lr, "optim.lr")
    choice(o.schedule, "optim.schedule", LR_SCHEDULES)
    non_negative(o.warmup_steps, "optim.warmup_steps")
    fraction(o.min_lr_ratio, "optim.min_lr_ratio")
    positive(o.cycles, "optim.cycles")
    check(0.0 < o.damping <= 1.0, "optim.damping", f"must be within (0, 1], got {o.damping}")
    check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", f"must be within (0, 1], got {o.decay_fraction}")
    non_negative(o.weight_decay, "optim.weight_decay")
    check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas",
          f"must be two values within [0, 1), got {o.betas}")
    positive(o.eps, "optim.eps")
    non_negative(o.grad_clip, "optim.grad_clip")

    # trainer
    t = cfg.trainer
    positive(t.max_steps, "trainer.max_steps")
    positive(t.global_batch_size, "trainer.global_batch_size")
    choice(t.zero_stage, "trainer.zero_stage", (0, 1, 2, 3))
    choice(t.precision, "trainer.precision", ("auto", "fp32", "bf16"))
    for key in ("checkpoint_every", "keep_every", "eval_every", "eval_batches", "stop_after_steps"):
        non_negative(getattr(t, key), f"trainer.{key}")
    positive(t.keep_last, "trainer.keep_last")
    positive(t.log_every, "trainer.log_every")
    positive(t.max_bad_steps, "trainer.max_bad_steps")
    non_negative(t.peak_tflops, "trainer.peak_tflops")
    non_negative(t.checkpoint_minutes, "trainer.checkpoint_minutes")
    if t.profile_steps:
        from masktrain.trainer.profiling import MAX_WINDOW

        first, last = (t.profile_steps * 2)[:2]
        check(len(t.profile_steps) == 2 and 1 <= first <= last <= t.max_steps and last - first < MAX_WINDOW,
              "trainer.profile_steps", f"must be [first, last] with 1 <= first <= last <= trainer.max_steps "
              f"({t.max_steps}), at most {MAX_WINDOW} steps (a window is held in memory), got {t.profile_steps}")
    if t.resume not in ("auto", "never"):
        from masktrain.trainer.checkpoint import is_complete, taken_rollback

        check(is_complete(Path(t.resume)) or taken_rollback(t.resume, cfg.output_dir), "trainer.resume",
              f"must be auto, never or a complete checkpoint folder (with meta.json), got {t.resume!r}")
    deepspeed_json = None
    if t.deepspeed_config:
        deepspeed_json, error = read_json_object(t.deepspeed_config)
        check(error is None, "trainer.deepspeed_config", f"{t.deepspeed_config}: {error}")

    # launch and the batch arithmetic that ties data, trainer and launch together
    la = cfg.launch
    positive(la.nproc_per_node, "launch.nproc_per_node")
    positive(la.nnodes, "launch.nnodes")
    choice(la.accelerator, "launch.accelerator", ("auto", "cpu", "cuda"))
    check(la.master_port == 0 or 1024 <= la.master_port < 65536, "launch.master_port",
          f"must be 0 or a port within [1024, 65535], got {la.master_port}")
    positive(la.shutdown_timeout, "launch.shutdown_timeout")
    positive(la.collective_timeout, "launch.collective_timeout")
    non_negative(la.threads_per_rank, "launch.threads_per_rank")
    if d.micro_batch_size > 0 and la.nproc_per_node > 0 and la.nnodes > 0:
        per_step = d.micro_batch_size * cfg.world_size
        check(t.global_batch_size % per_step == 0, "trainer.global_batch_size",
              f"{t.global_batch_size} is not a multiple of data.micro_batch_size ({d.micro_batch_size}) x world "
              f"size ({cfg.world_size} = {la.nnodes} nodes x {la.nproc_per_node}); try "
              f"{max(per_step, round(t.global_batch_size / per_step) * per_step)}")

    if deepspeed_json is not None:
        # The JSON is checked whatever else is wrong, so that one round fixes both; only the checks that need
        # the keys the run's DeepSpeed config is made of wait for those.
        invalid = {problem.partition(":")[0] for problem in problems}
        batches_valid = not invalid & {"data.micro_batch_size", "trainer.global_batch_size", "launch.nproc_per_node",
                                       "launch.nnodes"}
        json_problems = deepspeed_json_problems(deepspeed_json, cfg, batches_valid)
        for problem in json_problems:
            check(False, "trainer.deepspeed_config", f"{t.deepspeed_config}: {problem}")
        if batches_valid and not json_problems and not invalid & {"trainer.zero_stage", "optim.grad_clip"}:
            refusal = deepspeed_refusal(cfg)
            check(refusal is None, "trainer.deepspeed_config", f"{t.deepspeed_config}: DeepSpeed refuses it: {refusal}")
    return problems


# Options that one selection policy alone reads. (The table paths are not here: `masktrain data importance`
# and `data collocations` write them whatever the run's policy.)
POLICY_OPTIONS = {"span": ("span_mean", "span_max"), "importance": ("importance_power",)}


def inert_policy_options(cfg: Config, masking: dict) -> list[str]:
    """Policy options that `masking` (the data.masking the user wrote: YAML with overrides) sets to other than
    their defaults while neither the training nor the evaluation policy reads them: `span_mean: 5` under policy
    random trained random masking without a word. Defaults pass, as in a full config (`config show`, a run
    folder's config.yaml) used as a file. An objective that masks nothing (NTP) is let be: it reads no masking
    option, and a MEAP config switched to NTP by model.objective is the baseline run as it is."""
    from masktrain.trainer.objectives import OBJECTIVES

    objective = OBJECTIVES.get(cfg.model.objective)  # an unknown one: `validate` says so
    if objective is not None and not objective.masked:
        return []
    from masktrain.data.masking import POLICIES

    m, default = cfg.data.masking, MaskingConfig()
    used = {m.policy, m.eval_policy or m.policy}
    if used - POLICIES.keys():  # a policy of the researcher's own may read any option
        return []
    return [f"data.masking.{key}: {getattr(m, key)}, but only the {policy} policy reads it, and data.masking.policy "
            f"is {m.policy}{f' (eval_policy {m.eval_policy})' if m.eval_policy else ''}; set policy or eval_policy "
            f"to {policy}, or drop the option"
            for policy, keys in POLICY_OPTIONS.items() if policy not in used
            for key in keys if key in masking and getattr(m, key) != getattr(default, key)]


def schedule_notes(cfg: Config) -> list[str]:
    """Schedules that do not finish within trainer.max_steps, for the log. Not errors: a short trial of a
    full-size recipe (bert-base with trainer.max_steps=40) runs as asked, but a run that never reaches its peak
    LR or its final masking rate should say so at start, not leave it to be read off the curves a week later."""
    from masktrain.data.schedules import rate_schedule
    from masktrain.trainer.lr import lr_at

    notes = []
    last, o, m = cfg.trainer.max_steps - 1, cfg.optim, cfg.data.masking
    if o.warmup_steps > cfg.trainer.max_steps:
        notes.append(f"optim.warmup_steps ({o.warmup_steps}) > trainer.max_steps ({cfg.trainer.max_steps}): the "
                     f"learning rate ends its warmup at {lr_at(last, o, cfg.trainer.max_steps):.3g}, never reaching "
                     f"optim.lr ({o.lr:g}), and never decays")
    if m.schedule != "constant" and m.final_rate is not None and m.final_rate != m.rate:
        rates = rate_schedule(m, cfg.trainer.max_steps)
        if rates.warmup >= cfg.trainer.max_steps:
            notes.append(f"data.masking.warmup_steps ({m.warmup_steps}) >= trainer.max_steps "
                         f"({cfg.trainer.max_steps}): the masking rate stays at {m.rate} and never moves to "
                         f"final_rate ({m.final_rate})")
        elif rates.warmup + rates.steps > cfg.trainer.max_steps:
            notes.append(f"data.masking.warmup_steps + schedule_steps ({m.warmup_steps} + {m.schedule_steps}) > "
                         f"trainer.max_steps ({cfg.trainer.max_steps}): the masking rate ends at {rates(last):.3g}, "
                         f"never reaching final_rate ({m.final_rate})")
    return notes


def deepspeed_refusal(cfg: Config) -> str | None:
    """What DeepSpeed's own config classes refuse in the run's DeepSpeed config (the preset, the run's settings
    and the user's JSON, merged as the ranks merge them), or None. Without this check they would raise it in
    every rank after start-up. Imports DeepSpeed: only runs for a user's JSON."""
    import logging

    from pydantic import ValidationError

    from masktrain.trainer.engine import deepspeed_config

    ds = deepspeed_config(cfg, "fp32")
    del ds["train_batch_size"]  # here DeepSpeed sees one rank; the batch sizes were compared with the config's
    # DeepSpeed logs the accelerator it finds as it is imported and the world size it sees: beside the point here.
    logging.disable(logging.WARNING)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig  # its own failures are not the JSON's

        try:
            DeepSpeedConfig(ds)
        except ValidationError as err:
            return "; ".join(f"{err.title}: {'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}"
                             for e in err.errors())
        except Exception as err:  # DeepSpeedConfigError is a plain Exception; malformed sections raise anything
            return f"{type(err).__name__}: {err}"
    finally:
        logging.disable(logging.NOTSET)
    return None
